// Tests of 07_kv_quant's quantizers (quantize.cu, quantize_host.cpp). On the CPU: the FP8 formats
// written by hand against cuda_fp8.h, the fp16 scales (rounded up, never 0, NaN or Inf, no clipped
// code), the error bound of every scheme after a host round trip (outlier channels and an all-zero
// head included), the accounting. On the GPU: the device quantizer against the host one, bit for
// bit; append against bulk; a small append for compute-sanitizer. The decoding kernels are tested
// in test.cu. Inputs are fp16 (the chapter's only dtype).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include "07_kv_quant/kernel.h"
#include "common/testing.h"

using lab::KvScheme;

namespace {

struct SchemeCase {
  KvScheme scheme;
  int group;
  const char* name;
};
const SchemeCase kSchemes[] = {
    {KvScheme::int8_tensor, 0, "int8_tensor"},  {KvScheme::int8_token, 0, "int8_token"},
    {KvScheme::int8_head, 0, "int8_head"},      {KvScheme::int8_group, 32, "int8_group32"},
    {KvScheme::int8_group, 64, "int8_group64"}, {KvScheme::fp8_e4m3, 0, "fp8_e4m3"},
    {KvScheme::fp8_e5m2, 0, "fp8_e5m2"},        {KvScheme::fp8_e4m3_head, 0, "fp8_e4m3_head"}};

bool is_int8(KvScheme s) {
  return s == KvScheme::int8_tensor || s == KvScheme::int8_token || s == KvScheme::int8_head ||
         s == KvScheme::int8_group;
}

// Values exactly representable in fp16, as the cache holds them.
float to_fp16(float x) {
  return lab::half_bits_to_float(lab::float_to_half_bits(x, lab::DType::fp16), lab::DType::fp16);
}

// A host-only problem: K and V normal(0, 1), one channel in 16 with a 10x spread (per KV head),
// KV head `zero_head` all zeros; paged (pages in order) when page_size > 0.
lab::HostProblem host_problem(int batch, int heads_kv, int seqlen_kv, int d, int page_size, uint64_t seed,
                              int zero_head = -1, float outlier_scale = 10.f) {
  lab::HostProblem hp;
  lab::AttnParams& p = hp.shape;
  p.batch = batch, p.heads_q = p.heads_kv = heads_kv, p.seqlen_q = 1, p.seqlen_kv = seqlen_kv, p.head_dim = d;
  p.softmax_scale = 1.f / std::sqrt(float(d));
  alignas(16) static int dummy_table[4];
  if (page_size) {
    p.block_table = dummy_table;  // only "paged or not" matters on the host
    p.page_size = page_size;
    p.max_pages_per_seq = (seqlen_kv + page_size - 1) / page_size;
    p.num_pages = batch * p.max_pages_per_seq;
  }
  lab::set_contiguous_strides(p);
  const int64_t slots = page_size ? p.num_pages : batch, rows = page_size ? page_size : seqlen_kv;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<bool> outlier(size_t(heads_kv) * d);
  for (size_t i = 0; i < outlier.size(); ++i) outlier[i] = rng() % 16 == 0;
  for (std::vector<float>* t : {&hp.k, &hp.v}) {
    t->resize(size_t(slots * rows) * heads_kv * d);
    for (size_t i = 0; i < t->size(); ++i) {
      const size_t hc = i % (size_t(heads_kv) * d);
      const bool zero = int(hc / d) == zero_head;
      (*t)[i] = zero ? 0.f : to_fp16(n01(rng) * (outlier[hc] ? outlier_scale : 1.f));
    }
  }
  return hp;
}

// The stored scale that covers an element, as a float (1 for direct FP8).
float scale_of(const ch07::HostKvCache& c, bool is_v, int slot, int row, int h, int ch) {
  const ch07::KvCache& L = c.layout;
  if (!lab::kv_scheme_has_scales(L.scheme)) return 1.f;
  return ch07::scale_value((is_v ? c.v_scale : c.k_scale)[ch07::scale_index(
      L.scheme, L.group_size, slot, row, h, ch, L.rows, L.heads_kv, L.head_dim)]);
}

// The bound a scheme promises for one element x given its stored scale (see quantize.h): the
// scale's rounding up to fp16 is in `scale` itself, a step at most 2^-10 larger than amax / 127.
double error_bound(KvScheme s, float x, float scale) {
  const double a = std::fabs(double(x));
  // int8: half a step, plus the fp32 roundings of x / scale (up to 127 * 2^-24 of a step) and of
  // code * scale (2^-24 of x).
  if (is_int8(s)) return 0.5 * scale + (a + 128.0 * scale) * std::ldexp(1.0, -22);
  if (s == KvScheme::fp8_e5m2) return a >= std::ldexp(1.0, -14) ? a * 0.125 : std::ldexp(1.0, -17);
  const double y = a / scale;  // E4M3: 2^-4 relative in the normal range, half a subnormal step below
  return (y >= std::ldexp(1.0, -6) ? a * 0.0625 : std::ldexp(1.0, -10) * scale) * (1 + 1e-6);
}

// Max |x - dequantized x| over KV heads [h0, h1) and channels [ch0, ch1) of every token, for K.
double max_error(const lab::HostProblem& hp, const ch07::HostKvCache& c, int h0, int h1, int ch0, int ch1) {
  const lab::AttnParams& p = hp.shape;
  const ch07::KvCache& L = c.layout;
  double worst = 0;
  for (int s = 0; s < L.slots; ++s)
    for (int r = 0; r < L.rows; ++r)
      for (int h = h0; h < h1; ++h)
        for (int ch = ch0; ch < ch1; ++ch) {
          const float x = hp.k[s * p.k_batch_stride + r * p.k_row_stride + h * p.k_head_stride + ch];
          worst = std::max(worst, std::fabs(double(x) - ch07::dequantize(c, false, s, r, h, ch)));
        }
  return worst;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU

TEST_CASE("07: the FP8 formats by hand equal cuda_fp8.h's conversions", "[cpu]") {
  // Every fp16 value (the cache's inputs), and a spread of floats around the formats' edges.
  std::vector<float> xs;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits)
    xs.push_back(lab::half_bits_to_float(uint16_t(bits), lab::DType::fp16));
  std::mt19937_64 rng(lab::test_seed());
  std::uniform_real_distribution<float> e(-30.f, 20.f);
  for (int i = 0; i < 200000; ++i) xs.push_back((rng() & 1 ? -1.f : 1.f) * std::exp2(e(rng)));
  for (float x : {448.f, 449.f, 464.f, 465.f, 480.f, 57344.f, 61439.f, 61440.f, 1e9f, INFINITY, -INFINITY})
    xs.push_back(x), xs.push_back(-x);
  int64_t e4_bad = 0, e5_bad = 0;
  for (float x : xs) {
    if (std::isnan(x)) continue;
    const uint8_t e4 = ch07::encode_e4m3(x), e5 = ch07::encode_e5m2(x);
    const uint8_t r4 = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    const uint8_t r5 = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
    if (e4 != r4 && e4_bad++ < 5)
      UNSCOPED_INFO("E4M3(" << x << "): " << int(e4) << " vs cuda_fp8 " << int(r4));
    if (e5 != r5 && e5_bad++ < 5)
      UNSCOPED_INFO("E5M2(" << x << "): " << int(e5) << " vs cuda_fp8 " << int(r5));
  }
  CHECK(e4_bad == 0);
  CHECK(e5_bad == 0);
  // Decoding: every code, and the element order of the 2-at-a-time conversion the kernel uses.
  for (int code = 0; code < 256; ++code) {
    const __half h4 = __half(__nv_cvt_fp8_to_halfraw(uint8_t(code), __NV_E4M3));
    const __half h5 = __half(__nv_cvt_fp8_to_halfraw(uint8_t(code), __NV_E5M2));
    const float d4 = ch07::decode_e4m3(uint8_t(code)), d5 = ch07::decode_e5m2(uint8_t(code));
    INFO("code " << code);
    if (std::isnan(d4))
      CHECK(std::isnan(__half2float(h4)));
    else
      CHECK(d4 == __half2float(h4));
    if (std::isnan(d5))
      CHECK(std::isnan(__half2float(h5)));
    else
      CHECK(d5 == __half2float(h5));
  }
  const __half2_raw two = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(0x3840), __NV_E4M3);  // 0x40, 0x38
  CHECK(__half2float(__half(__half_raw{two.x})) == ch07::decode_e4m3(0x40));
  CHECK(__half2float(__half(__half_raw{two.y})) == ch07::decode_e4m3(0x38));
}

