// 03_flash_v2, step 3 ("overlap"): the softmax of one tile runs while the tensor cores compute
// the scores of the next.
//
// In step 2 each warp alternates: tensor cores busy (S = Q_i K_j^T), then FMA/MUFU units busy
// (the softmax of S_j: max, exp2, sum), then tensor cores again (O_i += P V_j). Two warps per
// scheduler cannot hide that: while one does its softmax the other often does too, and the tensor
// cores idle. This step reorders the loop so that the instructions of S_{j+1} = Q_i K_{j+1}^T and
// of the softmax of S_j sit in the same basic block: the compiler interleaves them, and the tensor
// cores work on tile j + 1 while the softmax of tile j is computed (FlashAttention-3's
// intra-warpgroup overlap, here with mma.sync).
// Cost: two score tiles live in registers at once. At d = 64 that fits (S_j, S_{j+1}: 64 + 64
// registers, O_i: 64); at d = 128, O_i alone takes 128 registers, so B_c drops to 32 and the
// per-tile overheads double: the ladder shows step 2 stays ahead there. The loop also computes
// one extra, discarded S tile per block (keeping it unconditional keeps the basic block whole),
// and rescales O_i unconditionally for the same reason.
//
// clang-format off
//   timeline per tile j (one warp):
//     step 2:  [QK^T j ====][softmax j ----][PV j ====]
//     step 3:  [QK^T j+1 ====]               [PV j ====]       ==== tensor cores
//              [softmax j ----]                                ---- FMA / MUFU units
//   K_{j+2} and V_{j+1} stream into the free buffers meanwhile (cp.async, one barrier per tile).
// clang-format on
#include <cmath>

#include "03_flash_v2/kernel.h"
#include "03_flash_v2/tensor_core.cuh"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch03 {

