#include "common/cuda_check.h"

namespace lab {

void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  throw CudaError(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                  ") in " + what + " at " + file + ":" + std::to_string(line));
}

void throw_cublas_error(cublasStatus_t s, const char* what, const char* file, int line) {
  throw CudaError(std::string("cuBLAS error ") + cublasGetStatusName(s) + " (" +
                  cublasGetStatusString(s) + ") in " + what + " at " + file + ":" +
                  std::to_string(line));
}

}  // namespace lab
