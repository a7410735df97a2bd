// 04_flash_decoding: split-KV decoding on the 03 tensor-core kernel.
//
// In decoding each sequence brings 1 new query row (a few with speculative decoding) and a KV
// cache of thousands of keys: ~1 FLOP per byte of K/V, so the kernel must read K and V once at
// the copy bandwidth. 03_flash_v2's fa2 kernel, run as it is, fails twice:
//   - its block owns B_r = 128 query rows and its warps split those rows: with one row, 127/128
//     of every mma is padding and 3 of the 4 warps compute nothing but still wait at barriers;
//   - it launches batch x heads blocks: 32 at batch 1, on a GPU with 132 SMs.
// This kernel changes three things and keeps 03's math (mma.sync, ldmatrix, cp.async, swizzle,
// online softmax in the exp2 domain):
//   - B_r = 16 query rows (one m16 fragment) per block, and the 4 warps split each K/V tile:
//     warp w takes keys 16w .. 16w+15 of every 64-key tile, into its own cp.async pipeline of
//     shared-memory stages (no block barrier in the loop); the warps' (m, l, O) are merged at the
//     end exactly as the splits are merged below;
//   - the keys of each sequence are cut into num_splits chunks, one block each (split-KV, "flash
//     decoding"): blocks = splits x heads x batch fill the GPU; each writes a partial O_s with its
//     log-sum-exp lse_s, and combine.cu merges them: O = sum_s exp(lse_s - lse) O_s;
//   - the KV cache as inference engines keep it: per-sequence lengths (cache_seqlens) and pages
//     (block_table). A 16-key slice never crosses a page (pages are >= 16 keys, slices 16-aligned),
//     so each slice looks its page up once.
// Cost: the tensor cores still multiply 16 rows where decoding has 1 (their time hides under the
// loads); split partials add 2 x splits x d floats of traffic per (batch, head), and a second launch.
//
// clang-format off
//   grid: (num_splits x query tiles, heads_q, batch)      block: 4 warps, 16 query rows
//
//   keys of sequence b:  |---- split 0 ----|---- split 1 ----| ... |-- split S-1 --|
//   one split, tile by tile (64 keys):
//                 keys 0..15   16..31   32..47   48..63 | 64..79 ...
//                 warp 0       warp 1   warp 2   warp 3 | warp 0 ...
//   per warp:  S = Q_i K^T (16 x 16), online softmax -> P, O_w += P V   (registers)
//   end:       (m_w, l_w, O_w) of the 4 warps -> (m, l, O) of the split     (shared memory)
//              splits == 1: O / l written as the output;  else O / l and lse_s -> workspace
// clang-format on
#include <algorithm>
#include <cmath>

#include "03_flash_v2/tensor_core.cuh"
#include "04_flash_decoding/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch04 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "04_flash_decoding";
  s.head_dims = {64, 128, 256};
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.cache_seqlens = true;
  s.paged_kv = true;
  s.splits = true;
  s.max_splits = kMaxSplits;
  s.max_seqlen_q = 64;
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
using ch03::smem_addr;
using ch03::softmax_alpha;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int B_r = 16;               // query rows per block: one m16 fragment
constexpr int B_c = 16;               // keys per warp slice
constexpr int kTile = kWarps * B_c;   // keys per block tile; split chunks are multiples of it

// Shared-memory stages per warp: double buffering, as in 03 (slice i + 1 loads while slice i is
// computed). Measured on H100 against 3 stages: as fast or faster, because 2 stages (68 KB at
// d = 128) let 3 blocks share an SM where 3 stages (100 KB) fit 2. Where a block may not have the
// 136 KB of 2 stages at d = 256 (99 KB on sm_86/89/120), plan_for picks 1 stage: each slice then
// loads, lands and is computed in turn, with no load in flight under the math.
constexpr int kStages = 2;

template <int D> constexpr int row_elems() { return (D + 63) / 64 * 64; }
template <int D, int NST> constexpr int smem_bytes() {
  // Q_i, then per warp NST stages of a K slice and a V slice (2-byte elements).
  return (B_r + kWarps * NST * 2 * B_c) * row_elems<D>() * 2;
}
// After the loop the same shared memory holds the warps' merge: 2 x kWarps + 2 rows of B_r floats
// (m, l), then each warp's O, [kWarps][B_r][D + 4] floats.
template <int D> constexpr int merge_bytes() {
  return ((2 * kWarps + 2) * B_r + kWarps * B_r * (D + 4)) * 4;
}

