// Chapter 05: decoding on CUDA cores. With seqlen_q = 1 an mma.sync tile of 16 query rows does
// 16x the work decoding needs; a thread group per key with 16-byte loads, fp32 dot products and
// warp-shuffle reductions does exactly the work, and its loads are what limits it.
#pragma once

#include <cuda_runtime.h>

#include "04_flash_decoding/kernel.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch05 {

// head_dim 64, 128, 256; fp16, bf16; seqlen_q = 1 (causal accepted: it masks nothing there);
// GQA/MQA (each query head reads its KV head); lse; cache_seqlens; paged KV; num_splits.
extern const lab::Support kSupport;

int num_splits_for(const lab::AttnParams& p);
size_t workspace_bytes(const lab::AttnParams& p);  // the partials of 04's combine
void forward(const lab::AttnParams& p, cudaStream_t stream);

inline lab::Chapter chapter() {
  return {"05_decoding_cuda_core", {{"", forward, &kSupport, workspace_bytes, num_splits_for}}};
}

}  // namespace ch05
