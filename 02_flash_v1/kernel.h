// Chapter 02: FlashAttention-1 (Algorithm 1 of the paper) on CUDA cores.
#pragma once

#include <cuda_runtime.h>

#include "common/attn.h"
#include "common/driver.h"

namespace ch02 {

// head_dim 1..128, fp16 and bf16, causal, GQA/MQA, lse.
extern const lab::Support kSupport;
// The running O (fp32), l and m of every query row: batch * heads_q * seqlen_q * (head_dim + 2) floats.
size_t workspace_bytes(const lab::AttnParams& p);
void forward(const lab::AttnParams& p, cudaStream_t stream);

inline lab::Chapter chapter() { return {"02_flash_v1", {{"", forward, &kSupport, workspace_bytes}}}; }

}  // namespace ch02
