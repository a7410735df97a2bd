// 08_flash_v3, step 4 ("pingpong"): the consumers take turns at the tensor cores, and each one
// runs its softmax while its own P V wgmma runs.
//
// Step 3 (kernel_ws.cu) gave the math two consumer warpgroups and the copies a producer, but each
// consumer still runs QK^T, waits, does its softmax, runs PV, waits: its tensor-core work and its
// exponentials never overlap, and nothing stops both consumers from doing their softmax at once.
// This step changes only the consumers' schedule (FlashAttention-3, section 3.1 and 3.2):
//   - pingpong: before issuing its wgmmas a consumer waits on its named barrier, and after
//     issuing them it arrives on the other's (bar.sync / bar.arrive, 256 threads): the two issue
//     their GEMMs in turn, so one's softmax runs while the other's GEMMs use the tensor cores.
//     Consumer 2 arrives once up front so that consumer 1 goes first, and skips the arrive after
//     its last batch, so every bar.sync is matched by exactly one bar.arrive,
//   - intra-warpgroup overlap: in iteration j a consumer issues S_j = Q_i K_j^T and then
//     O_i += P_{j-1} V_{j-1} together, waits only for S_j (wgmma.wait_group 1), and runs the
//     softmax of S_j while the P V wgmma still runs; it waits for that one before rescaling O_i.
//     P_{j-1} and S_j are both live: 32 + 64 more registers, within the 240 of step 3,
//   - a slot is released only after P_{j-1} V_{j-1} is done, i.e. one iteration later than in
//     step 3, so the ring has 3 stages (225 KB at d = 128) to keep two tiles ahead,
//   - at d = 64 three consumers take turns (B_r = 192; NC below): there the exponentials cost as
//     much as the GEMMs, and two consumers leave the tensor cores waiting for a softmax.
// What it still costs: O_i leaves through registers and plain stores while the tensor cores
// idle (FlashAttention-3 stages it through shared memory and a TMA store), and the grid is not
// persistent (every block pays its prologue). And ptxas (CUDA 13.0) puts the wait for
// P_{j-1} V_{j-1} before the exponentials of S_j (cuobjdump -sass: DEPBAR gsb0 0x0 ahead of the
// MUFU.EX2), so the overlap inside a warpgroup is in this source but not yet in the machine code.
//
// clang-format off
//   consumer 1:  [S_j PV_j-1]  softmax S_j  [S_j+1 PV_j]  softmax S_j+1 ...      [..] = its turn at
//   consumer 2:       softmax S_j-1  [S_j PV_j-1]  softmax S_j  [S_j+1 PV_j]       the tensor cores
//   per consumer, iteration j:  sync(mine) issue S_j, PV_j-1; arrive(other); wait<1>: softmax S_j;
//                               wait<0>: release slot j-1, rescale O_i, pack P_j
// clang-format on
#include <cmath>
#include <stdexcept>

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

// A producer warpgroup and NC consumer warpgroups of 64 query rows each: two (B_r = 128), or three
// (B_r = 192, FlashAttention-3's choice at d = 64, where the exponentials weigh as much as the GEMMs
// and a third warpgroup has its softmax ready when the tensor cores free up). The consumers take
// the registers the producer gives up: 240 each of two, 160 each of three.
template <int NC>
struct Team {
  static constexpr int threads = 128 * (NC + 1), consumer_threads = 128 * NC;
  static constexpr int producer_regs = 24, consumer_regs = NC == 2 ? 240 : 160;
  // setmaxnreg.inc blocks until the block's register pool can pay for it, and the pool is what the
  // block launched with (at most 65536 / threads per thread, in steps of 8; ptxas -v: 168 for two
  // consumers): budgets past it would leave the consumers waiting forever.
  static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
  static_assert(producer_regs % 8 == 0 && consumer_regs % 8 == 0 && producer_regs >= 24 && consumer_regs <= 256,
                "setmaxnreg takes multiples of 8 in [24, 256]");
  static_assert((threads - consumer_threads) * producer_regs + consumer_threads * consumer_regs <=
                    65536 / threads / 8 * 8 * threads,
                "the producer's and the consumers' registers must fit in the block's pool");
};

// Named barriers need immediate ids: barrier BASE + n for a warpgroup number n known only at run time.
template <int NC, int BASE, int COUNT>
__device__ __forceinline__ void sync_nth(int n) {
  if (n == 0) named_barrier_sync<BASE, COUNT>();
  else if (NC == 2 || n == 1) named_barrier_sync<BASE + 1, COUNT>();
  else named_barrier_sync<BASE + 2, COUNT>();
}
template <int NC, int BASE, int COUNT>
__device__ __forceinline__ void arrive_nth(int n) {
  if (n == 0) named_barrier_arrive<BASE, COUNT>();
  else if (NC == 2 || n == 1) named_barrier_arrive<BASE + 1, COUNT>();
  else named_barrier_arrive<BASE + 2, COUNT>();
}

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
    float half[(N + 1) / 2];  // an odd one out (B_c = 96, 160, 192) moves up unpaired
