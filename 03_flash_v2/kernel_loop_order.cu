// 03_flash_v2, step 0 ("loop_order"): FlashAttention-2's loop order, still on CUDA cores (fp32 math).
//
// What changes from 02_flash_v1 (`diff -u -w 02_flash_v1/kernel.cu 03_flash_v2/kernel_loop_order.cu`):
// the two loops swap. A block owns one query tile Q_i (grid: (batch * heads_q, T_r)) and walks
// over every K_j, V_j inside. So Q_i is loaded once, and the running O_i, l_i, m_i never leave the
// chip: O_i lives in the registers of the threads that compute P~ V_j, m_i and l_i in those of the
// threads that reduce a row, and O_i reaches HBM once, at the end. The fp32 workspace that 02
// read and wrote for every (i, j) pair, and its groups of query tiles, are gone.
//
// What it still costs: everything else is 02's. The arithmetic is fp32 FMAs on CUDA cores, fed
// from shared memory (each 4 x 4 micro-tile does 16 FMAs for 8 shared-memory loads); O_i is still
// renormalized by l at every tile (Algorithm 1's update, kept so that this diff is the loop order
// only); and the shared memory is 02's but for Q_i's padding (below): 113 KB per block at d = 128,
// two 256-thread blocks per 228 KB SM (02: one); 65 KB at d <= 64, three. Step 1 (kernel_mma.cu)
// runs the same loop on tensor cores.
//
// Besides the loop order, three guards test S == -inf and l == 0 where 02 tests m == -inf and
// l > 0: a NaN score then gives a NaN row and lse (the lab's NaN rule, common/attn.h), not 0.
//
// clang-format off
//   block (b, h, i):  load Q_i;  O_i = 0, l_i = 0, m_i = -inf     (registers, for the whole loop)
//   for j in 0 .. T_c-1:                       (the only loop: K_j, V_j through shared memory)
//     load K_j, V_j                                      +-----+-----+-----+
//     S_ij = scale Q_i K_j^T   (smem)                    | m~ = rowmax, P~ = exp(S - m~), l~ = rowsum
//     m_new = max(m_i, m~);  l_new = e^(m_i-m_new) l_i + e^(m~-m_new) l~
//     O_i = (l_i e^(m_i-m_new) O_i + e^(m~-m_new) P~ V_j) / l_new            (in registers)
//   O_i -> HBM once
// clang-format on
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "03_flash_v2/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch03 {