TEST_CASE("07: every FP8 and int8 code meets its error bound on every fp16 value", "[cpu]") {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const float x = lab::half_bits_to_float(uint16_t(bits), lab::DType::fp16);
    if (!std::isfinite(x)) continue;
    INFO("x = " << x);
    const float d4 = ch07::decode_e4m3(ch07::encode_e4m3(x)), d5 = ch07::decode_e5m2(ch07::encode_e5m2(x));
    if (std::fabs(x) <= 448.f)
      REQUIRE(std::fabs(d4 - x) <= error_bound(KvScheme::fp8_e4m3, x, 1.f));
    else
      REQUIRE(d4 == std::copysign(448.f, x));  // saturated, never NaN
    if (std::fabs(x) <= 57344.f)
      REQUIRE(std::fabs(d5 - x) <= error_bound(KvScheme::fp8_e5m2, x, 1.f));
    else
      REQUIRE(d5 == std::copysign(57344.f, x));
    // The widest fp16 range: every x in range.
    const float scale = ch07::scale_value(ch07::int8_scale(65504.f));
    REQUIRE(std::fabs(ch07::encode_int8(x, scale) * scale - x) <= error_bound(KvScheme::int8_head, x, scale));
  }
  // Scales are never 0, NaN or Inf; an out-of-range value clamps; NaN codes as 0.
  CHECK(ch07::scale_value(ch07::int8_scale(0.f)) == 1.f);
  CHECK(ch07::scale_value(ch07::int8_scale(INFINITY)) == 1.f);
  CHECK(ch07::scale_value(ch07::int8_scale(NAN)) == 1.f);
  CHECK(ch07::scale_value(ch07::e4m3_scale(0.f)) == 1.f);
  CHECK(ch07::encode_int8(1000.f, 1.f) == 127);
  CHECK(ch07::encode_int8(-1000.f, 1.f) == -127);
  CHECK(ch07::encode_int8(NAN, 1.f) == 0);
  CHECK(ch07::encode_int8(2.5f, 1.f) == 2);  // round half to even, as the device's rintf
  CHECK(ch07::encode_int8(3.5f, 1.f) == 4);
}

