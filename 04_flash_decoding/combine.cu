// 04_flash_decoding: merging the splits, and choosing how many.
//
// Split s of a query row computed, over its own chunk of keys, lse_s = log sum_j exp(s_j) and
// O_s = sum_j exp(s_j - lse_s) v_j. The whole row's result follows from these alone:
//   lse = log sum_s exp(lse_s)               (taken as m + log sum_s exp(lse_s - m), m = max_s lse_s)
//   O   = sum_s exp(lse_s - lse) O_s          (the weights sum to 1)
// An empty chunk has lse_s = -inf and weight 0; a row with no visible key at all gets O = 0 and
// lse = -inf, as in one pass. This is the same merge the 4 warps of a block do at its end.
// NaN (common/attn.h's rule): a split whose lse_s is NaN (a NaN score) makes O and lse NaN, and a
// NaN in a partial O_s (a NaN in V) reaches O even at weight 0 (0 * NaN), as it would in one pass;
// a row no split saw a key for is 0, as each split wrote it.
#include <algorithm>
#include <cmath>

#include "04_flash_decoding/kernel.h"
#include "03_flash_v2/tensor_core.cuh"
#include "common/cuda_check.h"

namespace ch04 {

int choose_num_splits(int requested, int64_t work_items, int max_keys, int min_keys_per_split,
                      int target_blocks) {
  if (requested > 0) return requested;
  // Decoding is bound by loads in flight and by balance, not by FLOPs. `target_blocks` is how
  // many blocks keep every SM's share of the bandwidth busy (a "wave"); n blocks run in
  // ceil(n / target) waves, and the last one is n / target - floor(...) full. Pick the fewest
  // splits whose waves are at least 90% full: fewer leave SMs idle or some SMs with one block
  // more than others (at batch 1, 160 blocks on 132 SMs ran 12% slower than 128), more only add
  // partials to write, read and merge. Chunks keep at least min_keys_per_split keys.
  const int max_splits = std::clamp(max_keys / std::max(1, min_keys_per_split), 1, kMaxSplits);
  const double target = std::max(1, target_blocks);
  int best = 1;
  double best_fill = 0;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(std::max<int64_t>(1, work_items)) * s / target;
    const double fill = waves / std::ceil(waves);
    if (fill >= 0.9) return s;
    if (fill > best_fill + 1e-9) best = s, best_fill = fill;
  }
  return best;
}

size_t partials_bytes(const lab::AttnParams& p, int splits) {
  if (splits <= 1) return 0;
  return size_t(splits) * p.batch * p.heads_q * p.seqlen_q * (size_t(p.head_dim) + 1) * sizeof(float);
}

Partials partials_in_workspace(const lab::AttnParams& p, int splits, const char* chapter) {
  Partials out;
  if (splits <= 1) return out;
  const size_t need = partials_bytes(p, splits);
  if (!p.workspace || p.workspace_bytes < need)
    throw lab::InvalidArgument(std::string(chapter) + ": workspace_bytes = " + std::to_string(p.workspace_bytes) +
                               " is too small for " + std::to_string(splits) + " splits (needs " +
                               std::to_string(need) + "; see workspace_bytes())");
  out.o = static_cast<float*>(p.workspace);
  out.lse = out.o + size_t(splits) * p.batch * p.heads_q * p.seqlen_q * p.head_dim;
  return out;
}

void check_split_kv_launch(const lab::AttnParams& p, const lab::Support& s, bool heads_kv_on_grid) {
  lab::check_params(p, s);
  const int heads = heads_kv_on_grid ? p.heads_kv : p.heads_q;
  if (heads > 65535 || p.batch > 65535)
    throw lab::InvalidArgument(std::string(s.chapter) + ": " +
                               (heads > 65535 ? (heads_kv_on_grid ? "heads_kv" : "heads_q") : "batch") +
                               " above 65535 is not supported (grid limit)");
  // The kernels cut a sequence's keys in int arithmetic: chunk ends (split + 1) x chunk, rounded up
  // to whole tiles, reach past seqlen_kv by up to splits x tile keys; kMaxSeqlenKv leaves room for
  // that (a paged cache that reuses pages can describe more keys than memory holds).
  if (p.seqlen_kv > kMaxSeqlenKv)
    throw lab::InvalidArgument(std::string(s.chapter) + ": seqlen_kv = " + std::to_string(p.seqlen_kv) +
                               " is not supported (supported: 1.." + std::to_string(kMaxSeqlenKv) +
                               ", so that key ranges of " + std::to_string(kMaxSplits) +
                               " splits fit in int)");
}

