// 06_gqa_alibi, step 3 ("decode_tile"): a decoding tile whose warps split the keys.
//
// Step 2 serves prefill and decode sequences in one launch, but a decode sequence (one query
// token: gqa_ratio packed rows) still gets 03's 128-row tile, in which only the first warp holds
// real rows: three warps load and wait. This step gives such problems a tile of their own, as 04
// does for decoding: with at most 32 packed rows (one token of up to 32 heads of a group) the 4
// warps share the rows and split each K/V tile's keys, each keeping its own (m, l, O); at the end
// merge_key_warps merges them through shared memory. Three K/V stages keep two tiles in flight
// while one is computed. Cost: the merge, once per block; prefill tiles are step 2's.
//
// clang-format off
//   grid: (row tiles, heads_kv, batch)      block: 4 warps, B_r = 16, 32 (decoding) or 128 packed rows
//   decoding tile (B_r = 16: one token of a group of up to 16 heads), one K/V tile of B_c = 64 keys:
//          keys 0..15   keys 16..31  keys 32..47  keys 48..63
//         +-----------+------------+------------+------------+
//   Q_i   |  warp 0   |   warp 1   |   warp 2   |   warp 3   |   each warp: S, P and its own
//  16 rows|  S, P, O  |  S, P, O   |  S, P, O   |  S, P, O   |   (m, l, O) for all 16 rows
//         +-----------+------------+------------+------------+
//   end: the 4 warps' (m, l, O) merged through shared memory (merge_key_warps), as 04's splits are.
// clang-format on
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "06_gqa_alibi/dispatch.h"
#include "06_gqa_alibi/kernel.h"
#include "06_gqa_alibi/merge_key_warps.cuh"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch06 {

const lab::Support kSupportDecodeTile = [] {
  lab::Support s;
  s.chapter = "06_gqa_alibi";
  s.head_dims = {64, 128};
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.alibi = true;
  s.varlen = true;
  s.vector_elems = 8;  // 16-byte cp.async rows
  return s;
}();

