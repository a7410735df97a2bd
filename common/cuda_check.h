// Every CUDA and cuBLAS call is checked; a failure throws with the call, file and line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace lab {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t s, const char* what, const char* file, int line);

}  // namespace lab

#define LAB_CUDA_CHECK(call)                                                      \
  do {                                                                            \
    cudaError_t lab_err_ = (call);                                                \
    if (lab_err_ != cudaSuccess) ::lab::throw_cuda_error(lab_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: catches bad launch configurations at once.
#define LAB_LAUNCH_CHECK() LAB_CUDA_CHECK(cudaGetLastError())

#define LAB_CUBLAS_CHECK(call)                                                    \
  do {                                                                            \
    cublasStatus_t lab_st_ = (call);                                              \
    if (lab_st_ != CUBLAS_STATUS_SUCCESS)                                         \
      ::lab::throw_cublas_error(lab_st_, #call, __FILE__, __LINE__);              \
  } while (0)