TEST_CASE("07: scales are fp16 rounded up: never 0, NaN or Inf, and no code clips", "[cpu]") {
  // The stored scale s of an amax is the smallest fp16 value >= amax / 127 (fp32), at least 2^-24:
  // s >= amax / 127 keeps every |x| <= amax within the codes; s one fp16 step lower would not.
  const double min_half = std::ldexp(1.0, -24), max_half = 65504.0;
  auto check_scale = [&](float amax, uint16_t bits, float divisor, float max_code) {
    INFO("amax = " << amax << " (/" << divisor << "): scale bits " << bits);
    const float q = amax / divisor, s = ch07::scale_value(bits);
    REQUIRE((std::isfinite(s) && s >= min_half && s <= max_half));
    REQUIRE(s >= std::min(q, 65504.f));
    if (bits > 1) REQUIRE(ch07::scale_value(uint16_t(bits - 1)) < q);  // the smallest such fp16
    // Rounding up costs at most one fp16 step: 2^-10 relative where fp16 is normal.
    if (q >= std::ldexp(1.0, -14) && q <= max_half)
      REQUIRE(double(s) <= double(q) * (1 + std::ldexp(1.0, -10)));
    // The largest element divides to at most the largest code: nothing is clipped.
    if (q <= max_half) REQUIRE(std::nearbyint(amax / s) <= max_code);
  };
  std::vector<float> amaxes;
  for (uint32_t bits = 1; bits < 0x7C00u; ++bits)  // every positive finite fp16 value: what inputs give
    amaxes.push_back(lab::half_bits_to_float(uint16_t(bits), lab::DType::fp16));
  std::mt19937_64 rng(lab::test_seed());
  std::uniform_real_distribution<float> e(-150.f, 40.f);
  for (int i = 0; i < 200000; ++i) amaxes.push_back(std::exp2(e(rng)));  // any float, through the API
  for (float a : {1e-9f, 1e-30f, 1e-45f, 1.17549435e-38f, 127.f * 65504.f, 1e10f, 3.4e38f})
    amaxes.push_back(a);
  for (float amax : amaxes) {
    const uint16_t i8 = ch07::int8_scale(amax), e4 = ch07::e4m3_scale(amax);
    check_scale(amax, i8, 127.f, 127.f);
    check_scale(amax, e4, 448.f, 448.f);
    const float s = ch07::scale_value(i8);
    if (amax / 127.f > 65504.f) continue;  // only through the API: its codes clamp (quantize.h)
    for (float x : {amax, -amax, 0.5f * amax, amax / 3.f}) {
      INFO("x = " << x << ", scale " << s);
      const int code = ch07::encode_int8(x, s);
      REQUIRE(std::abs(code) <= 127);
      REQUIRE(std::fabs(code * s - x) <= error_bound(KvScheme::int8_head, x, s));  // half a step
    }
    // E4M3 with its scale: the largest element lands on at most 448, never saturated from above.
    REQUIRE(std::fabs(ch07::decode_e4m3(ch07::encode_e4m3(amax / ch07::scale_value(e4)))) <= 448.f);
  }
  // fp16 inputs: 127 s >= amax exactly (not only in fp32), so x / s never exceeds 127.
  for (uint32_t bits = 1; bits < 0x7C00u; ++bits) {
    const float amax = lab::half_bits_to_float(uint16_t(bits), lab::DType::fp16);
    REQUIRE(127.0 * ch07::scale_value(ch07::int8_scale(amax)) >= double(amax));
    REQUIRE(448.0 * ch07::scale_value(ch07::e4m3_scale(amax)) >= double(amax));
  }
  // The edges: a tiny (or underflowing) amax gets the smallest fp16 scale, never 0; a huge one the
  // largest, never Inf; 0, Inf and NaN get 1.
  CHECK(ch07::int8_scale(1e-9f) == 0x0001);   // 1e-9 / 127 < 2^-24
  CHECK(ch07::int8_scale(1e-45f) == 0x0001);  // 1e-45 / 127 underflows to 0 in fp32
  CHECK(ch07::int8_scale(1e10f) == 0x7BFF);   // 65504
  CHECK(ch07::int8_scale(127.f) == 0x3C00);   // exactly 1: no step up when amax / 127 is an fp16 value
  CHECK(ch07::int8_scale(0.f) == 0x3C00);
  CHECK(ch07::e4m3_scale(INFINITY) == 0x3C00);
  CHECK(ch07::e4m3_scale(NAN) == 0x3C00);
}