namespace {

using ch03::cp_async_16;
using ch03::cp_async_commit;
using ch03::cp_async_wait;
using ch03::exp2_approx;
using ch03::ldmatrix_x4;
using ch03::ldmatrix_x4_trans;
using ch03::mma_16816;
using ch03::pack2;
using ch03::rescale_rows;
using ch03::smem_addr;
using ch03::softmax_alpha;

// B_c keys per K/V tile, and how far to unroll the k-loop of S = QK^T (a rolled loop keeps fewer
// fragments in flight: fewer registers). B_r comes from the tile (below).
template <int D> struct Tiles { static constexpr int B_c = 64, QK_UNROLL = D / 16; };
template <> struct Tiles<128> { static constexpr int B_c = 64, QK_UNROLL = 2; };

constexpr int kWarps = 4, kThreads = 32 * kWarps;

// Two tiles (plan_tile in plan.cpp picks one, and NST, per problem): prefill (KEY_WARPS = false) is step 2's,
// B_r = 64 M_FRAGS rows, warp w owning rows 16 M_FRAGS w.., NST = 2; decoding (KEY_WARPS = true)
// has B_r = 16 M_FRAGS rows shared by the 4 warps, warp w multiplying keys 16w..16w+15 of each
// 64-key tile, and NST = 3 K/V stages (2 where the GPU's shared memory per block is too small).

// Shared-memory tiles are rows of ROW elements (d rounded up to 64, i.e. 8+ chunks of 16 bytes).
// Chunk c of row r is stored at chunk c ^ (r % 8): the 8 row addresses of one ldmatrix then hit
// 8 different 16-byte bank groups instead of the same one.
template <int ROW>
__device__ __forceinline__ uint32_t smem_offset(int r, int c) {
  return uint32_t((r * (ROW / 8) + (c ^ (r & 7))) * 16);
}

// ROWS x D tile from global rows `row_stride` apart into swizzled shared memory, 16 bytes per
// cp.async; rows at or past `valid_rows` are zero-filled (src-size 0), never read. Each thread
// copies the same chunk c of rows r0, r0 + RPP, ...: one base address per thread. Unlike 03's
// copy, a row past the end selects the tile's first row as its (unread) address: 06 has always
// done so, and dropping the select (which bought 03 3%) is left to a measured change.
template <class T, int D, int ROW, int ROWS>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* g, int64_t row_stride,
                                                int valid_rows) {
  constexpr int CHUNKS = D / 8;
  static_assert((ROWS * CHUNKS) % kThreads == 0, "tile must split evenly over the threads");
  constexpr int RPP = kThreads / CHUNKS;  // rows per pass; a multiple of 8 keeps the swizzle fixed
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

// Pairwise (tree) reductions over the n8 tiles of one row: depth log2(N) instead of N.
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

// Sequence b of a varlen batch: its first rows in the packed Q/O and K/V tensors, and its lengths.
struct Sequence {
  int64_t q_row0 = 0, k_row0 = 0;
  int sq, sk;
};
__device__ __forceinline__ Sequence sequence(const lab::AttnParams& p, int b) {
  Sequence s;
  s.sq = p.seqlen_q, s.sk = p.seqlen_kv;
  if (p.cu_seqlens_q) {
    const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int k0 = p.cu_seqlens_kv[b], k1 = p.cu_seqlens_kv[b + 1];
    // Offsets the host check refuses (past total_q / total_kv, decreasing, longer than the grid)
    // are never followed, whatever the table holds by launch time: the sequence is skipped.
    const bool inside = 0 <= q0 && q0 <= q1 && q1 <= p.total_q && q1 - q0 <= p.seqlen_q && 0 <= k0 &&
                        k0 <= k1 && k1 <= p.total_kv && k1 - k0 <= p.seqlen_kv;
    s.q_row0 = q0, s.sq = inside ? q1 - q0 : 0;
    s.k_row0 = k0, s.sk = inside ? k1 - k0 : 0;
  }
  return s;
}

template <class T, int D, int M_FRAGS, bool KEY_WARPS, int NST, bool ALIBI>
__global__ void __launch_bounds__(kThreads, 2) flash_forward_grouped(const lab::AttnParams p) {
  constexpr int B_r = 16 * M_FRAGS * (KEY_WARPS ? 1 : kWarps), B_c = Tiles<D>::B_c;
  constexpr int W_C = KEY_WARPS ? B_c / kWarps : B_c;  // keys of each tile this warp multiplies
  constexpr int QK_UNROLL = KEY_WARPS ? D / 16 : ALIBI && D == 128 ? 1 : Tiles<D>::QK_UNROLL;
  constexpr int ROW = (D + 63) / 64 * 64;
  constexpr int N_S = W_C / 8;   // n8 tiles of S per fragment row
  constexpr int N_O = D / 8;     // n8 tiles of O
  static_assert(!KEY_WARPS || (B_r + 2 * NST * B_c) * ROW * sizeof(T) >= 2 * kWarps * B_r * 4 + kWarps * B_r * (D + 4) * 4,
                "the decoding tile's merge reuses its K/V stages");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK = sQ + B_r * ROW * sizeof(T);        // NST K tiles
  const uint32_t sV = sK + NST * B_c * ROW * sizeof(T);  // NST V tiles

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Causal: the last row tiles see the most keys; start them first.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h_kv = blockIdx.y, b = blockIdx.z, gqa_ratio = p.heads_q / p.heads_kv;
  const Sequence seq = sequence(p, b);
  const int sq = seq.sq, sk = seq.sk;
  const int rows = sq * gqa_ratio, m0 = m_block * B_r;
  if (m0 >= rows) return;  // a short sequence in a long batch: nothing here (before any barrier)
  const int diag = sk - sq, warp_row0 = KEY_WARPS ? 0 : warp * 16 * M_FRAGS;
  const int key_off = KEY_WARPS ? warp * W_C : 0;  // this warp's keys within a tile
  // Warps whose rows are all padding (a short sequence's last row tile) skip the math. Not at
  // d = 128: there the branch around the math costs the loop registers (spills).
  const bool warp_active = D == 128 || m0 + warp_row0 < rows;

  // ldmatrix addresses, as in step 2 (a warp's keys start key_off rows into the K/V tile).
  constexpr uint32_t ROW_BYTES = ROW * sizeof(T);
  const uint32_t y_a = (lane / 16) ^ (lane % 8);        // Q (A operand) and V (.trans) fragments
  const uint32_t y_b = ((lane / 8) & 1) ^ (lane % 8);   // K (B operand) fragments
  const uint32_t q_frag = sQ + (warp_row0 + lane % 16) * ROW_BYTES;
  const uint32_t k_frag = (lane % 8 + 8 * (lane / 16)) * ROW_BYTES;       // + the K tile
  const uint32_t v_frag = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_BYTES;  // + the V tile

  // T_c key tiles; with causal only those left of (or on) the diagonal of this tile's last token.
  int T_c = (sk + B_c - 1) / B_c;
  if (p.causal) T_c = min(T_c, max(0, ((min(m0 + B_r, rows) - 1) / gqa_ratio + 1 + diag + B_c - 1) / B_c));

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + seq.q_row0 * p.q_row_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + seq.k_row0 * p.k_row_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + seq.k_row0 * p.v_row_stride + h_kv * p.v_head_stride;

  // Q_i: packed row r is token r / gqa_ratio of query head h_kv gqa_ratio + r % gqa_ratio, so rows
  // are gathered one by one (once per block; the K/V tiles below are plain 03 tiles).
  constexpr uint32_t KV_TILE = B_c * ROW * sizeof(T);
  constexpr int CHUNKS = D / 8;
#pragma unroll
  for (int k = 0; k < B_r * CHUNKS / kThreads; ++k) {
    const int e = threadIdx.x + k * kThreads, r = e / CHUNKS, c = e % CHUNKS;
    const bool valid = m0 + r < rows;
    const int tok = (m0 + r) / gqa_ratio, h = h_kv * gqa_ratio + (m0 + r) % gqa_ratio;
    const T* src = valid ? Q + tok * p.q_row_stride + h * p.q_head_stride + c * 8 : Q;
    cp_async_16(sQ + smem_offset<ROW>(r, c), src, valid ? 16 : 0);
  }
  // ... and the first NST - 1 K/V tiles, one commit group each (Q rides with tile 0).
#pragma unroll
  for (int j = 0; j < NST - 1; ++j) {
    if (j < T_c) {
      load_tile_async<T, D, ROW, B_c>(sK + j * KV_TILE, K + j * B_c * p.k_row_stride, p.k_row_stride, sk - j * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + j * KV_TILE, V + j * B_c * p.v_row_stride, p.v_row_stride, sk - j * B_c);
    }
    cp_async_commit();
  }

  // This thread's rows are g and g + 8 of each fragment. With ALiBi each row keeps its slope in
  // score units (slope / scale) and slope (2t - i - diag): the bias of key n0 + 8 nj + 2t + c is
  // then slope (8 nj + c) (an FMA with a constant) plus a per-row term for the whole tile.
  const int row_base = m0 + warp_row0 + g;
  auto token_of = [&](int mi, int r) { return (row_base + mi * 16 + 8 * r) / gqa_ratio; };
  float slope_of[M_FRAGS][2], slope_shift[M_FRAGS][2];
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_base + mi * 16 + 8 * r;
      slope_of[mi][r] = ALIBI && row < rows ? p.alibi_slopes[h_kv * gqa_ratio + row % gqa_ratio] / p.softmax_scale : 0.f;
      slope_shift[mi][r] = slope_of[mi][r] * float(2 * t - token_of(mi, r) - diag);
    }
  const int crossing = m0 / gqa_ratio + diag;  // tiles with a key right of this cross the first row's diagonal

  // Per thread: rows g and g + 8 of each of its M_FRAGS fragments.
  float o[M_FRAGS][N_O][4] = {};
  float m_i[M_FRAGS][2], l_i[M_FRAGS][2];
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
    for (int r = 0; r < 2; ++r) m_i[mi][r] = -INFINITY, l_i[mi][r] = 0.f;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  // S = Q_i K_j^T on tensor cores.
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
        uint32_t bk[4];  // B fragments of key tiles nj and nj + 1
        ldmatrix_x4(bk, sK_j + k_frag + nj * 8 * ROW_BYTES + (((2 * kk) ^ y_b) << 4));
#pragma unroll
        for (int mi = 0; mi < M_FRAGS; ++mi) {
          mma_16816<T>(s[mi][nj], a[mi], bk[0], bk[1]);
          mma_16816<T>(s[mi][nj + 1], a[mi], bk[2], bk[3]);
        }
      }
    }
  };

  // Mask keys past the end of the sequence and, with causal, right of the diagonal. Only the
  // last tile and the tiles crossing the diagonal need it.
  auto mask_scores = [&](float (&s)[M_FRAGS][N_S][4], int n0) {
    if (n0 + W_C > sk || (p.causal && n0 + W_C - 1 > crossing)) {
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int last_col = p.causal ? min(sk - 1, token_of(mi, r) + diag) : sk - 1;
#pragma unroll
          for (int nj = 0; nj < N_S; ++nj)
#pragma unroll
            for (int c = 0; c < 2; ++c)
              if (n0 + nj * 8 + 2 * t + c > last_col) s[mi][nj][2 * r + c] = -INFINITY;
        }
    }
  };

  // Online softmax in the exp2 domain: m_i is the running max of raw scores, P = 2^(s*c - m_i*c)
  // with c = scale * log2(e); O_i and l_i are rescaled by 2^((m_old - m_new) * c). S becomes P.
  // With ALiBi, on a tile left of every row's diagonal the score held is s + slope (8 nj + c) (one
  // FMA with a constant); the rest of the bias, slope (n0 + 2t - i - diag), is the same for the
  // thread's whole row of the tile, so it is added to the row max and folded into the exp2
  // argument (each thread of a quad adds its own 2t). Other tiles add -slope |j - i - diag| per score.
  auto online_softmax = [&](float (&s)[M_FRAGS][N_S][4], int n0) {
    // alpha per row; O_i is rescaled after all rows, under one warp-wide branch (below).
    float alpha_of[M_FRAGS][2];
    bool moved = false;
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float row_bias = 0.f;
        if constexpr (ALIBI) {
          if (n0 + W_C - 1 <= crossing) {  // every key at or left of every row's diagonal
            row_bias = fmaf(slope_of[mi][r], float(n0), slope_shift[mi][r]);
#pragma unroll
            for (int nj = 0; nj < N_S; ++nj) {
              s[mi][nj][2 * r] = fmaf(slope_of[mi][r], float(8 * nj), s[mi][nj][2 * r]);
              s[mi][nj][2 * r + 1] = fmaf(slope_of[mi][r], float(8 * nj + 1), s[mi][nj][2 * r + 1]);
            }
          } else {  // keys right of a diagonal (not causal), or the diagonal tiles: -slope |distance|
            const float d0 = float(n0 + 2 * t - token_of(mi, r) - diag);  // key n0 + 2t minus the diagonal
#pragma unroll
            for (int nj = 0; nj < N_S; ++nj) {
              s[mi][nj][2 * r] = fmaf(-slope_of[mi][r], fabsf(d0 + float(8 * nj)), s[mi][nj][2 * r]);
              s[mi][nj][2 * r + 1] = fmaf(-slope_of[mi][r], fabsf(d0 + float(8 * nj + 1)), s[mi][nj][2 * r + 1]);
            }
          }
        }
        float pair[N_S];
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) pair[nj] = fmaxf(s[mi][nj][2 * r], s[mi][nj][2 * r + 1]);
        float mx = fmaxf(m_i[mi][r], tree_reduce(pair, [](float u, float v) { return fmaxf(u, v); }) + row_bias);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 threads of a quad share a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;  // row with no key yet
        const float alpha = softmax_alpha(m_i[mi][r], m_scaled, scale_log2);  // 1 if mx did not move
        const float shift = fmaf(row_bias, scale_log2, -m_scaled);
        m_i[mi][r] = mx;
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) {
          s[mi][nj][2 * r] = exp2_approx(fmaf(s[mi][nj][2 * r], scale_log2, shift));
          s[mi][nj][2 * r + 1] = exp2_approx(fmaf(s[mi][nj][2 * r + 1], scale_log2, shift));
          pair[nj] = s[mi][nj][2 * r] + s[mi][nj][2 * r + 1];
        }
        const float row_sum = tree_reduce(pair, [](float u, float v) { return u + v; });
        l_i[mi][r] = l_i[mi][r] * alpha + row_sum;  // per-thread partial sum; quad-reduced at the end
        alpha_of[mi][r] = alpha;
        moved |= alpha != 1.f;
      }
    rescale_rows(o, alpha_of, moved);  // one warp-wide branch (tensor_core.cuh)
  };

  // O_i += P V_j: P goes from S's accumulators straight into A fragments.
  auto accumulate_pv = [&](const float (&s)[M_FRAGS][N_S][4], uint32_t sV_j) {
#pragma unroll
    for (int kk = 0; kk < W_C / 16; ++kk) {
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
        uint32_t bv[4];  // B fragments of d-tiles nd and nd + 1, transposed on the way in
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
    const int n0 = j * B_c + key_off;  // this warp's first key
    cp_async_wait<NST - 2>();  // tile j has landed (the NST - 2 newer groups may still fly)
    __syncthreads();           // ... for every thread; and every warp is done with tile j - 1
    const int ahead = j + NST - 1;  // prefetch into the buffer tile j - 1 used
    if (ahead < T_c) {
      const uint32_t next = (ahead % NST) * KV_TILE;
      load_tile_async<T, D, ROW, B_c>(sK + next, K + ahead * B_c * p.k_row_stride, p.k_row_stride, sk - ahead * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + next, V + ahead * B_c * p.v_row_stride, p.v_row_stride, sk - ahead * B_c);
    }
    cp_async_commit();  // possibly empty: keeps one group per iteration for wait_group
    if (warp_active) {  // warp-uniform: padding-only warps just load
      const uint32_t sK_j = sK + (j % NST) * KV_TILE + key_off * ROW_BYTES;
      const uint32_t sV_j = sV + (j % NST) * KV_TILE + key_off * ROW_BYTES;
      float s[M_FRAGS][N_S][4];
      compute_scores(s, sK_j);
      mask_scores(s, n0);
      online_softmax(s, n0);
      accumulate_pv(s, sV_j);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused below for O

  // The sequence's offsets again: re-read here rather than kept in registers through the loop.
  const Sequence out = sequence(p, b);
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + out.q_row0 * p.o_row_stride;
  if constexpr (KEY_WARPS) {
    merge_key_warps<T, D, B_r, kWarps>(smem, o, m_i, l_i, scale_log2, p, m0, rows, gqa_ratio, h_kv, b, 0, 1, O,
                               nullptr, nullptr);
  } else {
    // Step 2's epilogue: O_i / l_i and lse; O staged in the warp's rows of the Q tile, 16-byte stores.
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
        const int row = m0 + warp_row0 + mi * 16 + g + 8 * r;
        if (p.lse && t == 0 && row < rows)
          p.lse[(int64_t(b) * p.heads_q + h_kv * gqa_ratio + row % gqa_ratio) * p.seqlen_q + row / gqa_ratio] =
              l == 0.f ? -INFINITY : m_i[mi][r] * p.softmax_scale + logf(l);  // NaN stays NaN
      }
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int nd = 0; nd < N_O; ++nd) {
        const int r0 = warp_row0 + mi * 16 + g;
        *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(r0, nd) + 4 * t) = pack2<T>(o[mi][nd][0], o[mi][nd][1]);
        *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(r0 + 8, nd) + 4 * t) = pack2<T>(o[mi][nd][2], o[mi][nd][3]);
      }
    __syncwarp();
