// 07_kv_quant, step 2: the fast kernel. Step 1 (kernel_dequant.cu) is 05's kernel reading 1-byte
// codes; on a GPU whose bandwidth outruns its instruction rate (the H200) it is bound by what it
// does per byte, not by the bytes. This step changes how the work is laid out, not what is computed:
//   - two KV heads per block (heads_per_block): a key's row of one head is D bytes, 128 at
//     d = 128, and the next KV head's row of the same key follows it in the cache; a thread group
//     of 16 lanes reads both, 256 contiguous bytes, 8 lanes per head, each lane keeping the
//     (m, l, O) of its own head. The block's query heads are those at the same place in each KV
//     head's GQA group;
//   - 256 threads per block for 1-byte codes (threads_per_block): a 1-byte block streams its keys
//     twice as fast, so what it pays once (first loads, merge, its share of 04's combine) weighs
//     twice as much; twice the threads halve the blocks and the splits;
//   - int8 K codes are never converted: q becomes 24-bit fixed point (a step of 2^-23 of its
//     largest element, about fp32's) and q . k runs on the integer pipe, three dp4a (4-way byte
//     dot products) per 4 codes, in place of 16 conversions and 16 FMAs;
//   - a per-tensor or per-KV-head scale is folded into q (K) and into the final O (V), nothing per
//     key; per-key scales keep their fp16 bits in registers until they are used;
//   - addresses: a 1-byte key is half the bytes, so its address arithmetic weighs twice as much per
//     byte: contiguous caches step pointers (adds only), paged ones find the page with a shift and
//     a mask.
// Cost: the diff against step 1 is all five at once, not one idea. FP8 and int8 V still take about
// one conversion instruction per element. Per-key fp16 scales add bytes (at d = 128: int8_head 2
// per token and head over 128 of codes, int8_group64 4, int8_group32 8), so the best speedup over
// fp16 is below 2x for them. What each change was measured to buy: docs/NOTES-07.md. The fp16
// variant is this kernel with 8 elements per thread and 128 threads: the baseline of the speedups.
//
// clang-format off
//   grid: (num_splits, heads_q / 2, batch)   block: 256 threads = 16 thread groups of 2 x 8 (1-byte codes, d = 128)
//
//   keys of one split, U = 4 per thread group per step:   step 0: keys 0..63    step 1: keys 64..127 ...
//                     group:  0  1 ... 15  0  1 ... 15 ...       (key = step base + 16 u + group)
//   one key, one thread group:  lane c of 8 per head loads codes k[16c .. 16c+15], v[16c .. 16c+15]
//                        of its head (16 bytes each; the group's 16 lanes read 256 contiguous bytes)
//                        (and, per-key scales, the scale of its token/head/scale group: 2 bytes each)
//                        s = sum_c q[16c..] . k[16c..] (x scale): int8 12 dp4a, other codes 16 floats
//                        and 16 FMAs; then 3 shuffles
//                        m, l, O[16c .. 16c+15] of the thread group and head: online softmax, O += (p scale_v) v
//   end: per head, 16 thread groups' (m, l, O) -> one (m, l, O) in shared memory -> O (x static V scale) or a partial
// clang-format on
#include <cmath>
#include <type_traits>

#include "07_kv_quant/dequant.cuh"
#include "07_kv_quant/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch07 {

