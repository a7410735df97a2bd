// Chapter 07: what a KV-cache scheme stores per element, and its conversion to fp32 in registers,
// shared by both steps (kernel_dequant.cu, kernel.cu). The rules of each scheme are in
// common/kv_quant.h and quantize.h; this file only reads codes.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/kv_quant.h"

namespace ch07 {

using lab::KvScheme;

// What one stored element is: the fp16 cache itself (scheme none), or a 1-byte code.
enum class Code { fp16, int8, e4m3, e5m2 };

template <KvScheme S>
constexpr Code code_of() {
  if constexpr (S == KvScheme::none)
    return Code::fp16;
  else if constexpr (S == KvScheme::fp8_e4m3 || S == KvScheme::fp8_e4m3_head)
    return Code::e4m3;
  else if constexpr (S == KvScheme::fp8_e5m2)
    return Code::e5m2;
  else
    return Code::int8;
}

// Bytes of one stored element: one 16-byte load holds 16 / code_bytes elements.
template <KvScheme S>
constexpr int code_bytes_of() {
  return code_of<S>() == Code::fp16 ? 2 : 1;
}

// Whether the scheme stores scales (every int8 scheme and fp8_e4m3_head).
template <KvScheme S>
constexpr bool has_scales() {
  return S != KvScheme::none && S != KvScheme::fp8_e4m3 && S != KvScheme::fp8_e5m2;
}

// int8 codes as floats (decode below): a byte b ^ 0x80 is u = b + 128 in 0..255; as the low byte
// of the float whose bits are kInt8FloatBits it reads as 2^23 + u exactly, so subtracting
// kInt8FloatBias (2^23 + 128) leaves b. One permute and one add per element, no I2F.
constexpr uint32_t kInt8SignFlip = 0x80808080u;
constexpr uint32_t kInt8FloatBits = 0x4B000000u;  // 2^23 as an fp32 bit pattern
constexpr float kInt8FloatBias = 8388736.f;       // 2^23 + 128

__device__ __forceinline__ void half2_to_floats(uint32_t bits, float* f) {
  const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&bits));
  f[0] = x.x, f[1] = x.y;
}

// One 16-byte load -> its elements as floats (the codes' values, before any scale).
template <Code C>
__device__ __forceinline__ void decode(const uint4& raw, float* f) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (C == Code::fp16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) half2_to_floats(w[k], f + 2 * k);
  } else if constexpr (C == Code::int8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t u = w[k] ^ kInt8SignFlip;
      f[4 * k + 0] = __uint_as_float(__byte_perm(u, kInt8FloatBits, 0x7440u)) - kInt8FloatBias;
      f[4 * k + 1] = __uint_as_float(__byte_perm(u, kInt8FloatBits, 0x7441u)) - kInt8FloatBias;
      f[4 * k + 2] = __uint_as_float(__byte_perm(u, kInt8FloatBits, 0x7442u)) - kInt8FloatBias;
      f[4 * k + 3] = __uint_as_float(__byte_perm(u, kInt8FloatBits, 0x7443u)) - kInt8FloatBias;
    }
  } else if constexpr (C == Code::e5m2) {
    // An E5M2 number is the high byte of the fp16 number with the same value.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      half2_to_floats(__byte_perm(w[k], 0u, 0x1404u), f + 4 * k);      // bytes 0, 1 -> high bytes
      half2_to_floats(__byte_perm(w[k], 0u, 0x3424u), f + 4 * k + 2);  // bytes 2, 3
    }
  } else {
    // E4M3 -> half2 two at a time (a hardware conversion on sm_89+), then half2 -> float2.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w[k] & 0xFFFFu), __NV_E4M3);
      const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w[k] >> 16), __NV_E4M3);
      half2_to_floats(uint32_t(lo.x) | uint32_t(lo.y) << 16, f + 4 * k);
      half2_to_floats(uint32_t(hi.x) | uint32_t(hi.y) << 16, f + 4 * k + 2);
    }
  }
}

}  // namespace ch07
