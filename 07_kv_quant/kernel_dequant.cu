// 07_kv_quant, step 1: 05's decoding kernel reading an int8 or FP8 KV cache, dequantized in registers.
//
// Decoding reads every byte of K and V once per step and does about one FLOP per byte: halve the
// bytes and, if nothing else becomes the limit, the step takes half the time. This is 05's kernel
// with 1-byte codes in place of fp16 values (dequant.cuh has the conversions):
//   - a 16-byte load now holds E = 16 codes, so a thread owns 16 of a key's d elements and a
//     thread group is D/16 threads (8 at d = 128); U = 4 keys per thread group in flight as in 05;
//   - the codes become fp32 right after the load, before q . k_j and O += p_j v_j;
//   - the scale is read at its granularity (common/kv_quant.h): per tensor, per KV head, per token,
//     per token and head, or per token, head and scale group of 32/64 channels (a thread's 16
//     channels lie in one scale group). Per key, it multiplies the thread's part of q . k_j before
//     the shuffle reduction (K) and p_j before O += p_j v_j (V). Direct FP8 has no scale.
// Cost: every code is converted (about one instruction per element more than fp16, with twice the
// elements per byte), every key reads its scales, and a key's row of one head is 128 bytes at
// d = 128, half of 05's. Step 2 (kernel.cu) removes these costs one by one.
//
// clang-format off
//   grid: (num_splits, heads_q, batch)        block: 128 threads = 16 thread groups of 8 (1-byte codes, d = 128)
//
//   keys of one split, U = 4 per thread group per step:   step 0: keys 0..63    step 1: keys 64..127 ...
//                     group:  0  1  2 ... 15  0  1 ... 15  0 ...   (key = step base + 16 u + group)
//   one key, one group:    lane c of 8 loads codes k[16c .. 16c+15], v[16c .. 16c+15]   (16 bytes each)
//                          and the key's K and V scales for channels 16c .. 16c+15
//                          s = sum_c (q[16c..] . k[16c..]) scale_k   (16 FMAs, then 3 shuffles)
//                          m, l, O[16c .. 16c+15] of the group, online softmax, O += (p scale_v) v
//   end: 16 thread groups' (m, l, O) -> one (m, l, O) in shared memory -> O or a split's partial
// clang-format on
#include <cmath>

#include "07_kv_quant/dequant.cuh"
#include "07_kv_quant/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch07 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "07_kv_quant";
  s.head_dims = {64, 128, 256};
  s.causal = true;  // with one query row, bottom-right causal sees every key
  s.gqa = true;
  s.lse = true;
  s.cache_seqlens = true;
  s.paged_kv = true;
  s.splits = true;
  s.max_splits = ch04::kMaxSplits;
  s.max_seqlen_q = 1;
  s.vector_elems = 8;  // 16-byte loads: 8 fp16 elements of Q/O, 16 one-byte codes of K/V
  s.kv_schemes = {KvScheme::int8_tensor, KvScheme::int8_token, KvScheme::int8_head,    KvScheme::int8_group,
                  KvScheme::fp8_e4m3,    KvScheme::fp8_e5m2,   KvScheme::fp8_e4m3_head};
  s.kv_group_sizes = {32, 64};
  return s;
}();

void check_launch(const lab::AttnParams& p) {
  ch04::check_split_kv_launch(p, kSupport);
  // Keys are counted in int: a split's range, rounded up to whole steps, stays below INT_MAX.
  if (p.seqlen_kv > kMaxSeqlenKv)
    throw lab::InvalidArgument(std::string(kSupport.chapter) +
                               ": seqlen_kv = " + std::to_string(p.seqlen_kv) + " is above the " +
                               std::to_string(kMaxSeqlenKv) + " keys the kernels count in int");
}