// Chunk c of row r sits at chunk c ^ (r % 8), as in 03.
template <int ROW>
__device__ __forceinline__ uint32_t smem_offset(int r, int c) {
  return uint32_t((r * (ROW / 8) + (c ^ (r & 7))) * 16);
}

// `rows` rows of D elements, `row_stride` apart, into swizzled shared memory; rows >= valid_rows
// are zero-filled (P is 0 there, and 0 * garbage could be NaN). `n_threads` threads, this one `tid`.
template <class T, int D, int ROWS, int N_THREADS>
__device__ __forceinline__ void load_rows_async(uint32_t smem, const T* g, int64_t row_stride,
                                                int valid_rows, int tid) {
  constexpr int CHUNKS = D / 8, ROW = row_elems<D>();
  static_assert((ROWS * CHUNKS) % N_THREADS == 0, "rows must split evenly over the threads");
#pragma unroll
  for (int k = 0; k < ROWS * CHUNKS / N_THREADS; ++k) {
    const int e = tid + k * N_THREADS, r = e / CHUNKS, c = e % CHUNKS;
    const bool valid = r < valid_rows;
    cp_async_16(smem + smem_offset<ROW>(r, c), valid ? g + r * row_stride + c * 8 : g, valid ? 16 : 0);
  }
}

