// Chapter 03: FlashAttention-2: its loop order on CUDA cores, then on tensor cores in three steps.
//   step 0 "loop_order" (kernel_loop_order.cu): 02's kernel with the loops swapped: one block per
//                                         (batch, head, query tile), O_i on chip, fp32 CUDA-core math.
//   step 1 "mma" (kernel_mma.cu):         one block per (query tile, head, batch), O_i in registers,
//                                         S = QK^T and O += PV with mma.sync; K/V loaded synchronously.
//   step 2 "fa2" (kernel.cu):             the same math with a cp.async pipeline and swizzled
//                                         shared memory: FlashAttention-2.
//   step 3 "overlap" (kernel_overlap.cu): S_{j+1} on the tensor cores while the softmax of S_j runs.
#pragma once

#include <cuda_runtime.h>

#include "common/attn.h"
#include "common/driver.h"

namespace ch03 {

// Steps 1-3: head_dim 32, 64, 96, 128, 256; fp16 and bf16; causal; GQA/MQA; lse.
extern const lab::Support kSupport;
// Step 0, as 02: head_dim 1..128, any stride; fp16 and bf16; causal; GQA/MQA; lse.
extern const lab::Support kSupportLoopOrder;

void forward_loop_order(const lab::AttnParams& p, cudaStream_t stream);  // step 0
// Step 0's launch configuration for `head_dim` where a block may have `smem_per_block` bytes of
// shared memory (lab::device_limits().smem_per_block), as 02's plan_for: whether V_j shares K_j's
// buffer (where separate ones do not fit) and the bytes it asks. Pure, for the CPU tests.
struct Plan {
  bool share_kv = false;
  size_t smem_bytes = 0;
};
Plan plan_loop_order(int head_dim, size_t smem_per_block);
// Step 0 as it runs with LAB_SMEM_CAP = smem_cap (the tests run the shared buffer on any GPU).
void forward_loop_order_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap);

void forward_mma(const lab::AttnParams& p, cudaStream_t stream);  // step 1
void forward(const lab::AttnParams& p, cudaStream_t stream);      // step 2
void forward_overlap(const lab::AttnParams& p, cudaStream_t stream);  // step 3

// Grid: (query tiles, heads_q, batch); CUDA allows 65535 in y and z.
inline void check_grid_limits(const lab::AttnParams& p, const char* who) {
  if (p.heads_q > 65535)
    throw lab::InvalidArgument(std::string(who) + ": heads_q = " + std::to_string(p.heads_q) +
                               " is not supported (supported: 1..65535)");
  if (p.batch > 65535)
    throw lab::InvalidArgument(std::string(who) + ": batch = " + std::to_string(p.batch) +
                               " is not supported (supported: 1..65535)");
}

inline lab::Chapter chapter() {
  return {"03_flash_v2",
          {{"loop_order", forward_loop_order, &kSupportLoopOrder, nullptr},
           {"mma", forward_mma, &kSupport, nullptr},
           {"fa2", forward, &kSupport, nullptr},
           {"overlap", forward_overlap, &kSupport, nullptr}}};
}

}  // namespace ch03