namespace {

constexpr int kThreads = 128;
// Keys per thread group in flight: 4 x (16 + 16) bytes per thread, as in 05.
constexpr int kU = 4;
template <KvScheme S, int D, int U> struct Groups {
  static constexpr int E = 16 / code_bytes_of<S>();      // elements per thread: one 16-byte load
  static constexpr int TPK = D / E;                      // threads per key
  static constexpr int COUNT = kThreads / TPK;           // thread groups per block
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

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <KvScheme S, int SCALE_GROUP, int D, int U>
__global__ void __launch_bounds__(kThreads) decode_split(const lab::AttnParams p, int splits,
                                                         float* o_partial, float* lse_partial) {
  using G = Groups<S, D, U>;
  using Elem = std::conditional_t<code_of<S>() == Code::fp16, __half, uint8_t>;  // what the cache stores
  constexpr int E = G::E, TPK = G::TPK, GROUPS = G::COUNT, STEP = G::KEYS_PER_STEP;
  constexpr bool kScaled = has_scales<S>();
  __shared__ float red_m[GROUPS], red_l[GROUPS], row_ml[2];
  __shared__ __align__(16) float part_o[GROUPS][D];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int group = threadIdx.x / TPK, c = threadIdx.x % TPK;  // this thread: elements E c .. E c + E-1
  int sk = p.cache_seqlens ? p.cache_seqlens[b] : p.seqlen_kv;
  bool bad_table = sk < 0 || sk > p.seqlen_kv;
  sk = bad_table ? 0 : sk;

  // This split's keys: whole steps, so every step but the last is full.
  const int chunk = ((sk + splits - 1) / splits + STEP - 1) / STEP * STEP;
  const int k_begin = min(sk, split * chunk), k_end = min(sk, k_begin + chunk);

  // q, pre-scaled so that scores come out in the exp2 domain: s = (q . k) * scale * log2(e).
  float q[E];
  {
    const __half* Q = static_cast<const __half*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
#pragma unroll
    for (int i = 0; i < E / 8; ++i)
      decode<Code::fp16>(*reinterpret_cast<const uint4*>(Q + E * c + 8 * i), q + 8 * i);
    const float scale_log2 = p.softmax_scale * float(M_LOG2E);
#pragma unroll
    for (int e = 0; e < E; ++e) q[e] *= scale_log2;
  }
  const Elem* K = static_cast<const Elem*>(p.k) + h_kv * p.k_head_stride + E * c;
  const Elem* V = static_cast<const Elem*>(p.v) + h_kv * p.v_head_stride + E * c;
  const int scale_rows = p.block_table ? p.page_size : p.seqlen_kv;  // rows per slot (common/kv_quant.h)

  float m = -INFINITY, l = 0.f, acc[E] = {};
  for (int base = k_begin; base < k_end; base += STEP) {
    // Issue all 2U loads before using any: U keys of K and V (and their scales) in flight per thread.
    uint4 kraw[U], vraw[U];
    float k_scale[U], v_scale[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * GROUPS + group;
      kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
      k_scale[u] = v_scale[u] = 1.f;
      if (key < k_end) {
        int64_t page = b, row = key;
        if (p.block_table) {
          page = p.block_table[int64_t(b) * p.max_pages_per_seq + key / p.page_size];
          row = key % p.page_size;
          if (page < 0 || page >= p.num_pages) bad_table = true, page = 0;  // never read outside
        }
        kraw[u] = load_stream(K + page * p.k_batch_stride + row * p.k_row_stride);
        vraw[u] = load_stream(V + page * p.v_batch_stride + row * p.v_row_stride);
        if constexpr (kScaled) {
          // LAB-BEGIN(scale-lookup): this key's K and V scales for this thread's E channels
          const int64_t at =
              scale_index(S, SCALE_GROUP, page, int(row), h_kv, E * c, scale_rows, p.heads_kv, D);
          k_scale[u] = scale_value(p.kv_quant.k_scale[at]);
          v_scale[u] = scale_value(p.kv_quant.v_scale[at]);
          // LAB-END(scale-lookup)
        }
      }
    }
    // Scores: E FMAs per thread on the converted codes, the key's K scale, then a butterfly over
    // the thread group's TPK lanes (all get the sum).
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // LAB-BEGIN(dequant-qk): k_j's codes to floats in registers; this thread's q . k_j times its K scale
      // LAB-STUB: float dot = 0.f;
      float k[E];
      decode<code_of<S>()>(kraw[u], k);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot = fmaf(q[e], k[e], dot);
      dot *= k_scale[u];
      // LAB-END(dequant-qk)
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
      // LAB-BEGIN(dequant-pv): l += p_j; v_j's E codes to floats in registers; O += (p_j scale_v) v_j
      float v[E];
      decode<code_of<S>()>(vraw[u], v);
      l += pu;
      const float w = pu * v_scale[u];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(w, v[e], acc[e]);
      // LAB-END(dequant-pv)
    }
  }

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // 04's combine may start launching
#endif
  // Merge the thread groups (04's warp merge): m = max_g m_g, l = sum_g l_g 2^(m_g - m), O likewise.
  if (c == 0) red_m[group] = m, red_l[group] = l;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mm = -INFINITY, ll = 0.f;
    for (int gi = 0; gi < GROUPS; ++gi) mm = fmaxf(mm, red_m[gi]);
    if (mm != -INFINITY)
      for (int gi = 0; gi < GROUPS; ++gi) ll += red_l[gi] * exp2_approx(red_m[gi] - mm);
    row_ml[0] = mm, row_ml[1] = ll;
  }
  __syncthreads();
  const float f = row_ml[0] == -INFINITY ? 0.f : exp2_approx(m - row_ml[0]);
#pragma unroll
  for (int i = 0; i < E / 4; ++i)
    reinterpret_cast<float4*>(&part_o[group][E * c])[i] =
        make_float4(acc[4 * i] * f, acc[4 * i + 1] * f, acc[4 * i + 2] * f, acc[4 * i + 3] * f);
  bad_table = __syncthreads_or(bad_table);  // also the barrier before part_o is read

