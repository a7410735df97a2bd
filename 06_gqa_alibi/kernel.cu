// 06_gqa_alibi: one kernel for GQA/MQA, ALiBi and hybrid prefill + decode batches.
//
// 03's fa2 kernel (and 04, 05) give every query head its own block, which reads its KV head from
// HBM. With grouped-query attention G = heads_q / heads_kv query heads share one KV head, so those
// blocks read the same K and V G times (the L2 catches some of it, by luck). This kernel changes
// what a row of the tile is:
//   - row r of a block is the pair (query token r / G, query head h_kv G + r % G): the G heads of
//     a group are packed into the M dimension of the mma, the block belongs to a KV head, and each
//     K_j, V_j tile is loaded once and used by the whole group. In decoding (1 token) the G heads
//     fill G rows of a fragment that 04 filled with 1 row, and the bytes read drop by G;
//   - ALiBi: s_ij += slope_h (j - (i + sk - sq)) / scale (in score units), added as one FMA per
//     score: the column part comes from per-thread constants, the row part is folded into the
//     exp2 argument, so the max sees the biased scores at no extra cost;
//   - varlen: sequence b's queries and keys are rows cu_seqlens_q[b].. and cu_seqlens_kv[b].. of
//     packed tensors, so one launch serves prefill sequences (thousands of rows) and decode
//     sequences (one row) together, as continuous batching does. Blocks past a short sequence's
//     rows exit at once;
//   - split-KV as in 04 (partials + 04's combine, now varlen-aware) for decoding batches too small
//     to fill the GPU.
// Everything else is 03's step 2: cp.async double buffering, swizzle, exp2 online softmax, P in
// registers. Cost: a row's query head and token come from a division by G (in the prologue and
// epilogue only); warps whose rows are all padding (decoding with G < 16) skip the math but still
// load their share of each tile.
//
// clang-format off
//   grid: (num_splits x row tiles, heads_kv, batch)      block: 4 warps, B_r = 64 or 128 packed rows
//
//   rows of the Q tile (GQA 32/8, G = 4):      K_j, V_j of KV head h_kv: loaded once, used by all
//     r = 0: token 0, head 4 h_kv + 0          +----------------+     +-----------+
//     r = 1: token 0, head 4 h_kv + 1   Q_i    | S = Q_i K_j^T  | P   |  O += P V |
//     r = 2: token 0, head 4 h_kv + 2  ------> | + ALiBi bias   | --> |           |
//     r = 3: token 0, head 4 h_kv + 3          +----------------+     +-----------+
//     r = 4: token 1, head 4 h_kv + 0  ...     (decode: rows 0..G-1 only; prefill: 128 rows)
// clang-format on
#include <cmath>
#include <mutex>

#include "03_flash_v2/tensor_core.cuh"
#include "06_gqa_alibi/kernel.h"
#include "common/cuda_check.h"

namespace ch06 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "06_gqa_alibi";
  s.head_dims = {64, 128};
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.alibi = true;
  s.varlen = true;
  s.splits = true;
  s.max_splits = ch04::kMaxSplits;
  s.vector_elems = 8;  // 16-byte cp.async rows
  return s;
}();