namespace {

// B_r query rows per block (4 warps, 16 * M_FRAGS rows each), B_c keys per K/V tile, and how far
// to unroll the k-loop of S = QK^T (a rolled loop keeps fewer fragments in flight: fewer registers).
// Chosen by measurement (docs/results, 03_flash_v2/README.md) within the 255 registers per thread
// that two blocks per SM allow; at d = 128 the accumulators do not quite fit and ptxas spills a
// few bytes (03_flash_v2/README.md, "Tile choices", has what -Xptxas -v reports per step).
template <int D> struct Tiles { static constexpr int B_r = 128, B_c = 64, QK_UNROLL = D / 16; };
template <> struct Tiles<96> { static constexpr int B_r = 128, B_c = 32, QK_UNROLL = 6; };
template <> struct Tiles<128> { static constexpr int B_r = 128, B_c = 32, QK_UNROLL = 8; };
template <> struct Tiles<256> { static constexpr int B_r = 64, B_c = 32, QK_UNROLL = 1; };

constexpr int kWarps = 4, kThreads = 32 * kWarps;

// Shared-memory tiles are rows of ROW elements (d rounded up to 64, i.e. 8+ chunks of 16 bytes).
// Chunk c of row r is stored at chunk c ^ (r % 8): the 8 row addresses of one ldmatrix then hit
// 8 different 16-byte bank groups instead of the same one.
template <int ROW>
__device__ __forceinline__ uint32_t smem_offset(int r, int c) {
  return uint32_t((r * (ROW / 8) + (c ^ (r & 7))) * 16);
}

// ROWS x D tile from global rows `row_stride` apart into swizzled shared memory, 16 bytes per
// cp.async; rows at or past `valid_rows` are zero-filled (src-size 0), never read. When the
// threads divide a row's chunks evenly, each thread copies the same chunk c of rows r0, r0 + RPP,
// ...: one base address per thread, the rest compile-time offsets.
template <class T, int D, int ROW, int ROWS>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* g, int64_t row_stride,
                                                int valid_rows) {
  constexpr int CHUNKS = D / 8;
  static_assert((ROWS * CHUNKS) % kThreads == 0, "tile must split evenly over the threads");
  if constexpr (kThreads % CHUNKS == 0 && (kThreads / CHUNKS) % 8 == 0) {
    constexpr int RPP = kThreads / CHUNKS;  // rows per pass; a multiple of 8 keeps the swizzle fixed
    const int r0 = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS;
    const T* src = g + r0 * row_stride + c * 8;
    const uint32_t dst = smem + smem_offset<ROW>(r0, c);
    const bool full = valid_rows >= ROWS;
#pragma unroll
    for (int k = 0; k < ROWS / RPP; ++k) {
      const bool valid = full || r0 + k * RPP < valid_rows;
      cp_async_16(dst + k * RPP * ROW * sizeof(T), valid ? src + k * RPP * row_stride : g, valid ? 16 : 0);
    }
  } else {
#pragma unroll
    for (int k = 0; k < ROWS * CHUNKS / kThreads; ++k) {
      const int e = threadIdx.x + k * kThreads, r = e / CHUNKS, c = e % CHUNKS;
      const bool valid = r < valid_rows;
      cp_async_16(smem + smem_offset<ROW>(r, c), valid ? g + r * row_stride + c * 8 : g, valid ? 16 : 0);
    }
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

template <class T, int D, int B_r, int B_c, int QK_UNROLL>
__global__ void __launch_bounds__(kThreads, 2) flash_forward_overlap(const lab::AttnParams p) {
  constexpr int M_FRAGS = B_r / (16 * kWarps);  // m16 fragments per warp
  constexpr int ROW = (D + 63) / 64 * 64;
  constexpr int N_S = B_c / 8;   // n8 tiles of S per fragment row
  constexpr int N_O = D / 8;     // n8 tiles of O
  static_assert(N_O % 2 == 0 && N_S % 2 == 0 && B_r % (16 * kWarps) == 0, "tile shape");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK = sQ + B_r * ROW * sizeof(T);      // two K tiles
  const uint32_t sV = sK + 2 * B_c * ROW * sizeof(T);  // two V tiles

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Causal: the last query tiles see the most keys; start them first.
  const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int sq = p.seqlen_q, sk = p.seqlen_kv, diag = sk - sq;  // query i sees keys j <= i + diag
  const int m0 = m_block * B_r, warp_row0 = warp * 16 * M_FRAGS;

  // ldmatrix addresses. Each ldmatrix reads 8 rows that are equal to lane % 8 modulo 8, and this
  // thread's chunk in them is 2 kk + (a lane bit): with the swizzle it sits at chunk 2 kk ^ y, y
  // fixed per thread. Everything else in an address is a compile-time offset.
  constexpr uint32_t ROW_BYTES = ROW * sizeof(T);
  const uint32_t y_a = (lane / 16) ^ (lane % 8);        // Q (A operand) and V (.trans) fragments
  const uint32_t y_b = ((lane / 8) & 1) ^ (lane % 8);   // K (B operand) fragments
  const uint32_t q_frag = sQ + (warp_row0 + lane % 16) * ROW_BYTES;
  const uint32_t k_frag = (lane % 8 + 8 * (lane / 16)) * ROW_BYTES;       // + the K tile
  const uint32_t v_frag = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_BYTES;  // + the V tile

  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const T* K = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_kv * p.v_head_stride;

  // T_c key tiles; with causal only those left of (or on) this query tile's diagonal.
  int T_c = (sk + B_c - 1) / B_c;
  if (p.causal) T_c = min(T_c, max(0, (min(m0 + B_r, sq) + diag + B_c - 1) / B_c));

  // Prologue: Q_i, K_0, V_0 and K_1. Buffers alternate: tile j lives in buffer j % 2.
  constexpr uint32_t KV_TILE = B_c * ROW * sizeof(T);
  load_tile_async<T, D, ROW, B_r>(sQ, Q, p.q_row_stride, sq - m0);
  if (T_c > 0) {
    load_tile_async<T, D, ROW, B_c>(sK, K, p.k_row_stride, sk);
    load_tile_async<T, D, ROW, B_c>(sV, V, p.v_row_stride, sk);
  }
  if (T_c > 1) load_tile_async<T, D, ROW, B_c>(sK + KV_TILE, K + B_c * p.k_row_stride, p.k_row_stride, sk - B_c);
  cp_async_commit();

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
    if (n0 + B_c > sk || (p.causal && n0 + B_c - 1 > m0 + diag)) {
#pragma unroll
      for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + warp_row0 + mi * 16 + g + 8 * (e / 2);
            const int col = n0 + nj * 8 + 2 * t + e % 2;
            if (col >= sk || (p.causal && col > row + diag)) s[mi][nj][e] = -INFINITY;
          }
    }
  };

  // Online softmax in the exp2 domain: m_i is the running max of raw scores, P = 2^(s*c - m_i*c)
  // with c = scale * log2(e); O_i and l_i are rescaled by 2^((m_old - m_new) * c). S becomes P.
  auto online_softmax = [&](float (&s)[M_FRAGS][N_S][4]) {
#pragma unroll
    for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float pair[N_S];
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) pair[nj] = fmaxf(s[mi][nj][2 * r], s[mi][nj][2 * r + 1]);
        float mx = fmaxf(m_i[mi][r], tree_reduce(pair, [](float u, float v) { return fmaxf(u, v); }));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 threads of a quad share a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;  // row with no key yet
        const float alpha = softmax_alpha(m_i[mi][r], m_scaled, scale_log2);  // 1 if mx did not move
        m_i[mi][r] = mx;
#pragma unroll
        for (int nj = 0; nj < N_S; ++nj) {
          s[mi][nj][2 * r] = exp2_approx(fmaf(s[mi][nj][2 * r], scale_log2, -m_scaled));
          s[mi][nj][2 * r + 1] = exp2_approx(fmaf(s[mi][nj][2 * r + 1], scale_log2, -m_scaled));
          pair[nj] = s[mi][nj][2 * r] + s[mi][nj][2 * r + 1];
        }
        const float row_sum = tree_reduce(pair, [](float u, float v) { return u + v; });
        l_i[mi][r] = l_i[mi][r] * alpha + row_sum;  // per-thread partial sum; quad-reduced at the end
#pragma unroll  // unconditional: a branch here would split the block the compiler interleaves
        for (int nd = 0; nd < N_O; ++nd) o[mi][nd][2 * r] *= alpha, o[mi][nd][2 * r + 1] *= alpha;
      }
  };

  // O_i += P V_j: P goes from S's accumulators straight into A fragments.
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

  // One step of the loop: s_cur holds the masked scores of tile j; the scores of tile j + 1 go to
  // s_next. Both score tiles stay in registers, so the loop is unrolled by two and the arrays swap
  // roles instead of being copied.
  auto step = [&](float (&s_cur)[M_FRAGS][N_S][4], float (&s_next)[M_FRAGS][N_S][4], int j) {
    cp_async_wait<0>();
    __syncthreads();  // K_{j+1}, V_j have landed; every warp is done with K_j and V_{j-1}
    if (j + 2 < T_c)  // into K_j's buffer
      load_tile_async<T, D, ROW, B_c>(sK + (j & 1) * KV_TILE, K + (j + 2) * B_c * p.k_row_stride,
                                      p.k_row_stride, sk - (j + 2) * B_c);
    if (j + 1 < T_c)  // into V_{j-1}'s buffer
      load_tile_async<T, D, ROW, B_c>(sV + ((j + 1) & 1) * KV_TILE, V + (j + 1) * B_c * p.v_row_stride,
                                      p.v_row_stride, sk - (j + 1) * B_c);
    cp_async_commit();
    compute_scores(s_next, sK + ((j + 1) & 1) * KV_TILE);  // tensor cores: tile j + 1 (on the last
    online_softmax(s_cur);                                 // step: stale data, never used) while
    accumulate_pv(s_cur, sV + (j & 1) * KV_TILE);          // FMA/MUFU do the softmax of tile j
    mask_scores(s_next, (j + 1) * B_c);
  };

  float s_a[M_FRAGS][N_S][4], s_b[M_FRAGS][N_S][4];
  cp_async_wait<0>();
  __syncthreads();
  if (T_c > 0) {
    compute_scores(s_a, sK);
    mask_scores(s_a, 0);
  }
  for (int j = 0; j < T_c; j += 2) {
    step(s_a, s_b, j);
    if (j + 1 < T_c) step(s_b, s_a, j + 1);
  }

  // O_i / l_i, and lse_i = m_i * scale + log(l_i). Rows that saw no key write 0 and -inf; a NaN
  // score made l_i NaN, and `l != 0` (not `l > 0`) keeps O_i and lse_i NaN (common/attn.h).
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused below for O
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + m0 * p.o_row_stride;
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_i[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv_l = l != 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int nd = 0; nd < N_O; ++nd) o[mi][nd][2 * r] *= inv_l, o[mi][nd][2 * r + 1] *= inv_l;
      const int row = m0 + warp_row0 + mi * 16 + g + 8 * r;
      if (p.lse && t == 0 && row < sq)
        p.lse[(int64_t(b) * p.heads_q + h) * sq + row] =
            l != 0.f ? m_i[mi][r] * p.softmax_scale + logf(l) : -INFINITY;
    }
  // Stage this warp's rows of O in its own rows of the Q tile, then 16-byte coalesced stores.
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int nd = 0; nd < N_O; ++nd) {
      const int r0 = warp_row0 + mi * 16 + g;
      *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(r0, nd) + 4 * t) = pack2<T>(o[mi][nd][0], o[mi][nd][1]);
      *reinterpret_cast<uint32_t*>(smem + smem_offset<ROW>(r0 + 8, nd) + 4 * t) = pack2<T>(o[mi][nd][2], o[mi][nd][3]);
    }
  __syncwarp();
  constexpr int CHUNKS = D / 8;