namespace {

// Keys per thread group in flight: 4 x (16 + 16) bytes per thread as in 05 (bench/tune07.cu: others).
constexpr int kU = 4;

// How a scheme's scales are applied (what it stores per element: dequant.cuh).
enum class ScaleAt { none, fixed, per_key };  // fixed: one per tensor, or per KV head

template <KvScheme S>
constexpr ScaleAt scale_at() {
  if constexpr (S == KvScheme::int8_tensor || S == KvScheme::fp8_e4m3_head)
    return ScaleAt::fixed;
  else if constexpr (S == KvScheme::int8_token || S == KvScheme::int8_head || S == KvScheme::int8_group)
    return ScaleAt::per_key;
  else
    return ScaleAt::none;
}

// Threads per block: 128 for fp16 (05's block), 256 for 1-byte codes. A 1-byte block streams half
// the bytes per key of an fp16 block, so at the same split count it is over twice as fast: what a
// block pays once (its first loads, its merge, its partial's share of 04's combine) weighs twice as
// much. Twice the threads keep the bytes in flight per SM and halve the blocks and the splits
// (512 was measured too: docs/NOTES-07.md).
template <KvScheme S>
constexpr int threads_per_block() {
  return code_of<S>() == Code::fp16 ? 128 : 256;
}

// Heads per block. A key's row of one head is D x 1 byte: 128 bytes at d = 128, one L2 line, and
// the same key's row of the next KV head sits right after it. Short rows stream slower than 256-byte
// ones (docs/NOTES-07.md), so a block takes the KV heads side by side until a key's rows make 256
// bytes: 2 heads at d = 128 and 4 at d = 64 for 1-byte codes; fp16 at d >= 128 stays at 1. Its
// query heads are those of each KV head at the same place in their GQA group.
constexpr int kSegmentBytes = 256;
template <KvScheme S, int D>
constexpr int heads_per_block() {
  constexpr int row = D * (code_of<S>() == Code::fp16 ? 2 : 1);
  return row >= kSegmentBytes ? 1 : kSegmentBytes / row;
}

template <KvScheme S, int D, int HPB, int T = threads_per_block<S>(), int U = kU>
struct ThreadGroups {
  static constexpr int BYTES = code_of<S>() == Code::fp16 ? 2 : 1;  // per stored element
  static constexpr int E = 16 / BYTES;                              // elements per thread: one 16-byte load
  static constexpr int TPK = D / E;                                 // threads per key and head
  static constexpr int LANES = HPB * TPK;                           // threads per key (its HPB heads)
  static_assert(LANES <= 32, "a key's heads must fit in a warp");
  static constexpr int THREADS = T;
  static constexpr int COUNT = THREADS / LANES;  // thread groups per block
  static constexpr int KEYS_PER_STEP = COUNT * U;
};

// 16 bytes of a streamed K/V row: read once, so do not allocate it in L1.
__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

// sum_i a.byte[i] * b.byte[i] + c, a's bytes unsigned and b's signed.
__device__ __forceinline__ int dp4a_u8_s8(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Blocks per SM the compiler must allow (__launch_bounds__' second argument), so that registers
// do not decide occupancy by accident. fp16: 7 (8, at 64 registers as 05, spills the stepped
// pointers). 1-byte codes hold 16 elements of q and of O per thread: 2 blocks of 256 threads (up
// to 128 registers, 64 KB of K/V in flight per SM), no spill. Other choices: docs/NOTES-07.md.
template <KvScheme S, int THREADS = threads_per_block<S>()>  // other sizes (tune07): same threads per SM
constexpr int min_blocks_per_sm() {
  return (code_of<S>() == Code::fp16 ? 7 : 2) * threads_per_block<S>() / THREADS;
}

template <KvScheme S, int SCALE_GROUP, int D, int HPB, int THREADS = threads_per_block<S>(), int U = kU,
          class Epilogue = void>  // bench/tune07.cu's candidates only (void: none)
__global__ void __launch_bounds__(THREADS, min_blocks_per_sm<S, THREADS>())
    decode_split(const lab::AttnParams p, int splits, float* o_partial, float* lse_partial) {
  using Gr = ThreadGroups<S, D, HPB, THREADS, U>;
  constexpr int E = Gr::E, TPK = Gr::TPK, GROUPS = Gr::COUNT, STEP = Gr::KEYS_PER_STEP;
  constexpr Code C = code_of<S>();
  constexpr ScaleAt SA = scale_at<S>();
  __shared__ float red_m[GROUPS * HPB], red_l[GROUPS * HPB], row_ml[HPB][2];
  __shared__ __align__(16) float part_o[GROUPS][HPB * D];

  // This block: query heads (kv0 + i) gqa_ratio + r for i < HPB, reading KV heads kv0 .. kv0 + HPB - 1.
  const int gqa_ratio = p.heads_q / p.heads_kv, kv0 = blockIdx.y / gqa_ratio * HPB,
            r = blockIdx.y % gqa_ratio;
  const int split = blockIdx.x, b = blockIdx.z;
  const int group = threadIdx.x / Gr::LANES, hb = threadIdx.x % Gr::LANES / TPK;  // thread group, head
  const int c = threadIdx.x % TPK;  // this thread: elements E c .. E c + E-1 of the block's head hb
  const int h_kv = kv0 + hb, h = h_kv * gqa_ratio + r;
  int sk = p.cache_seqlens ? p.cache_seqlens[b] : p.seqlen_kv;
  bool bad_table = sk < 0 || sk > p.seqlen_kv;
  sk = bad_table ? 0 : sk;

  // This split's keys: whole steps, so every step but the last is full.
  const int chunk = ((sk + splits - 1) / splits + STEP - 1) / STEP * STEP;
  const int k_begin = min(sk, split * chunk), k_end = min(sk, k_begin + chunk);

  // q, pre-scaled so that scores come out in the exp2 domain: s = (q . k) * scale * log2(e); a
  // fixed K scale joins the same multiply, and a fixed V scale multiplies O once at the end.
  float q[E];
  // A fixed V scale (per tensor or per KV head) multiplies O once, at the end.
  auto v_fixed_of = [&](int head_kv) {
    if constexpr (SA == ScaleAt::fixed)
      return scale_value(p.kv_quant.v_scale[S == KvScheme::int8_tensor ? 0 : head_kv]);
    else
      return 1.f;
  };
  {
    const __half* Q = static_cast<const __half*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + E * c;
#pragma unroll
    for (int i = 0; i < E / 8; ++i) decode<Code::fp16>(*reinterpret_cast<const uint4*>(Q + 8 * i), q + 8 * i);
    float qs = p.softmax_scale * float(M_LOG2E);
    if constexpr (SA == ScaleAt::fixed) {
      const int at = S == KvScheme::int8_tensor ? 0 : h_kv;
      qs *= scale_value(p.kv_quant.k_scale[at]);  // fp16 scales (quantize.h)
    }
#pragma unroll
    for (int e = 0; e < E; ++e) q[e] *= qs;
  }
  // int8 codes: q . k on the integer pipe, with no conversion of k. q (already scaled) becomes
  // 24-bit fixed point over this thread's E elements, q = q_step (65536 hi + 256 mid + lo), hi a
  // signed byte, mid and lo unsigned ones: a step of 2^-23 of the largest element, about fp32's.
  // Then q . k = q_step (65536 sum hi k + (256 sum mid k + sum lo k)): three dp4a per 4 codes,
  // two int32 sums that cannot overflow (|sum hi k| <= 2^18, the other < 2^27), two I2F.
  constexpr bool kIntDot = C == Code::int8;
  static_assert(!kIntDot || E == 16, "the dp4a path below takes a thread's codes as 4 words");
  uint32_t q_hi[E / 4], q_mid[E / 4], q_lo[E / 4];
  float q_step = 0.f;
  if constexpr (kIntDot) {
    float amax = 0.f;
    bool finite = true;
#pragma unroll
    for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(q[e])), finite = finite && isfinite(q[e]);
    q_step = finite ? amax / 8388607.f : NAN;  // non-finite q: NaN scores, a NaN row (common/attn.h)
#pragma unroll
    for (int w = 0; w < E / 4; ++w) {
      q_hi[w] = q_mid[w] = q_lo[w] = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // |q| / amax <= 1, so no overflow even for a subnormal amax; 0 for an all-zero or bad q.
        const float x = finite && amax > 0.f ? q[4 * w + i] / amax : 0.f;
        const int v = __float2int_rn(x * 8388607.f);  // -(2^23 - 1) .. 2^23 - 1
        q_hi[w] |= uint32_t(v >> 16 & 0xFF) << 8 * i;
        q_mid[w] |= uint32_t(v >> 8 & 0xFF) << 8 * i;
        q_lo[w] |= uint32_t(v & 0xFF) << 8 * i;
      }
    }
  }
  // Where key j's rows are. Contiguous caches: this thread's pointers step through its sequence,
  // no multiply in the loop. Paged: the page is looked up per key (page_size is a power of two:
  // a shift and a mask). With 1-byte codes a key is half the bytes of 05's, so the address
  // arithmetic per key weighs twice as much per byte: it is kept to a few adds.
  const bool paged = p.block_table != nullptr;
  const int page_shift = paged ? __ffs(p.page_size) - 1 : 0, page_mask = paged ? p.page_size - 1 : 0;
  const int* table = paged ? p.block_table + int64_t(b) * p.max_pages_per_seq : nullptr;
  const int64_t k_slot = p.k_batch_stride * Gr::BYTES, k_row = p.k_row_stride * Gr::BYTES;
  const int64_t v_slot = p.v_batch_stride * Gr::BYTES, v_row = p.v_row_stride * Gr::BYTES;
  const uint8_t* K = static_cast<const uint8_t*>(p.k) + (int64_t(h_kv) * p.k_head_stride + E * c) * Gr::BYTES;
  const uint8_t* V = static_cast<const uint8_t*>(p.v) + (int64_t(h_kv) * p.v_head_stride + E * c) * Gr::BYTES;
  // Per-key scales: the thread's scale for (slot, row) is at scales[slot * s_slot + row * s_row]
  // (the layouts of common/attn.h, with this thread's head and channel folded into the base).
  const uint16_t *KS = p.kv_quant.k_scale, *VS = p.kv_quant.v_scale;  // fp16 bits
  int64_t s_slot = 0, s_row = 0;
  if constexpr (SA == ScaleAt::per_key) {
    const int rows = paged ? p.page_size : p.seqlen_kv;
    const int64_t at = scale_index(S, SCALE_GROUP, 0, 0, h_kv, E * c, rows, p.heads_kv, D);
    KS += at, VS += at;
    s_row = scale_index(S, SCALE_GROUP, 0, 1, 0, 0, rows, p.heads_kv, D);
    s_slot = scale_index(S, SCALE_GROUP, 1, 0, 0, 0, rows, p.heads_kv, D);
  }
  if (!paged) KS += b * s_slot, VS += b * s_slot;  // a contiguous cache's slot is the sequence
  const int first = k_begin + group;                // this thread's first key
  const uint8_t* k_next = K + (paged ? 0 : b * k_slot + first * k_row);
  const uint8_t* v_next = V + (paged ? 0 : b * v_slot + first * v_row);

  float m = -INFINITY, l = 0.f, acc[E] = {};
  for (int base = k_begin; base < k_end; base += STEP) {
    // Issue all loads before using any: U keys of K and V (and their scales) in flight per thread.
    uint4 kraw[U], vraw[U];
    uint16_t k_sbits[U], v_sbits[U];  // fp16 scales, converted where they are used, not here
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * GROUPS + group;
      kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
      k_sbits[u] = v_sbits[u] = 0;
      if (key < k_end) {
        const uint8_t *k_at = k_next + u * GROUPS * k_row, *v_at = v_next + u * GROUPS * v_row;
        const uint16_t *ks_at = KS + key * s_row, *vs_at = VS + key * s_row;
        if (paged) {
          int64_t page = table[key >> page_shift];
          const int row = key & page_mask;
          if (page < 0 || page >= p.num_pages) bad_table = true, page = 0;  // never read outside
          k_at = K + page * k_slot + row * k_row, v_at = V + page * v_slot + row * v_row;
          ks_at = KS + page * s_slot + row * s_row, vs_at = VS + page * s_slot + row * s_row;
        }
        kraw[u] = load_stream(k_at);
        vraw[u] = load_stream(v_at);
        if constexpr (SA == ScaleAt::per_key) {
          // The thread group's lanes read the same 2 bytes (one request), neighbouring keys
          // neighbouring scales: these go through L1, unlike the codes. Converting them to float
          // here, inside the branch, would wait for each load before the next key's loads issue.
          k_sbits[u] = __ldg(ks_at);
          v_sbits[u] = __ldg(vs_at);
        }
      }
    }
    k_next += STEP * k_row, v_next += STEP * v_row;
    // Scores: 12 dp4a (int8) or E FMAs per thread (scaled once), then a butterfly over the TPK lanes.
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float dot = 0.f;
      if constexpr (kIntDot) {
        const int kw[4] = {int(kraw[u].x), int(kraw[u].y), int(kraw[u].z), int(kraw[u].w)};
        int hi = 0, low = 0;
#pragma unroll
        for (int w = 0; w < 4; ++w) hi = __dp4a(int(q_hi[w]), kw[w], hi);
#pragma unroll
        for (int w = 0; w < 4; ++w) low = dp4a_u8_s8(q_mid[w], kw[w], low);
        low *= 256;
#pragma unroll
        for (int w = 0; w < 4; ++w) low = dp4a_u8_s8(q_lo[w], kw[w], low);
        dot = fmaf(float(hi), 65536.f, float(low)) * q_step;
      } else {
        float k[E];
        decode<C>(kraw[u], k);
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(q[e], k[e], dot);
      }
      if constexpr (SA == ScaleAt::per_key) dot *= scale_value(k_sbits[u]);
#pragma unroll
      for (int off = TPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      s[u] = base + u * GROUPS + group < k_end ? dot : -INFINITY;
    }
    // Online softmax over these U keys, then O += (p scale_v) v.
    float m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, s[u]);
    if (m_new == -INFINITY) {
      // No key of this thread group in this step (the last one): skip it. fmaxf drops NaN, so
      // scores that are all NaN land here too: they make the row NaN (common/attn.h), through
      // p = 2^(NaN - m) below, with m finite from here on.
      bool nan = false;
#pragma unroll
      for (int u = 0; u < U; ++u) nan = nan || isnan(s[u]);
      if (!nan) continue;
      m_new = 0.f;
    }
    const float alpha = exp2_approx(m - m_new);
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float pu = exp2_approx(s[u] - m);
      l += pu;
      const float w = SA == ScaleAt::per_key ? pu * scale_value(v_sbits[u]) : pu;
      float v[E];
      decode<C>(vraw[u], v);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(w, v[e], acc[e]);
    }
  }

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // 04's combine may start launching
#endif
  // Merge the thread groups (04's warp merge): m = max_g m_g, l = sum_g l_g 2^(m_g - m), O likewise.
  if (c == 0) red_m[group * HPB + hb] = m, red_l[group * HPB + hb] = l;
  __syncthreads();
  if (threadIdx.x < HPB) {
    const int hf = threadIdx.x;
    float mm = -INFINITY, ll = 0.f;
    for (int gi = 0; gi < GROUPS; ++gi) mm = fmaxf(mm, red_m[gi * HPB + hf]);
    if (mm != -INFINITY)
      for (int gi = 0; gi < GROUPS; ++gi) ll += red_l[gi * HPB + hf] * exp2_approx(red_m[gi * HPB + hf] - mm);
    row_ml[hf][0] = mm, row_ml[hf][1] = ll;
  }
  __syncthreads();
  const float f = row_ml[hb][0] == -INFINITY ? 0.f : exp2_approx(m - row_ml[hb][0]);
