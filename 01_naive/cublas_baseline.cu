// 01_naive, variant "cublas": what a library gives without fusion. This is PyTorch eager's
// recipe for attention (baddbmm, softmax, bmm): two batched cuBLAS GEMMs on tensor cores and a
// softmax kernel in between, with S stored in the input dtype (fp16/bf16).
//
// The GEMMs are fast; the cost is the round trip of S through HBM (written, read, P written, read
// again), and storing the logits in 16 bits costs accuracy when they are large (the tests show it).
// It is the baseline the ladder measures every later chapter against.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>
#include <mutex>

#include "01_naive/kernel.h"
#include "common/cuda_check.h"

namespace ch01 {

const lab::Support kCublasSupport = [] {
  lab::Support s;
  s.chapter = "01_naive/cublas";
  s.max_head_dim = 256;
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.vector_elems = 8;  // cuBLAS tensor-core paths want 16-byte aligned rows
  return s;
}();

namespace {

cublasHandle_t handle_for_current_device() {
  static std::mutex mu;
  static cublasHandle_t handles[64] = {};
  int dev = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (!handles[dev]) LAB_CUBLAS_CHECK(cublasCreate(&handles[dev]));
  return handles[dev];
}

// Pointer arrays for cublasGemmBatchedEx, one entry per (batch, query head). GQA maps query head h
// to KV head h / (heads_q / heads_kv), which no single stride can express.
template <class T>
__global__ void build_pointers(lab::AttnParams p, T* S, const void** ptrs) {
  const int z = blockIdx.x * blockDim.x + threadIdx.x, n = p.batch * p.heads_q;
  if (z >= n) return;
  const int b = z / p.heads_q, h = z % p.heads_q, h_kv = h / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;
  T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  T* s = S + size_t(z) * p.seqlen_q * p.seqlen_kv;
  ptrs[0 * n + z] = k;
  ptrs[1 * n + z] = q;
  ptrs[2 * n + z] = s;
  ptrs[3 * n + z] = v;
  ptrs[4 * n + z] = o;
}

template <class T>
__device__ float to_f(T x) { return float(x); }

// One block per row; S already holds scale * q.k in T. Written back as P in T, in place.
template <class T>
__global__ void __launch_bounds__(256) softmax_rows_inplace(lab::AttnParams p, T* S) {
  __shared__ float partial[8];
  const size_t row = blockIdx.x;
  const int i = int(row % p.seqlen_q);
  const int n_visible = p.causal ? min(max(i + p.seqlen_kv - p.seqlen_q + 1, 0), p.seqlen_kv)
                                 : p.seqlen_kv;
  T* s = S + row * p.seqlen_kv;
  auto reduce = [&](float v, bool is_max) {
    for (int o = 16; o > 0; o /= 2) {
      const float w = __shfl_xor_sync(0xffffffffu, v, o);
      v = is_max ? fmaxf(v, w) : v + w;
    }
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    v = partial[0];
    for (int k = 1; k < 8; ++k) v = is_max ? fmaxf(v, partial[k]) : v + partial[k];
    __syncthreads();
    return v;
  };
  float m = -INFINITY;
  for (int j = threadIdx.x; j < n_visible; j += 256) m = fmaxf(m, to_f(s[j]));
  m = reduce(m, true);
  float l = 0.f;
  for (int j = threadIdx.x; j < n_visible; j += 256) l += __expf(to_f(s[j]) - m);
  l = reduce(l, false);
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  for (int j = threadIdx.x; j < p.seqlen_kv; j += 256)
    s[j] = T(j < n_visible ? __expf(to_f(s[j]) - m) * inv_l : 0.f);
}

template <class T>
void launch(const lab::AttnParams& p, cudaStream_t stream, cudaDataType_t type) {
  const int n = p.batch * p.heads_q;
  T* S = static_cast<T*>(p.workspace);
  const size_t s_bytes = size_t(n) * p.seqlen_q * p.seqlen_kv * sizeof(T);
  const void** ptrs = reinterpret_cast<const void**>(static_cast<char*>(p.workspace) + ((s_bytes + 255) / 256) * 256);
  build_pointers<T><<<(n + 255) / 256, 256, 0, stream>>>(p, S, ptrs);
  LAB_LAUNCH_CHECK();

  cublasHandle_t h = handle_for_current_device();
  LAB_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float alpha = p.softmax_scale, one = 1.f, zero = 0.f;
  // Column-major view: S^T (sk x sq) = K (as d x sk, transposed) x Q (as d x sq).
  LAB_CUBLAS_CHECK(cublasGemmBatchedEx(
      h, CUBLAS_OP_T, CUBLAS_OP_N, p.seqlen_kv, p.seqlen_q, p.head_dim, &alpha, ptrs + 0 * n, type,
      int(p.k_row_stride), ptrs + 1 * n, type, int(p.q_row_stride), &zero,
      const_cast<void**>(ptrs + 2 * n), type, p.seqlen_kv, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  softmax_rows_inplace<T><<<unsigned(size_t(n) * p.seqlen_q), 256, 0, stream>>>(p, S);
  LAB_LAUNCH_CHECK();
  // O^T (d x sq) = V (as d x sk) x P^T (as sk x sq).
  LAB_CUBLAS_CHECK(cublasGemmBatchedEx(
      h, CUBLAS_OP_N, CUBLAS_OP_N, p.head_dim, p.seqlen_q, p.seqlen_kv, &one, ptrs + 3 * n, type,
      int(p.v_row_stride), ptrs + 2 * n, type, p.seqlen_kv, &zero, const_cast<void**>(ptrs + 4 * n),
      type, int(p.o_row_stride), n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

size_t cublas_workspace_bytes(const lab::AttnParams& p) {
  const size_t s_bytes = size_t(p.batch) * p.heads_q * p.seqlen_q * size_t(p.seqlen_kv) * 2;
  return ((s_bytes + 255) / 256) * 256 + size_t(5) * p.batch * p.heads_q * sizeof(void*);
}

void forward_cublas(const lab::AttnParams& p, cudaStream_t stream) {
  lab::check_params(p, kCublasSupport);
  // One softmax block per row of S on grid.x (unsigned: past 2^32 rows it would wrap).
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  if (rows > 0x7fffffff)
    throw lab::InvalidArgument(
        "01_naive/cublas: batch * heads_q * seqlen_q = " + std::to_string(rows) +
        " rows of S are not supported (supported: up to 2147483647, the softmax's grid.x limit)");
  if (!p.workspace || p.workspace_bytes < cublas_workspace_bytes(p))
    throw lab::InvalidArgument("01_naive/cublas: workspace of " +
                               std::to_string(cublas_workspace_bytes(p)) + " bytes needed, got " +
                               std::to_string(p.workspace_bytes));
  constexpr int64_t kMaxLeadingDim = std::numeric_limits<int>::max();  // cuBLAS takes int strides
  if (p.q_row_stride > kMaxLeadingDim || p.k_row_stride > kMaxLeadingDim || p.v_row_stride > kMaxLeadingDim ||
      p.o_row_stride > kMaxLeadingDim)
    throw lab::InvalidArgument("01_naive/cublas: row strides must fit in 32 bits for cuBLAS");
  if (p.dtype == lab::DType::fp16) launch<__half>(p, stream, CUDA_R_16F);
  else launch<__nv_bfloat16>(p, stream, CUDA_R_16BF);
}

}  // namespace ch01
