// 02_flash_v1: FlashAttention-1, the paper's Algorithm 1, on CUDA cores (fp32 math).
//
// What changes from 01_naive: S never reaches HBM. K and V are cut into tiles K_j, V_j of B_c
// keys, Q into tiles Q_i of B_r rows; a B_r x B_c tile of S lives in shared memory only, and the
// softmax is computed online: each row keeps its running max m_i and sum l_i, and when a new tile
// raises the max, what was accumulated so far is rescaled by exp(m_old - m_new).
//
// The loop order is the paper's: K_j/V_j outer, Q_i inner. So the running O_i, l_i, m_i of every
// query tile must survive between visits: they are read from and written back to global memory
// (fp32) for every (i, j) pair, and O_i is renormalized at every step (Algorithm 1, line 12).
// That traffic, and the CUDA-core arithmetic, are what 03_flash_v2 removes.
//
// Parallelism: the paper's kernel runs one block per (batch, head). One block per (batch, head)
// is 16 to 1024 blocks on the prefill grid, under 8 per SM, so each (batch, head) is also split
// into groups of query tiles: each block runs Algorithm 1 on its group. With one group this is
// exactly Algorithm 1; more groups only re-read K_j/V_j once per group.
//
// clang-format off
//   for j in 0 .. T_c-1:                       (outer: one K_j, V_j tile in shared memory)
//     load K_j, V_j                                      +-----+-----+-----+
//     for i in my query tiles:                 (inner)   | S_ij = scale Q_i K_j^T   (smem)
//       load Q_i; load O_i, l_i, m_i from HBM            | m~ = rowmax, P~ = exp(S - m~), l~ = rowsum
//       m_new = max(m_i, m~);  l_new = e^(m_i-m_new) l_i + e^(m~-m_new) l~
//       O_i = (l_i e^(m_i-m_new) O_i + e^(m~-m_new) P~ V_j) / l_new   -> back to HBM
// clang-format on
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "02_flash_v1/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch02 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "02_flash_v1";
  s.max_head_dim = 128;
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.vector_elems = 1;  // scalar loads: any head_dim up to 128, any stride
  return s;
}();