template <class T, int D, int NST>
__global__ void __launch_bounds__(kThreads) flash_decode_split(const lab::AttnParams p, int splits,
                                                               float* o_partial, float* lse_partial) {
  static_assert(merge_bytes<D>() <= smem_bytes<D, NST>(), "the warps' merge must fit the stages");
  constexpr int ROW = row_elems<D>();
  constexpr int N_O = D / 8;  // n8 tiles of O
  constexpr uint32_t ROW_BYTES = ROW * sizeof(T), SLICE = B_c * ROW_BYTES;

  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sKV = sQ + B_r * ROW_BYTES + warp * NST * 2 * SLICE;  // this warp's stages: K, V, K, V...

  const int split = blockIdx.x % splits, m_block = blockIdx.x / splits;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / (p.heads_q / p.heads_kv);
  const int sq = p.seqlen_q, m0 = m_block * B_r;
  int sk = p.cache_seqlens ? p.cache_seqlens[b] : p.seqlen_kv;
  // A length the cache cannot hold would send the loads outside it: poison this block's rows.
  bool bad_table = sk < 0 || sk > p.seqlen_kv;
  sk = bad_table ? 0 : sk;
  const int diag = sk - sq;  // query i sees keys j <= i + diag (causal, bottom-right)

  // The keys this query tile sees, cut into `splits` chunks of whole 64-key tiles.
  int n_keys = sk;
  if (p.causal) n_keys = min(sk, max(0, min(m0 + B_r, sq) + diag));
  // LAB-BEGIN(split-range): this split's keys [k_begin, k_end): its chunk of whole 64-key tiles
  // LAB-STUB: const int k_begin = 0, k_end = 0;
  const int chunk = ((n_keys + splits - 1) / splits + kTile - 1) / kTile * kTile;
  const int k_begin = min(n_keys, split * chunk), k_end = min(n_keys, k_begin + chunk);
  // LAB-END(split-range)
  const int n_slices = (k_end - k_begin + B_c - 1) / B_c;
  const int my_slices = n_slices > warp ? (n_slices - warp + kWarps - 1) / kWarps : 0;

  // Address of key `key0`'s row of K (V): through the page table when the cache is paged.
  const T* K = static_cast<const T*>(p.k) + h_kv * p.k_head_stride;
  const T* V = static_cast<const T*>(p.v) + h_kv * p.v_head_stride;
  auto kv_rows = [&](int key0, const T*& k_rows, const T*& v_rows) {
    int64_t page = b, row = key0;
    if (p.block_table) {
      page = p.block_table[int64_t(b) * p.max_pages_per_seq + key0 / p.page_size];
      row = key0 % p.page_size;
      if (page < 0 || page >= p.num_pages) bad_table = true, page = 0;  // never read outside
    }
    k_rows = K + page * p.k_batch_stride + row * p.k_row_stride;
    v_rows = V + page * p.v_batch_stride + row * p.v_row_stride;
  };
  // Slice i of this warp: keys k_begin + 16 (warp + 4 i) ...
  auto load_slice = [&](int i) {
    const int key0 = k_begin + (warp + kWarps * i) * B_c;
    const T *k_rows, *v_rows;
    kv_rows(key0, k_rows, v_rows);
    const uint32_t stage = sKV + (i % NST) * 2 * SLICE;
    load_rows_async<T, D, B_c, 32>(stage, k_rows, p.k_row_stride, k_end - key0, lane);
    load_rows_async<T, D, B_c, 32>(stage + SLICE, v_rows, p.v_row_stride, k_end - key0, lane);
  };

  // Q_i, by the whole block, then each warp's first NST - 1 slices.
  const T* Q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  load_rows_async<T, D, B_r, kThreads>(sQ, Q, p.q_row_stride, sq - m0, threadIdx.x);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NST - 1; ++i) {
    if (i < my_slices) load_slice(i);
    cp_async_commit();  // empty groups keep the count uniform for wait_group
  }

  const uint32_t y_a = (lane / 16) ^ (lane % 8), y_b = ((lane / 8) & 1) ^ (lane % 8);
  const uint32_t q_frag = sQ + (lane % 16) * ROW_BYTES;
  const uint32_t k_frag = (lane % 8 + 8 * (lane / 16)) * ROW_BYTES;
  const uint32_t v_frag = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_BYTES;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  float o[N_O][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};  // rows g and g + 8

  for (int i = 0; i < my_slices; ++i) {
    if (i + NST - 1 < my_slices) load_slice(i + NST - 1);  // into the stage freed last iteration
    cp_async_commit();
    cp_async_wait<NST - 1>();  // slice i has landed (this warp's copies only: no block barrier)
    __syncwarp();
    const uint32_t sK = sKV + (i % NST) * 2 * SLICE, sV = sK + SLICE;
    const int key0 = k_begin + (warp + kWarps * i) * B_c;

    // S = Q_i K^T for 16 rows x 16 keys: two n8 tiles.
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4], bk[4];
      ldmatrix_x4(a, q_frag + (((2 * kk) ^ y_a) << 4));
      ldmatrix_x4(bk, sK + k_frag + (((2 * kk) ^ y_b) << 4));
      mma_16816<T>(s[0], a, bk[0], bk[1]);
      mma_16816<T>(s[1], a, bk[2], bk[3]);
    }
    // Keys past this query tile's visible range, and right of the diagonal.
    if (key0 + B_c > n_keys || (p.causal && key0 + B_c - 1 > m0 + diag)) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + 8 * (e / 2), col = key0 + nt * 8 + 2 * t + e % 2;
          if (col >= n_keys || (p.causal && col > row + diag)) s[nt][e] = -INFINITY;
        }
    }
    // Online softmax (03's, for two n8 tiles): P = 2^(s c - m c), O and l rescaled when m moves.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(m_i[r], fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
      const float alpha = softmax_alpha(m_i[r], m_scaled, scale_log2);  // 1 if mx did not move
      m_i[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[nt][e] = exp2_approx(fmaf(s[nt][e], scale_log2, -m_scaled));
          sum += s[nt][e];
        }
      l_i[r] = l_i[r] * alpha + sum;
      if (alpha != 1.f)
