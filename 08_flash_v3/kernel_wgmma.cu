// 08_flash_v3, step 1 ("wgmma"): FlashAttention-2's loop on Hopper's warpgroup MMA.
//
// What changes from 03_flash_v2 step 2 (kernel.cu; its loop, its cp.async double buffering):
//   - the block is one warpgroup (4 warps, 128 threads) and both products are wgmma.mma_async:
//     S = Q_i K_j^T is m64 n(B_c) k16 and O_i += P V_j is m64 n(d) k16, each issued by all 128
//     threads at once instead of mma.sync m16n8k16 per warp,
//   - the operands are read by the tensor cores straight from shared memory through descriptors:
//     no ldmatrix, no fragments in registers for Q, K or V. Tiles are stored in the 128-byte
//     swizzled layout the descriptors name (plan.h: sw128_offset); 03's XOR swizzle of 64-element
//     rows is that layout already, split here into 64-column blocks for d = 128,
//   - P stays in registers as the A operand of the second product (the RS form of wgmma),
//   - wgmma is asynchronous: wgmma_fence before, commit, and wait before reading accumulators;
//     tiles written by cp.async (generic proxy) need fence.proxy.async before wgmma reads them.
// What it still costs: each product is waited for at once (the softmax and the tensor cores take
// turns), every thread spends issue slots on cp.async, and a block of 4 warps is all an SM has to
// hide latency with besides its 1-2 neighbours. Step 2 (kernel_tma.cu) moves the copies to TMA.
//
// clang-format off
//   grid: (T_r query tiles of B_r = 64 rows, heads_q, batch)     block: one warpgroup (4 warps)
//
//          K_j^T (B_c keys)               V_j (B_c keys x d)
//         +----------------+             +-----------+
//   Q_i   | S = Q_i K_j^T  |  P = exp2   |           |
//  warp 0 | 16 rows x B_c  | --------->  |  O_i += P V_j   (16 rows x d per warp, in registers)
//  warp 1 | one wgmma per  |  (registers |           |     one wgmma per 16 keys, all 4 warps
//  warp 2 | 16 columns of d|   as the A  |           |
//  warp 3 |                |   operand)  |           |
//         +----------------+             +-----------+
//   timeline per tile j:  [wait K_j, V_j; fence; barrier] [issue K_j+1, V_j+1] QK^T.wait softmax PV.wait
// clang-format on
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "08_flash_v3/hopper.cuh"
#include "08_flash_v3/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch08 {

namespace {

using ch03::cp_async_16;
using ch03::cp_async_commit;
using ch03::cp_async_wait;
using ch03::exp2_approx;
using ch03::pack2;
using ch03::softmax_alpha;

constexpr int kThreads = 128;  // one warpgroup

// ROWS x D tile from global rows `row_stride` apart into the swizzled layout, 16 bytes per
// cp.async; rows at or past `valid_rows` are zero-filled (src-size 0), never read.
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* g, int64_t row_stride,
                                                int valid_rows) {
  constexpr int CHUNKS = D / 8;
  static_assert((ROWS * CHUNKS) % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int k = 0; k < ROWS * CHUNKS / kThreads; ++k) {
    const int e = threadIdx.x + k * kThreads, r = e / CHUNKS, c = e % CHUNKS;
    const bool valid = r < valid_rows;
    cp_async_16(smem + sw128_offset(ROWS, r, c), valid ? g + r * row_stride + c * 8 : g, valid ? 16 : 0);
  }
}