#pragma unroll
    for (int e = lane; e < 16 * M_FRAGS * CHUNKS; e += 32) {
      const int r = warp_row0 + e / CHUNKS, c = e % CHUNKS, row = m0 + r;
      if (row < rows)
        *reinterpret_cast<uint4*>(O + (row / gqa_ratio) * p.o_row_stride +
                                  (h_kv * gqa_ratio + row % gqa_ratio) * p.o_head_stride + c * 8) =
            *reinterpret_cast<const uint4*>(smem + smem_offset<ROW>(r, c));
    }
  }
}

using KernelFn = void (*)(const lab::AttnParams);
// The kernel for a plan: one instantiation per tile shape, stage count and ALiBi on or off.
template <class T, int D, bool ALIBI>
KernelFn kernel_for(const TilePlan& t) {
  if (!t.key_warps) return flash_forward_grouped<T, D, 2, false, 2, ALIBI>;
  if (t.m_frags == 1)
    return t.stages == 3 ? flash_forward_grouped<T, D, 1, true, 3, ALIBI> : flash_forward_grouped<T, D, 1, true, 2, ALIBI>;
  return t.stages == 3 ? flash_forward_grouped<T, D, 2, true, 3, ALIBI> : flash_forward_grouped<T, D, 2, true, 2, ALIBI>;
}

template <class T, int D>
struct Forward {
  static KernelFn kernel(const lab::AttnParams& p, const TilePlan& t) {
    return p.alibi_slopes ? kernel_for<T, D, true>(t) : kernel_for<T, D, false>(t);
  }
  static void run(const lab::AttnParams& p, cudaStream_t stream) {
    const TilePlan t = plan_tile(p);  // the tile for p's packed rows, on this GPU (plan.cpp)
    lab::configure_kernel((const void*)kernel(p, t), kThreads, t.smem_bytes, kSupportDecodeTile.chapter);
    kernel(p, t)<<<dim3(unsigned(t.row_tiles), p.heads_kv, p.batch), kThreads, t.smem_bytes, stream>>>(p);
    LAB_LAUNCH_CHECK();
  }
};

}  // namespace

void forward_decode_tile(const lab::AttnParams& p, cudaStream_t stream) {
  check_launch_limits(p, kSupportDecodeTile);
  dispatch<Forward>(p, stream);
}

}  // namespace ch06