TEST_CASE("07: host round trip of every scheme: error bounds, scales, an all-zero head", "[cpu]") {
  for (int page : {0, 16})
    for (const SchemeCase& sc : kSchemes) {
      const lab::HostProblem hp = host_problem(2, 4, 40, 128, page, lab::test_seed() + 3, /*zero_head=*/1);
      const ch07::HostKvCache c = ch07::quantize_host(hp, sc.scheme, sc.group);
      const lab::AttnParams& p = hp.shape;
      const ch07::KvCache& L = c.layout;
      INFO(sc.name << (page ? " paged" : ""));
      REQUIRE(L.slots == (page ? p.num_pages : p.batch));
      REQUIRE(c.k_scale.size() == ch07::scale_count(L));
      for (const std::vector<uint16_t>* scales : {&c.k_scale, &c.v_scale})
        for (uint16_t s : *scales)
          REQUIRE((std::isfinite(ch07::scale_value(s)) && ch07::scale_value(s) > 0.f));
      int64_t checked = 0;
      for (int is_v = 0; is_v < 2; ++is_v)
        for (int s = 0; s < L.slots; ++s)
          for (int r = 0; r < L.rows; ++r)
            for (int h = 0; h < L.heads_kv; ++h)
              for (int ch = 0; ch < L.head_dim; ++ch) {
                const std::vector<float>& t = is_v ? hp.v : hp.k;
                const float x = t[s * p.k_batch_stride + r * p.k_row_stride + h * p.k_head_stride + ch];
                const float y = ch07::dequantize(c, is_v, s, r, h, ch);
                if (h == 1) REQUIRE(y == 0.f);  // the all-zero head: exact zeros back
                const float scale = scale_of(c, is_v, s, r, h, ch);
                // int8: the scale covers every element it scales, exactly (fp16 x): no code clips.
                if (is_int8(sc.scheme)) REQUIRE(std::fabs(double(x)) <= 127.0 * scale);
                const double bound = error_bound(sc.scheme, x, scale);
                if (!(std::fabs(double(x) - y) <= bound)) {
                  INFO("K/V " << is_v << " slot " << s << " row " << r << " head " << h << " channel " << ch
                              << ": x = " << x << ", dequantized " << y << ", bound " << bound);
                  REQUIRE(std::fabs(double(x) - y) <= bound);
                }
                ++checked;
              }
      REQUIRE(checked == 2 * int64_t(L.slots) * L.rows * L.heads_kv * L.head_dim);
    }
}