#pragma unroll
    for (int i = 0; i < (N + 1) / 2; ++i) half[i] = 2 * i + 1 < N ? op(v[2 * i], v[2 * i + 1]) : v[2 * i];
    return tree_reduce<(N + 1) / 2>(half, op);
  }
}

template <class T, int D, int B_c, int STAGES, int NC>
__global__ void __launch_bounds__(Team<NC>::threads, 1)
    flash_forward_pingpong(const lab::AttnParams p, const __grid_constant__ CUtensorMap tmap_q,
                           const __grid_constant__ CUtensorMap tmap_k,
                           const __grid_constant__ CUtensorMap tmap_v) {
  constexpr int B_r = 64 * NC;  // NC consumer warpgroups of 64 rows (one wgmma M) each
  constexpr int N_S = B_c / 8, N_O = D / 8;  // n8 blocks of S and O in a thread's two rows

  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;  // tiles on 1024-byte boundaries
  unsigned char* smem = smem_raw + (sQ - smem_addr(smem_raw));
  constexpr uint32_t KV_TILE = B_c * D * sizeof(T);
  const uint32_t sK = sQ + B_r * D * sizeof(T);  // STAGES K tiles
  const uint32_t sV = sK + STAGES * KV_TILE;     // STAGES V tiles
  __shared__ __align__(8) uint64_t q_full, full[STAGES], empty[STAGES];

  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4,
            t = lane % 4;
  // Causal: the last query tiles see the most keys; start them first.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;  // query i sees keys j <= i + diag
  const int m0 = m_block * B_r, wg_row0 = (wg - 1) * 64, warp_row0 = wg_row0 + warp * 16;  // consumers

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

  // Thread 0 sets up the barriers: a slot is empty once all consumer threads have arrived.
  if (threadIdx.x == 0) {
    mbar_init(smem_addr(&q_full), 1);
    for (int s = 0; s < STAGES; ++s)
      mbar_init(smem_addr(&full[s]), 1), mbar_init(smem_addr(&empty[s]), Team<NC>::consumer_threads);
    mbar_init_fence();
  }
  __syncthreads();  // the barriers exist before anyone waits on them; the last block-wide barrier

  if (wg == 0) {  // the producer
    setmaxnreg_dec<Team<NC>::producer_regs>();
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(smem_addr(&q_full), B_r * D * sizeof(T));
      load_tile_tma<D, B_r>(sQ, &tmap_q, smem_addr(&q_full), m0, h, b);
      for (int j = 0; j < T_c; ++j) {
        const int slot = j % STAGES;
        // Round r = j / STAGES needs the slot emptied in round r - 1: parity (r - 1) & 1. In round
        // 0 that is parity 1, the phase "before" phase 0, which counts as completed: no wait.
        mbar_wait(smem_addr(&empty[slot]), ((j / STAGES) & 1) ^ 1);
        issue_kv(j, slot);
      }
    }
    return;  // nothing after this point waits for the producer
  }
  setmaxnreg_inc<Team<NC>::consumer_regs>();
  mbar_wait(smem_addr(&q_full), 0);

  // Per thread: rows warp_row0 + g and + 8 of the tile, in the wgmma accumulator layout.
  float o[D / 2] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  // S = Q_i K_j^T: one wgmma per 16 columns of d. Both operands K-major, 128-byte swizzled: rows of
  // 128 bytes, 8-row groups 1024 bytes apart (SBO; LBO is unused for this layout); the k-th 16
  // columns of a 64-column block start 32 k bytes into it, and block kk / 4 starts ROWS x 128 on.
  // A consumer's 64 rows of Q_i start 64 x 128 bytes into each block (a multiple of 1024).
  auto issue_scores = [&](float(&s)[B_c / 2], uint32_t sK_j) {
    fence_accumulators(s);  // the reads of the last S (P's packing) stay above the wgmmas
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t a = kmajor_desc(sQ + wg_row0 * 128, B_r, kk);
      const uint64_t bk = kmajor_desc(sK_j, B_c, kk);
      wgmma_ss<T, B_c>(s, a, bk, kk > 0);
    }
    wgmma_commit();
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
  // O_i is not touched here (a P V wgmma may still accumulate into it): alpha goes out, and
  // rescale_o applies it once that wgmma is done.
  auto online_softmax = [&](float(&s)[B_c / 2], float(&alpha_of)[2]) {
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
  };
  auto rescale_o = [&](const float(&alpha_of)[2]) {
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
  auto pack_p = [&](const float(&s)[B_c / 2], uint32_t(&a)[B_c / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < B_c / 16; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) a[kk][q] = pack2<T>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
  };
  auto issue_pv = [&](uint32_t(&a)[B_c / 16][4], uint32_t sV_j) {
    fence_accumulators(o);  // O's rescale and P's packing stay above the fence
    fence_fragments(a);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < B_c / 16; ++kk) wgmma_rs<T, D>(o, a[kk], mn_major_desc(sV_j, B_c, kk));
    wgmma_commit();
  };

  // Pingpong: consumer c waits on barrier NC + 1 + c for its turn and hands the turn to the next
  // one, (c + 1) % NC, once its wgmmas are issued; 256 threads: one warpgroup syncs, one arrives.
  // (Barriers 1 .. NC are the consumers' own, for the epilogue.)
  const int c = wg - 1;
  auto my_turn = [&] { sync_nth<NC, NC + 1, 2 * 128>(c); };
  auto your_turn = [&] { arrive_nth<NC, NC + 1, 2 * 128>(c + 1 == NC ? 0 : c + 1); };

  // Batches of wgmmas, each issued in this consumer's turn: S_0; then S_j with P_{j-1} V_{j-1}
  // for j = 1 .. T_c - 1; then P_{T_c-1} V_{T_c-1}. Every consumer has T_c + 1 of them.
  if (T_c > 0) {
    float s[B_c / 2], alpha_of[2];
    uint32_t pa[B_c / 16][4];
    if (c == NC - 1) your_turn();  // the last consumer hands the first turn to consumer 1
    mbar_wait(smem_addr(&full[0]), 0);
    my_turn();
    issue_scores(s, sK);
    your_turn();
    wgmma_wait<0>();
    fence_accumulators(s);
    mask_scores(s, 0);
    online_softmax(s, alpha_of);
    rescale_o(alpha_of);
    pack_p(s, pa);
    for (int j = 1; j < T_c; ++j) {
      const int slot = j % STAGES, prev = (j - 1) % STAGES;
      mbar_wait(smem_addr(&full[slot]), (j / STAGES) & 1);  // K_j, V_j have landed
      my_turn();
      issue_scores(s, sK + slot * KV_TILE);
      issue_pv(pa, sV + prev * KV_TILE);
      your_turn();
      wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
      fence_accumulators(s);
      mask_scores(s, j * B_c);
      online_softmax(s, alpha_of);
      wgmma_wait<0>();  // P_{j-1} V_{j-1} is done: slot j - 1 is free, O_i may be touched
      fence_accumulators(o);
      fence_fragments(pa);  // P_{j-1}'s registers stay live until here, then pack_p rewrites them
      mbar_arrive(smem_addr(&empty[prev]));
      rescale_o(alpha_of);
      pack_p(s, pa);
    }
    my_turn();
    issue_pv(pa, sV + ((T_c - 1) % STAGES) * KV_TILE);
    if (c != NC - 1) your_turn();  // the last consumer's last batch has no one to hand the turn to
    wgmma_wait<0>();
    fence_accumulators(o);
    fence_fragments(pa);
    mbar_arrive(smem_addr(&empty[(T_c - 1) % STAGES]));
  }

  // O_i / l_i, and lse_i = m_i * scale + log(l_i). Rows that saw no key write 0 and -inf.
  // This warpgroup's wgmmas have read its rows of Q_i (barrier 1 .. NC, one per consumer).
  sync_nth<NC, 1, 128>(c);
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

