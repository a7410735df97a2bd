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

// The launch configuration for `head_dim` where a block may have `smem_per_block` bytes of shared
// memory (lab::device_limits().smem_per_block): whether V_j shares K_j's buffer (where separate
// ones do not fit) and the bytes it asks. Pure, for the CPU tests.
struct Plan {
  bool share_kv = false;
  size_t smem_bytes = 0;
};
Plan plan_for(int head_dim, size_t smem_per_block);
// forward() as it runs with LAB_SMEM_CAP = smem_cap: the configuration a GPU allowing only that
// much would get (the tests run the shared buffer on any GPU this way).
void forward_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap);

inline lab::Chapter chapter() { return {"02_flash_v1", {{"", forward, &kSupport, workspace_bytes}}}; }

}  // namespace ch02
