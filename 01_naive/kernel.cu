// 01_naive: the textbook algorithm, one kernel per line of it.
//
//   S = scale * Q K^T        [seqlen_q x seqlen_kv] per (batch, head), fp32, written to HBM
//   P = softmax(S)           row by row, in place (masked keys get 0)
//   O = P V                  read P back from HBM
//
// Cost: S is written once and read twice (softmax, then PV) and P written once: O(N^2) bytes of
// HBM traffic per head, against O(N^2 d) FLOPs. At seqlen 4096, 16 heads and batch 4 that is 4.3 GB
// per pass over S, more time than the arithmetic itself, and the memory grows as N^2 (S for
// seqlen 16k and 32 heads is 34 GB). Every later chapter removes this traffic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "01_naive/kernel.h"
#include "common/cuda_check.h"

namespace ch01 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "01_naive";
  s.max_head_dim = 256;
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.vector_elems = 1;  // scalar loads: any head_dim and stride
  return s;
}();

namespace {

template <class T>
__device__ float to_float(T x);
template <>
__device__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ T from_float(float x);
template <>
__device__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Both matrix products use the classic shared-memory tiling: a block computes a TILE x TILE output
// tile, 16 x 16 threads, each thread a 4 x 4 micro-tile, stepping through the inner dimension
// TK at a time.
constexpr int TILE = 64, TK = 16, THREADS = 256;

// S[b, h, i, j] = scale * Q_i . K_j, or -inf where the causal mask hides key j from query i.
template <class T>
__global__ void __launch_bounds__(THREADS) compute_scores(lab::AttnParams p, float* S) {
  __shared__ float Qs[TK][TILE + 1];  // +1: the transposing stores hit distinct banks
  __shared__ float Ks[TK][TILE + 1];
  const int bh = blockIdx.z, b = bh / p.heads_q, h = bh % p.heads_q;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;

  float acc[4][4] = {};
  for (int c0 = 0; c0 < p.head_dim; c0 += TK) {
    // Stage Q[i0 .. i0+63][c0 .. c0+15] and the same slice of K, transposed, zero outside.
    for (int e = threadIdx.x; e < TILE * TK; e += THREADS) {
      const int r = e / TK, c = e % TK;
      const bool in_c = c0 + c < p.head_dim;
      Qs[c][r] = (i0 + r < p.seqlen_q && in_c) ? to_float(Q[(i0 + r) * p.q_row_stride + c0 + c]) : 0.f;
      Ks[c][r] = (j0 + r < p.seqlen_kv && in_c) ? to_float(K[(j0 + r) * p.k_row_stride + c0 + c]) : 0.f;
    }
    __syncthreads();
    for (int c = 0; c < TK; ++c)
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < 4; ++x) acc[y][x] += Qs[c][ty + 16 * y] * Ks[c][tx + 16 * x];
    __syncthreads();
  }
  float* S_bh = S + size_t(bh) * p.seqlen_q * p.seqlen_kv;
  for (int y = 0; y < 4; ++y) {
    const int i = i0 + ty + 16 * y;
    if (i >= p.seqlen_q) continue;
    for (int x = 0; x < 4; ++x) {
      const int j = j0 + tx + 16 * x;
      if (j >= p.seqlen_kv) continue;
      const bool masked = p.causal && j > i + p.seqlen_kv - p.seqlen_q;
      S_bh[size_t(i) * p.seqlen_kv + j] = masked ? -INFINITY : p.softmax_scale * acc[y][x];
    }
  }
}

__device__ float block_reduce(float v, bool is_max) {
  __shared__ float partial[32];
  // LAB-BEGIN(block-reduce): reduce v over the block: warp shuffles, a partial per warp in partial[]
  for (int o = 16; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < blockDim.x / 32; ++w) v = is_max ? fmaxf(v, partial[w]) : v + partial[w];
  __syncthreads();  // partial[] is reused by the next call
  // LAB-END(block-reduce)
  return v;
}

// One block per row of S: P_ij = exp(S_ij - m_i) / l_i, written over S. lse_i = m_i + log(l_i).
__global__ void __launch_bounds__(THREADS) softmax_rows(lab::AttnParams p, float* S) {
  const size_t row = blockIdx.x;  // (b * heads_q + h) * seqlen_q + i
  float* s = S + row * p.seqlen_kv;
  // LAB-BEGIN(row-softmax): m_i and l_i of this row, then P_ij = exp(S_ij - m_i) / l_i over S, and lse_i
  float m = -INFINITY;
  for (int j = threadIdx.x; j < p.seqlen_kv; j += THREADS) m = fmaxf(m, s[j]);
  m = block_reduce(m, true);
  // A row that sees no key has m = -inf and keeps P = 0 (e^(-inf - 0) = 0). fmaxf drops NaN, so
  // a NaN (or +inf) score makes l NaN and, through `l != 0`, every P_ij and lse_i (common/attn.h).
  const float m_ref = m == -INFINITY ? 0.f : m;
  float l = 0.f;
  for (int j = threadIdx.x; j < p.seqlen_kv; j += THREADS) l += expf(s[j] - m_ref);
  l = block_reduce(l, false);
  const float inv_l = l != 0.f ? 1.f / l : 0.f;
  for (int j = threadIdx.x; j < p.seqlen_kv; j += THREADS) s[j] = l != 0.f ? expf(s[j] - m_ref) * inv_l : 0.f;
  if (p.lse && threadIdx.x == 0) p.lse[row] = l != 0.f ? m + logf(l) : -INFINITY;
  // LAB-END(row-softmax)
}