#pragma unroll
        for (int nd = 0; nd < N_O; ++nd) o[nd][2 * r] *= alpha, o[nd][2 * r + 1] *= alpha;
    }
    // O += P V: P (16 x 16) straight from S's registers into one A fragment.
    const uint32_t a[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                           pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int nd = 0; nd < N_O; nd += 2) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sV + v_frag + ((nd ^ y_a) << 4));
      mma_16816<T>(o[nd], a, bv[0], bv[1]);
      mma_16816<T>(o[nd + 1], a, bv[2], bv[3]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may start launching
#endif
  __syncthreads();  // the K/V stages are reused below

  // Merge the 4 warps' (m, l, O) into the block's, through shared memory:
  //   m = max_w m_w,  l = sum_w l_w 2^((m_w - m) c),  O = sum_w O_w 2^((m_w - m) c).
  float* red_m = reinterpret_cast<float*>(smem);  // [kWarps][16]
  float* red_l = red_m + kWarps * B_r;            // [kWarps][16]
  float* row_m = red_l + kWarps * B_r;            // [16], then [16] of l
  float* row_l = row_m + B_r;
  float* part_o = row_l + B_r;                    // [kWarps][16][D + 4]: each warp's scaled O
  constexpr int O_STRIDE = D + 4;                 // padding: the 8 rows g of a store hit 8 banks
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
    if (t == 0) red_m[warp * B_r + g + 8 * r] = m_i[r], red_l[warp * B_r + g + 8 * r] = l_i[r];
  }
  __syncthreads();
  if (threadIdx.x < B_r) {
    const int row = threadIdx.x;
    float m = -INFINITY, l = 0.f;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red_m[w * B_r + row]);
    // With m = -inf (no key, or only NaN scores: fmaxf drops NaN) every factor is 2^-inf = 0, and
    // 0 * l_w keeps a NaN l_w: the NaN rule.
    const float m_ref = m == -INFINITY ? 0.f : m;
    for (int w = 0; w < kWarps; ++w)
      l += red_l[w * B_r + row] * exp2_approx((red_m[w * B_r + row] - m_ref) * scale_log2);
    row_m[row] = m, row_l[row] = l;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    const float f = row_m[row] == -INFINITY ? 0.f : exp2_approx((m_i[r] - row_m[row]) * scale_log2);
    float* dst = part_o + (warp * B_r + row) * O_STRIDE + 2 * t;
#pragma unroll
    for (int nd = 0; nd < N_O; ++nd)
      *reinterpret_cast<float2*>(dst + nd * 8) = make_float2(o[nd][2 * r] * f, o[nd][2 * r + 1] * f);
  }
  __syncthreads();

  // O / l for each row this block owns (a row that saw no key: 0, lse = -inf). A bad cache table
  // makes the rows NaN: wrong input must not look like a result. l is NaN after a NaN score, and
  // `l != 0` (not `l > 0`) keeps it NaN in O and lse, with one split or many (the NaN rule).
  bad_table = __syncthreads_or(bad_table);
  const int64_t part_row0 = ((int64_t(split) * p.batch + b) * p.heads_q + h) * sq;
  T* O = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  for (int e = threadIdx.x; e < B_r * (D / 8); e += kThreads) {
    const int row = e / (D / 8), c = (e % (D / 8)) * 8;
    if (m0 + row >= sq) continue;
    const float l = row_l[row], inv_l = bad_table ? NAN : (l != 0.f ? 1.f / l : 0.f);
    // A row that saw no key writes exactly 0, also when a NaN in V of its tile reached its O
    // through 0 * NaN: the combine writes 0 for such a row too, so one split and many agree.
    const bool empty = l == 0.f && !bad_table;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) acc += part_o[(w * B_r + row) * O_STRIDE + c + k];
      v[k] = empty ? 0.f : acc * inv_l;
    }
    if (splits == 1) {
      uint4 packed;
      uint32_t* w32 = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int k = 0; k < 4; ++k) w32[k] = pack2<T>(v[2 * k], v[2 * k + 1]);
      *reinterpret_cast<uint4*>(O + (m0 + row) * p.o_row_stride + c) = packed;
    } else {
      float4* dst = reinterpret_cast<float4*>(o_partial + (part_row0 + m0 + row) * D + c);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
  }
  if (threadIdx.x < B_r && m0 + threadIdx.x < sq) {
    const float l = row_l[threadIdx.x];
    const float lse =
        bad_table ? NAN : (l != 0.f ? row_m[threadIdx.x] * p.softmax_scale + logf(l) : -INFINITY);
    if (splits > 1) lse_partial[part_row0 + m0 + threadIdx.x] = lse;
    else if (p.lse) p.lse[(int64_t(b) * p.heads_q + h) * sq + m0 + threadIdx.x] = lse;
  }
}