  // l = 0: no visible key (O = 0, lse = -inf); l = NaN: a NaN score (O and lse NaN).
  const float l_sum = row_ml[1], inv_l = bad_table ? NAN : (l_sum != 0.f ? 1.f / l_sum : 0.f);
  const int64_t part_row = (int64_t(split) * p.batch + b) * p.heads_q + h;  // seqlen_q = 1
  __half* O = static_cast<__half*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  for (int e = threadIdx.x; e < D; e += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int gi = 0; gi < GROUPS; ++gi) sum += part_o[gi][e];
    if (splits == 1) {
      O[e] = __float2half_rn(sum * inv_l);
    } else {
      o_partial[part_row * D + e] = sum * inv_l;
    }
  }
  if (threadIdx.x == 0) {
    // Natural-log LSE from the exp2-domain max and sum: (m + log2 l) ln 2.
    const float lse = bad_table ? NAN : (l_sum != 0.f ? (row_ml[0] + log2f(l_sum)) * float(M_LN2) : -INFINITY);
    if (splits > 1) lse_partial[part_row] = lse;
    else if (p.lse) p.lse[int64_t(b) * p.heads_q + h] = lse;
  }
}

template <KvScheme S, int SCALE_GROUP, int D, int U>
int splits_for(const lab::AttnParams& p) {
  const int sms = lab::device_limits().sm_count;
  // A block keeps 16 KB of K/V in flight, as 05's: aim for 4 blocks per SM. Chunks keep at least
  // 4 steps (256 keys at d = 128).
  return ch04::choose_num_splits(p.num_splits, int64_t(p.batch) * p.heads_q, p.seqlen_kv,
                                 4 * Groups<S, D, U>::KEYS_PER_STEP, 4 * sms);
}

template <KvScheme S, int SCALE_GROUP, int D, int U>
int launch(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  const int splits = splits_for<S, SCALE_GROUP, D, U>(p);
  if (!run) return splits;
  const ch04::Partials part = ch04::partials_in_workspace(p, splits, kSupport.chapter);
  // Refuses by name on a GPU this build has no code for (07 is built for sm_80 and newer).
  lab::configure_kernel(reinterpret_cast<const void*>(decode_split<S, SCALE_GROUP, D, U>), kThreads, 0,
                        kSupport.chapter);
  decode_split<S, SCALE_GROUP, D, U>
      <<<dim3(splits, p.heads_q, p.batch), kThreads, 0, stream>>>(p, splits, part.o, part.lse);
  LAB_LAUNCH_CHECK();
  if (splits > 1) ch04::combine_splits(p, splits, part.o, part.lse, stream);
  return splits;
}

template <KvScheme S, int SCALE_GROUP>
int launch_by_head_dim(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  switch (p.head_dim) {
    case 64: return launch<S, SCALE_GROUP, 64, kU>(p, stream, run);
    case 128: return launch<S, SCALE_GROUP, 128, kU>(p, stream, run);
    default: return launch<S, SCALE_GROUP, 256, kU>(p, stream, run);
  }
}

// The scheme dispatcher: p's scheme (and scale group size) picks the instantiation; run = false
// only returns the split count.
int dispatch(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  check_launch(p);
  switch (p.kv_quant.scheme) {
    case KvScheme::int8_tensor: return launch_by_head_dim<KvScheme::int8_tensor, 0>(p, stream, run);
    case KvScheme::int8_token: return launch_by_head_dim<KvScheme::int8_token, 0>(p, stream, run);
    case KvScheme::int8_head: return launch_by_head_dim<KvScheme::int8_head, 0>(p, stream, run);
    case KvScheme::int8_group:
      if (p.kv_quant.group_size == 32) return launch_by_head_dim<KvScheme::int8_group, 32>(p, stream, run);
      return launch_by_head_dim<KvScheme::int8_group, 64>(p, stream, run);
    case KvScheme::fp8_e4m3: return launch_by_head_dim<KvScheme::fp8_e4m3, 0>(p, stream, run);
    case KvScheme::fp8_e5m2: return launch_by_head_dim<KvScheme::fp8_e5m2, 0>(p, stream, run);
    case KvScheme::fp8_e4m3_head: return launch_by_head_dim<KvScheme::fp8_e4m3_head, 0>(p, stream, run);
    default: return launch_by_head_dim<KvScheme::none, 0>(p, stream, run);
  }
}

}  // namespace

int num_splits_for_dequant(const lab::AttnParams& p) { return dispatch(p, 0, false); }

size_t workspace_bytes_dequant(const lab::AttnParams& p) {
  return ch04::partials_bytes(p, num_splits_for_dequant(p));
}

void forward_dequant(const lab::AttnParams& p, cudaStream_t stream) { dispatch(p, stream, true); }

}  // namespace ch07