// O[b, i, h, c] = sum_j P[b, h, i, j] * V[b, j, h_kv, c]
template <class T>
__global__ void __launch_bounds__(THREADS) compute_output(lab::AttnParams p, const float* P) {
  __shared__ float Ps[TK][TILE + 1];
  __shared__ float Vs[TK][TILE];
  const int bh = blockIdx.z, b = bh / p.heads_q, h = bh % p.heads_q;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int i0 = blockIdx.y * TILE, c0 = blockIdx.x * TILE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;
  const float* P_bh = P + size_t(bh) * p.seqlen_q * p.seqlen_kv;

  float acc[4][4] = {};
  for (int j0 = 0; j0 < p.seqlen_kv; j0 += TK) {
    for (int e = threadIdx.x; e < TILE * TK; e += THREADS) {
      const int r = e / TK, j = e % TK;  // P: 64 rows x 16 keys
      Ps[j][r] = (i0 + r < p.seqlen_q && j0 + j < p.seqlen_kv)
                     ? P_bh[size_t(i0 + r) * p.seqlen_kv + j0 + j] : 0.f;
      const int jv = e / TILE, c = e % TILE;  // V: 16 keys x 64 channels
      Vs[jv][c] = (j0 + jv < p.seqlen_kv && c0 + c < p.head_dim)
                      ? to_float(V[(j0 + jv) * p.v_row_stride + c0 + c]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < TK; ++j)
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < 4; ++x) acc[y][x] += Ps[j][ty + 16 * y] * Vs[j][tx + 16 * x];
    __syncthreads();
  }
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  for (int y = 0; y < 4; ++y) {
    const int i = i0 + ty + 16 * y;
    if (i >= p.seqlen_q) continue;
    for (int x = 0; x < 4; ++x) {
      const int c = c0 + tx + 16 * x;
      if (c < p.head_dim) O[i * p.o_row_stride + c] = from_float<T>(acc[y][x]);
    }
  }
}

template <class T>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  float* S = static_cast<float*>(p.workspace);
  const unsigned bh = unsigned(p.batch * p.heads_q);
  const dim3 grid_s((p.seqlen_kv + TILE - 1) / TILE, (p.seqlen_q + TILE - 1) / TILE, bh);
  compute_scores<T><<<grid_s, THREADS, 0, stream>>>(p, S);
  LAB_LAUNCH_CHECK();
  softmax_rows<<<unsigned(size_t(bh) * p.seqlen_q), THREADS, 0, stream>>>(p, S);
  LAB_LAUNCH_CHECK();
  const dim3 grid_o((p.head_dim + TILE - 1) / TILE, (p.seqlen_q + TILE - 1) / TILE, bh);
  compute_output<T><<<grid_o, THREADS, 0, stream>>>(p, S);
  LAB_LAUNCH_CHECK();
}

}  // namespace

size_t workspace_bytes(const lab::AttnParams& p) {
  return size_t(p.batch) * p.heads_q * p.seqlen_q * size_t(p.seqlen_kv) * sizeof(float);
}

namespace {

// Refuses, by name, a shape whose grids exceed CUDA's limits: (batch, head) pairs on grid.z of the
// two products, 64-row tiles of S and O on grid.y, 64-key tiles of S on grid.x, one block per row
// of S on the softmax's grid.x.
void check_grids(const lab::AttnParams& p) {
  const std::string who = "01_naive: ";
  const int64_t bh = int64_t(p.batch) * p.heads_q, rows = bh * p.seqlen_q;
  if (bh > 65535)
    throw lab::InvalidArgument(who + "batch * heads_q = " + std::to_string(bh) +
                               " is not supported (supported: up to 65535, the grid.z limit)");
  if ((int64_t(p.seqlen_q) + TILE - 1) / TILE > 65535)
    throw lab::InvalidArgument(who + "seqlen_q = " + std::to_string(p.seqlen_q) +
                               " is not supported (supported: 1.." + std::to_string(65535 * TILE) +
                               ": 65535 tiles of " + std::to_string(TILE) + " query rows, the grid.y limit)");
  if (p.seqlen_kv > 0x7fffffff - TILE)  // seqlen_kv + TILE - 1 must not wrap
    throw lab::InvalidArgument(who + "seqlen_kv = " + std::to_string(p.seqlen_kv) +
                               " is not supported (supported: 1.." + std::to_string(0x7fffffff - TILE) + ")");
  if (rows > 0x7fffffff)
    throw lab::InvalidArgument(
        who + "batch * heads_q * seqlen_q = " + std::to_string(rows) +
        " rows of S are not supported (supported: up to 2147483647, the softmax's grid.x limit)");
}

}  // namespace

void forward(const lab::AttnParams& p, cudaStream_t stream) {
  lab::check_params(p, kSupport);
  check_grids(p);
  if (!p.workspace || p.workspace_bytes < workspace_bytes(p))
    throw lab::InvalidArgument("01_naive: workspace of " + std::to_string(workspace_bytes(p)) +
                               " bytes needed for S, got " + std::to_string(p.workspace_bytes));
  if (p.dtype == lab::DType::fp16) launch<__half>(p, stream);
  else launch<__nv_bfloat16>(p, stream);
}

}  // namespace ch01