#pragma unroll
  for (int e = lane; e < 16 * M_FRAGS * CHUNKS; e += 32) {
    const int r = warp_row0 + e / CHUNKS, c = e % CHUNKS;
    if (m0 + r < sq)
      *reinterpret_cast<uint4*>(O + r * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem + smem_offset<ROW>(r, c));
  }
}

template <class T, int D, int B_r, int B_c, int QK_UNROLL>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  constexpr int ROW = (D + 63) / 64 * 64;
  constexpr int smem = (B_r + 4 * B_c) * ROW * int(sizeof(T));  // Q_i, 2 x K_j, 2 x V_j
  auto kernel = flash_forward_overlap<T, D, B_r, B_c, QK_UNROLL>;
  lab::require_compute_capability(8, 0, "03_flash_v2", "mma.sync, ldmatrix, cp.async and bf16");
  // Refuses by name (InvalidArgument) where the device, or LAB_SMEM_CAP, allows less shared memory.
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), kThreads, size_t(smem), "03_flash_v2");
  const dim3 grid((p.seqlen_q + B_r - 1) / B_r, p.heads_q, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  LAB_LAUNCH_CHECK();
}

template <class T, int D>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  launch<T, D, Tiles<D>::B_r, Tiles<D>::B_c, Tiles<D>::QK_UNROLL>(p, stream);
}

template <class T>
void dispatch_head_dim(const lab::AttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 96: return launch<T, 96>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
  }
}

}  // namespace

void forward_overlap(const lab::AttnParams& p, cudaStream_t stream) {
  lab::check_params(p, kSupport);
  check_grid_limits(p, "03_flash_v2");
  if (p.dtype == lab::DType::fp16) dispatch_head_dim<__half>(p, stream);
  else dispatch_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace ch03