namespace {

using ch03::cp_async_16;
using ch03::cp_async_commit;
using ch03::cp_async_wait;
using ch03::ldmatrix_x4;
using ch03::ldmatrix_x4_trans;
using ch03::mma_16816;
using ch03::pack2;
using ch03::smem_addr;

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 03's tiles; B_r = 64 (one m16 fragment per warp) when no sequence has more than 64 packed rows.
template <int D> struct Tiles { static constexpr int B_c = 64, QK_UNROLL = D / 16; };
template <> struct Tiles<128> { static constexpr int B_c = 64, QK_UNROLL = 2; };

constexpr int kWarps = 4, kThreads = 32 * kWarps;

// K/V stages: 03's double buffer for prefill tiles (B_r = 128); the decoding tile (B_r = 64) has
// little math to hide loads behind and a smaller Q tile, so it keeps two tiles in flight (112 KB
// at d = 128, still two blocks per SM).
template <int M_FRAGS> struct Stages { static constexpr int value = M_FRAGS == 1 ? 3 : 2; };

template <int ROW>
__device__ __forceinline__ uint32_t smem_offset(int r, int c) {
  return uint32_t((r * (ROW / 8) + (c ^ (r & 7))) * 16);
}

// 03's tile copy (rows `row_stride` apart, rows >= valid_rows zero-filled).
template <class T, int D, int ROW, int ROWS>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* g, int64_t row_stride,
                                                int valid_rows) {
  constexpr int CHUNKS = D / 8;
  static_assert((ROWS * CHUNKS) % kThreads == 0, "tile must split evenly over the threads");
  constexpr int RPP = kThreads / CHUNKS;
  static_assert(kThreads % CHUNKS == 0 && RPP % 8 == 0, "one chunk column per thread");
  const int r0 = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS;
  const T* src = g + r0 * row_stride + c * 8;
  const uint32_t dst = smem + smem_offset<ROW>(r0, c);
  const bool full = valid_rows >= ROWS;
#pragma unroll
  for (int k = 0; k < ROWS / RPP; ++k) {
    const bool valid = full || r0 + k * RPP < valid_rows;
    cp_async_16(dst + k * RPP * ROW * sizeof(T), valid ? src + k * RPP * row_stride : g, valid ? 16 : 0);
  }
}

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

