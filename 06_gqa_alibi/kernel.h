// Chapter 06: grouped-query attention, ALiBi and hybrid prefill + decode batches, in four steps.
//   step 1 "gqa" (kernel_gqa.cu):     03's fa2 kernel with the query heads of a KV group packed into
//                                     the rows of the tile: each K/V tile is loaded once per group.
//   step 2 "alibi" (kernel_alibi.cu): + ALiBi as a score bias, and varlen (cu_seqlens) batches that
//                                     mix prefill and decode sequences in one launch.
//   step 3 "decode_tile" (kernel_decode_tile.cu): + a decoding tile whose warps split the keys.
//   step 4 (kernel.cu, the chapter's default, named ""): + 04's split-KV across blocks, for decoding
//                                     batches too small for the GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "04_flash_decoding/kernel.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch06 {

// Step 4: head_dim 64, 128; fp16, bf16; causal (bottom-right per sequence); GQA/MQA (heads_q a
// multiple of heads_kv); ALiBi (alibi_slopes, [heads_q], e.g. lab::alibi_slopes_standard); varlen
// (cu_seqlens_q/kv, seqlen_q/kv the longest); lse; num_splits. Step 1 lacks ALiBi, varlen and
// num_splits; steps 2 and 3 lack num_splits.
extern const lab::Support kSupport;
extern const lab::Support kSupportGqa, kSupportAlibi, kSupportDecodeTile;

void forward_gqa(const lab::AttnParams& p, cudaStream_t stream);          // step 1
void forward_alibi(const lab::AttnParams& p, cudaStream_t stream);        // step 2
void forward_decode_tile(const lab::AttnParams& p, cudaStream_t stream);  // step 3
int num_splits_for(const lab::AttnParams& p);                             // step 4
size_t workspace_bytes(const lab::AttnParams& p);                         // 04's partials when splits > 1
void forward(const lab::AttnParams& p, cudaStream_t stream);

// The tile of steps 3 and 4 for a problem with `packed_rows` = seqlen_q * heads_q / heads_kv rows
// per (sequence, KV head), on a GPU that allows `smem_limit` bytes of shared memory per block
// (lab::device_limits().smem_per_block): the decoding tile (warps split the keys) up to 32 rows,
// with three K/V stages where they fit, else two; 03's 128-row tile otherwise. Throws
// lab::InvalidArgument when nothing fits. Pure: the CPU tests call it with each LAB_SMEM_CAP.
struct TilePlan {
  int m_frags = 2;         // m16 fragments per warp
  bool key_warps = false;  // the decoding tile
  int stages = 2;          // K/V tiles in shared memory
  int B_r = 128;           // packed rows per block
  size_t smem_bytes = 0;
  int64_t row_tiles = 0;  // blocks per (sequence, KV head): packed_rows / B_r, rounded up
};
TilePlan plan_tile(int64_t packed_rows, int head_dim, int elem_bytes, size_t smem_limit);
TilePlan plan_tile(const lab::AttnParams& p);  // p's problem on this GPU (lab::device_limits())

inline lab::Chapter chapter() {
  return {"06_gqa_alibi",
          {{"gqa", forward_gqa, &kSupportGqa, nullptr},
           {"alibi", forward_alibi, &kSupportAlibi, nullptr},
           {"decode_tile", forward_decode_tile, &kSupportDecodeTile, nullptr},
           {"", forward, &kSupport, workspace_bytes, num_splits_for}}};
}

}  // namespace ch06