namespace {

constexpr int B_r = 64, B_c = 64, kThreads = 256;

template <class T>
__device__ float to_float(T x) { return float(x); }

// Shared memory for head_dim up to D: Q_i and K_j rows padded to D + 1 floats (the S loop reads
// 16 different rows at the same column: an odd stride spreads them over the banks). SHARE_KV: V_j
// has no buffer of its own (see the kernel).
template <int D, bool SHARE_KV>
constexpr size_t smem_bytes() {
  return sizeof(float) * (size_t(B_r) * (D + 1) + size_t(B_c) * (D + 1) +
                          (SHARE_KV ? 0 : size_t(B_c) * D) + size_t(B_r) * (B_c + 1) + 2 * B_r);
}

// SHARE_KV (where a block may not have the 115,968 bytes of head_dim 128, e.g. 99 KB on
// sm_86/89/120): K_j is not needed once S_ij = Q_i K_j^T is in shared memory, so V_j is loaded
// into K_j's buffer then, and K_j again for the next Q_i: 83,200 bytes, for K_j and V_j read for
// every (i, j) pair instead of once per K_j.
template <class T, int D, bool SHARE_KV>
__global__ void __launch_bounds__(kThreads) flash_v1(const lab::AttnParams p, float* O_acc,
                                                     float* l_acc, float* m_acc, int tiles_per_block) {
  extern __shared__ float smem[];
  float* Qs = smem;                       // [B_r][D + 1]
  float* Ks = Qs + B_r * (D + 1);         // [B_c][D + 1]
  float* Vs = SHARE_KV ? Ks : Ks + B_c * (D + 1);             // [B_c][D]
  float* Ss = Ks + B_c * (D + 1) + (SHARE_KV ? 0 : B_c * D);  // [B_r][B_c + 1]: S_ij, then P~_ij
  float* row_alpha = Ss + B_r * (B_c + 1);  // per row: l_i e^(m_i - m_new) / l_new
  float* row_beta = row_alpha + B_r;        // per row: e^(m~ - m_new) / l_new

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int d = p.head_dim, sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;
  const int T_r = (sq + B_r - 1) / B_r;
  const int i_begin = blockIdx.y * tiles_per_block, i_end = min(T_r, i_begin + tiles_per_block);

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  float* O_run = O_acc + size_t(bh) * sq * d;  // running O_i, l_i, m_i of this (batch, head)
  float* l_run = l_acc + size_t(bh) * sq;
  float* m_run = m_acc + size_t(bh) * sq;

  // The last key tile query tile i sees (-1: none, only with causal and seqlen_q > seqlen_kv).
  auto last_tile = [&](int i) {
    const int last_row = min((i + 1) * B_r, sq) - 1;
    const int last_key = p.causal ? min(sk - 1, last_row + diag) : sk - 1;
    return last_key < 0 ? -1 : last_key / B_c;
  };
  // Query tiles that see no key at all: O = 0 and lse = -inf, written once.
  for (int i = i_begin; i < i_end && last_tile(i) < 0; ++i)
    for (int e = tid; e < B_r * d; e += kThreads) {
      const int row = i * B_r + e / d;
      if (row >= sq) continue;
      O[row * p.o_row_stride + e % d] = T(0.f);
      if (p.lse && e % d == 0) p.lse[size_t(bh) * sq + row] = -INFINITY;
    }

  const int T_c = i_end > i_begin ? last_tile(i_end - 1) + 1 : 0;
  for (int j = 0; j < T_c; ++j) {  // outer loop over K_j, V_j (Algorithm 1, line 5)
    const int n0 = j * B_c;
    __syncthreads();  // every thread is done with the previous K_j, V_j
    if constexpr (!SHARE_KV)
      for (int e = tid; e < B_c * d; e += kThreads) {
        const int r = e / d, c = e % d;
        const bool valid = n0 + r < sk;
        Ks[r * (D + 1) + c] = valid ? to_float(K[(n0 + r) * p.k_row_stride + c]) : 0.f;
        Vs[r * D + c] = valid ? to_float(V[(n0 + r) * p.v_row_stride + c]) : 0.f;
      }

    for (int i = i_begin; i < i_end; ++i) {  // inner loop over Q_i (line 7)
      if (j > last_tile(i)) continue;         // causal: K_j is entirely right of Q_i's diagonal
      const int m0 = i * B_r;
      const bool last_visit = j == last_tile(i);
      __syncthreads();  // previous Q_i, S and row factors are consumed
      for (int e = tid; e < B_r * d; e += kThreads) {  // line 8: Q_i from HBM
        const int r = e / d, c = e % d;
        Qs[r * (D + 1) + c] = m0 + r < sq ? to_float(Q[(m0 + r) * p.q_row_stride + c]) : 0.f;
      }
      if constexpr (SHARE_KV)  // K_j, over the previous Q_i's V_j
        for (int e = tid; e < B_c * d; e += kThreads) {
          const int r = e / d, c = e % d;
          Ks[r * (D + 1) + c] = n0 + r < sk ? to_float(K[(n0 + r) * p.k_row_stride + c]) : 0.f;
        }
      __syncthreads();

      // S_ij = scale * Q_i K_j^T (line 9): each thread a 4 x 4 micro-tile, rows ty + 16y, cols tx + 16x.
      float acc[4][4] = {};
      for (int c = 0; c < d; ++c) {
        float q[4], k[4];
        for (int y = 0; y < 4; ++y) q[y] = Qs[(ty + 16 * y) * (D + 1) + c];
        for (int x = 0; x < 4; ++x) k[x] = Ks[(tx + 16 * x) * (D + 1) + c];
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 4; ++x) acc[y][x] = fmaf(q[y], k[x], acc[y][x]);
      }
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < 4; ++x) {
          const int row = m0 + ty + 16 * y, col = n0 + tx + 16 * x;
          const bool masked = col >= sk || (p.causal && col > row + diag);
          Ss[(ty + 16 * y) * (B_c + 1) + tx + 16 * x] = masked ? -INFINITY : p.softmax_scale * acc[y][x];
        }
      __syncthreads();
      if constexpr (SHARE_KV)  // V_j over K_j: every thread is done with K_j (the barrier above)
        for (int e = tid; e < B_c * d; e += kThreads) {
          const int r = e / d, c = e % d;
          Vs[r * D + c] = n0 + r < sk ? to_float(V[(n0 + r) * p.v_row_stride + c]) : 0.f;
        }

      // Row statistics of this tile (line 10) and the new running statistics (line 11).
      // Four threads per row, 16 columns each.
      {
        const int r = tid / 4, q4 = tid % 4, row = m0 + r;
        // LAB-BEGIN(tile-stats): this row's m~ and l~ over its 64 scores, P~ = exp(S - m~) written over S
        // LAB-STUB: float m_tile = -INFINITY, l_tile = 0.f;
        float* s_row = Ss + r * (B_c + 1) + 16 * q4;
        float m_tile = -INFINITY;
        for (int c = 0; c < 16; ++c) m_tile = fmaxf(m_tile, s_row[c]);
        m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
        m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 2));
        // A row with no visible key here has m~ = -inf: e^(-inf - 0) = 0. Not a test on m~ alone:
        // fmaxf drops NaN, and a row of NaN scores (NaN in Q_i) must make P~ NaN (the NaN rule).
        const float m_ref = m_tile == -INFINITY ? 0.f : m_tile;
        float l_tile = 0.f;
        for (int c = 0; c < 16; ++c) {
          const float pv = __expf(s_row[c] - m_ref);  // P~_ij
          s_row[c] = pv;
          l_tile += pv;
        }
        l_tile += __shfl_xor_sync(0xffffffffu, l_tile, 1);
        l_tile += __shfl_xor_sync(0xffffffffu, l_tile, 2);
        // LAB-END(tile-stats)
        if (q4 == 0) {
          // LAB-BEGIN(rescale): m_new, l_new (line 11), the factors of line 12, m_i, l_i (or lse) to HBM
          // LAB-STUB: row_alpha[r] = 0.f, row_beta[r] = 0.f;
          float m_old = -INFINITY, l_old = 0.f;  // Algorithm 1, line 2: l = 0, m = -inf
          if (j > 0 && row < sq) m_old = m_run[row], l_old = l_run[row];
          const float m_new = fmaxf(m_old, m_tile);
          const float a = m_new == -INFINITY ? 0.f : __expf(m_old - m_new);
          const float bt = m_new == -INFINITY ? 0.f : __expf(m_tile - m_new);
          const float l_new = a * l_old + bt * l_tile;
          const float inv = l_new != 0.f ? 1.f / l_new : 0.f;  // NaN l_new (NaN scores) stays NaN
          row_alpha[r] = l_old * a * inv;
          row_beta[r] = bt * inv;
          if (row < sq) {
            if (!last_visit) m_run[row] = m_new, l_run[row] = l_new;  // line 13: back to HBM
            else if (p.lse)
              p.lse[size_t(bh) * sq + row] = l_new != 0.f ? m_new + logf(l_new) : -INFINITY;
          }
          // LAB-END(rescale)
        }
      }
      __syncthreads();  // and V_j has landed, where it shares K_j's buffer

      // O_i = diag(alpha) O_i + diag(beta) P~_ij V_j (line 12); O_i read from and written to HBM.
      constexpr int X = D / 16;
      float pv[4][X] = {};
      for (int c = 0; c < B_c; ++c) {
        float pr[4], vr[X];
        for (int y = 0; y < 4; ++y) pr[y] = Ss[(ty + 16 * y) * (B_c + 1) + c];
        for (int x = 0; x < X; ++x) vr[x] = Vs[c * D + tx + 16 * x];
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < X; ++x) pv[y][x] = fmaf(pr[y], vr[x], pv[y][x]);
      }
      for (int y = 0; y < 4; ++y) {
        const int r = ty + 16 * y, row = m0 + r;
        if (row >= sq) continue;
        for (int x = 0; x < X; ++x) {
          const int col = tx + 16 * x;
          if (col >= d) continue;
          float* o_run = O_run + size_t(row) * d + col;
          // LAB-BEGIN(o-update): O_i = diag(alpha) O_i + diag(beta) P~ V_j for this element (line 12)
          // LAB-STUB: const float o_new = pv[y][x];
          const float o_old = j > 0 ? *o_run : 0.f;
          const float o_new = row_alpha[r] * o_old + row_beta[r] * pv[y][x];
          // LAB-END(o-update)
          if (last_visit) O[row * p.o_row_stride + col] = T(o_new);  // final: the output tensor
          else *o_run = o_new;
        }
      }
    }
  }
}

