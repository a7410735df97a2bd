// 07_kv_quant on the host: the FP8 formats written out by hand, the int8 rule, the host quantizer
// (the same codes and scales as the GPU's quantize_bulk, for the tests) and the dequantizer (the
// K/V the decoding kernel reads, for the fp64 reference).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include "07_kv_quant/quantize.h"

namespace ch07 {

namespace {

uint8_t sign_bit(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return uint8_t((bits >> 24) & 0x80);
}

// An FP8 number with E exponent bits and M mantissa bits (bias 2^(E-1) - 1), round to nearest
// even, saturating at `max_finite`; `nan_code` for NaN. Subnormals below 2^(1 - bias).
uint8_t encode_fp8(float x, int E, int M, float max_finite, uint8_t max_code, uint8_t nan_code) {
  const uint8_t sign = sign_bit(x);
  if (std::isnan(x)) return sign | nan_code;
  const float a = std::fabs(x);
  if (a >= max_finite) return sign | max_code;  // satfinite: Inf and overflow too
  const int bias = (1 << (E - 1)) - 1;
  const float min_normal = std::ldexp(1.f, 1 - bias);
  if (a < min_normal) {
    // Subnormals are multiples of 2^(1 - bias - M); a rounded count of 2^M is the smallest normal,
    // whose code is exactly that count (exponent field 1, mantissa 0).
    const float m = std::nearbyint(std::ldexp(a, bias - 1 + M));  // exact scaling, then RNE
    return sign | uint8_t(m);
  }
  int e;
  const float f = std::frexp(a, &e);                             // a = (2f) 2^(e-1), 2f in [1, 2)
  float mant = std::nearbyint((2.f * f - 1.f) * float(1 << M));  // exact, then RNE
  int biased = e - 1 + bias;
  if (mant == float(1 << M)) mant = 0.f, biased += 1;  // rounded up to the next power of two
  // a < max_finite, so rounding reaches at most max_code, never Inf/NaN.
  return sign | uint8_t(biased << M) | uint8_t(mant);
}

float decode_fp8(uint8_t code, int E, int M) {
  const int bias = (1 << (E - 1)) - 1;
  const int biased = (code >> M) & ((1 << E) - 1);
  const int mant = code & ((1 << M) - 1);
  float a;
  if (biased == 0)
    a = std::ldexp(float(mant), 1 - bias - M);
  else
    a = std::ldexp(1.f + float(mant) / float(1 << M), biased - bias);
  return (code & 0x80) ? -a : a;
}

}  // namespace

// E4M3 (the "fn" variant: no infinities, only S.1111.111 is NaN, largest finite 448).
uint8_t encode_e4m3(float x) { return encode_fp8(x, 4, 3, 448.f, 0x7E, 0x7F); }
float decode_e4m3(uint8_t code) {
  if ((code & 0x7F) == 0x7F) return NAN;
  return decode_fp8(code, 4, 3);
}

// E5M2 (IEEE-like: S.11111.00 is Inf, S.11111.xx NaN, largest finite 57344).
uint8_t encode_e5m2(float x) { return encode_fp8(x, 5, 2, 57344.f, 0x7B, 0x7F); }
float decode_e5m2(uint8_t code) {
  if ((code & 0x7C) == 0x7C) return (code & 0x03) ? NAN : ((code & 0x80) ? -INFINITY : INFINITY);
  return decode_fp8(code, 5, 2);
}

// amax / 127 (448) in fp32, IEEE division as the device's __fdiv_rn, then the shared round-up to fp16.
uint16_t int8_scale(float amax) {
  return scale_bits_at_least(amax > 0.f && std::isfinite(amax) ? amax / 127.f : 1.f);
}
uint16_t e4m3_scale(float amax) {
  return scale_bits_at_least(amax > 0.f && std::isfinite(amax) ? amax / 448.f : 1.f);
}

int8_t encode_int8(float x, float scale) {
  const float q = x / scale;
  if (std::isnan(q)) return 0;
  return int8_t(std::clamp(std::nearbyint(q), -127.f, 127.f));
}

HostKvCache quantize_host(const lab::HostProblem& hp, KvScheme scheme, int group_size) {
  const lab::AttnParams& p = hp.shape;
  HostKvCache c;
  c.layout = cache_layout(p, scheme, group_size);
  const KvCache& L = c.layout;
  c.k.assign(code_bytes(L), 0);
  c.v.assign(code_bytes(L), 0);
  c.k_scale.assign(scale_count(L), 0);
  c.v_scale.assign(scale_count(L), 0);
  const int H = L.heads_kv, D = L.head_dim, G = group_size;

  for (int is_v = 0; is_v < 2; ++is_v) {
    const std::vector<float>& src = is_v ? hp.v : hp.k;
    const int64_t bs = is_v ? p.v_batch_stride : p.k_batch_stride;
    const int64_t rs = is_v ? p.v_row_stride : p.k_row_stride;
    const int64_t hs = is_v ? p.v_head_stride : p.k_head_stride;
    auto x = [&](int64_t slot, int row, int h, int ch) { return src[slot * bs + row * rs + h * hs + ch]; };
    auto amax = [&](int64_t slot0, int64_t slot1, int row0, int row1, int h0, int h1, int ch0, int ch1) {
      float m = 0.f;
      for (int64_t s = slot0; s < slot1; ++s)
        for (int r = row0; r < row1; ++r)
          for (int h = h0; h < h1; ++h)
            for (int ch = ch0; ch < ch1; ++ch) m = std::max(m, std::fabs(x(s, r, h, ch)));  // NaN ignored
      return m;
    };
    std::vector<uint8_t>& codes = is_v ? c.v : c.k;
    std::vector<uint16_t>& scales = is_v ? c.v_scale : c.k_scale;
    auto at = [&](int64_t slot, int row, int h, int ch) {
      return scale_index(scheme, G, slot, row, h, ch, L.rows, H, D);
    };

    // Scales first: static ones over the whole tensor, dynamic ones over what they cover.
    if (scheme == KvScheme::int8_tensor) scales[0] = int8_scale(amax(0, L.slots, 0, L.rows, 0, H, 0, D));
    if (scheme == KvScheme::fp8_e4m3_head)
      for (int h = 0; h < H; ++h) scales[h] = e4m3_scale(amax(0, L.slots, 0, L.rows, h, h + 1, 0, D));
    for (int64_t s = 0; s < L.slots; ++s)
      for (int r = 0; r < L.rows; ++r) {
        if (scheme == KvScheme::int8_token)
          scales[at(s, r, 0, 0)] = int8_scale(amax(s, s + 1, r, r + 1, 0, H, 0, D));
        for (int h = 0; h < H; ++h) {
          if (scheme == KvScheme::int8_head)
            scales[at(s, r, h, 0)] = int8_scale(amax(s, s + 1, r, r + 1, h, h + 1, 0, D));
          if (scheme == KvScheme::int8_group)
            for (int g = 0; g < D; g += G)
              scales[at(s, r, h, g)] = int8_scale(amax(s, s + 1, r, r + 1, h, h + 1, g, g + G));
          uint8_t* out = codes.data() + s * L.slot_stride + r * L.row_stride + h * L.head_stride;
          for (int ch = 0; ch < D; ++ch) {
            const float v = x(s, r, h, ch);
            switch (scheme) {
              case KvScheme::fp8_e4m3:
                out[ch] = encode_e4m3(v);
                break;
              case KvScheme::fp8_e5m2:
                out[ch] = encode_e5m2(v);
                break;
              case KvScheme::fp8_e4m3_head:  // codes from the stored (fp16) scale, as they are read
                out[ch] = encode_e4m3(v / scale_value(scales[h]));
                break;
              default:
                out[ch] = uint8_t(encode_int8(v, scale_value(scales[at(s, r, h, ch)])));
                break;
            }
          }
        }
      }
  }
  return c;
}

float dequantize(const HostKvCache& c, bool is_v, int slot, int row, int head, int channel) {
  const KvCache& L = c.layout;
  const uint8_t code =
      (is_v ? c.v : c.k)[slot * L.slot_stride + row * L.row_stride + head * L.head_stride + channel];
  const std::vector<uint16_t>& scales = is_v ? c.v_scale : c.k_scale;
  const int64_t at =
      scale_index(L.scheme, L.group_size, slot, row, head, channel, L.rows, L.heads_kv, L.head_dim);
  switch (L.scheme) {
    case KvScheme::fp8_e4m3:
      return decode_e4m3(code);
    case KvScheme::fp8_e5m2:
      return decode_e5m2(code);
    case KvScheme::fp8_e4m3_head:
      return decode_e4m3(code) * scale_value(scales[at]);
    case KvScheme::none:
      return NAN;  // not a quantized cache
    default:
      return float(int8_t(code)) * scale_value(scales[at]);
  }
}

void dequantize_host(const HostKvCache& c, lab::HostProblem& hp) {
  const lab::AttnParams& p = hp.shape;
  const KvCache& L = c.layout;
  // Every slot independently: spread them over the host's cores (large caches are GBs).
  auto work = [&](int first, int step) {
    for (int s = first; s < L.slots; s += step)
      for (int r = 0; r < L.rows; ++r)
        for (int h = 0; h < L.heads_kv; ++h)
          for (int ch = 0; ch < L.head_dim; ++ch) {
            hp.k[s * p.k_batch_stride + r * p.k_row_stride + h * p.k_head_stride + ch] =
                dequantize(c, false, s, r, h, ch);
            hp.v[s * p.v_batch_stride + r * p.v_row_stride + h * p.v_head_stride + ch] =
                dequantize(c, true, s, r, h, ch);
          }
  };
  const int n = int(std::max(1u, std::min(std::thread::hardware_concurrency(), 64u)));
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work, t, n);
  work(0, n);
  for (auto& th : pool) th.join();
}

}  // namespace ch07
