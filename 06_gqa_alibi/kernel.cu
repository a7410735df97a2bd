// 06_gqa_alibi, step 4 (the chapter's default kernel): split-KV across blocks, with 04's combine.
//
// Step 3's decoding tile gives each (sequence, KV head) one block, and a small decoding batch has
// few of them (batch x heads_kv: 64 at batch 8, GQA 32/8) for a GPU that holds hundreds. As 04
// does, blocks split each sequence's keys into num_splits chunks (whole B_c tiles) and write fp32
// partials with their lse_s instead of O; 04's combine (varlen-aware) merges them. The kernel is
// step 3's with a key range [k_begin, k_end) in place of [0, n_keys) and a second epilogue.
// Cost: with splits, the partials' round trip through HBM and a second kernel; none with one.
//
//   grid: (num_splits x row tiles, heads_kv, batch): block (s, row tile) takes keys
//         [s chunk, (s + 1) chunk) of those its tile sees; block: step 3's (4 warps, B_r 16, 32 or 128)
#include <algorithm>
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "06_gqa_alibi/dispatch.h"
#include "06_gqa_alibi/kernel.h"
#include "06_gqa_alibi/merge_key_warps.cuh"
#include "common/cuda_check.h"
#include "common/device.h"

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
using ch03::exp2_approx;
using ch03::ldmatrix_x4;
using ch03::ldmatrix_x4_trans;
using ch03::mma_16816;
using ch03::pack2;
using ch03::rescale_rows;
using ch03::smem_addr;
using ch03::softmax_alpha;

// B_c keys per K/V tile and the unrolling of S = QK^T's k-loop, as in step 3 (B_r: the tile's).
template <int D> struct Tiles { static constexpr int B_c = 64, QK_UNROLL = D / 16; };
template <> struct Tiles<128> { static constexpr int B_c = 64, QK_UNROLL = 2; };

constexpr int kWarps = 4, kThreads = 32 * kWarps;

// Shared-memory rows of ROW elements, chunk c of row r at chunk c ^ (r % 8) (step 2's swizzle).
template <int ROW>
__device__ __forceinline__ uint32_t smem_offset(int r, int c) {
  return uint32_t((r * (ROW / 8) + (c ^ (r & 7))) * 16);
}

// Step 3's tile copy: rows at or past `valid_rows` are zero-filled, their address the tile's first
// row (unread; dropping the select, which bought 03 3%, is left to a measured change).
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
    // Offsets the host check refuses are never followed: the sequence is skipped (step 2).
    const bool inside = 0 <= q0 && q0 <= q1 && q1 <= p.total_q && q1 - q0 <= p.seqlen_q && 0 <= k0 &&
                        k0 <= k1 && k1 <= p.total_kv && k1 - k0 <= p.seqlen_kv;
    s.q_row0 = q0, s.sq = inside ? q1 - q0 : 0;
    s.k_row0 = k0, s.sk = inside ? k1 - k0 : 0;
  }
  return s;
}