#pragma unroll
  for (int i = 0; i < E / 4; ++i)
    reinterpret_cast<float4*>(&part_o[group][hb * D + E * c])[i] =
        make_float4(acc[4 * i] * f, acc[4 * i + 1] * f, acc[4 * i + 2] * f, acc[4 * i + 3] * f);
  bad_table = __syncthreads_or(bad_table);  // also the barrier before part_o is read

  for (int e = threadIdx.x; e < HPB * D; e += Gr::THREADS) {
    const int hf = e / D, h_out = (kv0 + hf) * gqa_ratio + r;
    const int64_t part_row = (int64_t(split) * p.batch + b) * p.heads_q + h_out;  // seqlen_q = 1
    float sum = 0.f;
#pragma unroll
    for (int gi = 0; gi < GROUPS; ++gi) sum += part_o[gi][e];
    const float l_sum = row_ml[hf][1];
    // l = 0: no visible key (O = 0, lse = -inf); l = NaN: a NaN score (O and lse NaN).
    const float inv_l = bad_table ? NAN : (l_sum != 0.f ? v_fixed_of(kv0 + hf) / l_sum : 0.f);
    __half* O = static_cast<__half*>(p.o) + b * p.o_batch_stride + h_out * p.o_head_stride;
    if (splits == 1)
      O[e % D] = __float2half_rn(sum * inv_l);
    else
      o_partial[part_row * D + e % D] = sum * inv_l;
  }
  if (threadIdx.x < HPB) {
    // Natural-log LSE from the exp2-domain max and sum: (m + log2 l) ln 2.
    const int hf = threadIdx.x, h_out = (kv0 + hf) * gqa_ratio + r;
    const float l_sum = row_ml[hf][1];
    const float lse =
        bad_table ? NAN : (l_sum != 0.f ? (row_ml[hf][0] + log2f(l_sum)) * float(M_LN2) : -INFINITY);
    if (splits > 1)
      lse_partial[(int64_t(split) * p.batch + b) * p.heads_q + h_out] = lse;
    else if (p.lse)
      p.lse[int64_t(b) * p.heads_q + h_out] = lse;
  }
  if constexpr (!std::is_void_v<Epilogue>)
    Epilogue::template run<HPB, D, THREADS>(p, splits, o_partial, lse_partial, b, kv0, gqa_ratio, r);
}

