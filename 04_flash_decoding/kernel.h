// Chapter 04: flash decoding. One new query token (or a few) per sequence attends to a long KV
// cache: the work is memory-bound, and one block per (batch, head) leaves most SMs idle.
//   kernel.cu:  the 03 tensor-core kernel turned for decoding: B_r = 16 query rows, the block's
//               4 warps split each K/V tile between them instead of the query rows, and blocks
//               split the KV sequence (num_splits chunks), each writing a partial O and its LSE;
//               per-sequence KV lengths (cache_seqlens) and a paged KV cache (block_table).
//   combine.cu: the kernel that merges the partial outputs with their log-sum-exps, and the
//               num_splits heuristic (05_decoding_cuda_core uses both).
#pragma once

#include <cuda_runtime.h>

#include "common/attn.h"
#include "common/driver.h"

namespace ch04 {

// head_dim 64, 128, 256; fp16, bf16; seqlen_q 1..64 (causal, bottom-right, when > 1); GQA/MQA
// (each query head reads its KV head; 06_gqa_alibi shares the reads); lse; cache_seqlens; paged
// KV (page size a power of two >= 16); num_splits.
extern const lab::Support kSupport;

// num_splits in 0..kMaxSplits (0: the heuristic picks).
constexpr int kMaxSplits = 256;
// The longest KV sequence a split-KV launcher takes: 2^31 - 2^20, so that int key ranges of up to
// kMaxSplits splits of whole tiles (up to 4096 keys each) cannot overflow.
constexpr int kMaxSeqlenKv = 0x7fffffff - (1 << 20) + 1;

// The split count forward() uses for this problem on the current device.
int num_splits_for(const lab::AttnParams& p);
// Partial outputs and LSEs when num_splits > 1: num_splits * batch * heads_q * seqlen_q * (head_dim + 1) floats.
size_t workspace_bytes(const lab::AttnParams& p);
void forward(const lab::AttnParams& p, cudaStream_t stream);

// The launch configuration for `head_dim` where a block may have `smem_per_block` bytes of shared
// memory (lab::device_limits().smem_per_block): K/V stages per warp (2, or 1 where 2 do not fit)
// and the bytes they ask. Pure, for the CPU tests.
struct Plan {
  int stages = 0;
  size_t smem_bytes = 0;
};
Plan plan_for(int head_dim, size_t smem_per_block);
// forward() as it runs with LAB_SMEM_CAP = smem_cap: the configuration a GPU allowing only that
// much would get (the tests run 1 stage on any GPU this way).
void forward_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap);

// ---- shared with 05_decoding_cuda_core (combine.cu) ----

// How many chunks to split each sequence's keys into: the fewest whose blocks fill their last wave
// of `target_blocks` to at least 90%, given `work_items` blocks per split (batch x heads x query
// tiles), with no chunk shorter than `min_keys_per_split`. A nonzero `requested` wins.
int choose_num_splits(int requested, int64_t work_items, int max_keys, int min_keys_per_split,
                      int target_blocks);

// Bytes of partial results for `splits` chunks (0 when splits == 1: the kernel writes O directly).
size_t partials_bytes(const lab::AttnParams& p, int splits);

// What every split-KV launcher (04-07) checks before launching: the chapter's Support (num_splits
// included, capped by Support::max_splits), then the grid: the heads on grid.y (heads_kv when
// `heads_kv_on_grid`, else heads_q) and batch on grid.z, at most 65535 each; seqlen_kv at most
// kMaxSeqlenKv.
void check_split_kv_launch(const lab::AttnParams& p, const lab::Support& s, bool heads_kv_on_grid = false);

// Where the partials of `splits` chunks live in p.workspace (nullptr when splits == 1); refuses a
// missing or too small workspace by name.
struct Partials {
  float* o = nullptr;
  float* lse = nullptr;
};
Partials partials_in_workspace(const lab::AttnParams& p, int splits, const char* chapter);

// o_partial: [splits][batch][heads_q][seqlen_q][head_dim] fp32, each chunk's O normalized by its
// own sum; lse_partial: [splits][batch][heads_q][seqlen_q] (natural log, -inf for an empty chunk).
// Writes O = sum_s exp(lse_s - lse) O_s with lse = log sum_s exp(lse_s), and lse if asked.
void combine_splits(const lab::AttnParams& p, int splits, const float* o_partial,
                    const float* lse_partial, cudaStream_t stream);

inline lab::Chapter chapter() {
  return {"04_flash_decoding", {{"", forward, &kSupport, workspace_bytes, num_splits_for}}};
}

}  // namespace ch04