template <class T, int D, int M_FRAGS, bool ALIBI>
__global__ void __launch_bounds__(kThreads, 2) flash_forward_grouped(const lab::AttnParams p, int splits,
                                                                     float* o_partial, float* lse_partial) {
  constexpr int B_r = 16 * kWarps * M_FRAGS, B_c = Tiles<D>::B_c;
  constexpr int QK_UNROLL = ALIBI && D == 128 ? 1 : Tiles<D>::QK_UNROLL;
  constexpr int ROW = (D + 63) / 64 * 64;
  constexpr int N_S = B_c / 8, N_O = D / 8, CHUNKS = D / 8;
  constexpr uint32_t ROW_BYTES = ROW * sizeof(T), KV_TILE = B_c * ROW * sizeof(T);
  constexpr int NST = Stages<M_FRAGS>::value;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK = sQ + B_r * ROW_BYTES;
  const uint32_t sV = sK + NST * KV_TILE;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int G = p.heads_q / p.heads_kv;
  const int split = blockIdx.x % splits, m_block = blockIdx.x / splits;
  const int h_kv = blockIdx.y, b = blockIdx.z;
  // Sequence b: its rows in the (possibly packed) Q/O and K/V tensors.
  int sq = p.seqlen_q, sk = p.seqlen_kv;
  int64_t q_row0 = 0, k_row0 = 0;
  if (p.cu_seqlens_q) {
    q_row0 = p.cu_seqlens_q[b], sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    k_row0 = p.cu_seqlens_kv[b], sk = p.cu_seqlens_kv[b + 1] - p.cu_seqlens_kv[b];
  }
  const int rows = sq * G, r0 = m_block * B_r;
  if (r0 >= rows) return;  // a short sequence in a long batch: nothing here (before any barrier)
  const int diag = sk - sq, warp_row0 = warp * 16 * M_FRAGS;
  const bool warp_active = r0 + warp_row0 < rows;  // some row of this warp is real

  // Keys this tile sees (causal: up to its last token's diagonal), cut into split chunks.
  const int first_tok = r0 / G, last_tok = (min(r0 + B_r, rows) - 1) / G;
  int n_keys = sk;
  if (p.causal) n_keys = min(sk, max(0, last_tok + 1 + diag));
  const int chunk = ((n_keys + splits - 1) / splits + B_c - 1) / B_c * B_c;
  const int k_begin = min(n_keys, split * chunk), k_end = min(n_keys, k_begin + chunk);
  const int T_c = (k_end - k_begin + B_c - 1) / B_c;

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + q_row0 * p.q_row_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + (k_row0 + k_begin) * p.k_row_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + (k_row0 + k_begin) * p.v_row_stride + h_kv * p.v_head_stride;

  // Q_i: packed row r is token r / G of query head h_kv G + r % G, so rows are gathered one by
  // one (once per block; the K/V tiles below are plain 03 tiles).
#pragma unroll
  for (int k = 0; k < B_r * CHUNKS / kThreads; ++k) {
    const int e = threadIdx.x + k * kThreads, r = e / CHUNKS, c = e % CHUNKS;
    const bool valid = r0 + r < rows;
    const int tok = (r0 + r) / G, h = h_kv * G + (r0 + r) % G;
    const T* src = valid ? Q + tok * p.q_row_stride + h * p.q_head_stride + c * 8 : Q;
    cp_async_16(sQ + smem_offset<ROW>(r, c), src, valid ? 16 : 0);
  }
  // ... and the first NST - 1 K/V tiles, one commit group each (Q rides with tile 0).
#pragma unroll
  for (int j = 0; j < NST - 1; ++j) {
    if (j < T_c) {
      load_tile_async<T, D, ROW, B_c>(sK + j * KV_TILE, K + j * B_c * p.k_row_stride, p.k_row_stride, k_end - k_begin - j * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + j * KV_TILE, V + j * B_c * p.v_row_stride, p.v_row_stride, k_end - k_begin - j * B_c);
    }
    cp_async_commit();
  }

  // This thread's rows are g and g + 8 of each fragment; their tokens are computed where needed
  // (the mask of diagonal tiles), not kept in registers. With ALiBi each row keeps its slope in
  // score units (slope / scale) and slope (2t - i - diag): the bias of key n0 + 8 nj + 2t + c is
  // then slope (8 nj + c) (an FMA with a constant) plus a per-row term for the whole tile.
  const int row_base = r0 + warp_row0 + g;
  auto token_of = [&](int mi, int r) { return (row_base + mi * 16 + 8 * r) / G; };
  float slope_of[M_FRAGS][2], slope_shift[M_FRAGS][2];
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_base + mi * 16 + 8 * r;
      slope_of[mi][r] = ALIBI && row < rows ? p.alibi_slopes[h_kv * G + row % G] / p.softmax_scale : 0.f;
      slope_shift[mi][r] = slope_of[mi][r] * float(2 * t - token_of(mi, r) - diag);
    }
  const int crossing = first_tok + diag;  // tiles with a key right of this is the first row's diagonal

  float o[M_FRAGS][N_O][4] = {};
  float m_i[M_FRAGS][2], l_i[M_FRAGS][2];
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
    for (int r = 0; r < 2; ++r) m_i[mi][r] = -INFINITY, l_i[mi][r] = 0.f;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  const uint32_t y_a = (lane / 16) ^ (lane % 8);
  const uint32_t y_b = ((lane / 8) & 1) ^ (lane % 8);
  const uint32_t q_frag = sQ + (warp_row0 + lane % 16) * ROW_BYTES;
  const uint32_t k_frag = (lane % 8 + 8 * (lane / 16)) * ROW_BYTES;
  const uint32_t v_frag = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_BYTES;

  auto compute_scores = [&](float (&s)[M_FRAGS][N_S][4], uint32_t sK_j) {
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int nj = 0; nj < N_S; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.f;
#pragma unroll(QK_UNROLL)
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[M_FRAGS][4];
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi)
        ldmatrix_x4(a[mi], q_frag + mi * 16 * ROW_BYTES + (((2 * kk) ^ y_a) << 4));
#pragma unroll
      for (int nj = 0; nj < N_S; nj += 2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sK_j + k_frag + nj * 8 * ROW_BYTES + (((2 * kk) ^ y_b) << 4));
