// 05_decoding_cuda_core: decoding (seqlen_q = 1) on CUDA cores, split-KV.
//
// 04 runs decoding on tensor cores: every mma multiplies 16 query rows where decoding has one, so
// 15/16 of the tensor-core work, and of the shared-memory traffic feeding it, is padding. It still
// keeps up with HBM at d = 128, but it pays for the detour: K and V go global -> shared ->
// registers, and each block holds two shared-memory stages per warp (68 KB at d = 128), so only
// three blocks fit on an SM.
// This kernel does the exact work instead:
//   - a group of D/8 threads owns one key at a time; each thread loads 16 bytes (8 elements) of
//     the key's K row and of its V row straight into registers (ld.global.nc, no L1 allocation),
//     U keys per group in flight before the first use;
//   - s_j = q . k_j as 8 fp32 FMAs per thread and a shuffle reduction over the group's lanes;
//   - online softmax per group over its U keys at a time, O += p_j v_j as 8 FMAs per thread;
//   - the groups' (m, l, O) merged in shared memory at the end (04's merge), then split-KV and
//     04's combine kernel exactly as in 04.
// Cost: no data reuse at all (there is none to have with one query row), and a shuffle reduction
// per key; each block is small (128 threads, no staging buffers), so many fit on an SM and their
// loads overlap.
//
// clang-format off
//   grid: (num_splits, heads_q, batch)        block: 128 threads = 8 groups of 16 (d = 128)
//
//   keys of one split, U = 4 per group per step:   step 0: keys 0..31    step 1: keys 32..63 ...
//                     group:  0  1  2 ... 7  0  1 ... 7  0 ...   (key = step base + 8 u + group)
//   one key, one group:    lane c of 16 loads k[8c .. 8c+7], v[8c .. 8c+7]   (16 bytes each)
//                          s = sum_c q[8c..] . k[8c..]   (8 FMAs, then 4 shuffles)
//                          m, l, O[8c .. 8c+7] of the group, online softmax
//   end: 8 groups' (m, l, O) -> one (m, l, O) in shared memory -> O or a split's partial
// clang-format on
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "05_decoding_cuda_core/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch05 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "05_decoding_cuda_core";
  s.head_dims = {64, 128, 256};
  s.bf16 = true;
  s.causal = true;  // with one query row, bottom-right causal sees every key
  s.gqa = true;
  s.lse = true;
  s.cache_seqlens = true;
  s.paged_kv = true;
  s.splits = true;
  s.max_splits = ch04::kMaxSplits;
  s.max_seqlen_q = 1;
  s.vector_elems = 8;  // 16-byte loads
  return s;
}();

namespace {

constexpr int kThreads = 128;
// Keys per group in flight: 4 x (16 + 16) bytes per thread, 16 KB per block at d = 128. 8 was
// measured too: faster at some shapes, slower at others (more registers, fewer blocks per SM).
constexpr int kU = 4;
template <int D, int U> struct Groups {
  static constexpr int TPK = D / 8;                      // threads per key: 8 elements each
  static constexpr int COUNT = kThreads / TPK;           // groups per block
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

// Eight 16-bit values in a uint4 -> eight floats.
template <class T>
__device__ __forceinline__ void to_float8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float2 x;
    if constexpr (std::is_same_v<T, __half>) x = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
    else x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[k]));
    f[2 * k] = x.x, f[2 * k + 1] = x.y;
  }
}