// Pairwise (tree) reductions over the n8 blocks of one row: depth log2(N) instead of N.
template <int N, class F>
__device__ __forceinline__ float tree_reduce(const float (&v)[N], F op) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    float half[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) half[i] = op(v[2 * i], v[2 * i + 1]);
    return tree_reduce<N / 2>(half, op);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) flash_forward_wgmma(const lab::AttnParams p) {
  constexpr Tiles TILES = tiles_for(Step::wgmma, D);
  constexpr int B_r = TILES.B_r, B_c = TILES.B_c;
  constexpr int N_S = B_c / 8, N_O = D / 8;  // n8 blocks of S and O in a thread's two rows
  static_assert(B_r == 64, "one warpgroup computes the 64 rows of one wgmma");

  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;  // tiles on 1024-byte boundaries
  unsigned char* smem = smem_raw + (sQ - smem_addr(smem_raw));
  constexpr uint32_t KV_TILE = B_c * D * sizeof(T);
  const uint32_t sK = sQ + B_r * D * sizeof(T);  // two K tiles
  const uint32_t sV = sK + 2 * KV_TILE;          // two V tiles

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Causal: the last query tiles see the most keys; start them first.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;  // query i sees keys j <= i + diag
  const int m0 = m_block * B_r, warp_row0 = warp * 16;

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;

  // T_c key tiles; with causal only those left of (or on) this query tile's diagonal.
  int T_c = (sk + B_c - 1) / B_c;
  if (p.causal) T_c = min(T_c, max(0, (min(m0 + B_r, sq) + diag + B_c - 1) / B_c));

  // Prologue: Q_i and the first K/V tiles. Buffers alternate: tile j lives in buffer j % 2.
  load_tile_async<T, D, B_r>(sQ, Q, p.q_row_stride, sq - m0);
  if (T_c > 0) {
    load_tile_async<T, D, B_c>(sK, K, p.k_row_stride, sk);
    load_tile_async<T, D, B_c>(sV, V, p.v_row_stride, sk);
  }
  cp_async_commit();

  // Per thread: rows warp_row0 + g and + 8 of the tile, in the wgmma accumulator layout.
  float o[D / 2] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  // S = Q_i K_j^T: one wgmma per 16 columns of d. Both operands K-major, 128-byte swizzled: rows of
  // 128 bytes, 8-row groups 1024 bytes apart (SBO; LBO is unused for this layout); the k-th 16
  // columns of a 64-column block start 32 k bytes into it, and block kk / 4 starts ROWS x 128 on.
  auto compute_scores = [&](float(&s)[B_c / 2], uint32_t sK_j) {
    fence_accumulators(s);  // the reads of the last S (P's packing) stay above the wgmmas
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t a = kmajor_desc(sQ, B_r, kk);
      const uint64_t bk = kmajor_desc(sK_j, B_c, kk);
      wgmma_ss<T, B_c>(s, a, bk, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(s);
  };

  // Mask keys past the end of the sequence and, with causal, right of the diagonal. Only the
  // last tile and the tiles crossing the diagonal need it.
  auto mask_scores = [&](float(&s)[B_c / 2], int n0) {
    if (n0 + B_c > sk || (p.causal && n0 + B_c - 1 > m0 + diag)) {
#pragma unroll
      for (int i = 0; i < N_S; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + warp_row0 + g + 8 * (e / 2);
          const int col = n0 + i * 8 + 2 * t + e % 2;
          if (col >= sk || (p.causal && col > row + diag)) s[4 * i + e] = -INFINITY;
        }
    }
  };

  // Online softmax in the exp2 domain, as in 03: m_i is the running max of raw scores, P =
  // 2^(s c - m_i c) with c = scale log2(e); O_i and l_i are rescaled by 2^((m_old - m_new) c).
  auto online_softmax = [&](float(&s)[B_c / 2]) {
    float alpha_of[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float pair[N_S];
#pragma unroll
      for (int i = 0; i < N_S; ++i) pair[i] = fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]);
      float mx = fmaxf(m_i[r], tree_reduce(pair, [](float u, float v) { return fmaxf(u, v); }));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 threads of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;  // row with no key yet
      alpha_of[r] = softmax_alpha(m_i[r], m_scaled, scale_log2);       // 1 if mx did not move
      m_i[r] = mx;
#pragma unroll
      for (int i = 0; i < N_S; ++i) {
        s[4 * i + 2 * r] = exp2_approx(fmaf(s[4 * i + 2 * r], scale_log2, -m_scaled));
        s[4 * i + 2 * r + 1] = exp2_approx(fmaf(s[4 * i + 2 * r + 1], scale_log2, -m_scaled));
        pair[i] = s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
      }
      l_i[r] = l_i[r] * alpha_of[r] + tree_reduce(pair, [](float u, float v) { return u + v; });
    }
    if (__any_sync(0xffffffffu, alpha_of[0] != 1.f || alpha_of[1] != 1.f))
#pragma unroll
      for (int i = 0; i < N_O; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * i + e] *= alpha_of[e / 2];
  };

  // O_i += P V_j: one wgmma per 16 keys, P's A operand packed from S's accumulators. V_j is
  // MN-major (d contiguous): 8-key groups 1024 bytes apart (SBO), 64-column blocks B_c x 128
  // bytes apart (LBO); the kk-th 16 keys start 16 rows (2048 bytes) on. P is packed before the
  // fence: a register written between wgmmas makes ptxas insert a fence there (warning C7519).
  auto accumulate_pv = [&](const float(&s)[B_c / 2], uint32_t sV_j) {
    uint32_t a[B_c / 16][4];
#pragma unroll
    for (int kk = 0; kk < B_c / 16; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) a[kk][q] = pack2<T>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
    fence_accumulators(o);  // O's rescale and P's packing stay above the fence
    fence_fragments(a);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < B_c / 16; ++kk) wgmma_rs<T, D>(o, a[kk], mn_major_desc(sV_j, B_c, kk));
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(o);
    fence_fragments(a);  // P's registers stay live (unreused) until the wgmmas reading them are done
  };

  for (int j = 0; j < T_c; ++j) {
    const int n0 = j * B_c;
    cp_async_wait<0>();
    fence_proxy_async();  // the cp.async writes, made visible to wgmma (async proxy)
    __syncthreads();      // K_j, V_j (and Q_i) have landed; every warp is done with tile j - 1
    if (j + 1 < T_c) {    // prefetch tile j + 1 into the other buffers while tile j is computed
      const uint32_t next = ((j + 1) & 1) * KV_TILE;
      load_tile_async<T, D, B_c>(sK + next, K + (n0 + B_c) * p.k_row_stride, p.k_row_stride, sk - n0 - B_c);
      load_tile_async<T, D, B_c>(sV + next, V + (n0 + B_c) * p.v_row_stride, p.v_row_stride, sk - n0 - B_c);
      cp_async_commit();
    }
    const uint32_t sK_j = sK + (j & 1) * KV_TILE, sV_j = sV + (j & 1) * KV_TILE;
    float s[B_c / 2];
    compute_scores(s, sK_j);
    mask_scores(s, n0);
    online_softmax(s);
    accumulate_pv(s, sV_j);
  }

  // O_i / l_i, and lse_i = m_i * scale + log(l_i). Rows that saw no key write 0 and -inf.
  cp_async_wait<0>();
  __syncthreads();  // every wgmma has read Q_i: its shared memory is reused below for O
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + m0 * p.o_row_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv_l = l != 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < N_O; ++i) o[4 * i + 2 * r] *= inv_l, o[4 * i + 2 * r + 1] *= inv_l;
    const int row = m0 + warp_row0 + g + 8 * r;
    if (p.lse && t == 0 && row < sq)
      p.lse[(int64_t(b) * p.heads_q + h) * sq + row] =
          l != 0.f ? m_i[r] * p.softmax_scale + logf(l) : -INFINITY;
  }
  // Stage this warp's 16 rows of O in its own rows of the Q tile, then 16-byte coalesced stores.
