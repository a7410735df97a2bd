// Tests of 05_decoding_cuda_core against the fp64 reference, and of its splits through 04's combine.
#include <cmath>
#include <cstring>

#include <cuda_fp16.h>

#include "05_decoding_cuda_core/kernel.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Variant& variant() { static lab::Chapter c = ch05::chapter(); return c.variants[0]; }

// Runs the chapter on `spec` and returns O (as bits) and lse, after checking against the reference.
struct Result { std::vector<uint16_t> o; std::vector<float> lse; };
Result run_checked(const lab::ProblemSpec& spec) {
  lab::Problem prob(spec);
  prob.ensure_workspace(ch05::workspace_bytes(prob.params));
  prob.poison_outputs(0);
  ch05::forward(prob.params, 0);
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  lab::CheckOptions opt;
  opt.seed = spec.seed;
  LAB_REQUIRE_PASS(prob.check(opt));
  Result r;
  r.o = lab::download_bits(prob.params.o, prob.o_elems);
  if (prob.lse_elems) r.lse = lab::download_f32(prob.params.lse, prob.lse_elems);
  return r;
}
}  // namespace

TEST_CASE("05_decoding_cuda_core matches the reference on awkward decode shapes", "[gpu]") {
  for (DType t : {DType::fp16, DType::bf16})
    for (int d : {64, 128})
      for (const lab::ProblemSpec& s : lab::awkward_decode_shapes(d, t)) {
        INFO(lab::describe(s));
        LAB_REQUIRE_PASS(lab::run_and_check(variant(), s));
      }
}

TEST_CASE("05_decoding_cuda_core: head_dim 256, strided rows", "[gpu]") {
  for (DType t : {DType::fp16, DType::bf16}) {
    lab::ProblemSpec s;
    s.batch = 3, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 2500, s.head_dim = 256;
    s.dtype = t, s.causal = true, s.lse = true, s.row_pad = 8, s.cache_seqlens = {2500, 1, 1300};
    s.seed = lab::test_seed() + 31;
    INFO(lab::describe(s));
    LAB_REQUIRE_PASS(lab::run_and_check(variant(), s));
  }
}

TEST_CASE("05_decoding_cuda_core: any split count gives the one-pass result", "[gpu]") {
  // The combine must reproduce what one pass over all keys computes: same O within rounding of the
  // fp32 partials, same lse. Splits beyond the key count leave empty chunks (lse = -inf).
  for (int page : {0, 64}) {
    lab::ProblemSpec s;
    s.batch = 3, s.heads_q = 4, s.heads_kv = 4, s.seqlen_q = 1, s.seqlen_kv = 5000, s.head_dim = 128;
    s.cache_seqlens = {5000, 300, 4097}, s.page_size = page, s.lse = true;
    s.dist = lab::Dist::large_logits, s.seed = lab::test_seed() + 7;
    s.num_splits = 1;
    const Result one = run_checked(s);
    for (int splits : {2, 3, 8, 37, 128, 256}) {
      s.num_splits = splits;
      INFO(lab::describe(s));
      const Result many = run_checked(s);
      // P stays fp32 in this kernel: the two differ by fp32 summation order, then round once to
      // fp16, so they agree within an ulp or two (ulp = |x| 2^-10).
      double worst_ulps = 0, max_lse = 0;
      for (size_t i = 0; i < one.o.size(); ++i) {
        __half a, b;
        std::memcpy(&a, &one.o[i], 2), std::memcpy(&b, &many.o[i], 2);
        const double x = __half2float(a), y = __half2float(b);
        const double ulp = std::max(std::max(std::fabs(x), std::fabs(y)), 1.0 / 64) / 1024;
        worst_ulps = std::max(worst_ulps, std::fabs(x - y) / ulp);
      }
      for (size_t i = 0; i < one.lse.size(); ++i) {
        if (std::isinf(one.lse[i]) || std::isinf(many.lse[i])) REQUIRE(one.lse[i] == many.lse[i]);
        else max_lse = std::max(max_lse, double(std::fabs(one.lse[i] - many.lse[i])));
      }
      INFO("max |O_1 - O_splits| = " << worst_ulps << " ulps, max |lse_1 - lse_splits| = " << max_lse);
      CHECK(worst_ulps <= 2.0);
      CHECK(max_lse <= 1e-4);
    }
  }
}

TEST_CASE("05_decoding_cuda_core: the same input gives bit-identical output twice", "[gpu]") {
  lab::ProblemSpec s;
  s.batch = 2, s.heads_q = 8, s.heads_kv = 8, s.seqlen_q = 1, s.seqlen_kv = 9000, s.head_dim = 128;
  s.num_splits = 16, s.seed = lab::test_seed();
  lab::require_bit_identical_runs(variant(), s);
}