template <class T, int D, int U>
__global__ void __launch_bounds__(kThreads) decode_split(const lab::AttnParams p, int splits,
                                                         float* o_partial, float* lse_partial) {
  using G = Groups<D, U>;
  constexpr int TPK = G::TPK, GROUPS = G::COUNT, STEP = G::KEYS_PER_STEP;
  __shared__ float red_m[GROUPS], red_l[GROUPS], row_ml[2];
  __shared__ __align__(16) float part_o[GROUPS][D];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int group = threadIdx.x / TPK, c = threadIdx.x % TPK;  // this thread: elements 8c .. 8c+7
  int sk = p.cache_seqlens ? p.cache_seqlens[b] : p.seqlen_kv;
  bool bad_table = sk < 0 || sk > p.seqlen_kv;
  sk = bad_table ? 0 : sk;

  // This split's keys: whole steps, so every step but the last is full.
  const int chunk = ((sk + splits - 1) / splits + STEP - 1) / STEP * STEP;
  const int k_begin = min(sk, split * chunk), k_end = min(sk, k_begin + chunk);

  // q, pre-scaled so that scores come out in the exp2 domain: s = (q . k) * scale * log2(e).
  float q[8];
  {
    const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    to_float8<T>(*reinterpret_cast<const uint4*>(Q + 8 * c), q);
    const float scale_log2 = p.softmax_scale * float(M_LOG2E);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[e] *= scale_log2;
  }
  const T* K = static_cast<const T*>(p.k) + h_kv * p.k_head_stride + 8 * c;
  const T* V = static_cast<const T*>(p.v) + h_kv * p.v_head_stride + 8 * c;

  float m = -INFINITY, l = 0.f, acc[8] = {};
  for (int base = k_begin; base < k_end; base += STEP) {
    // Issue all 2U loads before using any: U keys of K and V in flight per thread.
    uint4 kraw[U], vraw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * GROUPS + group;
      kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
      if (key < k_end) {
        int64_t page = b, row = key;
        if (p.block_table) {
          page = p.block_table[int64_t(b) * p.max_pages_per_seq + key / p.page_size];
          row = key % p.page_size;
          if (page < 0 || page >= p.num_pages) bad_table = true, page = 0;  // never read outside
        }
        kraw[u] = load_stream(K + page * p.k_batch_stride + row * p.k_row_stride);
        vraw[u] = load_stream(V + page * p.v_batch_stride + row * p.v_row_stride);
      }
    }
    // Scores: 8 FMAs per thread, then a butterfly over the group's TPK lanes (all get the sum).
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float k[8];
      to_float8<T>(kraw[u], k);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(q[e], k[e], dot);
      // LAB-BEGIN(group-reduce): sum dot over the TPK lanes of this thread group; every lane gets the sum
#pragma unroll
      for (int off = TPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      // LAB-END(group-reduce)
      s[u] = base + u * GROUPS + group < k_end ? dot : -INFINITY;
    }
    // Online softmax over these U keys, then O += p v.
    float m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, s[u]);
    // No key of this group in this step (the last one). Tested on the key index, not on
    // m_new == -inf: fmaxf drops NaN, and a step of NaN scores must still reach l and O (the NaN
    // rule; m stays -inf and 2^(-inf - -inf) = NaN carries it).
    if (base + group >= k_end) continue;
    const float alpha = exp2_approx(m - m_new);
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float pu = exp2_approx(s[u] - m);
      float v[8];
      to_float8<T>(vraw[u], v);
      l += pu;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(pu, v[e], acc[e]);
    }
  }

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // 04's combine may start launching
#endif
  // Merge the groups (04's warp merge): m = max_g m_g, l = sum_g l_g 2^(m_g - m), O likewise.
  if (c == 0) red_m[group] = m, red_l[group] = l;
  __syncthreads();
  if (threadIdx.x == 0) {
    // LAB-BEGIN(group-merge): the block's (m, l) from the groups' (m_g, l_g) into row_ml
    // LAB-STUB: row_ml[0] = m, row_ml[1] = l;
    float mm = -INFINITY, ll = 0.f;
    for (int gi = 0; gi < GROUPS; ++gi) mm = fmaxf(mm, red_m[gi]);
    // As in 04: with mm = -inf every factor is 0, and 0 * a NaN l_g stays NaN.
    const float mm_ref = mm == -INFINITY ? 0.f : mm;
    for (int gi = 0; gi < GROUPS; ++gi) ll += red_l[gi] * exp2_approx(red_m[gi] - mm_ref);
    row_ml[0] = mm, row_ml[1] = ll;
    // LAB-END(group-merge)
  }
  __syncthreads();
  const float f = row_ml[0] == -INFINITY ? 0.f : exp2_approx(m - row_ml[0]);
  reinterpret_cast<float4*>(&part_o[group][8 * c])[0] = make_float4(acc[0] * f, acc[1] * f, acc[2] * f, acc[3] * f);
  reinterpret_cast<float4*>(&part_o[group][8 * c])[1] = make_float4(acc[4] * f, acc[5] * f, acc[6] * f, acc[7] * f);
  bad_table = __syncthreads_or(bad_table);  // also the barrier before part_o is read

  // `!= 0`, not `> 0`: a NaN l_sum (a NaN score) stays NaN in O and lse.
  const float l_sum = row_ml[1], inv_l = bad_table ? NAN : (l_sum != 0.f ? 1.f / l_sum : 0.f);
  const int64_t part_row = (int64_t(split) * p.batch + b) * p.heads_q + h;  // seqlen_q = 1
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  for (int e = threadIdx.x; e < D; e += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int gi = 0; gi < GROUPS; ++gi) sum += part_o[gi][e];
    if (splits == 1) {
      if constexpr (std::is_same_v<T, __half>) O[e] = __float2half_rn(sum * inv_l);
      else O[e] = __float2bfloat16_rn(sum * inv_l);
    } else {
      o_partial[part_row * D + e] = sum * inv_l;
    }
  }
  if (threadIdx.x == 0) {
    // Natural-log LSE from the exp2-domain max and sum: (m + log2 l) ln 2.
    const float lse =
        bad_table ? NAN : (l_sum != 0.f ? (row_ml[0] + log2f(l_sum)) * float(M_LN2) : -INFINITY);
    if (splits > 1) lse_partial[part_row] = lse;
    else if (p.lse) p.lse[int64_t(b) * p.heads_q + h] = lse;
  }
}

