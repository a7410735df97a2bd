// The few PTX instructions chapter 03 is built from, one small wrapper each.
//
//   mma.sync.m16n8k16   D[16x8] += A[16x16] * B[16x8], fp16/bf16 in, fp32 accumulate, one warp
//   ldmatrix.x4         four 8x8 16-bit matrices from shared memory into mma fragment layout
//   ldmatrix.x4.trans   the same, transposed (V is [keys, d]; the B operand of PV wants [d, keys])
//   cp.async.cg         16-byte global -> shared copy that bypasses registers and L1
//   ex2.approx          2^x on the special-function unit, for the online softmax
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16x16, row-major): a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..]   a2 = A[g][2t+8..]   a3 = A[g+8][2t+8..]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C (16x8, fp32):       c0,c1 = C[g][2t..2t+1]   c2,c3 = C[g+8][2t..2t+1]
// C of S = QK^T, two n-tiles side by side, has exactly A's layout for P in O += PV: P never leaves
// registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ch03 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes; with src_bytes = 0 it writes 16 zero bytes instead (rows past the sequence).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values (lo in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 2^x on the special-function unit (MUFU.EX2); flushes denormal results to 0, where exp2f would
// add range fix-ups around every call.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The online softmax's rescale factor alpha = 2^(m_old c - m_new c), given m_scaled = m_new c.
// It is exactly 1 when the max did not move: m_old c is rounded as m_scaled was. Written
// m_old * c - m_scaled, it compiles to one FMA that returns m_scaled's rounding error, and l_i
// drifts by ~1e-6 per tile (1e-4 in lse over 4k keys: 04's split test caught it).
__device__ __forceinline__ float softmax_alpha(float m_old, float m_scaled, float scale_log2) {
  return exp2_approx(__fmul_rn(m_old, scale_log2) - m_scaled);
}

// O_i *= alpha per row, O_i in C fragments (c0, c1 in row g, c2, c3 in row g + 8), skipped when no
// row of the warp moved its max (most tiles after the first few). One branch for the warp, not one
// per row: per-row branches diverge and cut the loop into basic blocks the compiler cannot schedule
// across (+2.5% in step 2 at d = 128, H100).
template <int M, int N>
__device__ __forceinline__ void rescale_rows(float (&o)[M][N][4], const float (&alpha)[M][2], bool moved) {
  if (__any_sync(0xffffffffu, moved))
#pragma unroll
    for (int mi = 0; mi < M; ++mi)
#pragma unroll
      for (int nd = 0; nd < N; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mi][nd][e] *= alpha[mi][e / 2];
}

}  // namespace ch03