TEST_CASE("07: an outlier channel costs per-token and per-head int8 scales, not group scales", "[cpu]") {
  // Channel 5 of KV head 0 is 50x larger than everything else. It sets the scale of every token
  // (int8_token: all heads of the token get a ~17x coarser step) and of head 0 (int8_head: all 128
  // channels of head 0); with groups, only the outlier's own group of 32 or 64 channels.
  lab::HostProblem hp = host_problem(1, 4, 64, 128, 0, lab::test_seed() + 5, -1, 1.f);
  for (size_t i = 0; i < hp.k.size(); ++i) {
    const int ch = int(i % 128), h = int(i / 128 % 4);
    hp.k[i] = to_fp16(h == 0 && ch == 5 ? (i % 3 ? -45.f : 50.f) : std::fmod(hp.k[i], 3.f));
  }
  auto err = [&](KvScheme s, int g, int h0, int h1, int ch0, int ch1) {
    return max_error(hp, ch07::quantize_host(hp, s, g), h0, h1, ch0, ch1);
  };
  // Heads 1..3 (no outlier): the token's scale is the outlier's, the head's is their own.
  const double token_rest = err(KvScheme::int8_token, 0, 1, 4, 0, 128),
               head_rest = err(KvScheme::int8_head, 0, 1, 4, 0, 128);
  // Head 0, channels 64..127 (outside the outlier's groups): the head's scale against the groups'.
  const double head0 = err(KvScheme::int8_head, 0, 0, 1, 64, 128);
  const double group32 = err(KvScheme::int8_group, 32, 0, 1, 64, 128),
               group64 = err(KvScheme::int8_group, 64, 0, 1, 64, 128);
  INFO("heads 1-3: int8_token " << token_rest << ", int8_head " << head_rest
                                << "; head 0, channels 64-127: int8_head " << head0 << ", int8_group32 "
                                << group32 << ", int8_group64 " << group64);
  CHECK(head_rest * 8 < token_rest);
  CHECK(group32 * 8 < head0);
  CHECK(group64 * 8 < head0);
}

TEST_CASE("07: accounting counts 1-byte codes plus their fp16 scales", "[cpu]") {
  const lab::HostProblem hp = host_problem(2, 4, 40, 128, 0, 1);
  lab::KvQuant q;
  q.scheme = KvScheme::int8_head;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == 2.0);
  q.scheme = KvScheme::int8_group, q.group_size = 32;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == 8.0);
  q.scheme = KvScheme::int8_token, q.group_size = 0;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == 0.5);  // 2 bytes over 4 KV heads
  q.scheme = KvScheme::int8_tensor;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == Approx(2.0 / (2 * 40 * 4)));
  q.scheme = KvScheme::fp8_e4m3_head;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == Approx(2.0 * 4 / (2 * 40 * 4)));
  q.scheme = KvScheme::fp8_e5m2;
  CHECK(lab::kv_scale_bytes_per_token_head(hp, q) == 0.0);
  // Q and O: 2 * (2 * 1 * 4 * 128) * 2 bytes; K and V: 2 * (2 * 40 * 4) tokens-heads * (128 + 2).
  q.scheme = KvScheme::int8_head;
  CHECK(lab::attn_bytes_stored(hp, q) == 2.0 * 2 * 4 * 128 * 2 + 2.0 * 2 * 40 * 4 * 130);
  q.scheme = KvScheme::none;
  CHECK(lab::attn_bytes_stored(hp, q) == lab::attn_bytes(hp));
  // The cache layout: fp16 strides rounded up to 16 elements; scales per common/attn.h.
  lab::AttnParams p = hp.shape;
  p.k_row_stride = p.v_row_stride = 4 * 128 + 8;  // a padded fp16 cache
  p.k_batch_stride = p.v_batch_stride = 40 * p.k_row_stride;
  const ch07::KvCache c = ch07::cache_layout(p, KvScheme::int8_group, 64);
  CHECK(c.row_stride == 4 * 128 + 16);
  CHECK(c.slot_stride == 40 * c.row_stride);
  CHECK(ch07::scale_count(c) == size_t(2 * 40 * 4 * 2));
  // Codes (2 slots of 40 rows of 528 bytes) and fp16 scales, K and V, each part 256-byte aligned.
  CHECK(ch07::code_bytes(c) == size_t(2 * 40 * 528));
  CHECK(ch07::storage_bytes(c) == 2 * size_t(42240) + 2 * size_t(1280));
  CHECK(ch07::scale_index(KvScheme::int8_head, 0, 1, 3, 2, 0, 40, 4, 128) == (1 * 4 + 2) * 40 + 3);
  CHECK(ch07::scale_index(KvScheme::int8_group, 32, 1, 3, 2, 70, 40, 4, 128) ==
        ((1 * 4 + 2) * 40 + 3) * 4 + 2);
}