template <class T, int D, int U>
int splits_for(const lab::AttnParams& p) {
  const int sms = lab::device_limits().sm_count;
  // A block keeps 16 KB of K/V in flight (04's keeps 32 KB): aim for 4 blocks per SM. Chunks keep
  // at least 4 steps (128 keys at d = 128).
  return ch04::choose_num_splits(p.num_splits, int64_t(p.batch) * p.heads_q, p.seqlen_kv,
                                 4 * Groups<D, U>::KEYS_PER_STEP, 4 * sms);
}

template <class T, int D, int U>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  const int splits = splits_for<T, D, U>(p);
  const ch04::Partials part = ch04::partials_in_workspace(p, splits, kSupport.chapter);
  decode_split<T, D, U><<<dim3(splits, p.heads_q, p.batch), kThreads, 0, stream>>>(p, splits, part.o, part.lse);
  LAB_LAUNCH_CHECK();
  if (splits > 1) ch04::combine_splits(p, splits, part.o, part.lse, stream);
}

template <class T>
int splits_by_head_dim(const lab::AttnParams& p) {
  switch (p.head_dim) {
    case 64: return splits_for<T, 64, kU>(p);
    case 128: return splits_for<T, 128, kU>(p);
    default: return splits_for<T, 256, kU>(p);
  }
}

template <class T>
void launch_by_head_dim(const lab::AttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64, kU>(p, stream);
    case 128: return launch<T, 128, kU>(p, stream);
    default: return launch<T, 256, kU>(p, stream);
  }
}


}  // namespace

int num_splits_for(const lab::AttnParams& p) {
  ch04::check_split_kv_launch(p, kSupport);
  return p.dtype == lab::DType::fp16 ? splits_by_head_dim<__half>(p) : splits_by_head_dim<__nv_bfloat16>(p);
}

size_t workspace_bytes(const lab::AttnParams& p) { return ch04::partials_bytes(p, num_splits_for(p)); }

void forward(const lab::AttnParams& p, cudaStream_t stream) {
  ch04::check_split_kv_launch(p, kSupport);
  if (p.dtype == lab::DType::fp16) launch_by_head_dim<__half>(p, stream);
  else launch_by_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace ch05
