// 2^x on the FMA pipe, for a tuning option of the pingpong kernel (kernel.cu, EXP_EMU; swept by
// bench/tune08.cu). At d = 64 the softmax's exponentials on the SFU (MUFU.EX2: 16 per clock per SM,
// against 128 FMAs) take about as long as the GEMMs; computing some of them with FMAs instead
// balances the two pipes, if the FMA pipe has room. Untimed so far: whether it pays is the sweep's
// question.
//
//   x = n + f with n = floor(x) and f in [0, 1): 2^x = 2^f 2^n. 2^f is a degree-5 polynomial in
//   Horner form (5 FMAs), 2^n is built in the exponent bits. floor(x) comes from one addition in
//   round-down mode: 1.5 * 2^23 + x rounded down is 1.5 * 2^23 + floor(x), an integer whose low
//   bits are floor(x), so no conversion instruction is needed (those run at 16 per clock per SM too).
//   x is clamped at -127 first (-inf too); for x < -126 then n = -127, the scale's exponent field
//   is 0 and 2^x = 0, as ex2.approx.ftz gives. max.NaN keeps a NaN: it runs through the polynomial
//   and the final multiply and comes out NaN. Meant for x <= 0 (softmax); x >= 128 overflows.
//   SASS: FMNMX.NAN, FADD.RM, 2 FADD, 5 FFMA, IMAD, FMUL per exponential, against one MUFU.EX2.
//
// The coefficients minimize the relative error |p(f) / 2^f - 1| on [0, 1] (Remez exchange, in
// double: 7.5e-8); rounded to float and evaluated in float, 08_flash_v3_test checks < 1e-6 on
// [-126, 0].
#pragma once

#include <cstdint>
#include <cstring>
#ifndef __CUDA_ARCH__
#include <cmath>
#endif

namespace ch08 {

__host__ __device__ __forceinline__ float exp2_fma(float x) {
  constexpr float c0 = 0.99999994f, c1 = 0.69315308f, c2 = 0.24015361f, c3 = 0.055826318f, c4 = 0.0089893397f,
                  c5 = 0.0018775767f;
#ifdef __CUDA_ARCH__
  asm("max.NaN.f32 %0, %0, 0fC2FE0000;" : "+f"(x));  // max(x, -127), NaN stays NaN
  const float shifted = __fadd_rd(x, 12582912.f);    // 1.5 * 2^23 + floor(x)
  const float f = x - (shifted - 12582912.f);        // both subtractions are exact
  // floor(x) sits in the low bits of `shifted`: times 2^23 it lands in the exponent field, and the
  // bits above it shift out; + 127 << 23 makes it the float 2^floor(x) (0 at -127).
  const float scale = __uint_as_float(__float_as_uint(shifted) * (1u << 23) + (127u << 23));
#else  // the same arithmetic on the host, for the tests
  if (std::isnan(x)) return x;
  x = std::fmax(x, -127.f);
  const float n = std::floor(x), f = x - n;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
#endif
  float p = c5;
  p = fmaf(p, f, c4);
  p = fmaf(p, f, c3);
  p = fmaf(p, f, c2);
  p = fmaf(p, f, c1);
  p = fmaf(p, f, c0);
  return p * scale;
}

}  // namespace ch08
