// 08_flash_v3, step 2 ("tma"): tiles copied by the tensor memory accelerator into an mbarrier ring.
//
// Step 1 (kernel_wgmma.cu) moved both products onto wgmma; its tiles still arrive by cp.async:
// every thread computes addresses and issues 16-byte copies, then all of them wait and meet at a
// barrier per tile. This step changes only how tiles move:
//   - Q_i, K_j and V_j are copied by TMA (cp.async.bulk.tensor): one thread describes a whole
//     tile by its coordinates in a tensor map (made on the host, plan.cpp), and the hardware
//     writes it into shared memory already 128-byte swizzled, with zeros for rows past the
//     sequence: no address arithmetic, no tail branches, no fence.proxy.async (TMA writes through
//     the async proxy that wgmma reads from),
//   - K/V tiles live in a ring of STAGES slots. Slot s has a "full" mbarrier (one arrival with
//     expect_tx of the tile's bytes; completes when the bytes have landed) and an "empty" one (all
//     128 threads arrive when they are done with the slot). Tile j uses slot j % STAGES and phase
//     parity (j / STAGES) & 1 of both barriers, so no barrier is ever re-initialized,
//   - there is no __syncthreads in the loop: warps wait for their data, not for each other.
// What it still costs: thread 0 refills a slot only after all 128 threads are done with it, so
// warp 0 waits for the slowest warp each tile; and the tensor cores still idle during the softmax
// (one warpgroup, each product waited for at once). The next steps are a producer warp that only
// issues TMA, and two consumer warpgroups that take turns.
//
// clang-format off
//   grid: (T_r query tiles of B_r = 64 rows, heads_q, batch)     block: one warpgroup (4 warps)
//
//     slot 0: [K_j  V_j ]  full[0] empty[0]        thread 0:  wait empty[s] (parity of the round),
//     slot 1: [K_j+1 V_j+1] full[1] empty[1]                  expect_tx(full[s], bytes), TMA K, V
//                                                  all:       wait full[s]; QK^T softmax PV;
//                                                             arrive empty[s]
//   timeline per tile j:  [wait full[j % 2]] QK^T.wait softmax PV.wait [arrive empty] (thread 0: refill)
// clang-format on
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "08_flash_v3/hopper.cuh"
#include "08_flash_v3/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch08 {