const lab::Support kSupportLoopOrder = [] {
  lab::Support s;
  s.chapter = "03_flash_v2/loop_order";
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

// Shared memory for head_dim up to D: K_j rows padded to D + 1 floats (the S loop reads 16
// different rows at the same column: an odd stride spreads them over the banks). Q_i rows are not
// padded: a warp reads Q_i at 2 addresses at a time (broadcasts), and the 256 bytes saved make
// d = 128 fit twice in a Hopper SM (2 x (115,712 + 1,024 reserved) = 228 KB). SHARE_KV: V_j
// has no buffer of its own (see the kernel).
template <int D, bool SHARE_KV>
constexpr size_t smem_bytes() {
  return sizeof(float) * (size_t(B_r) * D + size_t(B_c) * (D + 1) +
                          (SHARE_KV ? 0 : size_t(B_c) * D) + size_t(B_r) * (B_c + 1) + 2 * B_r);
}

// At d = 128 the shared memory fits two blocks per SM; the bound (at most 128 registers per
// thread) keeps the registers from limiting them to one. At d <= 64 (0: no bound) ptxas stays
// under the 85 registers of three blocks by itself; a bound of 3 made it spill.
// SHARE_KV (where a block may not have the 115,712 bytes of head_dim 128, e.g. 99 KB on
// sm_86/89/120): as in 02, V_j is loaded into K_j's buffer once S_ij is computed: 82,944 bytes.
// One Q_i per block, so K_j and V_j are still read once; V_j's load now waits for S_ij.
template <class T, int D, bool SHARE_KV>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 0 : 2) flash_loop_order(const lab::AttnParams p) {
  extern __shared__ float smem[];
  float* Qs = smem;                       // [B_r][D]
  float* Ks = Qs + B_r * D;               // [B_c][D + 1]
  float* Vs = SHARE_KV ? Ks : Ks + B_c * (D + 1);             // [B_c][D]
  float* Ss = Ks + B_c * (D + 1) + (SHARE_KV ? 0 : B_c * D);  // [B_r][B_c + 1]: S_ij, then P~_ij
  float* row_alpha = Ss + B_r * (B_c + 1);  // per row: l_i e^(m_i - m_new) / l_new
  float* row_beta = row_alpha + B_r;        // per row: e^(m~ - m_new) / l_new

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int d = p.head_dim, sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;
  const int i = blockIdx.y, m0 = i * B_r;  // this block's query tile Q_i

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;

  // The last key tile Q_i sees (-1: none, only with causal and seqlen_q > seqlen_kv).
  const int last_row = min(m0 + B_r, sq) - 1;
  const int last_key = p.causal ? min(sk - 1, last_row + diag) : sk - 1;
  const int T_c = last_key < 0 ? 0 : last_key / B_c + 1;

  for (int e = tid; e < B_r * d; e += kThreads) {  // Q_i from HBM, once
    const int r = e / d, c = e % d;
    Qs[r * D + c] = m0 + r < sq ? to_float(Q[(m0 + r) * p.q_row_stride + c]) : 0.f;
  }
  constexpr int X = D / 16;
  float o[4][X] = {};                      // O_i: rows ty + 16y, cols tx + 16x (P~ V_j's layout)
  float m_i = -INFINITY, l_i = 0.f;        // of row tid / 4 (the statistics' layout)

  for (int j = 0; j < T_c; ++j) {  // the loop over K_j, V_j, inside the block
    const int n0 = j * B_c;
    __syncthreads();  // every thread is done with the previous K_j, V_j, S and row factors
    if constexpr (!SHARE_KV)
      for (int e = tid; e < B_c * d; e += kThreads) {
        const int r = e / d, c = e % d;
        const bool valid = n0 + r < sk;
        Ks[r * (D + 1) + c] = valid ? to_float(K[(n0 + r) * p.k_row_stride + c]) : 0.f;
        Vs[r * D + c] = valid ? to_float(V[(n0 + r) * p.v_row_stride + c]) : 0.f;
      }
    if constexpr (SHARE_KV)  // K_j, over the previous V_j
      for (int e = tid; e < B_c * d; e += kThreads) {
        const int r = e / d, c = e % d;
        Ks[r * (D + 1) + c] = n0 + r < sk ? to_float(K[(n0 + r) * p.k_row_stride + c]) : 0.f;
      }
    __syncthreads();

    // S_ij = scale * Q_i K_j^T: each thread a 4 x 4 micro-tile, rows ty + 16y, cols tx + 16x.
    float acc[4][4] = {};
    for (int c = 0; c < d; ++c) {
      float q[4], k[4];
      for (int y = 0; y < 4; ++y) q[y] = Qs[(ty + 16 * y) * D + c];
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

    // Row statistics of this tile and the new running statistics, kept in registers.
    // Four threads per row, 16 columns each.
    {
      const int r = tid / 4, q4 = tid % 4, row = m0 + r;
      float* s_row = Ss + r * (B_c + 1) + 16 * q4;
      float m_tile = -INFINITY;
      for (int c = 0; c < 16; ++c) m_tile = fmaxf(m_tile, s_row[c]);
      m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
      m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 2));
      float l_tile = 0.f;
      for (int c = 0; c < 16; ++c) {
        const float pv = s_row[c] == -INFINITY ? 0.f : __expf(s_row[c] - m_tile);  // P~_ij; NaN stays
        s_row[c] = pv;
        l_tile += pv;
      }
      l_tile += __shfl_xor_sync(0xffffffffu, l_tile, 1);
      l_tile += __shfl_xor_sync(0xffffffffu, l_tile, 2);
      const float m_old = m_i, l_old = l_i;
      const float m_new = fmaxf(m_old, m_tile);
      const float a = m_new == -INFINITY ? 0.f : __expf(m_old - m_new);
      const float bt = m_new == -INFINITY ? 0.f : __expf(m_tile - m_new);
      const float l_new = a * l_old + bt * l_tile;
      m_i = m_new, l_i = l_new;  // the 4 threads of the row keep the same copy
      if (q4 == 0) {
        const float inv = l_new == 0.f ? 0.f : 1.f / l_new;  // a NaN l_new makes O_i NaN
        row_alpha[r] = l_old * a * inv;
        row_beta[r] = bt * inv;
      }
      if (q4 == 0 && row < sq && j == T_c - 1 && p.lse)
        p.lse[size_t(bh) * sq + row] = l_new == 0.f ? -INFINITY : m_new + logf(l_new);
    }
    __syncthreads();  // and V_j has landed, where it shares K_j's buffer

    // O_i = diag(alpha) O_i + diag(beta) P~_ij V_j, in registers.
    float pv[4][X] = {};
    for (int c = 0; c < B_c; ++c) {
      float pr[4], vr[X];
      for (int y = 0; y < 4; ++y) pr[y] = Ss[(ty + 16 * y) * (B_c + 1) + c];
      for (int x = 0; x < X; ++x) vr[x] = Vs[c * D + tx + 16 * x];
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < X; ++x) pv[y][x] = fmaf(pr[y], vr[x], pv[y][x]);
    }
    for (int y = 0; y < 4; ++y) {
      const int r = ty + 16 * y;
      for (int x = 0; x < X; ++x) o[y][x] = row_alpha[r] * o[y][x] + row_beta[r] * pv[y][x];
    }
  }

  // O_i to HBM, once. A tile that sees no key (T_c = 0) writes O = 0 and lse = -inf.
  for (int y = 0; y < 4; ++y) {
    const int r = ty + 16 * y, row = m0 + r;
    if (row >= sq) continue;
    for (int x = 0; x < X; ++x) {
      const int col = tx + 16 * x;
      if (col < d) O[row * p.o_row_stride + col] = T(o[y][x]);
    }
    if (T_c == 0 && p.lse && tx == 0) p.lse[size_t(bh) * sq + row] = -INFINITY;
  }
}