template <class T, int D>
void launch(const lab::AttnParams& p, cudaStream_t stream, bool share_kv) {
  const size_t smem = share_kv ? smem_bytes<D, true>() : smem_bytes<D, false>();
  auto kernel = share_kv ? flash_v1<T, D, true> : flash_v1<T, D, false>;
  // Refuses by name (InvalidArgument) where the device, or LAB_SMEM_CAP, allows less shared memory
  // than even plan_for's shared K_j/V_j buffer needs (83,200 bytes at head_dim 128).
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), kThreads, smem,
                        D > 64 ? "02_flash_v1 (head_dim 65..128)" : "02_flash_v1");
  const int sms = lab::device_limits().sm_count;
  // Groups of query tiles: enough blocks for ~8 per SM, as few groups as that allows.
  const int T_r = (p.seqlen_q + B_r - 1) / B_r;
  const int64_t bh = int64_t(p.batch) * p.heads_q;
  const int64_t groups_wanted = std::max<int64_t>(1, (int64_t(sms) * 8 + bh - 1) / bh);
  const int tiles_per_block = int(std::max<int64_t>(1, (T_r + groups_wanted - 1) / groups_wanted));
  const int groups = (T_r + tiles_per_block - 1) / tiles_per_block;

  float* O_acc = static_cast<float*>(p.workspace);
  float* l_acc = O_acc + size_t(bh) * p.seqlen_q * p.head_dim;
  float* m_acc = l_acc + size_t(bh) * p.seqlen_q;
  kernel<<<dim3(unsigned(bh), unsigned(groups)), kThreads, smem, stream>>>(p, O_acc, l_acc, m_acc,
                                                                           tiles_per_block);
  LAB_LAUNCH_CHECK();
}

}  // namespace