#pragma unroll
        for (int mi = 0; mi < M_FRAGS; ++mi) {
          mma_16816<T>(s[mi][nj], a[mi], bk[0], bk[1]);
          mma_16816<T>(s[mi][nj + 1], a[mi], bk[2], bk[3]);
        }
      }
    }
  };

  // Keys past the sequence (or the split's causal range) and right of each row's diagonal.
  auto mask_scores = [&](float (&s)[M_FRAGS][N_S][4], int n0) {
    if (n0 + B_c > k_end || (p.causal && n0 + B_c - 1 > crossing)) {
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int last_col = p.causal ? min(k_end - 1, token_of(mi, r) + diag) : k_end - 1;
#pragma unroll
          for (int nj = 0; nj < N_S; ++nj)
#pragma unroll
            for (int c = 0; c < 2; ++c)
              if (n0 + nj * 8 + 2 * t + c > last_col) s[mi][nj][2 * r + c] = -INFINITY;
        }
    }
  };

  // 03's online softmax on biased scores. With ALiBi the score held is s + slope (8 nj + c) (one
  // FMA with a constant); the rest of the bias, slope (n0 + 2t - i - diag), is the same for the
  // thread's whole row of the tile, so it is added to the row max and folded into the exp2
  // argument. (The 4 threads of a quad hold different 2t: each adds its own before the shuffles.)
  auto online_softmax = [&](float (&s)[M_FRAGS][N_S][4], int n0) {
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float row_bias = 0.f;
        if constexpr (ALIBI) {
          row_bias = fmaf(slope_of[mi][r], float(n0), slope_shift[mi][r]);
#pragma unroll
          for (int nj = 0; nj < N_S; ++nj) {
            s[mi][nj][2 * r] = fmaf(slope_of[mi][r], float(8 * nj), s[mi][nj][2 * r]);
            s[mi][nj][2 * r + 1] = fmaf(slope_of[mi][r], float(8 * nj + 1), s[mi][nj][2 * r + 1]);
          }
        }
        float pair[N_S];
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) pair[nj] = fmaxf(s[mi][nj][2 * r], s[mi][nj][2 * r + 1]);
        float mx = fmaxf(m_i[mi][r], tree_reduce(pair, [](float u, float v) { return fmaxf(u, v); }) + row_bias);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
        const float alpha = exp2_approx(m_i[mi][r] * scale_log2 - m_scaled);
        const float shift = fmaf(row_bias, scale_log2, -m_scaled);
        m_i[mi][r] = mx;
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) {
          s[mi][nj][2 * r] = exp2_approx(fmaf(s[mi][nj][2 * r], scale_log2, shift));
          s[mi][nj][2 * r + 1] = exp2_approx(fmaf(s[mi][nj][2 * r + 1], scale_log2, shift));
          pair[nj] = s[mi][nj][2 * r] + s[mi][nj][2 * r + 1];
        }
        const float row_sum = tree_reduce(pair, [](float u, float v) { return u + v; });
        l_i[mi][r] = l_i[mi][r] * alpha + row_sum;
        if (alpha != 1.f)
