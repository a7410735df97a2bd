// Chapter 08: FlashAttention-3's Hopper techniques in plain CUDA (inline PTX, no CUTLASS), in steps.
//   step 1 "wgmma" (kernel_wgmma.cu): one warpgroup per block; S = QK^T and O += PV on wgmma, Q/K/V
//                                     in 128-byte swizzled shared memory, P from registers;
//                                     tiles still copied by cp.async, as in 03.
//   step 2 "tma"   (kernel_tma.cu):   Q, K and V tiles copied by the tensor memory accelerator into
//                                     a ring of stages guarded by full/empty mbarriers.
//   step 3 "ws"    (kernel_ws.cu):    warp specialization: a producer warpgroup issues the TMA,
//                                     two consumer warpgroups compute; setmaxnreg moves registers.
//   step 4 "pingpong" (kernel.cu):    the consumers alternate at the tensor cores (named barriers),
//                                     and each one's softmax runs while its own P V wgmma does.
// Compiled for sm_90a only, and refused by name on any GPU that is not compute capability 9.0.
#pragma once

#include <cuda_runtime.h>

#include "08_flash_v3/plan.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch08 {

void forward_wgmma(const lab::AttnParams& p, cudaStream_t stream);  // step 1
void forward_tma(const lab::AttnParams& p, cudaStream_t stream);    // step 2
void forward_ws(const lab::AttnParams& p, cudaStream_t stream);     // step 3
void forward(const lab::AttnParams& p, cudaStream_t stream);        // step 4

// The plan of `step` for p on the current GPU (lab::device_limits()); throws lab::InvalidArgument
// naming the field, the GPU or the shared memory that does not fit, before any GPU work.
LaunchPlan plan_on_this_gpu(Step step, const lab::AttnParams& p);

inline lab::Chapter chapter() {
  return {"08_flash_v3",
          {{"wgmma", forward_wgmma, &kSupport, nullptr},
           {"tma", forward_tma, &kSupport, nullptr},
           {"ws", forward_ws, &kSupport, nullptr},
           {"pingpong", forward, &kSupport, nullptr}}};
}

}  // namespace ch08
