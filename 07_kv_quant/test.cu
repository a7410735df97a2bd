// Tests of 07_kv_quant's decoding kernels, both steps (kernel_dequant.cu, kernel.cu), every scheme.
// On the CPU: refusals by name. On the GPU: decoding against the fp64 reference on the dequantized
// K/V (the kernel's own error, apart from the quantization error) on the awkward decode shapes,
// every split count, the NaN rule of common/attn.h (a NaN in q, in a K code or in V reaches the
// rows that see it, with one split and many), bad cache tables, and small cases for
// compute-sanitizer. The quantizers are tested in test_quantize.cu. Inputs are fp16.
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <map>

#include "07_kv_quant/kernel.h"
#include "common/testing.h"

using lab::KvScheme;

namespace {

const lab::Chapter& chapter07() {
  static lab::Chapter c = ch07::chapter();
  return c;
}
const lab::Variant& variant(const std::string& name) {
  for (const lab::Variant& v : chapter07().variants)
    if (v.name == name) return v;
  throw std::runtime_error("no variant " + name);
}

lab::AttnParams decode_params() {
  lab::AttnParams p;
  p.batch = 2, p.heads_q = 8, p.heads_kv = 8, p.seqlen_q = 1, p.seqlen_kv = 1024, p.head_dim = 128;
  p.softmax_scale = 0.088f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[64];
  p.q = p.k = p.v = buf;
  p.o = buf;
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU

TEST_CASE("07 refuses what it does not support, naming the field", "[cpu]") {
  const lab::AttnParams p = decode_params();
  alignas(16) static uint16_t scales[4];
  CHECK(lab::unsupported_reason(p, ch07::kSupport).empty());
  auto refused = [&](lab::AttnParams bad, const std::string& field, const lab::Support& s = ch07::kSupport) {
    const std::string why = lab::unsupported_reason(bad, s);
    INFO(why);
    CHECK(why.find(field) != std::string::npos);
  };
  lab::AttnParams q = p;  // a valid int8_head problem
  q.kv_quant.scheme = KvScheme::int8_head, q.kv_quant.k_scale = scales, q.kv_quant.v_scale = scales;
  CHECK(lab::unsupported_reason(q, ch07::kSupport).empty());

  lab::AttnParams bad = q;
  bad.kv_quant.scheme = KvScheme(42);
  refused(bad,
          "kv_quant.scheme = 42 is unknown (supported: none, int8_tensor, int8_token, int8_head, "
          "int8_group, fp8_e4m3, fp8_e5m2, fp8_e4m3_head)");
  bad = q, bad.kv_quant.scheme = KvScheme::int8_group, bad.kv_quant.group_size = 48;
  refused(bad, "kv_quant.group_size = 48 is not supported (supported: 32, 64)");
  bad = q, bad.kv_quant.group_size = 32;
  refused(bad, "kv_quant.group_size = 32 is only used by int8_group");
  bad = q, bad.kv_quant.v_scale = nullptr;
  refused(bad, "kv_quant.v_scale is a null pointer (int8_head needs scales)");
  bad = q, bad.kv_quant.scheme = KvScheme::fp8_e5m2;
  refused(bad, "kv_quant.k_scale/v_scale are given but fp8_e5m2 has no scales");
  bad = q, bad.k_row_stride = 8 * 128 + 8;  // 16 bytes of fp16, 8 of 1-byte codes
  refused(bad, "k_row_stride = 1032 is not a multiple of 16 elements");
  bad = p, bad.k_row_stride = 8 * 128 + 8;  // the same stride is fine for an fp16 cache
  CHECK(lab::unsupported_reason(bad, ch07::kSupport).empty());
  bad = q, bad.seqlen_q = 2;
  refused(bad, "seqlen_q = 2 is not supported (supported: 1)");
  bad = q, bad.dtype = lab::DType::bf16;
  refused(bad, "dtype = bf16 is not supported");
  bad = q, bad.head_dim = 96;
  lab::set_contiguous_strides(bad);
  refused(bad, "head_dim = 96");

  // Chapters without quantized KV refuse it by name (their Support lists no schemes).
  refused(q,
          "04_flash_decoding: kv_quant.scheme = int8_head is not supported (supported: none; quantized KV "
          "caches: see 07_kv_quant)",
          ch04::kSupport);
  lab::Support plain;
  plain.chapter = "chX";
  refused(q, "chX: kv_quant.scheme = int8_head is not supported", plain);

  // The launcher and the quantizer refuse too, before touching a GPU.
  bad = q, bad.num_splits = 300;
  try {
    ch07::forward(bad, 0);
    FAIL("num_splits = 300 was accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("num_splits = 300") != std::string::npos);
  }
  bad = q, bad.kv_quant.scheme = KvScheme(42);
  CHECK_THROWS_AS(ch07::forward(bad, 0), lab::InvalidArgument);
  try {
    ch07::kv_prepare(KvScheme::int8_group, 48);
    FAIL("group size 48 was accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("kv_quant.group_size = 48") != std::string::npos);
  }
  try {
    ch07::kv_prepare(KvScheme(42), 0);
    FAIL("scheme 42 was accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("kv_quant.scheme = 42") != std::string::npos);
  }
  // Keys are counted in int: seqlen_kv near INT_MAX is refused by name (a paged cache that reuses
  // pages could describe it with little memory).
  bad = q, bad.seqlen_kv = ch07::kMaxSeqlenKv + 1;
  for (auto launch : {ch07::forward, ch07::forward_dequant}) {
    try {
      launch(bad, 0);
      FAIL("seqlen_kv = " << bad.seqlen_kv << " was accepted");
    } catch (const lab::InvalidArgument& e) {
      CHECK(std::string(e.what()).find("seqlen_kv = " + std::to_string(bad.seqlen_kv)) != std::string::npos);
    }
  }
  bad = q, bad.num_splits = 300;
  CHECK_THROWS_AS(ch07::forward_dequant(bad, 0), lab::InvalidArgument);
  // fp16, then step 1 and step 2 on each of the 8 schemes.
  CHECK(chapter07().variants.size() == 17);
  CHECK(variant("dequant_int8_group32").forward == ch07::forward_dequant);
  CHECK(variant("int8_group32").forward == ch07::forward);
}

// ---------------------------------------------------------------------------------------------
// GPU

TEST_CASE("07 decodes as the reference on the K/V it reads: awkward decode shapes, every scheme", "[gpu]") {
  for (const lab::Variant& v : chapter07().variants)
    for (const lab::ProblemSpec& s : lab::awkward_decode_shapes(128, lab::DType::fp16)) {
      INFO(v.name << " " << lab::describe(s));
      LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    }
  for (const char* name : {"int8_group32", "int8_head", "fp8_e4m3", "fp8_e5m2", "fp16"})
    for (int d : {64, 256})
      for (const lab::ProblemSpec& s : lab::awkward_decode_shapes(d, lab::DType::fp16)) {
        INFO(name << " " << lab::describe(s));
        LAB_REQUIRE_PASS(lab::run_and_check(variant(name), s));
      }
}

TEST_CASE("07: any split count gives the one-pass result", "[gpu]") {
  for (const char* name :
       {"int8_head", "int8_group64", "fp8_e4m3_head", "dequant_int8_head", "dequant_fp8_e4m3"})
    for (int page : {0, 64}) {
      lab::ProblemSpec s;
      s.batch = 3, s.heads_q = 8, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 5000, s.head_dim = 128;
      s.cache_seqlens = {5000, 300, 4097}, s.page_size = page, s.lse = true;
      s.dist = lab::Dist::large_logits, s.seed = lab::test_seed() + 7;
      std::vector<uint16_t> one;
      for (int splits : {1, 2, 3, 8, 37, 128, 256}) {
        s.num_splits = splits;
        INFO(name << " " << lab::describe(s));
        lab::Problem prob(s);
        const lab::VariantInputs in = lab::prepare_variant(prob, variant(name));
        prob.poison_outputs(0);
        variant(name).forward(in.params, 0);
        LAB_CUDA_CHECK(cudaDeviceSynchronize());
        lab::CheckOptions opt;
        opt.seed = s.seed;
        LAB_REQUIRE_PASS(prob.check(opt, &in.host));
        const std::vector<uint16_t> o = lab::download_bits(in.params.o, prob.o_elems);
        if (splits == 1) {
          one = o;
          continue;
        }
        double worst_ulps = 0;  // fp32 partials in another order, one rounding to fp16
        for (size_t i = 0; i < o.size(); ++i) {
          const double x = lab::half_bits_to_float(one[i], lab::DType::fp16);
          const double y = lab::half_bits_to_float(o[i], lab::DType::fp16);
          worst_ulps = std::max(worst_ulps,
                                std::fabs(x - y) / (std::max({std::fabs(x), std::fabs(y), 1.0 / 64}) / 1024));
        }
        INFO("max |O_1 - O_splits| = " << worst_ulps << " ulps");
        CHECK(worst_ulps <= 2.0);
      }
    }
}

TEST_CASE("07: the kernel's error and the quantization error are measured apart", "[gpu]") {
  // The same output, two references: on the dequantized K/V the kernel passes the fp16 tolerance;
  // on the original K/V the quantization error shows, in the order of the formats' precision.
  lab::ProblemSpec s;
  s.batch = 4, s.heads_q = s.heads_kv = 8, s.seqlen_q = 1, s.seqlen_kv = 1000, s.head_dim = 128;
  s.seed = lab::test_seed() + 41;
  std::map<std::string, double> quant_err;
  for (lab::Dist dist : {lab::Dist::normal, lab::Dist::outliers}) {
    s.dist = dist;
    lab::Problem prob(s);
    for (const lab::Variant& v : chapter07().variants) {
      const lab::VariantInputs in = lab::prepare_variant(prob, v);
      prob.poison_outputs(0);
      v.forward(in.params, 0);
      LAB_CUDA_CHECK(cudaDeviceSynchronize());
      lab::CheckOptions opt;
      opt.all_rows = true;
      const lab::CheckReport kernel = prob.check(opt, in.prepared ? &in.host : nullptr);
      const lab::CheckReport source = prob.check(opt);
      INFO(v.name << " " << lab::dist_name(dist) << ": kernel " << kernel.summary() << "; vs original K/V "
                  << source.summary());
      LAB_REQUIRE_PASS(kernel);
      quant_err[v.name + "/" + lab::dist_name(dist)] = source.rel_l2_err;
    }
  }
  for (auto& [k, e] : quant_err) UNSCOPED_INFO(k << ": rel_l2 " << e);
  CHECK(quant_err["int8_head/normal"] < quant_err["fp8_e4m3/normal"]);
  CHECK(quant_err["fp8_e4m3/normal"] < quant_err["fp8_e5m2/normal"]);
  CHECK(quant_err["fp8_e5m2/normal"] > 2.0 / 1024);  // beyond what an fp16 check would accept
  // Outlier channels (the same channels in every head) make one scale per tensor 2-3x worse than
  // scales per head or group. Per token, per head and per group differ here by less than this small
  // problem's sampling noise (seed 13403: int8_head 0.0647 against int8_token 0.0626), so they are
  // not ordered here: the [cpu] test above orders them on a confined outlier, and the chapter's
  // table measures them at full size.
  CHECK(quant_err["int8_head/outliers"] < quant_err["int8_tensor/outliers"]);
  CHECK(quant_err["int8_group32/outliers"] < quant_err["int8_tensor/outliers"]);
}

namespace {

// Writes one element of a device tensor: `bits` is `bytes` wide (a 1-byte code or fp16 bits).
void poke(const void* base, int64_t element, int bytes, uint16_t bits) {
  char* at = static_cast<char*>(const_cast<void*>(base)) + element * bytes;
  LAB_CUDA_CHECK(cudaMemcpy(at, &bits, bytes, cudaMemcpyHostToDevice));
}

}  // namespace

TEST_CASE("07: a NaN in q, in a K code or in V reaches the rows that see it, with one split and many",
          "[gpu]") {
  // common/attn.h's rule. Batch 2, 4 query heads on 2 KV heads, sequence 1 sees its first 100 keys.
  // q NaN: (b0, h0). K NaN: (b1, key 50, KV head 1), seen by (b1, h2) and (b1, h3); and (b1, key
  // 200, KV head 0), past sequence 1's length: seen by nobody. V NaN: (b0, key 299, KV head 1,
  // channel 9): channel 9 of (b0, h2) and (b0, h3), their other channels and lse finite. The
  // int8 schemes have no NaN code: their variants get the q NaN only (the dp4a path included).
  lab::ProblemSpec s;
  s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 300, s.head_dim = 128;
  s.cache_seqlens = {300, 100}, s.lse = true, s.seed = lab::test_seed() + 5;
  for (const lab::Variant& v : chapter07().variants)
    for (int splits : {1, 8}) {
      s.num_splits = splits;
      INFO(v.name << " num_splits " << splits);
      lab::Problem prob(s);
      const lab::VariantInputs in = lab::prepare_variant(prob, v);
      const lab::AttnParams& p = in.params;
      const KvScheme scheme = p.kv_quant.scheme;
      const bool nan_codes = scheme == KvScheme::none || scheme == KvScheme::fp8_e4m3 ||
                             scheme == KvScheme::fp8_e5m2 || scheme == KvScheme::fp8_e4m3_head;
      const int bytes = lab::kv_element_bytes(p);
      // fp16 NaN 0x7E00; E4M3 and E5M2 both read 0x7F as NaN (all-ones exponent and mantissa).
      const uint16_t kv_nan = bytes == 2 ? 0x7E00 : 0x7F;
      poke(p.q, 0 * p.q_batch_stride + 0 * p.q_head_stride + 7, 2, 0x7E00);
      if (nan_codes) {
        poke(p.k, 1 * p.k_batch_stride + 50 * p.k_row_stride + 1 * p.k_head_stride + 3, bytes, kv_nan);
        poke(p.k, 1 * p.k_batch_stride + 200 * p.k_row_stride + 0 * p.k_head_stride + 3, bytes, kv_nan);
        poke(p.v, 0 * p.v_batch_stride + 299 * p.v_row_stride + 1 * p.v_head_stride + 9, bytes, kv_nan);
      }
      prob.poison_outputs(0);
      v.forward(p, 0);
      LAB_CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<uint16_t> o = lab::download_bits(p.o, prob.o_elems);
      std::vector<float> lse(prob.lse_elems);
      LAB_CUDA_CHECK(cudaMemcpy(lse.data(), p.lse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
      for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads_q; ++h) {
          const bool row_nan = (b == 0 && h == 0) || (nan_codes && b == 1 && h >= 2);
          const bool channel_nan = nan_codes && b == 0 && h >= 2;  // channel 9 only
          INFO("row b" << b << " h" << h);
          CHECK(std::isnan(lse[size_t(b) * s.heads_q + h]) == row_nan);
          for (int ch = 0; ch < s.head_dim; ++ch) {
            const float x =
                lab::half_bits_to_float(o[(size_t(b) * s.heads_q + h) * s.head_dim + ch], lab::DType::fp16);
            const bool want_nan = row_nan || (channel_nan && ch == 9);
            if (want_nan != std::isnan(x) || (!want_nan && !std::isfinite(x))) {
              FAIL_CHECK("channel " << ch << " = " << x << (want_nan ? ", want NaN" : ", want finite"));
              break;
            }
          }
        }
    }
}

TEST_CASE("07: bad cache tables turn rows into NaN, never reads outside", "[gpu]") {
  lab::ProblemSpec s;
  s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 256, s.head_dim = 128;
  s.cache_seqlens = {256, 100}, s.page_size = 64, s.seed = lab::test_seed();
  lab::Problem prob(s);
  const lab::VariantInputs in = lab::prepare_variant(prob, variant("int8_group32"));
  int* table = const_cast<int*>(in.params.block_table);
  const int bad_page = in.params.num_pages;
  LAB_CUDA_CHECK(cudaMemcpy(table + 2, &bad_page, sizeof(int), cudaMemcpyHostToDevice));
  prob.poison_outputs(0);
  ch07::forward(in.params, 0);
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint16_t> o = lab::download_bits(in.params.o, prob.o_elems);
  CHECK(std::isnan(lab::half_bits_to_float(o[0], lab::DType::fp16)));  // sequence 0 uses entry 2
  CHECK(std::isfinite(lab::half_bits_to_float(o[s.heads_q * s.head_dim], lab::DType::fp16)));
}

TEST_CASE("07: small cases for the sanitizers", "[gpu][sanitize]") {
  lab::ProblemSpec s;
  s.batch = 3, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 700, s.head_dim = 128;
  s.cache_seqlens = {700, 0, 65}, s.page_size = 16, s.num_splits = 5, s.lse = true;
  s.seed = lab::test_seed();
  for (const lab::Variant& v : chapter07().variants) {
    INFO(v.name);
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
  }
  s.page_size = 0, s.num_splits = 1, s.head_dim = 64, s.cache_seqlens = {};
  for (const char* name : {"int8_token", "fp8_e5m2"}) LAB_REQUIRE_PASS(lab::run_and_check(variant(name), s));
}