TEST_CASE("07: the quantizer refuses more token rows than its grid holds, by name, before any GPU work",
          "[cpu]") {
  // One block per token row on the grid's x dimension: 65536 sequences of 65536 rows is 2^32 rows.
  lab::AttnParams p;
  p.batch = 65536, p.heads_q = p.heads_kv = 1, p.seqlen_q = 1, p.seqlen_kv = 65536, p.head_dim = 64;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[64];  // never dereferenced: the refusal comes first
  p.k = p.v = buf;
  ch07::KvCache c = ch07::cache_layout(p, KvScheme::int8_head, 0);
  c.k = c.v = reinterpret_cast<uint8_t*>(buf);
  c.k_scale = c.v_scale = reinterpret_cast<uint16_t*>(buf);
  try {
    ch07::quantize_bulk(p, c, 0);
    FAIL("2^32 token rows were accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("batch * seqlen_kv = 4294967296") != std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// GPU

namespace {

// Multiplies KV head `h` of K and V by `factor` (rounded to fp16), on the device and in the host
// mirror: 0 gives an all-zero head (+0, as a memset would), tiny factors heads whose scales fall
// among the fp16 subnormals, or below them (2^-24).
void scale_head(lab::Problem& prob, int h, float factor) {
  const lab::AttnParams& p = prob.params;
  const int64_t rows = int64_t(prob.kv_elems / p.k_row_stride);
  std::vector<uint16_t> bits(size_t(rows) * p.head_dim);
  for (int is_v = 0; is_v < 2; ++is_v) {
    std::vector<float>& t = is_v ? prob.host.v : prob.host.k;
    for (int64_t r = 0; r < rows; ++r)
      for (int ch = 0; ch < p.head_dim; ++ch) {
        float& x = t[r * p.k_row_stride + h * p.k_head_stride + ch];
        x = factor == 0.f ? 0.f : to_fp16(x * factor);
        bits[size_t(r) * p.head_dim + ch] = lab::float_to_half_bits(x, lab::DType::fp16);
      }
    char* dev = static_cast<char*>(const_cast<void*>(is_v ? p.v : p.k)) + h * p.k_head_stride * 2;
    LAB_CUDA_CHECK(cudaMemcpy2D(dev, p.k_row_stride * 2, bits.data(), p.head_dim * 2, p.head_dim * 2, rows,
                                cudaMemcpyHostToDevice));
  }
}

// Codes (valid positions only: padding is never written) and scales, bit for bit.
void require_same(const ch07::HostKvCache& a, const ch07::HostKvCache& b) {
  const ch07::KvCache& L = a.layout;
  int64_t diff = 0;
  for (int is_v = 0; is_v < 2; ++is_v)
    for (int s = 0; s < L.slots; ++s)
      for (int r = 0; r < L.rows; ++r)
        for (int h = 0; h < L.heads_kv; ++h)
          for (int ch = 0; ch < L.head_dim; ++ch) {
            const int64_t at = s * L.slot_stride + r * L.row_stride + h * L.head_stride + ch;
            const uint8_t x = (is_v ? a.v : a.k)[at], y = (is_v ? b.v : b.k)[at];
            if (x != y && diff++ < 5)
              UNSCOPED_INFO((is_v ? "V" : "K") << " slot " << s << " row " << r << " head " << h
                                               << " channel " << ch << ": " << int(x) << " vs " << int(y));
          }
  CHECK(diff == 0);
  REQUIRE(a.k_scale.size() == b.k_scale.size());
  CHECK(std::memcmp(a.k_scale.data(), b.k_scale.data(), a.k_scale.size() * lab::kKvScaleBytes) == 0);
  CHECK(std::memcmp(a.v_scale.data(), b.v_scale.data(), a.v_scale.size() * lab::kKvScaleBytes) == 0);
}

std::vector<lab::ProblemSpec> quantizer_shapes() {
  std::vector<lab::ProblemSpec> out;
  lab::ProblemSpec s;
  s.batch = 3, s.heads_q = 8, s.heads_kv = 4, s.seqlen_q = 1, s.seqlen_kv = 300, s.head_dim = 128;
  s.dist = lab::Dist::outliers, s.seed = lab::test_seed() + 11;
  out.push_back(s);
  s.page_size = 16, s.cache_seqlens = {300, 17, 0}, s.head_dim = 64, s.seed += 1;
  out.push_back(s);
  s.page_size = 0, s.cache_seqlens = {}, s.row_pad = 8, s.head_dim = 256, s.heads_kv = 2,
  s.dist = lab::Dist::normal;
  s.seed += 1;
  out.push_back(s);
  return out;
}

}  // namespace

TEST_CASE("07: the GPU quantizer writes the host quantizer's codes and scales, bit for bit", "[gpu]") {
  for (const lab::ProblemSpec& spec : quantizer_shapes()) {
    lab::Problem prob(spec);
    scale_head(prob, 1, 0.f);  // an all-zero head
    if (spec.heads_kv >= 4) {
      // The fp16 scales' edges, where host and device round up separately: head 2's scales among
      // fp16's subnormals, head 3's amax / 127 below 2^-24 (their scale: 2^-24, never 0).
      scale_head(prob, 2, std::ldexp(1.f, -16));
      scale_head(prob, 3, std::ldexp(1.f, -26));
    }
    for (const SchemeCase& sc : kSchemes) {
      INFO(sc.name << " " << lab::describe(spec));
      ch07::KvCache c = ch07::cache_layout(prob.params, sc.scheme, sc.group);
      lab::DeviceBuffer storage(ch07::storage_bytes(c));
      ch07::place(c, storage.get());
      ch07::quantize_bulk(prob.params, c, 0);
      const ch07::HostKvCache dev = ch07::download(c);
      const ch07::HostKvCache host = ch07::quantize_host(prob.host, sc.scheme, sc.group);
      require_same(dev, host);
      for (const std::vector<uint16_t>* scales : {&dev.k_scale, &dev.v_scale})
        for (uint16_t s : *scales)
          REQUIRE((std::isfinite(ch07::scale_value(s)) && ch07::scale_value(s) > 0.f));
      if (spec.heads_kv >= 4 && sc.scheme == KvScheme::int8_head) {
        // Both edges were reached: subnormal scales on head 2, the smallest (2^-24) on head 3.
        const ch07::KvCache& L = dev.layout;
        bool subnormal = false, smallest = false;
        for (int r = 0; r < L.rows; ++r) {
          const uint16_t s2 =
              dev.k_scale[ch07::scale_index(L.scheme, 0, 0, r, 2, 0, L.rows, L.heads_kv, L.head_dim)];
          const uint16_t s3 =
              dev.k_scale[ch07::scale_index(L.scheme, 0, 0, r, 3, 0, L.rows, L.heads_kv, L.head_dim)];
          subnormal |= s2 > 1 && s2 < 0x0400;
          smallest |= s3 == 0x0001;
        }
        CHECK(subnormal);
        CHECK(smallest);
      }
      // The all-zero head dequantizes to zeros.
      for (int r = 0; r < c.rows; ++r) REQUIRE(ch07::dequantize(dev, true, 0, r, 1, 3) == 0.f);
    }
  }
}

TEST_CASE("07: append writes what bulk writes, and nothing outside its rows", "[gpu]") {
  for (int page : {0, 16})
    for (const SchemeCase& sc : kSchemes) {
      lab::ProblemSpec spec;
      spec.batch = 3, spec.heads_q = spec.heads_kv = 4, spec.seqlen_q = 1, spec.seqlen_kv = 100,
      spec.head_dim = 128;
      spec.page_size = page, spec.dist = lab::Dist::outliers, spec.seed = lab::test_seed() + 21;
      lab::Problem prob(spec);
      const lab::AttnParams& p = prob.params;
      INFO(sc.name << (page ? " paged" : ""));
      ch07::KvCache bulk = ch07::cache_layout(p, sc.scheme, sc.group), app = bulk;
      lab::DeviceBuffer bulk_mem(ch07::storage_bytes(bulk)), app_mem(ch07::storage_bytes(app));
      ch07::place(bulk, bulk_mem.get());
      ch07::place(app, app_mem.get());
      ch07::quantize_bulk(p, bulk, 0);
      LAB_CUDA_CHECK(cudaMemset(app_mem.get(), 0xFF, ch07::storage_bytes(app)));  // "never written"
      if (sc.scheme == KvScheme::int8_tensor || sc.scheme == KvScheme::fp8_e4m3_head) {
        // Static scales: the calibrated ones (here: bulk's) are in the cache before appending.
        const size_t n = ch07::scale_count(app) * lab::kKvScaleBytes;
        LAB_CUDA_CHECK(cudaMemcpy(app.k_scale, bulk.k_scale, n, cudaMemcpyDeviceToDevice));
        LAB_CUDA_CHECK(cudaMemcpy(app.v_scale, bulk.v_scale, n, cudaMemcpyDeviceToDevice));
      }
      // New tokens: all of sequence 1, positions 0..9 and 99 of sequence 2; then two rows outside
      // the cache (a position at the capacity, sequence 3 = batch), which must be skipped.
      std::vector<int> seq, pos;
      for (int j = 0; j < 100; ++j) seq.push_back(1), pos.push_back(j);
      for (int j : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99}) seq.push_back(2), pos.push_back(j);
      const int valid = int(seq.size());
      const int capacity = page ? p.max_pages_per_seq * page : p.seqlen_kv;  // positions a sequence can hold
      seq.push_back(0), pos.push_back(capacity);
      seq.push_back(3), pos.push_back(0);
      const int n = int(seq.size()), row = p.heads_kv * p.head_dim;
      std::vector<uint16_t> k_new(size_t(n) * row), v_new(k_new.size());
      for (int r = 0; r < n; ++r)
        for (int h = 0; h < p.heads_kv; ++h)
          for (int ch = 0; ch < p.head_dim; ++ch) {
            const int b = std::min(seq[r], p.batch - 1), j = std::min(pos[r], p.seqlen_kv - 1);
            const int64_t at = lab::kv_offset(prob.host, false, b, j, h) + ch;
            k_new[size_t(r) * row + h * p.head_dim + ch] =
                lab::float_to_half_bits(prob.host.k[at], lab::DType::fp16);
            v_new[size_t(r) * row + h * p.head_dim + ch] =
                lab::float_to_half_bits(prob.host.v[at], lab::DType::fp16);
          }
      lab::DeviceBuffer kd(k_new.size() * 2), vd(v_new.size() * 2), sd(n * 4), pd(n * 4);
      LAB_CUDA_CHECK(cudaMemcpy(kd.get(), k_new.data(), k_new.size() * 2, cudaMemcpyHostToDevice));
      LAB_CUDA_CHECK(cudaMemcpy(vd.get(), v_new.data(), v_new.size() * 2, cudaMemcpyHostToDevice));
      LAB_CUDA_CHECK(cudaMemcpy(sd.get(), seq.data(), n * 4, cudaMemcpyHostToDevice));
      LAB_CUDA_CHECK(cudaMemcpy(pd.get(), pos.data(), n * 4, cudaMemcpyHostToDevice));
      ch07::quantize_append(app, kd.get(), vd.get(), sd.as<int>(), pd.as<int>(), n, 0);
      const ch07::HostKvCache a = ch07::download(bulk), b = ch07::download(app);

      // Appended rows: the same codes and scales as bulk; every other row: untouched.
      std::set<std::pair<int64_t, int>> written;  // (slot, row)
      for (int r = 0; r < valid; ++r) {
        const int64_t slot =
            page ? prob.host.block_table[size_t(seq[r]) * p.max_pages_per_seq + pos[r] / page] : seq[r];
        written.insert({slot, page ? pos[r] % page : pos[r]});
      }
      const ch07::KvCache& L = a.layout;
      int64_t diff = 0, stray = 0;
      for (int is_v = 0; is_v < 2; ++is_v)
        for (int s = 0; s < L.slots; ++s)
          for (int r = 0; r < L.rows; ++r) {
            const bool w = written.count({s, r}) > 0;
            for (int h = 0; h < L.heads_kv; ++h)
              for (int ch = 0; ch < L.head_dim; ++ch) {
                const int64_t at = s * L.slot_stride + r * L.row_stride + h * L.head_stride + ch;
                const uint8_t x = (is_v ? a.v : a.k)[at], y = (is_v ? b.v : b.k)[at];
                if (w)
                  diff += x != y;
                else
                  stray += y != 0xFF;
                if (w && lab::kv_scheme_has_scales(sc.scheme)) {
                  const int64_t si =
                      ch07::scale_index(sc.scheme, sc.group, s, r, h, ch, L.rows, L.heads_kv, L.head_dim);
                  diff += (is_v ? a.v_scale : a.k_scale)[si] != (is_v ? b.v_scale : b.k_scale)[si];
                }
              }
          }
      CHECK(diff == 0);
      CHECK(stray == 0);
    }
}

TEST_CASE("07: a small append for the sanitizers", "[gpu][sanitize]") {
  lab::ProblemSpec s;
  s.batch = 3, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 700, s.head_dim = 64;
  s.seed = lab::test_seed();
  // Append, with a row outside the cache.
  lab::Problem prob(s);
  ch07::KvCache c = ch07::cache_layout(prob.params, KvScheme::int8_group, 32);
  lab::DeviceBuffer mem(ch07::storage_bytes(c)), rows(size_t(2) * s.heads_kv * s.head_dim * 2), idx(16);
  ch07::place(c, mem.get());
  LAB_CUDA_CHECK(cudaMemset(rows.get(), 0, rows.bytes()));
  const int seq_pos[4] = {1, 2, 5, 700};  // seq {1, 2}, pos {5, 700}: the second is outside
  LAB_CUDA_CHECK(cudaMemcpy(idx.get(), seq_pos, 16, cudaMemcpyHostToDevice));
  ch07::quantize_append(c, rows.get(), rows.get(), idx.as<int>(), idx.as<int>() + 2, 2, 0);
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
}