#pragma unroll
          for (int nd = 0; nd < N_O; ++nd) o[mi][nd][2 * r] *= alpha, o[mi][nd][2 * r + 1] *= alpha;
      }
  };

  auto accumulate_pv = [&](const float (&s)[M_FRAGS][N_S][4], uint32_t sV_j) {
#pragma unroll
    for (int kk = 0; kk < B_c / 16; ++kk) {
      uint32_t a[M_FRAGS][4];
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi) {
        a[mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        a[mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        a[mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        a[mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < N_O; nd += 2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV_j + v_frag + kk * 16 * ROW_BYTES + ((nd ^ y_a) << 4));
#pragma unroll
        for (int mi = 0; mi < M_FRAGS; ++mi) {
          mma_16816<T>(o[mi][nd], a[mi], bv[0], bv[1]);
          mma_16816<T>(o[mi][nd + 1], a[mi], bv[2], bv[3]);
        }
      }
    }
  };

  for (int j = 0; j < T_c; ++j) {
    const int n0 = k_begin + j * B_c;  // key index within the sequence
    cp_async_wait<NST - 2>();  // tile j has landed (the NST - 2 newer groups may still fly)
    __syncthreads();           // ... for every thread; and every warp is done with tile j - 1
    const int ahead = j + NST - 1;  // prefetch into the buffer tile j - 1 used
    if (ahead < T_c) {
      const uint32_t next = (ahead % NST) * KV_TILE;
      load_tile_async<T, D, ROW, B_c>(sK + next, K + ahead * B_c * p.k_row_stride, p.k_row_stride, k_end - k_begin - ahead * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + next, V + ahead * B_c * p.v_row_stride, p.v_row_stride, k_end - k_begin - ahead * B_c);
    }
    cp_async_commit();  // possibly empty: keeps one group per iteration for wait_group
    if (warp_active) {  // warp-uniform: padding-only warps (decoding) just load
      const uint32_t sK_j = sK + (j % NST) * KV_TILE, sV_j = sV + (j % NST) * KV_TILE;
      float s[M_FRAGS][N_S][4];
      compute_scores(s, sK_j);
      mask_scores(s, n0);
      online_softmax(s, n0);
      accumulate_pv(s, sV_j);
    }
  }
  cp_async_wait<0>();
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // 04's combine may start launching
#endif
  __syncthreads();  // shared memory is reused below for O

  // O_i / l_i; lse (or this split's lse_s). Then O staged in shared memory, 16-byte stores.
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + q_row0 * p.o_row_stride;
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_i[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv_l = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int nd = 0; nd < N_O; ++nd) o[mi][nd][2 * r] *= inv_l, o[mi][nd][2 * r + 1] *= inv_l;
      const int row = r0 + warp_row0 + mi * 16 + g + 8 * r;
      if (t == 0 && row < rows) {
        const float lse = l > 0.f ? m_i[mi][r] * p.softmax_scale + logf(l) : -INFINITY;
        const int64_t at = (int64_t(b) * p.heads_q + h_kv * G + row % G) * p.seqlen_q + row / G;
        if (splits > 1) lse_partial[int64_t(split) * p.batch * p.heads_q * p.seqlen_q + at] = lse;
        else if (p.lse) p.lse[at] = lse;
      }
    }
  if (splits > 1) {  // fp32 partials straight from registers: [split][b][h][i][d]
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = r0 + warp_row0 + mi * 16 + g + 8 * r;
        if (row >= rows) continue;
        const int64_t at = ((int64_t(split) * p.batch + b) * p.heads_q + h_kv * G + row % G) * p.seqlen_q + row / G;
#pragma unroll
        for (int nd = 0; nd < N_O; ++nd)
          *reinterpret_cast<float2*>(o_partial + at * D + nd * 8 + 2 * t) = make_float2(o[mi][nd][2 * r], o[mi][nd][2 * r + 1]);
      }
    return;
  }
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int nd = 0; nd < N_O; ++nd) {
      const int rr = warp_row0 + mi * 16 + g;
      *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(rr, nd) + 4 * t) = pack2<T>(o[mi][nd][0], o[mi][nd][1]);
      *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(rr + 8, nd) + 4 * t) = pack2<T>(o[mi][nd][2], o[mi][nd][3]);
    }
  __syncwarp();
#pragma unroll
  for (int e = lane; e < 16 * M_FRAGS * CHUNKS; e += 32) {
    const int rr = warp_row0 + e / CHUNKS, c = e % CHUNKS, row = r0 + rr;
    if (row < rows)
      *reinterpret_cast<uint4*>(O + (row / G) * p.o_row_stride + (h_kv * G + row % G) * p.o_head_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem + smem_offset<ROW>(rr, c));
  }
}