template <class T, int D, int NST>
void allow_large_smem() {
  lab::require_compute_capability(8, 0, "04_flash_decoding", "mma.sync, ldmatrix, cp.async and bf16");
  // Refuses by name (InvalidArgument) where the device, or LAB_SMEM_CAP, allows less shared memory
  // than even plan_for's 1 stage needs (73,728 bytes at head_dim 256).
  lab::configure_kernel(reinterpret_cast<const void*>(flash_decode_split<T, D, NST>), kThreads,
                        size_t(smem_bytes<D, NST>()),
                        D > 128 ? "04_flash_decoding (head_dim 256)" : "04_flash_decoding");
}

template <class T, int D>
int splits_for(const lab::AttnParams& p) {
  const int sms = lab::device_limits().sm_count;
  const int64_t work = int64_t(p.batch) * p.heads_q * ((p.seqlen_q + B_r - 1) / B_r);
  // One block per SM already keeps 32 KB of K/V in flight there (4 warps x one 8 KB slice at
  // d = 128), enough for its share of HBM: a wave is one block per SM (the split sweep in the
  // README peaks at 4 splits for batch 1 x 32 heads: 128 blocks). Chunks keep >= 4 tiles.
  return choose_num_splits(p.num_splits, work, p.seqlen_kv, 4 * kTile, sms);
}

template <class T, int D, int NST>
void launch(const lab::AttnParams& p, cudaStream_t stream) {
  const int splits = splits_for<T, D>(p);
  const Partials part = partials_in_workspace(p, splits, kSupport.chapter);
  const dim3 grid(splits * ((p.seqlen_q + B_r - 1) / B_r), p.heads_q, p.batch);
  allow_large_smem<T, D, NST>();
  flash_decode_split<T, D, NST>
      <<<grid, kThreads, smem_bytes<D, NST>(), stream>>>(p, splits, part.o, part.lse);
  LAB_LAUNCH_CHECK();
  if (splits > 1) combine_splits(p, splits, part.o, part.lse, stream);
}

template <class T, int D>
void launch(const lab::AttnParams& p, cudaStream_t stream, int stages) {
  if (stages == kStages) launch<T, D, kStages>(p, stream);
  else launch<T, D, 1>(p, stream);
}

template <class T>
int splits_by_head_dim(const lab::AttnParams& p) {
  switch (p.head_dim) {
    case 64: return splits_for<T, 64>(p);
    case 128: return splits_for<T, 128>(p);
    default: return splits_for<T, 256>(p);
  }
}

template <class T>
void launch_by_head_dim(const lab::AttnParams& p, cudaStream_t stream, int stages) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream, stages);
    case 128: return launch<T, 128>(p, stream, stages);
    default: return launch<T, 256>(p, stream, stages);
  }
}

}  // namespace

Plan plan_for(int head_dim, size_t smem_per_block) {
  const auto bytes = [head_dim](int stages) {
    const bool two = stages == kStages;
    if (head_dim <= 64) return size_t(two ? smem_bytes<64, kStages>() : smem_bytes<64, 1>());
    if (head_dim <= 128) return size_t(two ? smem_bytes<128, kStages>() : smem_bytes<128, 1>());
    return size_t(two ? smem_bytes<256, kStages>() : smem_bytes<256, 1>());
  };
  // Double buffering where it fits; else 1 stage, which the launcher refuses by name if even that
  // does not fit.
  const int stages = bytes(kStages) <= smem_per_block ? kStages : 1;
  return {stages, bytes(stages)};
}

int num_splits_for(const lab::AttnParams& p) {
  check_split_kv_launch(p, kSupport);
  return p.dtype == lab::DType::fp16 ? splits_by_head_dim<__half>(p) : splits_by_head_dim<__nv_bfloat16>(p);
}

size_t workspace_bytes(const lab::AttnParams& p) { return partials_bytes(p, num_splits_for(p)); }

void forward_with_smem_cap(const lab::AttnParams& p, cudaStream_t stream, size_t smem_cap) {
  check_split_kv_launch(p, kSupport);
  // One K/V stage per warp where the device (or the cap) allows less than two need.
  const int stages = plan_for(p.head_dim, std::min(smem_cap, lab::device_limits().smem_per_block)).stages;
  if (p.dtype == lab::DType::fp16) launch_by_head_dim<__half>(p, stream, stages);
  else launch_by_head_dim<__nv_bfloat16>(p, stream, stages);
}

void forward(const lab::AttnParams& p, cudaStream_t stream) { forward_with_smem_cap(p, stream, SIZE_MAX); }

}  // namespace ch04