namespace {

using ch03::exp2_approx;
using ch03::pack2;
using ch03::softmax_alpha;

constexpr int kThreads = 128;  // one warpgroup

// A ROWS x D tile at (row0, head, batch) of a tensor map: one TMA box per 64-column block.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile_tma(uint32_t smem, const CUtensorMap* map, uint32_t bar, int row0,
                                              int head, int batch) {
#pragma unroll
  for (int cb = 0; cb < D / 64; ++cb)
    tma_load_4d(smem + cb * ROWS * 128, map, bar, cb * 64, row0, head, batch);
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
__global__ void __launch_bounds__(kThreads)
    flash_forward_tma(const lab::AttnParams p, const __grid_constant__ CUtensorMap tmap_q,
                      const __grid_constant__ CUtensorMap tmap_k,
                      const __grid_constant__ CUtensorMap tmap_v) {
  constexpr Tiles TILES = tiles_for(Step::tma, D);
  constexpr int B_r = TILES.B_r, B_c = TILES.B_c, STAGES = TILES.stages;
  constexpr int N_S = B_c / 8, N_O = D / 8;  // n8 blocks of S and O in a thread's two rows
  static_assert(B_r == 64, "one warpgroup computes the 64 rows of one wgmma");

  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;  // tiles on 1024-byte boundaries
  unsigned char* smem = smem_raw + (sQ - smem_addr(smem_raw));
  constexpr uint32_t KV_TILE = B_c * D * sizeof(T);
  const uint32_t sK = sQ + B_r * D * sizeof(T);  // STAGES K tiles
  const uint32_t sV = sK + STAGES * KV_TILE;     // STAGES V tiles
  __shared__ __align__(8) uint64_t q_full, full[STAGES], empty[STAGES];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Causal: the last query tiles see the most keys; start them first.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;  // query i sees keys j <= i + diag
  const int m0 = m_block * B_r, warp_row0 = warp * 16;

  // T_c key tiles; with causal only those left of (or on) this query tile's diagonal.
  int T_c = (sk + B_c - 1) / B_c;
  if (p.causal) T_c = min(T_c, max(0, (min(m0 + B_r, sq) + diag + B_c - 1) / B_c));

  // K_j and V_j into slot s, counted on full[s] (the whole boxes' bytes: TMA writes zeros for rows
  // past the sequence, and they count).
  auto issue_kv = [&](int j, int s) {
    mbar_arrive_expect_tx(smem_addr(&full[s]), 2 * KV_TILE);
    load_tile_tma<D, B_c>(sK + s * KV_TILE, &tmap_k, smem_addr(&full[s]), j * B_c, h_kv, b);
    load_tile_tma<D, B_c>(sV + s * KV_TILE, &tmap_v, smem_addr(&full[s]), j * B_c, h_kv, b);
  };

  // Prologue: thread 0 sets up the barriers, then asks for Q_i and the first STAGES K/V tiles.
  if (threadIdx.x == 0) {
    mbar_init(smem_addr(&q_full), 1);
    for (int s = 0; s < STAGES; ++s)
      mbar_init(smem_addr(&full[s]), 1), mbar_init(smem_addr(&empty[s]), kThreads);
    mbar_init_fence();
  }
  __syncthreads();  // the barriers exist before anyone waits on them
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(smem_addr(&q_full), B_r * D * sizeof(T));
    load_tile_tma<D, B_r>(sQ, &tmap_q, smem_addr(&q_full), m0, h, b);
    for (int j = 0; j < min(STAGES, T_c); ++j) issue_kv(j, j);
  }
  mbar_wait(smem_addr(&q_full), 0);

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
    const int n0 = j * B_c, slot = j % STAGES;
    const uint32_t parity = (j / STAGES) & 1;   // the round of the ring tile j is in
    mbar_wait(smem_addr(&full[slot]), parity);  // K_j, V_j have landed
    const uint32_t sK_j = sK + slot * KV_TILE, sV_j = sV + slot * KV_TILE;
    float s[B_c / 2];
    compute_scores(s, sK_j);
    mask_scores(s, n0);
    online_softmax(s);
    accumulate_pv(s, sV_j);  // waited for: this thread's wgmmas no longer read the slot
    mbar_arrive(smem_addr(&empty[slot]));
    if (threadIdx.x == 0 && j + STAGES < T_c) {  // refill the slot once every thread is done with it
      mbar_wait(smem_addr(&empty[slot]), parity);
      issue_kv(j + STAGES, slot);
    }
    __syncwarp();  // warp 0 whole again before the next .aligned wgmma
  }

  // O_i / l_i, and lse_i = m_i * scale + log(l_i). Rows that saw no key write 0 and -inf.
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
  const Tiles& t = plan.tiles;
  // Tensor maps: [batch, seqlen, heads, d] with d contiguous, boxes of 64 columns x B_r or B_c rows.
  const CUtensorMap tq = encode_tma_tile(tma_tile("q", p.dtype, p.q, D, p.seqlen_q, p.heads_q, p.batch,
                                                  p.q_row_stride, p.q_head_stride, p.q_batch_stride, t.B_r));
  const CUtensorMap tk = encode_tma_tile(tma_tile("k", p.dtype, p.k, D, p.seqlen_kv, p.heads_kv, p.batch,
                                                  p.k_row_stride, p.k_head_stride, p.k_batch_stride, t.B_c));
  const CUtensorMap tv = encode_tma_tile(tma_tile("v", p.dtype, p.v, D, p.seqlen_kv, p.heads_kv, p.batch,
                                                  p.v_row_stride, p.v_head_stride, p.v_batch_stride, t.B_c));
  auto kernel = flash_forward_tma<T, D>;
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), kThreads, plan.smem, "08_flash_v3");
  kernel<<<dim3(plan.grid_x, plan.grid_y, plan.grid_z), kThreads, plan.smem, stream>>>(p, tq, tk, tv);
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

void forward_tma(const lab::AttnParams& p, cudaStream_t stream) {
  const LaunchPlan plan = plan_on_this_gpu(Step::tma, p);
  if (p.dtype == lab::DType::fp16)
    dispatch_head_dim<__half>(plan, p, stream);
  else
    dispatch_head_dim<__nv_bfloat16>(plan, p, stream);
}

}  // namespace ch08