namespace {

// One warp per query row (b, h, i); lanes cover head_dim in float4 steps.
template <class T>
__global__ void __launch_bounds__(128) combine_splits_kernel(const lab::AttnParams p, int splits,
                                                             const float* o_partial,
                                                             const float* lse_partial) {
#if __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the split kernel: this block may already be resident
  // while the split kernel's last blocks run; wait here until all of them have finished and their
  // partials are visible.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = int(row % p.seqlen_q), h = int(row / p.seqlen_q % p.heads_q), b = int(row / p.seqlen_q / p.heads_q);
  // Varlen batches (06): rows are laid out for the longest sequence; shorter ones stop early, and
  // their O rows sit at their packed offset.
  int64_t o_row = i;
  if (p.cu_seqlens_q) {
    if (i >= p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]) return;
    o_row += p.cu_seqlens_q[b];
    if (o_row >= p.total_q) return;  // never past the packed rows, whatever the offsets say
  }

  // lse = m + log sum_s exp(lse_s - m). A NaN partial (a bad cache table) must stay visible:
  // fmaxf would drop it.
  float m = -INFINITY;
  bool nan = false;
  for (int s = lane; s < splits; s += 32) {
    const float l = lse_partial[s * rows + row];
    nan |= l != l;
    m = fmaxf(m, l);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  nan = __any_sync(0xffffffffu, nan);
  // LAB-BEGIN(combine-lse): lse = m + log sum_s exp(lse_s - m), reduced over the warp; NaN stays NaN
  // LAB-STUB: const float lse = m;
  float sum = 0.f;
  if (m != -INFINITY)
    for (int s = lane; s < splits; s += 32) sum += expf(lse_partial[s * rows + row] - m);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float lse = nan ? NAN : (m == -INFINITY ? -INFINITY : m + logf(sum));
  // LAB-END(combine-lse)

  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + o_row * p.o_row_stride + h * p.o_head_stride;
  for (int c = 4 * lane; c < p.head_dim; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (m != -INFINITY)
      for (int s = 0; s < splits; ++s) {
        // LAB-BEGIN(combine-weights): O += exp(lse_s - lse) * O_s for these 4 channels of split s
        const float w = expf(lse_partial[s * rows + row] - lse);  // 0 for an empty split
        const float4 o = *reinterpret_cast<const float4*>(o_partial + (s * rows + row) * p.head_dim + c);
        acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
        // LAB-END(combine-weights)
      }
    if (nan) acc = make_float4(NAN, NAN, NAN, NAN);
    uint2 packed = {ch03::pack2<T>(acc.x, acc.y), ch03::pack2<T>(acc.z, acc.w)};
    *reinterpret_cast<uint2*>(O + c) = packed;
  }
  if (p.lse && lane == 0) p.lse[row] = lse;  // [batch, heads_q, seqlen_q]: the same row order
}

}  // namespace

void combine_splits(const lab::AttnParams& p, int splits, const float* o_partial,
                    const float* lse_partial, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  // Programmatic dependent launch (Hopper): the launch of this kernel overlaps the tail of the
  // split kernel instead of starting after it; griddepcontrol.wait above keeps the order.
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((rows + 3) / 4));
  cfg.blockDim = dim3(128);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (p.dtype == lab::DType::fp16)
    LAB_CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine_splits_kernel<__half>, p, splits, o_partial, lse_partial));
  else
    LAB_CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine_splits_kernel<__nv_bfloat16>, p, splits, o_partial, lse_partial));
}

}  // namespace ch04