#pragma unroll
  for (int i = 0; i < N_O; ++i) {
    const int r0 = warp_row0 + g;
    *reinterpret_cast<uint32_t*>(smem + sw128_offset(B_r, r0, i) + 4 * t) = pack2<T>(o[4 * i], o[4 * i + 1]);
    *reinterpret_cast<uint32_t*>(smem + sw128_offset(B_r, r0 + 8, i) + 4 * t) =
        pack2<T>(o[4 * i + 2], o[4 * i + 3]);
  }
  __syncwarp();
#pragma unroll
  for (int e = lane; e < 16 * N_O; e += 32) {
    const int r = warp_row0 + e / N_O, chunk = e % N_O;
    if (m0 + r < sq)
      *reinterpret_cast<uint4*>(O + r * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + sw128_offset(B_r, r, chunk));
  }
}

template <class T, int D>
void launch(const LaunchPlan& plan, const lab::AttnParams& p, cudaStream_t stream) {
  auto kernel = flash_forward_wgmma<T, D>;
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), kThreads, plan.smem, "08_flash_v3");
  kernel<<<dim3(plan.grid_x, plan.grid_y, plan.grid_z), kThreads, plan.smem, stream>>>(p);
  LAB_LAUNCH_CHECK();
}

template <class T>
void dispatch_head_dim(const LaunchPlan& plan, const lab::AttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return launch<T, 64>(plan, p, stream);
    case 128:
      return launch<T, 128>(plan, p, stream);
  }
}

}  // namespace

void forward_wgmma(const lab::AttnParams& p, cudaStream_t stream) {
  const LaunchPlan plan = plan_on_this_gpu(Step::wgmma, p);
  if (p.dtype == lab::DType::fp16)
    dispatch_head_dim<__half>(plan, p, stream);
  else
    dispatch_head_dim<__nv_bfloat16>(plan, p, stream);
}

}  // namespace ch08
