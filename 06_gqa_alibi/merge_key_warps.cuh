// 06 steps 3 and 4: the epilogue of the decoding tile (kernel_decode_tile.cu and kernel.cu include
// it; a unit of its own, so that step 3's diff reads in two parts). Step 3 passes splits = 1; step
// 4's split-KV writes the fp32 partials and lse_s below instead of O.
#pragma once

#include <cmath>
#include <cstdint>

#include "03_flash_v2/tensor_core.cuh"
#include "common/attn.h"

namespace ch06 {
namespace {

using ch03::exp2_approx;
using ch03::pack2;

// The decoding tile's epilogue: the 4 warps saw different keys of the same rows, so their
// (m_w, l_w, O_w) merge as 04's warps (and splits) do, through shared memory:
//   m = max_w m_w,  l = sum_w l_w 2^((m_w - m) c),  O = sum_w O_w 2^((m_w - m) c) / l.
// Then O (or this split's fp32 partial and lse_s) goes to row (token r / gqa_ratio, head
// h_kv gqa_ratio + r % gqa_ratio).
template <class T, int D, int B_r, int WARPS, int M_FRAGS = B_r / 16>
__device__ __forceinline__ void merge_key_warps(unsigned char* smem, float (&o)[M_FRAGS][D / 8][4],
                                                float (&m_i)[M_FRAGS][2], float (&l_i)[M_FRAGS][2],
                                                float scale_log2, const lab::AttnParams& p, int m0, int rows,
                                                int gqa_ratio, int h_kv, int b, int split, int splits, T* O,
                                                float* o_partial, float* lse_partial) {
  constexpr int O_STRIDE = D + 4;  // padding: the 8 rows g of a store hit different banks
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float* red_m = reinterpret_cast<float*>(smem);  // [WARPS][B_r]
  float* red_l = red_m + WARPS * B_r;            // [WARPS][B_r]
  float* part_o = red_l + WARPS * B_r;           // [WARPS][B_r][O_STRIDE]: each warp's O, rescaled
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_i[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (t == 0)
        red_m[warp * B_r + mi * 16 + g + 8 * r] = m_i[mi][r], red_l[warp * B_r + mi * 16 + g + 8 * r] = l;
    }
  __syncthreads();
  auto row_max = [&](int row) {
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) m = fmaxf(m, red_m[w * B_r + row]);
    return m;
  };
  auto factor = [&](float m_w, float m) {
    return m == -INFINITY ? 0.f : exp2_approx((m_w - m) * scale_log2);
  };
#pragma unroll
  for (int mi = 0; mi < M_FRAGS; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = mi * 16 + g + 8 * r;
      const float f = factor(m_i[mi][r], row_max(row));
      float* dst = part_o + (warp * B_r + row) * O_STRIDE + 2 * t;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        *reinterpret_cast<float2*>(dst + nd * 8) =
            make_float2(o[mi][nd][2 * r] * f, o[mi][nd][2 * r + 1] * f);
    }
  __syncthreads();
  auto row_sum = [&](int row, float m) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) l += red_l[w * B_r + row] * factor(red_m[w * B_r + row], m);
    return l;
  };
  for (int e = threadIdx.x; e < B_r * (D / 8); e += 32 * WARPS) {
    const int rr = e / (D / 8), c = (e % (D / 8)) * 8, row = m0 + rr;
    if (row >= rows) continue;
    const float l = row_sum(rr, row_max(rr)), inv_l = l > 0.f ? 1.f / l : 0.f;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) acc += part_o[(w * B_r + rr) * O_STRIDE + c + k];
      v[k] = acc * inv_l;
    }
    const int tok = row / gqa_ratio, h = h_kv * gqa_ratio + row % gqa_ratio;
    if (splits == 1) {
      uint4 packed;
      uint32_t* w32 = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int k = 0; k < 4; ++k) w32[k] = pack2<T>(v[2 * k], v[2 * k + 1]);
      *reinterpret_cast<uint4*>(O + tok * p.o_row_stride + h * p.o_head_stride + c) = packed;
    } else {
      const int64_t at = ((int64_t(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + tok;
      float4* dst = reinterpret_cast<float4*>(o_partial + at * D + c);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
  }
  if (threadIdx.x < B_r && m0 + int(threadIdx.x) < rows) {
    const int rr = threadIdx.x, row = m0 + rr;
    const float m = row_max(rr), l = row_sum(rr, m);
    const float lse = l == 0.f ? -INFINITY : m * p.softmax_scale + logf(l);  // NaN stays NaN
    const int64_t at = (int64_t(b) * p.heads_q + h_kv * gqa_ratio + row % gqa_ratio) * p.seqlen_q + row / gqa_ratio;
    if (splits > 1)
      lse_partial[int64_t(split) * p.batch * p.heads_q * p.seqlen_q + at] = lse;
    else if (p.lse)
      p.lse[at] = lse;
  }
}

}  // namespace
}  // namespace ch06