Plan plan_for(int head_dim, size_t smem_per_block) {
  const auto bytes = [head_dim](bool share) {
    if (head_dim <= 64) return share ? smem_bytes<64, true>() : smem_bytes<64, false>();
    return share ? smem_bytes<128, true>() : smem_bytes<128, false>();
  };
  // Separate K_j and V_j buffers where they fit; else the shared one, which the launcher refuses
  // by name if even that does not fit.
  const bool share = bytes(false) > smem_per_block;
  return {share, bytes(share)};
}

size_t workspace_bytes(const lab::AttnParams& p) {
  const size_t rows = size_t(p.batch) * p.heads_q * p.seqlen_q;
  return rows * (size_t(p.head_dim) + 2) * sizeof(float);
}

void forward_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap) {
  lab::check_params(p, kSupport);
  if (!p.workspace || p.workspace_bytes < workspace_bytes(p))
    throw lab::InvalidArgument("02_flash_v1: workspace of " + std::to_string(workspace_bytes(p)) +
                               " bytes needed for the running O, l, m; got " +
                               std::to_string(p.workspace_bytes));
  if (int64_t(p.batch) * p.heads_q > 0x7fffffff)  // (batch, head) pairs on grid.x
    throw lab::InvalidArgument(
        "02_flash_v1: batch * heads_q = " + std::to_string(int64_t(p.batch) * p.heads_q) +
        " is not supported (supported: up to 2147483647, the grid.x limit)");
  if (p.seqlen_q > 65535 * B_r)
    throw lab::InvalidArgument("02_flash_v1: seqlen_q = " + std::to_string(p.seqlen_q) +
                               " is not supported (supported: 1.." + std::to_string(65535 * B_r) + ")");
  // V_j shares K_j's buffer where the device (or the cap) allows less than separate buffers need.
  const size_t smem_per_block = std::min(smem_cap, lab::device_limits().smem_per_block);
  const bool share = plan_for(p.head_dim, smem_per_block).share_kv;
  const bool fp16 = p.dtype == lab::DType::fp16;
  if (p.head_dim <= 64)
    fp16 ? launch<__half, 64>(p, stream, share) : launch<__nv_bfloat16, 64>(p, stream, share);
  else
    fp16 ? launch<__half, 128>(p, stream, share) : launch<__nv_bfloat16, 128>(p, stream, share);
}

void forward(const lab::AttnParams& p, cudaStream_t stream) { forward_with_smem_cap(p, stream, SIZE_MAX); }

}  // namespace ch02