TEST_CASE("05_decoding_cuda_core: bad cache tables are refused by name, and never read outside", "[gpu]") {
  lab::check_bad_cache_tables(variant());
}

TEST_CASE("05_decoding_cuda_core: too small a workspace is refused by name", "[gpu]") {
  lab::check_workspace_refused(variant());
}

TEST_CASE("05_decoding_cuda_core: a small case for the sanitizers", "[gpu][sanitize]") {
  lab::ProblemSpec s;
  s.batch = 3, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 700, s.head_dim = 128;
  s.cache_seqlens = {700, 0, 65}, s.page_size = 16, s.num_splits = 5, s.lse = true;
  s.seed = lab::test_seed();
  LAB_REQUIRE_PASS(lab::run_and_check(variant(), s));
  s.page_size = 0, s.num_splits = 1, s.causal = true, s.head_dim = 64;
  LAB_REQUIRE_PASS(lab::run_and_check(variant(), s));
}

TEST_CASE("05_decoding_cuda_core refuses what it does not support, naming the field", "[cpu]") {
  lab::AttnParams p;
  p.batch = 2, p.heads_q = 8, p.heads_kv = 8, p.seqlen_q = 1, p.seqlen_kv = 1024, p.head_dim = 128;
  p.softmax_scale = 0.088f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[16];
  p.q = p.k = p.v = buf;
  p.o = buf;
  CHECK(lab::unsupported_reason(p, ch05::kSupport).empty());
  auto refused = [&](lab::AttnParams bad, const std::string& field) {
    const std::string why = lab::unsupported_reason(bad, ch05::kSupport);
    INFO(why);
    CHECK(why.find(field) != std::string::npos);
  };
  lab::AttnParams bad = p;
  bad.head_dim = 96;
  lab::set_contiguous_strides(bad);
  refused(bad, "head_dim = 96");
  bad = p, bad.seqlen_q = 2;  // tensor cores (04) serve several query rows; this kernel one
  refused(bad, "seqlen_q = 2 is not supported (supported: 1)");
  bad = p, bad.heads_kv = 3;
  refused(bad, "heads_q = 8 is not a multiple of heads_kv = 3");
  bad = p, bad.batch = 0;
  refused(bad, "batch = 0");
  bad = p, bad.block_table = reinterpret_cast<const int*>(buf), bad.page_size = 24, bad.max_pages_per_seq = 64;
  bad.num_pages = 128;
  refused(bad, "page_size = 24");
  bad.page_size = 16, bad.max_pages_per_seq = 8;  // 128 keys < seqlen_kv
  refused(bad, "exceeds the block table's capacity");
  bad = p, bad.k = buf + 2;
  refused(bad, "k pointer");
  bad = p, bad.alibi_slopes = reinterpret_cast<const float*>(buf);
  refused(bad, "alibi_slopes");
  bad = p, bad.num_splits = 300;
  try {
    ch05::forward(bad, 0);
    FAIL("num_splits = 300 was accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("num_splits = 300") != std::string::npos);
  }
}

TEST_CASE("05_decoding_cuda_core: the NaN rule, a NaN in q, k or v, one split and many", "[gpu]") {
  for (int splits : {1, 8})
    for (int d : {64, 128, 256})
      for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
        lab::ProblemSpec s;
        s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 1000, s.head_dim = d;
        s.cache_seqlens = {1000, 300}, s.page_size = 64, s.num_splits = splits, s.seed = lab::test_seed();
        INFO(lab::describe(s));
        lab::check_nan_rule(variant(), s, where);
        lab::check_nan_rule(variant(), s, where, 999);  // the last key: alone in its group's last step
      }
}

TEST_CASE("05_decoding_cuda_core: the NaN rule when the NaN key is its group's only key", "[gpu]") {
  // The issue's case: d = 128, 5 keys, NaN in key 3. Each of 8 groups takes one key, so group 3's
  // only score is NaN and its running max stays -inf: the row must be NaN, not softmax over 4 keys.
  for (lab::NanIn where : {lab::NanIn::k, lab::NanIn::v})
    for (int splits : {1, 2}) {
      lab::ProblemSpec s;
      s.batch = 1, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 5, s.head_dim = 128;
      s.num_splits = splits, s.seed = lab::test_seed();
      INFO(lab::describe(s));
      lab::check_nan_rule(variant(), s, where, 3);
    }
}