template <class T, int D, int B_c = tiles_for(Step::pingpong, D).B_c,
          int STAGES = tiles_for(Step::pingpong, D).stages, int NC = tiles_for(Step::pingpong, D).B_r / 64>
void launch(const LaunchPlan& plan, const lab::AttnParams& p, cudaStream_t stream) {
  // The plan is tiles_for's, or a tuning sweep's (bench/tune08.cu): it must be this instantiation's.
  constexpr int kThreads = Team<NC>::threads;
  const Tiles& t = plan.tiles;
  if (t.B_r != 64 * NC || t.B_c != B_c || t.stages != STAGES || t.threads != kThreads)
    throw std::logic_error("08_flash_v3: the launch plan's tiles are not this kernel's");
  // Tensor maps: [batch, seqlen, heads, d] with d contiguous, boxes of 64 columns x B_r or B_c rows.
  const CUtensorMap tq = encode_tma_tile(tma_tile("q", p.dtype, p.q, D, p.seqlen_q, p.heads_q, p.batch,
                                                  p.q_row_stride, p.q_head_stride, p.q_batch_stride, t.B_r));
  const CUtensorMap tk = encode_tma_tile(tma_tile("k", p.dtype, p.k, D, p.seqlen_kv, p.heads_kv, p.batch,
                                                  p.k_row_stride, p.k_head_stride, p.k_batch_stride, t.B_c));
  const CUtensorMap tv = encode_tma_tile(tma_tile("v", p.dtype, p.v, D, p.seqlen_kv, p.heads_kv, p.batch,
                                                  p.v_row_stride, p.v_head_stride, p.v_batch_stride, t.B_c));
  auto kernel = flash_forward_pingpong<T, D, B_c, STAGES, NC>;
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

void forward(const lab::AttnParams& p, cudaStream_t stream) {
  const LaunchPlan plan = plan_on_this_gpu(Step::pingpong, p);
  if (p.dtype == lab::DType::fp16)
    dispatch_head_dim<__half>(plan, p, stream);
  else
    dispatch_head_dim<__nv_bfloat16>(plan, p, stream);
}

}  // namespace ch08