// One instantiation per (scheme, scale group size, head_dim, heads per block): its split count
// for p on this device, and, with run, its launch (and 04's combine).
template <KvScheme S, int SCALE_GROUP, int D, int HPB, int THREADS = threads_per_block<S>(), int U = kU>
int launch(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  constexpr int threads = THREADS;
  const auto kernel = decode_split<S, SCALE_GROUP, D, HPB, THREADS, U>;
  const int sms = lab::device_limits().sm_count;
  // Static shared memory only, under the 48 KB every GPU gives a block without opting in.
  using Gr = ThreadGroups<S, D, HPB, THREADS, U>;
  static_assert((Gr::COUNT * HPB * (2 + D) + 2 * HPB) * sizeof(float) <= 48 * 1024,
                "decode_split's static shared memory must fit every GPU's 48 KB");
  const int resident =
      lab::configure_kernel(reinterpret_cast<const void*>(kernel), threads, 0, kSupport.chapter);
  // 05's rule over the blocks' (batch, head pair) items: aim for 512 threads per SM (4 fp16
  // blocks, 2 of 1-byte codes), chunks of at least 4 steps (at d = 128, 128 keys of one fp16
  // head, 256 keys of two 1-byte heads) ...
  const int64_t items = int64_t(p.batch) * p.heads_q / HPB;
  int splits = ch04::choose_num_splits(p.num_splits, items, p.seqlen_kv,
                                       4 * Gr::KEYS_PER_STEP, 512 / threads * sms);
  // ... but no more blocks than fit on the GPU at once, when one wave can hold them all: the blocks
  // of a second, partial wave would stream their chunks with few loads in flight beside them.
  if (p.num_splits == 0) {
    const int64_t wave = int64_t(resident) * sms;
    if (items * splits > wave && items <= wave) splits = int(std::max<int64_t>(1, wave / items));
  }
  if (!run) return splits;
  const ch04::Partials part = ch04::partials_in_workspace(p, splits, kSupport.chapter);
  kernel<<<dim3(splits, p.heads_q / HPB, p.batch), threads, 0, stream>>>(p, splits, part.o, part.lse);
  LAB_LAUNCH_CHECK();
  if (splits > 1) ch04::combine_splits(p, splits, part.o, part.lse, stream);
  return splits;
}