template <class T, int D>
void launch(const lab::AttnParams& p, cudaStream_t stream, bool share_kv) {
  const size_t smem = share_kv ? smem_bytes<D, true>() : smem_bytes<D, false>();
  auto kernel = share_kv ? flash_loop_order<T, D, true> : flash_loop_order<T, D, false>;
  // Refuses by name (InvalidArgument) where the device, or LAB_SMEM_CAP, allows less shared memory
  // than even plan_loop_order's shared K_j/V_j buffer needs (82,944 bytes at head_dim 128).
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), kThreads, smem, "03_flash_v2/loop_order");
  // One block per (batch, head, query tile): T_r * heads_q * batch blocks, no workspace.
  const int T_r = (p.seqlen_q + B_r - 1) / B_r;
  const int64_t bh = int64_t(p.batch) * p.heads_q;
  kernel<<<dim3(unsigned(bh), unsigned(T_r)), kThreads, smem, stream>>>(p);
  LAB_LAUNCH_CHECK();
}

}  // namespace

Plan plan_loop_order(int head_dim, size_t smem_per_block) {
  const auto bytes = [head_dim](bool share) {
    if (head_dim <= 64) return share ? smem_bytes<64, true>() : smem_bytes<64, false>();
    return share ? smem_bytes<128, true>() : smem_bytes<128, false>();
  };
  // Separate K_j and V_j buffers where they fit; else the shared one, which the launcher refuses
  // by name if even that does not fit.
  const bool share = bytes(false) > smem_per_block;
  return {share, bytes(share)};
}

void forward_loop_order_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap) {
  lab::check_params(p, kSupportLoopOrder);
  if (p.seqlen_q > 65535 * B_r)
    throw lab::InvalidArgument("03_flash_v2/loop_order: seqlen_q = " + std::to_string(p.seqlen_q) +
                               " is not supported (supported: 1.." + std::to_string(65535 * B_r) + ")");
  if (int64_t(p.batch) * p.heads_q > 0x7fffffff)  // (batch, head) pairs on grid.x
    throw lab::InvalidArgument(
        "03_flash_v2/loop_order: batch * heads_q = " + std::to_string(int64_t(p.batch) * p.heads_q) +
        " is not supported (supported: up to 2147483647, the grid.x limit)");
  // V_j shares K_j's buffer where the device (or the cap) allows less than separate buffers need.
  const size_t smem_per_block = std::min(smem_cap, lab::device_limits().smem_per_block);
  const bool share = plan_loop_order(p.head_dim, smem_per_block).share_kv;
  const bool fp16 = p.dtype == lab::DType::fp16;
  if (p.head_dim <= 64)
    fp16 ? launch<__half, 64>(p, stream, share) : launch<__nv_bfloat16, 64>(p, stream, share);
  else
    fp16 ? launch<__half, 128>(p, stream, share) : launch<__nv_bfloat16, 128>(p, stream, share);
}

void forward_loop_order(const lab::AttnParams& p, cudaStream_t stream) {
  forward_loop_order_with_smem_cap(p, stream, SIZE_MAX);
}

}  // namespace ch03