template <class T, int D, int M_FRAGS, bool KEY_WARPS, int NST, bool ALIBI>
__global__ void __launch_bounds__(kThreads, 2) flash_forward_grouped(const lab::AttnParams p, int splits,
                                                                     float* o_partial, float* lse_partial) {
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
  const int gqa_ratio = p.heads_q / p.heads_kv;
  const int split = blockIdx.x % splits, m_block = blockIdx.x / splits;
  const int h_kv = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence(p, b);
  const int sq = seq.sq, sk = seq.sk;
  const int rows = sq * gqa_ratio, m0 = m_block * B_r;
  if (m0 >= rows) return;  // a short sequence in a long batch: nothing here (before any barrier)
  const int diag = sk - sq, warp_row0 = KEY_WARPS ? 0 : warp * 16 * M_FRAGS;
  const int key_off = KEY_WARPS ? warp * W_C : 0;  // this warp's keys within a tile
  // Warps whose rows are all padding (a short sequence's last row tile) skip the math. Not at
  // d = 128: there the branch around the math costs the loop registers (spills).
  const bool warp_active = D == 128 || m0 + warp_row0 < rows;

  // Keys this tile sees (causal: up to its last token's diagonal), cut into split chunks.
  const int first_tok = m0 / gqa_ratio, last_tok = (min(m0 + B_r, rows) - 1) / gqa_ratio;
  int n_keys = sk;
  if (p.causal) n_keys = min(sk, max(0, last_tok + 1 + diag));
  const int chunk = ((n_keys + splits - 1) / splits + B_c - 1) / B_c * B_c;
  const int k_begin = min(n_keys, split * chunk), k_end = min(n_keys, k_begin + chunk);
  const int T_c = (k_end - k_begin + B_c - 1) / B_c;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + seq.q_row0 * p.q_row_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + (seq.k_row0 + k_begin) * p.k_row_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + (seq.k_row0 + k_begin) * p.v_row_stride + h_kv * p.v_head_stride;
  // Q_i gathered row by row (packed row r: token r / gqa_ratio, head h_kv gqa_ratio + r % gqa_ratio).
  constexpr uint32_t KV_TILE = B_c * ROW * sizeof(T);
  constexpr uint32_t ROW_BYTES = ROW * sizeof(T);
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
      load_tile_async<T, D, ROW, B_c>(sK + j * KV_TILE, K + j * B_c * p.k_row_stride, p.k_row_stride, k_end - k_begin - j * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + j * KV_TILE, V + j * B_c * p.v_row_stride, p.v_row_stride, k_end - k_begin - j * B_c);
    }
    cp_async_commit();
  }

  // ALiBi, as in step 2: each row's slope in score units, and slope (2t - i - diag).
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
  const int crossing = first_tok + diag;  // tiles with a key right of this cross the first row's diagonal

  // Per thread: rows g and g + 8 of each of its M_FRAGS fragments.
  float o[M_FRAGS][N_O][4] = {};
  float m_i[M_FRAGS][2], l_i[M_FRAGS][2];
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
    for (int r = 0; r < 2; ++r) m_i[mi][r] = -INFINITY, l_i[mi][r] = 0.f;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  // ldmatrix addresses, as in step 2 (a warp's keys start key_off rows into the K/V tile).
  const uint32_t y_a = (lane / 16) ^ (lane % 8);        // Q (A operand) and V (.trans) fragments
  const uint32_t y_b = ((lane / 8) & 1) ^ (lane % 8);   // K (B operand) fragments
  const uint32_t q_frag = sQ + (warp_row0 + lane % 16) * ROW_BYTES;
  const uint32_t k_frag = (lane % 8 + 8 * (lane / 16)) * ROW_BYTES;       // + the K tile
  const uint32_t v_frag = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_BYTES;  // + the V tile

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

  // Mask keys past the end of the split's range and, with causal, right of the diagonal. Only the
  // last tile and the tiles crossing the diagonal need it.
  auto mask_scores = [&](float (&s)[M_FRAGS][N_S][4], int n0) {
    if (n0 + W_C > k_end || (p.causal && n0 + W_C - 1 > crossing)) {
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

  // Online softmax in the exp2 domain with ALiBi's bias, as in step 2 (its comment says how).
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
    const int n0 = k_begin + j * B_c + key_off;  // this warp's first key, within the sequence
    cp_async_wait<NST - 2>();  // tile j has landed (the NST - 2 newer groups may still fly)
    __syncthreads();           // ... for every thread; and every warp is done with tile j - 1
    const int ahead = j + NST - 1;  // prefetch into the buffer tile j - 1 used
    if (ahead < T_c) {
      const uint32_t next = (ahead % NST) * KV_TILE;
      load_tile_async<T, D, ROW, B_c>(sK + next, K + ahead * B_c * p.k_row_stride, p.k_row_stride, k_end - k_begin - ahead * B_c);
      load_tile_async<T, D, ROW, B_c>(sV + next, V + ahead * B_c * p.v_row_stride, p.v_row_stride, k_end - k_begin - ahead * B_c);
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
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // 04's combine may start launching
#endif
  __syncthreads();  // shared memory is reused below for O

  // The sequence's offsets again: re-read here rather than kept in registers through the loop.
  const Sequence out = sequence(p, b);
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + out.q_row0 * p.o_row_stride;
  if constexpr (KEY_WARPS) {
    merge_key_warps<T, D, B_r, kWarps>(smem, o, m_i, l_i, scale_log2, p, m0, rows, gqa_ratio, h_kv, b, split, splits, O,
                               o_partial, lse_partial);
  } else {
    // 03's epilogue: O_i / l_i; lse (or this split's lse_s); O staged in shared memory, 16-byte stores.
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
        if (t == 0 && row < rows) {
          const float lse = l == 0.f ? -INFINITY : m_i[mi][r] * p.softmax_scale + logf(l);  // NaN stays NaN
          const int64_t at = (int64_t(b) * p.heads_q + h_kv * gqa_ratio + row % gqa_ratio) * p.seqlen_q + row / gqa_ratio;
          if (splits > 1) lse_partial[int64_t(split) * p.batch * p.heads_q * p.seqlen_q + at] = lse;
          else if (p.lse) p.lse[at] = lse;
        }
      }
    if (splits > 1) {  // fp32 partials straight from registers: [split][b][h][i][d]
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 + warp_row0 + mi * 16 + g + 8 * r;
          if (row >= rows) continue;
          const int64_t at = ((int64_t(split) * p.batch + b) * p.heads_q + h_kv * gqa_ratio + row % gqa_ratio) * p.seqlen_q + row / gqa_ratio;
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

using KernelFn = void (*)(const lab::AttnParams, int, float*, float*);
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
  // Split-KV: a GQA decoding batch has few blocks (batch x heads_kv: 64 at batch 8, GQA 32/8) over
  // few bytes. Aim for one full wave of resident blocks (2 per SM at d = 128), so every block
  // starts at once and none waits for a second wave; chunks keep at least 4 tiles.
  static int splits(const lab::AttnParams& p) {
    const TilePlan t = plan_tile(p);
    // Sets the kernel's shared-memory limit (once per device); returns how many blocks an SM holds.
    const int resident = lab::configure_kernel((const void*)kernel(p, t), kThreads, t.smem_bytes, kSupport.chapter);
    return ch04::choose_num_splits(p.num_splits, t.row_tiles * p.heads_kv * p.batch, p.seqlen_kv, 4 * 64,
                                   std::max(1, resident) * lab::device_limits().sm_count);
  }
  static void run(const lab::AttnParams& p, cudaStream_t stream) {
    const int splits = Forward::splits(p);  // configures the kernel, too
    const ch04::Partials part = ch04::partials_in_workspace(p, splits, kSupport.chapter);
    const TilePlan t = plan_tile(p);
    kernel(p, t)<<<dim3(unsigned(t.row_tiles * splits), p.heads_kv, p.batch), kThreads, t.smem_bytes, stream>>>(
        p, splits, part.o, part.lse);
    LAB_LAUNCH_CHECK();
    if (splits > 1) ch04::combine_splits(p, splits, part.o, part.lse, stream);
  }
};

template <class T, int D>
struct Splits {
  static int run(const lab::AttnParams& p) { return Forward<T, D>::splits(p); }
};

}  // namespace

int num_splits_for(const lab::AttnParams& p) {
  check_launch_limits(p, kSupport);
  return dispatch<Splits>(p);
}
size_t workspace_bytes(const lab::AttnParams& p) { return ch04::partials_bytes(p, num_splits_for(p)); }
void forward(const lab::AttnParams& p, cudaStream_t stream) {
  check_launch_limits(p, kSupport);
  dispatch<Forward>(p, stream);
}

}  // namespace ch06