// Heads per block: heads_per_block<S, D>() when the KV heads split evenly into such runs, else 1.
template <KvScheme S, int SCALE_GROUP>
int launch_by_head_dim(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  constexpr int H64 = heads_per_block<S, 64>(), H128 = heads_per_block<S, 128>(),
                H256 = heads_per_block<S, 256>();
  switch (p.head_dim) {
    case 64:
      return p.heads_kv % H64 == 0 ? launch<S, SCALE_GROUP, 64, H64>(p, stream, run)
                                   : launch<S, SCALE_GROUP, 64, 1>(p, stream, run);
    case 128:
      return p.heads_kv % H128 == 0 ? launch<S, SCALE_GROUP, 128, H128>(p, stream, run)
                                    : launch<S, SCALE_GROUP, 128, 1>(p, stream, run);
    default:
      return p.heads_kv % H256 == 0 ? launch<S, SCALE_GROUP, 256, H256>(p, stream, run)
                                    : launch<S, SCALE_GROUP, 256, 1>(p, stream, run);
  }
}

// The scheme dispatcher: p's scheme (and scale group size) picks the instantiation; run = false
// only returns the split count.
int dispatch(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  check_launch(p);
  switch (p.kv_quant.scheme) {
    case KvScheme::int8_tensor:
      return launch_by_head_dim<KvScheme::int8_tensor, 0>(p, stream, run);
    case KvScheme::int8_token:
      return launch_by_head_dim<KvScheme::int8_token, 0>(p, stream, run);
    case KvScheme::int8_head:
      return launch_by_head_dim<KvScheme::int8_head, 0>(p, stream, run);
    case KvScheme::int8_group:
      if (p.kv_quant.group_size == 32) return launch_by_head_dim<KvScheme::int8_group, 32>(p, stream, run);
      return launch_by_head_dim<KvScheme::int8_group, 64>(p, stream, run);
    case KvScheme::fp8_e4m3:
      return launch_by_head_dim<KvScheme::fp8_e4m3, 0>(p, stream, run);
    case KvScheme::fp8_e5m2:
      return launch_by_head_dim<KvScheme::fp8_e5m2, 0>(p, stream, run);
    case KvScheme::fp8_e4m3_head:
      return launch_by_head_dim<KvScheme::fp8_e4m3_head, 0>(p, stream, run);
    default:
      return launch_by_head_dim<KvScheme::none, 0>(p, stream, run);
  }
}

}  // namespace

int num_splits_for(const lab::AttnParams& p) { return dispatch(p, 0, false); }

size_t workspace_bytes(const lab::AttnParams& p) { return ch04::partials_bytes(p, num_splits_for(p)); }

void forward(const lab::AttnParams& p, cudaStream_t stream) { dispatch(p, stream, true); }

}  // namespace ch07
