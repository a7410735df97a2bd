// Chapter 01: attention with S = QK^T materialized in global memory.
#pragma once

#include <cuda_runtime.h>

#include "common/attn.h"
#include "common/driver.h"

namespace ch01 {

// Three kernels: S = scale * Q K^T (fp32, global memory), row softmax in place, O = P V.
extern const lab::Support kSupport;
size_t workspace_bytes(const lab::AttnParams& p);  // S: batch * heads_q * seqlen_q * seqlen_kv fp32
void forward(const lab::AttnParams& p, cudaStream_t stream);

// What a library gives without fusion (PyTorch eager's recipe): cuBLAS batched GEMM into S stored
// in the input dtype, a softmax kernel, a second batched GEMM.
extern const lab::Support kCublasSupport;
size_t cublas_workspace_bytes(const lab::AttnParams& p);
void forward_cublas(const lab::AttnParams& p, cudaStream_t stream);

// The chapter as the CLI, the tests and the ladder see it.
inline lab::Chapter chapter() {
  return {"01_naive",
          {{"naive", forward, &kSupport, workspace_bytes},
           {"cublas", forward_cublas, &kCublasSupport, cublas_workspace_bytes}}};
}

}  // namespace ch01