template <class T, int D, int M_FRAGS>
constexpr int smem_bytes() {
  return (16 * kWarps * M_FRAGS + 2 * Stages<M_FRAGS>::value * Tiles<D>::B_c) * ((D + 63) / 64 * 64) * int(sizeof(T));
}

template <class T, int D, int M_FRAGS, bool ALIBI>
void launch_tiles(const lab::AttnParams& p, int splits, float* o_partial, float* lse_partial, cudaStream_t stream) {
  constexpr int smem = smem_bytes<T, D, M_FRAGS>();
  auto kernel = flash_forward_grouped<T, D, M_FRAGS, ALIBI>;
  int dev = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  static std::once_flag configured[64];
  std::call_once(configured[dev % 64], [&] {
    LAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  });
  const int G = p.heads_q / p.heads_kv, B_r = 16 * kWarps * M_FRAGS;
  const int64_t row_tiles = (int64_t(p.seqlen_q) * G + B_r - 1) / B_r;
  const dim3 grid(unsigned(row_tiles * splits), p.heads_kv, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p, splits, o_partial, lse_partial);
  LAB_LAUNCH_CHECK();
}

// B_r = 64 when every sequence fits in one 64-row tile (decoding: G rows per token), else 128.
int m_frags_for(const lab::AttnParams& p) {
  return int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv) <= 64 ? 1 : 2;
}

int splits_for(const lab::AttnParams& p) {
  int dev = 0, sms = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int B_r = 64 * m_frags_for(p);
  const int64_t row_tiles = (int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv) + B_r - 1) / B_r;
  // A block keeps about one 32 KB K/V tile in flight (d = 128), and with GQA a decoding batch
  // has few blocks (batch x heads_kv) over few bytes, so balance matters as much as bytes in
  // flight: aim for 4 blocks per SM (as 05 does), chunks of at least 4 tiles.
  return ch04::choose_num_splits(p.num_splits, row_tiles * p.heads_kv * p.batch, p.seqlen_kv, 4 * 64, 4 * sms);
}

template <class T, int D>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  const int splits = splits_for(p);
  const ch04::Partials part = ch04::partials_in_workspace(p, splits, kSupport.chapter);
  const bool alibi = p.alibi_slopes != nullptr;
  if (m_frags_for(p) == 1) {
    if (alibi) launch_tiles<T, D, 1, true>(p, splits, part.o, part.lse, stream);
    else launch_tiles<T, D, 1, false>(p, splits, part.o, part.lse, stream);
  } else {
    if (alibi) launch_tiles<T, D, 2, true>(p, splits, part.o, part.lse, stream);
    else launch_tiles<T, D, 2, false>(p, splits, part.o, part.lse, stream);
  }
  if (splits > 1) ch04::combine_splits(p, splits, part.o, part.lse, stream);
}

void check_launch_limits(const lab::AttnParams& p) {
  ch04::check_split_kv_launch(p, kSupport, true);  // heads_kv on grid.y
  if (int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv) > (int64_t(1) << 30))
    throw lab::InvalidArgument("06_gqa_alibi: seqlen_q * heads_q / heads_kv above 2^30 is not supported");
}

}  // namespace

int num_splits_for(const lab::AttnParams& p) {
  check_launch_limits(p);
  return splits_for(p);
}

size_t workspace_bytes(const lab::AttnParams& p) { return ch04::partials_bytes(p, num_splits_for(p)); }

void forward(const lab::AttnParams& p, cudaStream_t stream) {
  check_launch_limits(p);
  const bool half = p.dtype == lab::DType::fp16;
  if (p.head_dim == 64) half ? launch<__half, 64>(p, stream) : launch<__nv_bfloat16, 64>(p, stream);
  else half ? launch<__half, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}

}  // namespace ch06
