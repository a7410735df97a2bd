// Tests of common/: the reference (against an independent direct formula and its properties),
// the accounting, validation, the command line, and (on a GPU) fills, timing and ceilings.
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "common/device.h"
#include "common/testing.h"

using namespace lab;

namespace {

// A host problem with random float tensors (contiguous layout, no GPU involved).
HostProblem random_host(int b, int hq, int hkv, int sq, int sk, int d, bool causal, uint64_t seed,
                        float std_qk = 1.f) {
  HostProblem hp;
  AttnParams& p = hp.shape;
  p.batch = b, p.heads_q = hq, p.heads_kv = hkv, p.seqlen_q = sq, p.seqlen_kv = sk, p.head_dim = d;
  p.causal = causal;
  p.softmax_scale = 1.f / std::sqrt(float(d));
  set_contiguous_strides(p);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  hp.q.resize(size_t(b) * sq * hq * d);
  hp.k.resize(size_t(b) * sk * hkv * d);
  hp.v.resize(hp.k.size());
  for (float& x : hp.q) x = std_qk * n01(rng);
  for (float& x : hp.k) x = std_qk * n01(rng);
  for (float& x : hp.v) x = n01(rng);
  return hp;
}

// Attention written the direct way, in long double: scores for all keys, mask, exp without the
// max trick (inputs are small), normalize, multiply by V. Shares no code with reference.cpp.
std::vector<long double> direct_attention(const HostProblem& hp, int b, int h, int i) {
  const AttnParams& p = hp.shape;
  const int group = p.heads_q / p.heads_kv, hk = h / group, d = p.head_dim;
  std::vector<long double> w(size_t(p.seqlen_kv), 0.0L);
  long double total = 0;
  for (int j = 0; j < p.seqlen_kv; ++j) {
    if (p.causal && j - i > p.seqlen_kv - p.seqlen_q) continue;
    long double dot = 0;
    for (int c = 0; c < d; ++c)
      dot += (long double)hp.q[((size_t(b) * p.seqlen_q + i) * p.heads_q + h) * d + c] *
             hp.k[((size_t(b) * p.seqlen_kv + j) * p.heads_kv + hk) * d + c];
    long double bias =
        hp.alibi_slopes.empty() ? 0 : -hp.alibi_slopes[h] * std::fabs((long double)(i + p.seqlen_kv - p.seqlen_q - j));
    w[j] = std::exp((long double)p.softmax_scale * dot + bias);
    total += w[j];
  }
  std::vector<long double> out(size_t(d), 0.0L);
  for (int j = 0; j < p.seqlen_kv; ++j)
    for (int c = 0; c < d; ++c)
      out[c] += w[j] / total * hp.v[((size_t(b) * p.seqlen_kv + j) * p.heads_kv + hk) * d + c];
  return out;
}

}  // namespace

TEST_CASE("reference equals the direct formula on tiny shapes", "[cpu]") {
  struct Case { int b, hq, hkv, sq, sk, d; bool causal, alibi; };
  for (Case c : {Case{1, 1, 1, 1, 1, 4, false, false}, Case{2, 2, 2, 5, 5, 8, true, false},
                 Case{1, 4, 2, 3, 7, 8, true, false}, Case{1, 3, 1, 6, 4, 16, false, false},
                 Case{2, 4, 4, 6, 9, 8, true, true}, Case{1, 6, 3, 7, 7, 4, false, true}}) {
    HostProblem hp = random_host(c.b, c.hq, c.hkv, c.sq, c.sk, c.d, c.causal, 42 + c.sq);
    if (c.alibi) hp.alibi_slopes = alibi_slopes_standard(c.hq);
    std::vector<double> out(size_t(c.d));
    for (int b = 0; b < c.b; ++b)
      for (int h = 0; h < c.hq; ++h)
        for (int i = 0; i < c.sq; ++i) {
          if (visible_keys(c.causal, i, c.sq, c.sk) == 0) continue;
          reference_row(hp, b, h, i, out.data());
          const std::vector<long double> want = direct_attention(hp, b, h, i);
          for (int k = 0; k < c.d; ++k) REQUIRE(std::fabs(out[k] - double(want[k])) < 1e-12);
        }
  }
}

TEST_CASE("reference: rows of P sum to 1 and masked keys get zero weight", "[cpu]") {
  // seqlen_q != seqlen_kv both ways: the causal diagonal is aligned bottom-right.
  for (auto [sq, sk] : {std::pair{5, 9}, std::pair{9, 5}, std::pair{7, 7}}) {
    HostProblem hp = random_host(1, 2, 2, sq, sk, 8, true, 7, 3.f);
    std::vector<double> prob;
    for (int i = 0; i < sq; ++i) {
      const double lse = reference_probs(hp, 0, 1, i, prob);
      const int visible = i + sk - sq + 1;  // keys 0 .. i + sk - sq
      double sum = 0;
      for (int j = 0; j < sk; ++j) {
        if (j >= visible) REQUIRE(prob[j] == 0.0);
        sum += prob[j];
      }
      if (visible <= 0) {
        REQUIRE(sum == 0.0);
        REQUIRE(std::isinf(lse));
        REQUIRE(lse < 0);
      } else {
        REQUIRE(std::fabs(sum - 1.0) < 1e-12);
        REQUIRE(std::isfinite(lse));
      }
    }
  }
}

TEST_CASE("reference: a row that sees no key outputs zeros", "[cpu]") {
  HostProblem hp = random_host(1, 1, 1, 6, 3, 4, true, 9);
  std::vector<double> out(4, 123.0);
  // sq = 6, sk = 3: rows 0..2 see no key (j <= i - 3).
  const double lse = reference_row(hp, 0, 0, 1, out.data());
  REQUIRE(std::isinf(lse));
  for (double x : out) REQUIRE(x == 0.0);
  REQUIRE(visible_keys(true, 5, 6, 3) == 3);
  REQUIRE(visible_keys(true, 2, 6, 3) == 0);
  REQUIRE(visible_keys(false, 0, 6, 3) == 3);
}

TEST_CASE("reference: GQA maps query head h to KV head h / group", "[cpu]") {
  HostProblem hp = random_host(1, 8, 2, 4, 6, 8, false, 11);
  // Give query heads 0..3 (group 0) and 4..7 (group 1) the same queries.
  for (int i = 0; i < 4; ++i)
    for (int h = 1; h < 8; ++h)
      for (int c = 0; c < 8; ++c) hp.q[(size_t(i) * 8 + h) * 8 + c] = hp.q[(size_t(i) * 8 + 0) * 8 + c];
  std::vector<double> a(8), b(8);
  reference_row(hp, 0, 0, 2, a.data());
  reference_row(hp, 0, 3, 2, b.data());
  REQUIRE(a == b);  // same group: same K/V
  reference_row(hp, 0, 4, 2, b.data());
  REQUIRE(a != b);  // other group
  // Changing KV head 1 must not change the output of head 0.
  for (int j = 0; j < 6; ++j)
    for (int c = 0; c < 8; ++c) hp.v[(size_t(j) * 2 + 1) * 8 + c] += 1.f;
  reference_row(hp, 0, 0, 2, b.data());
  REQUIRE(a == b);
}

TEST_CASE("ALiBi standard slopes", "[cpu]") {
  const std::vector<float> s8 = alibi_slopes_standard(8);
  for (int i = 0; i < 8; ++i) REQUIRE(s8[i] == Approx(std::pow(2.0, -(i + 1))));
  // 12 heads: the 8 slopes of 8 heads, then the odd-numbered slopes of 16 heads (2^-0.5, 2^-1.5, ...).
  const std::vector<float> s12 = alibi_slopes_standard(12);
  REQUIRE(s12.size() == 12);
  for (int i = 0; i < 8; ++i) REQUIRE(s12[i] == s8[i]);
  for (int i = 0; i < 4; ++i) REQUIRE(s12[8 + i] == Approx(std::pow(2.0, -0.5 - 1.0 * i)));
}

TEST_CASE("ALiBi is FlashAttention's: -slope * |i + sk - sq - j| on both sides of the diagonal", "[cpu]") {
  // One head, head_dim 1, q = 0: every score is the bias alone. sq = 2, sk = 5, not causal: query i
  // sits on key i + 3, so row 0's biases are -0.5 * (3, 2, 1, 0, 1) and row 1's -0.5 * (4, 3, 2, 1, 0).
  HostProblem hp = random_host(1, 1, 1, 2, 5, 1, false, 3);
  hp.q.assign(hp.q.size(), 0.f);
  hp.alibi_slopes = {0.5f};
  const double bias[2][5] = {{-1.5, -1.0, -0.5, 0.0, -0.5}, {-2.0, -1.5, -1.0, -0.5, 0.0}};
  for (int i = 0; i < 2; ++i) {
    std::vector<double> prob;
    const double lse = reference_probs(hp, 0, 0, i, prob);
    double sum = 0;
    for (double x : bias[i]) sum += std::exp(x);
    REQUIRE(lse == Approx(std::log(sum)).epsilon(1e-12));
    for (int j = 0; j < 5; ++j) REQUIRE(prob[j] == Approx(std::exp(bias[i][j]) / sum).epsilon(1e-12));
  }
}

TEST_CASE("accounting: FLOPs count visible keys, bytes count each tensor once", "[cpu]") {
  HostProblem hp = random_host(2, 4, 4, 4, 4, 16, false, 1);
  REQUIRE(attn_flops(hp) == 4.0 * 16 * 4 * 2 * (4 * 4));
  hp.shape.causal = true;  // rows see 1 + 2 + 3 + 4 keys
  REQUIRE(attn_flops(hp) == 4.0 * 16 * 4 * 2 * 10);
  HostProblem r = random_host(1, 2, 1, 2, 5, 8, true, 1);  // rows see 4 and 5 keys
  REQUIRE(attn_flops(r) == 4.0 * 8 * 2 * 9);
  // Q and O: 1*2*2*8 elements each; K and V: 1*5*1*8 each (GQA: once per KV head); 2 bytes each.
  REQUIRE(attn_bytes(r) == 2.0 * (2 * 32 + 2 * 40));
  REQUIRE(attn_bytes(r, 1.0, 4.0) == 2.0 * 2 * 32 + 2.0 * 5 * (8 + 4));
  // Per-sequence cache lengths replace seqlen_kv.
  HostProblem c = random_host(2, 1, 1, 1, 10, 8, false, 1);
  c.cache_seqlens = {3, 10};
  REQUIRE(attn_flops(c) == 4.0 * 8 * (3 + 10));
}

TEST_CASE("rates: pct_peak uses the ceiling that bounds the problem", "[cpu]") {
  ResultRow r;
  r.ms = 1.0;
  r.flops = 500e9;  // 500 TFLOPS
  r.bytes = 1e9;    // 1000 GB/s: 500 FLOP/byte, above the ridge of 700e12 / 3000e9 = 233
  fill_rates(r, 700, 3000, 2500);
  REQUIRE(r.bound == "compute");
  REQUIRE(r.pct_peak == Approx(100.0 * 500 / 700));
  r.flops = 1e9;
  fill_rates(r, 700, 3000, 2500);
  REQUIRE(r.bound == "memory");
  REQUIRE(r.pct_peak == Approx(100.0 * 1000 / 3000));  // of the read ceiling, not the copy
  REQUIRE(r.pct_copy == Approx(100.0 * 1000 / 2500));
  r.flops = 500e9, r.bytes = 2e9;  // 250 FLOP/byte: above the read ridge (700e12 / 3000e9 = 233),
  fill_rates(r, 700, 3000, 2500);   // below the copy's (700e12 / 2500e9 = 280): the read decides
  REQUIRE(r.bound == "compute");
  fill_rates(r, 700, 3000);  // no copy ceiling given: no pct_copy
  REQUIRE(r.pct_copy == 0);
}

TEST_CASE("validation catches unwritten, NaN and wrong elements; passes the exact answer", "[cpu]") {
  for (DType t : {DType::fp16, DType::bf16}) {
    HostProblem hp = random_host(1, 2, 2, 70, 70, 16, true, 5);
    hp.shape.dtype = t;
    // Round the inputs to the storage type, as the device copies are.
    for (auto* v : {&hp.q, &hp.k, &hp.v})
      for (float& x : *v) x = half_bits_to_float(float_to_half_bits(x, t), t);
    std::vector<uint16_t> o(hp.q.size());
    std::vector<float> lse(size_t(2) * 70);
    std::vector<double> row(16);
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 70; ++i) {
        lse[lse_offset(hp.shape, 0, h, i)] = float(reference_row(hp, 0, h, i, row.data()));
        for (int c = 0; c < 16; ++c)
          o[o_offset(hp.shape, 0, i, h) + c] = float_to_half_bits(float(row[c]), t);
      }
    CheckOptions all;
    all.all_rows = true;
    CheckReport good = check_output(hp, o, lse, all);
    INFO(good.summary());
    REQUIRE(good.ok);
    REQUIRE(good.rows_checked == 140);

    auto bad = o;
    bad[o_offset(hp.shape, 0, 69, 1) + 15] = poison_bits(t);
    CheckReport r = check_output(hp, bad, lse, all);
    REQUIRE_FALSE(r.ok);
    REQUIRE(r.unwritten == 1);
    REQUIRE(r.failure.find("never written") != std::string::npos);

    bad = o;
    bad[o_offset(hp.shape, 0, 3, 0)] = t == DType::fp16 ? 0x7C00 : 0x7F80;  // +Inf
    r = check_output(hp, bad, lse, all);
    REQUIRE_FALSE(r.ok);
    REQUIRE(r.nan_or_inf == 1);

    bad = o;  // one element off by 0.5
    const int64_t at = o_offset(hp.shape, 0, 40, 1) + 2;
    bad[at] = float_to_half_bits(half_bits_to_float(o[at], t) + 0.5f, t);
    r = check_output(hp, bad, lse, all);
    REQUIRE_FALSE(r.ok);
    REQUIRE(r.failure.find("i=40") != std::string::npos);

    auto bad_lse = lse;
    bad_lse[lse_offset(hp.shape, 0, 1, 30)] += 0.01f;
    r = check_output(hp, o, bad_lse, all);
    REQUIRE_FALSE(r.ok);
    REQUIRE(r.failure.find("lse") != std::string::npos);

    // A sampled check of a large problem still scans every element for poison.
    CheckOptions sampled;
    sampled.budget_flops = 1;
    bad = o;
    bad[o_offset(hp.shape, 0, 50, 0) + 1] = poison_bits(t);
    r = check_output(hp, bad, lse, sampled);
    REQUIRE(r.sampled);
    REQUIRE(r.rows_checked < r.rows_total);
    REQUIRE_FALSE(r.ok);

    // A cap on sampled rows keeps every sampled row of the first and last (batch, head) only.
    sampled.max_sampled_rows = 1;
    CheckReport capped = check_output(hp, o, lse, sampled);
    sampled.max_sampled_rows = 0;
    CheckReport uncapped = check_output(hp, o, lse, sampled);
    REQUIRE(capped.ok);
    REQUIRE(capped.rows_checked == uncapped.rows_checked);  // 2 heads: both are first or last
    REQUIRE(capped.rows_checked >= 2 * 13);                  // 13 edge rows exist below 70
  }
}

TEST_CASE("tolerances follow the storage precision", "[cpu]") {
  REQUIRE(tolerance_for(DType::fp16).rel_l2 == Approx(2.0 / 1024));
  REQUIRE(tolerance_for(DType::bf16).rel_l2 == Approx(2.0 / 128));
  REQUIRE(tolerance_for(DType::bf16).max_abs > tolerance_for(DType::fp16).max_abs);
}

TEST_CASE("command line: bad input is refused naming the flag", "[cpu]") {
  auto error_of = [](std::vector<std::string> args) -> std::string {
    try {
      parse_cli(args);
    } catch (const CliError& e) {
      return e.what();
    }
    return "";
  };
  CHECK(error_of({"--head-dim", "0"}).find("--head-dim") == 0);
  CHECK(error_of({"--head-dim", "0"}).find("allowed: 1..256") != std::string::npos);
  CHECK(error_of({"--heads", "32", "--heads-kv", "5"}).find("--heads-kv") == 0);
  CHECK(error_of({"--seqlen-q", "-1"}).find("--seqlen-q") == 0);
  CHECK(error_of({"--dtype", "fp64"}) == "--dtype: 'fp64' is not allowed (allowed: fp16, bf16)");
  CHECK(error_of({"--frobnicate"}).find("unknown flag '--frobnicate'") == 0);
  CHECK(error_of({"--batch"}) == "--batch needs a value");
  CHECK(error_of({"--batch", "--causal"}) == "--batch needs a value");
  CHECK(error_of({"--batch", "x7"}).find("--batch: 'x7' is not an integer") == 0);
  CHECK(error_of({"--page-size", "48"}).find("--page-size") == 0);
  CHECK(error_of({"--dist", "cauchy"}).find("--dist") == 0);
  CHECK(error_of({"--causal=1"}) == "--causal takes no value");

  CliOptions o = parse_cli({"--batch=3", "--heads", "8", "--heads-kv", "2", "--seqlen", "100",
                            "--dtype", "bf16", "--causal"});
  REQUIRE(o.batch == 3);
  REQUIRE(o.heads_kv == 2);
  REQUIRE(o.seqlen_q == 100);
  REQUIRE(o.seqlen_kv == 100);
  REQUIRE(o.dtype == DType::bf16);
  REQUIRE(o.causal);
  REQUIRE(parse_cli({}).heads_kv == parse_cli({}).heads);
}

TEST_CASE("command line: run_cli exits with 2 on bad input, before touching a GPU", "[cpu]") {
  Chapter none{"test_chapter", {}};
  Support sup;
  sup.chapter = "test_chapter";
  sup.head_dims = {64, 128};
  Chapter one{"test_chapter", {{"", +[](const AttnParams&, cudaStream_t) {}, &sup, nullptr}}};
  auto run = [&](const Chapter& ch, std::vector<std::string> a) {
    std::vector<char*> argv{const_cast<char*>("prog")};
    for (auto& s : a) argv.push_back(s.data());
    return run_cli(int(argv.size()), argv.data(), ch);
  };
  REQUIRE(run(one, {"--head-dim", "0"}) == 2);
  REQUIRE(run(one, {"--heads", "32", "--heads-kv", "5"}) == 2);
  REQUIRE(run(one, {"--seqlen-q", "-1"}) == 2);
  REQUIRE(run(one, {"--dtype", "fp64"}) == 2);
  REQUIRE(run(one, {"--nope"}) == 2);
  REQUIRE(run(one, {"--iters"}) == 2);
  REQUIRE(run(one, {"--head-dim", "96"}) == 2);  // valid flag, unsupported by the chapter
  REQUIRE(run(one, {"--splits", "4"}) == 2);     // accepted by the CLI, refused, not ignored
  REQUIRE(run(one, {"--variant", "other"}) == 2);
  REQUIRE(run(one, {"--help"}) == 0);
  Chapter two{"test_chapter", {{"a", +[](const AttnParams&, cudaStream_t) {}, &sup, nullptr},
                               {"b", +[](const AttnParams&, cudaStream_t) {}, &sup, nullptr}}};
  REQUIRE(run(two, {"--head-dim", "96"}) == 2);  // every variant refuses: still bad input
}

TEST_CASE("command line: empty values, numbers, sizes and refusals name the flag", "[cpu]") {
  auto error_of = [](std::vector<std::string> args) -> std::string {
    try {
      parse_cli(args);
    } catch (const CliError& e) {
      return e.what();
    }
    return "";
  };
  CHECK(error_of({"--variant", ""}) == "--variant: an empty value is not allowed");
  CHECK(error_of({"--csv="}) == "--csv: an empty value is not allowed");
  CHECK(error_of({"--seed", "5x"}).find("--seed: '5x' is not an integer") == 0);
  CHECK(error_of({"--seed", "-1"}).find("--seed: -1 is out of range") == 0);
  CHECK(error_of({"--batch", "65536"}).find("--batch: 65536 is out of range (allowed: 1..65535)") == 0);
  CHECK(error_of({"--head-dim", ""}).find("--head-dim: an empty value") == 0);

  auto number_error = [](const std::string& v) -> std::string {
    try {
      parse_number_flag("--max-seconds", v, 0.01, 3600);
    } catch (const CliError& e) {
      return e.what();
    }
    return "";
  };
  CHECK(parse_number_flag("--max-seconds", "0.5", 0.01, 3600) == 0.5);
  for (const char* bad : {"-1", "nan", "inf", "1e308", "0"})
    CHECK(number_error(bad).find(std::string("--max-seconds: ") + bad + " is out of range") == 0);
  for (const char* bad : {"", "2x", " 1", "1e", "--"})
    CHECK(number_error(bad).find("is not a number") != std::string::npos);

  CHECK(with_flag("03_flash_v2: head_dim = 96 is not supported") ==
        "--head-dim: 03_flash_v2: head_dim = 96 is not supported");
  CHECK(with_flag("x: heads_q = 6 is not a multiple of heads_kv = 4").find("--heads: ") == 0);
  CHECK(with_flag("no field here") == "no field here");

  // Products computed without overflow, refused with what was asked and what fits.
  ProblemSpec s;
  s.batch = 65535, s.seqlen_q = s.seqlen_kv = 1 << 20, s.page_size = 16;
  CHECK(problem_size_reason(s).find("--page-size: --batch 65535 x --seqlen-kv 1048576 in pages of 16 tokens is "
                                    "4294901763 pages; at most 2147483647") == 0);
  s.page_size = 0;
  CHECK(problem_size_reason(s).find("--batch: 65535 x --seqlen-q 1048576 = 68718428160 rows") == 0);
  s.batch = 1024, s.seqlen_q = s.seqlen_kv = 1 << 20, s.heads_q = s.heads_kv = 64, s.head_dim = 256;
  CHECK(problem_size_reason(s).find("of host memory") != std::string::npos);
  s.batch = 1, s.seqlen_q = s.seqlen_kv = 4096, s.heads_q = s.heads_kv = 32, s.head_dim = 128;
  CHECK(problem_size_reason(s).empty());
  CHECK(problem_size_reason(s, size_t(64) << 20).find("GiB of device memory (Q, K, V, O); this GPU has 0.06 GiB") !=
        std::string::npos);

  // The decoding chapters run with no flags: one query token against a cache.
  const CliOptions d = parse_cli({}, decode_cli_defaults());
  CHECK(d.seqlen_q == 1);
  CHECK(d.seqlen_kv == 4096);
  CHECK(d.heads_kv == d.heads);
  CHECK(parse_cli({"--seqlen-kv", "100"}, decode_cli_defaults()).seqlen_q == 1);
  CHECK(cli_usage("04", {""}, decode_cli_defaults()).find("query length (1)") != std::string::npos);
  CHECK(cli_usage("01", {""}).find("3 no usable GPU") != std::string::npos);
}

TEST_CASE("validation scans O in parallel and still names the first bad element in order", "[cpu]") {
  // 10,000 query rows: the scan of every element runs on several threads; the counts add up and the
  // message is the first bad element in (b, i, h, c) order, the row's lse after its c.
  HostProblem hp = random_host(1, 2, 2, 10000, 64, 16, false, 9);
  std::vector<uint16_t> o(hp.q.size(), float_to_half_bits(0.25f, DType::fp16));
  std::vector<float> lse(size_t(2) * 10000, 1.f);
  o[o_offset(hp.shape, 0, 9000, 1) + 3] = kPoisonFp16;
  o[o_offset(hp.shape, 0, 5000, 0) + 7] = kPoisonFp16;
  o[o_offset(hp.shape, 0, 7000, 1) + 0] = float_to_half_bits(INFINITY, DType::fp16);
  CheckOptions opt;
  CheckReport r = check_output(hp, o, lse, opt);
  CHECK(r.unwritten == 2);
  CHECK(r.nan_or_inf == 1);
  CHECK(r.lse_unwritten == 0);
  CHECK(r.failure.rfind("O[b=0, i=5000, h=0, c=7] was never written", 0) == 0);
  float poison;
  std::memcpy(&poison, &kPoisonF32, 4);
  lse[lse_offset(hp.shape, 0, 1, 4999)] = poison;  // row 4999's lse comes before row 5000's O
  r = check_output(hp, o, lse, opt);
  CHECK(r.lse_unwritten == 1);
  CHECK(r.failure.rfind("lse[b=0, h=1, i=4999] was never written", 0) == 0);
  lse[lse_offset(hp.shape, 0, 1, 4999)] = 1.f;
  o[o_offset(hp.shape, 0, 5000, 0) + 6] = float_to_half_bits(NAN, DType::fp16);  // c = 6 before c = 7
  r = check_output(hp, o, lse, opt);
  CHECK(r.nan_or_inf == 2);
  CHECK(r.failure.rfind("O[b=0, i=5000, h=0, c=6] is NaN or Inf", 0) == 0);
}

TEST_CASE("check_params names the field", "[cpu]") {
  Support s;
  s.chapter = "chX";
  s.head_dims = {64, 128};
  AttnParams p;
  p.batch = 2, p.heads_q = 8, p.heads_kv = 8, p.seqlen_q = 10, p.seqlen_kv = 10, p.head_dim = 64;
  p.softmax_scale = 0.125f;
  set_contiguous_strides(p);
  alignas(16) static char buf[64];
  p.q = p.k = p.v = buf;
  p.o = buf;
  REQUIRE(unsupported_reason(p, s).empty());
  auto why = [&](auto change) { AttnParams c = p; change(c); return unsupported_reason(c, s); };
  CHECK(why([](auto& c) { c.head_dim = 96; }).find("head_dim = 96 is not supported (supported: 64, 128)") != std::string::npos);
  CHECK(why([](auto& c) { c.heads_kv = 2; }).find("heads_kv") != std::string::npos);  // GQA unsupported here
  CHECK(why([](auto& c) { c.heads_kv = 3; }).find("not a multiple of heads_kv") != std::string::npos);
  CHECK(why([](auto& c) { c.k = buf + 2; }).find("k pointer is not 16-byte aligned") != std::string::npos);
  CHECK(why([](auto& c) { c.v_row_stride = 8 * 64 + 4; }).find("v_row_stride") != std::string::npos);
  CHECK(why([](auto& c) { c.k_head_stride = -64; }).find("k_head_stride") != std::string::npos);
  CHECK(why([](auto& c) { c.causal = true; }).find("causal") != std::string::npos);
  CHECK(why([](auto& c) { c.lse = reinterpret_cast<float*>(buf); }).find("lse") != std::string::npos);
  CHECK(why([](auto& c) { c.dtype = DType::bf16; }).find("dtype = bf16") != std::string::npos);
  CHECK(why([](auto& c) { c.seqlen_kv = 0; }).find("seqlen_kv = 0 must be > 0") != std::string::npos);
  CHECK(why([](auto& c) { c.v = nullptr; }).find("v is a null pointer") != std::string::npos);
  CHECK(why([](auto& c) { c.num_splits = 4; }).find("num_splits = 4 is not supported") != std::string::npos);
  s.paged_kv = true;
  CHECK(why([](auto& c) {
          c.block_table = reinterpret_cast<const int*>(buf);
          c.page_size = 24;
          c.max_pages_per_seq = 1;
          c.num_pages = 1;
        }).find("page_size = 24") != std::string::npos);
  CHECK(why([](auto& c) {
          c.block_table = reinterpret_cast<const int*>(buf);
          c.page_size = 16;
          c.max_pages_per_seq = 0;
          c.num_pages = 1;
        }).find("max_pages_per_seq") != std::string::npos);
  CHECK(why([](auto& c) {
          c.block_table = reinterpret_cast<const int*>(buf);
          c.page_size = 16;
          c.max_pages_per_seq = 1;  // 16 tokens < seqlen_kv would need
          c.seqlen_kv = 17;
          c.num_pages = 1;
        }).find("exceeds the block table's capacity") != std::string::npos);
}

TEST_CASE("check_params: the KV quantization descriptor is refused by name", "[cpu]") {
  Support s;
  s.chapter = "chX";
  AttnParams p;
  p.batch = 2, p.heads_q = 8, p.heads_kv = 8, p.seqlen_q = 1, p.seqlen_kv = 10, p.head_dim = 64;
  p.softmax_scale = 0.125f;
  set_contiguous_strides(p);
  alignas(16) static char buf[64];
  alignas(16) static uint16_t scales[4];
  p.q = p.k = p.v = buf;
  p.o = buf;
  for (int i = 0; i < kKvSchemeCount; ++i) REQUIRE(kv_scheme_name(KvScheme(i)) != nullptr);
  REQUIRE(kv_scheme_name(KvScheme(kKvSchemeCount)) == nullptr);
  REQUIRE(kv_element_bytes(p) == 2);
  p.kv_quant.scheme = KvScheme::int8_group;
  p.kv_quant.group_size = 32;
  REQUIRE(kv_element_bytes(p) == 1);
  auto why = [&](auto change) { AttnParams c = p; change(c); return unsupported_reason(c, s); };
  // A chapter that lists no scheme: only the 16-bit cache.
  CHECK(why([](auto&) {}).find("chX: kv_quant.scheme = int8_group is not supported (supported: none; "
                               "quantized KV caches: see 07_kv_quant)") != std::string::npos);
  s.kv_schemes = {KvScheme::int8_group, KvScheme::fp8_e5m2};
  s.kv_group_sizes = {32, 64};
  CHECK(why([](auto&) {}).find("kv_quant.k_scale is a null pointer (int8_group needs scales)") !=
        std::string::npos);
  p.kv_quant.k_scale = p.kv_quant.v_scale = scales;
  CHECK(why([](auto&) {}).empty());
  CHECK(why([](auto& c) { c.kv_quant.scheme = KvScheme(42); })
            .find("kv_quant.scheme = 42 is unknown (supported: none, int8_group, fp8_e5m2)") !=
        std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.scheme = KvScheme::int8_head; })
            .find("kv_quant.scheme = int8_head is not supported (supported: none, int8_group, fp8_e5m2)") !=
        std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.group_size = 48; })
            .find("kv_quant.group_size = 48 is not supported (supported: 32, 64)") != std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.group_size = 64, c.head_dim = 96, set_contiguous_strides(c); })
            .find("kv_quant.group_size = 64 does not divide head_dim = 96") != std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.scheme = KvScheme::fp8_e5m2, c.kv_quant.group_size = 0; })
            .find("kv_quant.k_scale/v_scale are given but fp8_e5m2 has no scales") != std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.v_scale = reinterpret_cast<const uint16_t*>(buf + 1); })
            .find("kv_quant scale pointers must be 2-byte aligned") != std::string::npos);
  CHECK(why([](auto& c) { c.kv_quant.v_scale = reinterpret_cast<const uint16_t*>(buf + 2); }).empty());
  // 1-byte codes: K/V strides must still cover whole 16-byte vectors (16 elements, not 8).
  CHECK(why([](auto& c) { c.v_row_stride = 8 * 64 + 8; })
            .find("v_row_stride = 520 is not a multiple of 16 elements") != std::string::npos);
  CHECK(why([](auto& c) { c.q_row_stride = 8 * 64 + 8; }).empty());  // Q stays fp16
  CHECK(why([](auto& c) { c.head_dim = 72, c.kv_quant.scheme = KvScheme::fp8_e5m2, c.kv_quant.group_size = 0,
                          c.kv_quant.k_scale = c.kv_quant.v_scale = nullptr, set_contiguous_strides(c); })
            .find("head_dim = 72 must be a multiple of 16 for a 1-byte KV cache") != std::string::npos);
}

TEST_CASE("fills are seeded, reproducible and have the requested spread", "[gpu]") {
  const size_t n = size_t(1) << 20;
  DeviceBuffer a(n * 2), b(n * 2);
  fill_random(a.get(), DType::fp16, n, 128, 5, 2.f, 1.f);
  fill_random(b.get(), DType::fp16, n, 128, 5, 2.f, 1.f);
  std::vector<float> x = download_as_float(a.get(), DType::fp16, n);
  REQUIRE(download_bits(a.get(), n) == download_bits(b.get(), n));
  fill_random(b.get(), DType::fp16, n, 128, 6, 2.f, 1.f);
  REQUIRE(download_bits(a.get(), n) != download_bits(b.get(), n));
  double mean = 0, var = 0;
  for (float v : x) mean += v;
  mean /= n;
  for (float v : x) var += (v - mean) * (v - mean);
  var /= n;
  CHECK(std::fabs(mean) < 0.01);
  CHECK(std::sqrt(var) == Approx(2.0).epsilon(0.01));
  // Outlier channels: about one in 16 has a 10x spread.
  fill_random(a.get(), DType::bf16, n, 128, 9, 1.f, 10.f);
  x = download_as_float(a.get(), DType::bf16, n);
  int wide = 0;
  for (int c = 0; c < 128; ++c) {
    double s2 = 0;
    for (size_t i = c; i < n; i += 128) s2 += double(x[i]) * x[i];
    wide += std::sqrt(s2 / (n / 128)) > 5.0;
  }
  CHECK(wide >= 2);
  CHECK(wide <= 20);
}

TEST_CASE("poison marks every element", "[gpu][sanitize]") {
  DeviceBuffer a(1000 * 2);
  poison(a.get(), DType::bf16, 1000);
  for (uint16_t v : download_bits(a.get(), 1000)) REQUIRE(v == kPoisonBf16);
}

TEST_CASE("timing and ceilings measure something plausible", "[gpu]") {
  L2Flusher flusher;
  DeviceBuffer a(size_t(256) << 20), b(size_t(256) << 20);
  TimingOptions opt;
  opt.iters = 10;
  Timing t = time_it([&](cudaStream_t s) {
    LAB_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), a.bytes(), cudaMemcpyDeviceToDevice, s));
  }, 0, opt, &flusher);
  REQUIRE(t.reps == 10);
  REQUIRE(t.min_ms > 0);
  REQUIRE(t.min_ms <= t.median_ms);
  REQUIRE(t.median_ms <= t.p90_ms);
  Ceilings c = measure_ceilings(0, size_t(512) << 20, 4096);
  INFO("read " << c.read_gbps << " GB/s (" << c.read_method << "), copy " << c.copy_gbps << " GB/s, GEMM "
                << c.gemm_tflops << " TFLOPS");
  REQUIRE(c.copy_gbps > 100);
  REQUIRE(c.gemm_tflops > 10);
  // A copy reads at copy_gbps / 2 while it writes as much: reading alone must be faster than that.
  REQUIRE(c.read_gbps > c.copy_gbps / 2);
  REQUIRE(c.read_bytes == size_t(512) << 20);
  REQUIRE(!c.read_method.empty());
}

TEST_CASE("LAB_SMEM_CAP: sizes in bytes or KiB, anything else refused by name", "[cpu]") {
  CHECK(parse_smem_cap("") == 0);
  CHECK(parse_smem_cap("0") == 0);
  CHECK(parse_smem_cap("101376") == 101376);
  CHECK(parse_smem_cap("99K") == 99 * 1024);
  CHECK(parse_smem_cap("163k") == 163 * 1024);
  for (const char* bad : {"99KB", "-1", "1e5", "K", " 99", "99 ", "1000"}) {
    INFO(bad);
    try {
      parse_smem_cap(bad);
      FAIL("accepted");
    } catch (const InvalidArgument& e) {
      CHECK(std::string(e.what()).find("LAB_SMEM_CAP") != std::string::npos);
    }
  }
}

// ---- the NaN rule (common/attn.h) in the reference ----

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Row i of (b = 0, h = 0): O (head_dim values) and lse.
std::pair<std::vector<double>, double> ref_row(const HostProblem& hp, int i) {
  std::vector<double> out(size_t(hp.shape.head_dim));
  const double lse = reference_row(hp, 0, 0, i, out.data());
  return {out, lse};
}

}  // namespace

TEST_CASE("reference: a NaN in q makes its row NaN and leaves the others exact", "[cpu]") {
  HostProblem hp = random_host(1, 1, 1, 6, 9, 8, true, 21, 3.f);
  const HostProblem clean = hp;
  hp.q[size_t(2) * 8 + 5] = kNaN;  // row 2, one channel
  for (int i = 0; i < 6; ++i) {
    INFO("row " << i);
    const auto [out, lse] = ref_row(hp, i);
    const auto [want, want_lse] = ref_row(clean, i);
    if (i == 2) {
      REQUIRE(std::isnan(lse));
      for (double x : out) REQUIRE(std::isnan(x));
    } else {
      REQUIRE(lse == want_lse);
      REQUIRE(out == want);
    }
  }
}

TEST_CASE("reference: a NaN in k reaches the rows that see that key, not the others", "[cpu]") {
  // sq = sk = 7, causal: row i sees keys 0..i. A NaN in one channel of key 4.
  HostProblem hp = random_host(1, 1, 1, 7, 7, 8, true, 22);
  const HostProblem clean = hp;
  hp.k[size_t(4) * 8 + 1] = kNaN;
  for (int i = 0; i < 7; ++i) {
    INFO("row " << i);
    const auto [out, lse] = ref_row(hp, i);
    if (i >= 4) {
      REQUIRE(std::isnan(lse));
      for (double x : out) REQUIRE(std::isnan(x));
    } else {  // rows 0..3 never see key 4: exactly the clean answer
      const auto [want, want_lse] = ref_row(clean, i);
      REQUIRE(lse == want_lse);
      REQUIRE(out == want);
    }
  }
  // Without the causal mask every row sees key 4.
  hp.shape.causal = false;
  for (int i = 0; i < 7; ++i) REQUIRE(std::isnan(ref_row(hp, i).second));
}

TEST_CASE("reference: a NaN in v reaches its channel in every row that sees the key", "[cpu]") {
  HostProblem hp = random_host(1, 1, 1, 7, 7, 8, true, 23);
  // Key 3 gets a score so low that its weight underflows to exactly 0 in fp64 for every row (q is
  // all ones and k_3 = -1e4: s = -1e4 * 8 / sqrt(8)): 0 * NaN must still be NaN.
  for (int i = 0; i < 7; ++i)
    for (int c = 0; c < 8; ++c) hp.q[size_t(i) * 8 + c] = 1.f;
  for (int c = 0; c < 8; ++c) hp.k[size_t(3) * 8 + c] = -1e4f;
  const HostProblem clean = hp;
  hp.v[size_t(3) * 8 + 6] = kNaN;  // key 3, channel 6
  std::vector<double> prob;
  REQUIRE(reference_probs(clean, 0, 0, 5, prob) > -1e300);
  REQUIRE(prob[3] == 0.0);  // the premise: its weight is exactly 0
  for (int i = 0; i < 7; ++i) {
    INFO("row " << i);
    const auto [out, lse] = ref_row(hp, i);
    const auto [want, want_lse] = ref_row(clean, i);
    REQUIRE(lse == want_lse);  // V never changes lse
    for (int c = 0; c < 8; ++c) {
      if (c == 6 && i >= 3)
        REQUIRE(std::isnan(out[c]));
      else
        REQUIRE(out[c] == want[c]);
    }
  }
}

TEST_CASE("reference: a NaN past a sequence's cache length is never read", "[cpu]") {
  HostProblem hp = random_host(2, 1, 1, 1, 10, 8, false, 24);
  hp.cache_seqlens = {6, 10};
  const HostProblem clean = hp;
  for (int c = 0; c < 8; ++c) hp.k[size_t(8) * 8 + c] = hp.v[size_t(8) * 8 + c] = kNaN;  // b 0, key 8
  std::vector<double> out(8), want(8);
  REQUIRE(reference_row(hp, 0, 0, 0, out.data()) == reference_row(clean, 0, 0, 0, want.data()));
  REQUIRE(out == want);
}

// ---- varlen row totals, packed strides and the table checks, on the host ----

TEST_CASE("check_params: varlen needs total_q/total_kv and packed (batch stride 0) tensors", "[cpu]") {
  Support s;
  s.chapter = "chX";
  s.varlen = true;
  AttnParams p;
  p.batch = 2, p.heads_q = 4, p.heads_kv = 4, p.seqlen_q = 100, p.seqlen_kv = 100, p.head_dim = 64;
  p.softmax_scale = 0.125f;
  alignas(16) static char buf[64];
  p.q = p.k = p.v = buf;
  p.o = buf;
  p.cu_seqlens_q = p.cu_seqlens_kv = reinterpret_cast<const int*>(buf);  // never read here
  p.total_q = p.total_kv = 200;
  set_contiguous_strides(p);  // after cu_seqlens: the packed layout
  CHECK(p.q_batch_stride == 0);
  CHECK(p.o_batch_stride == 0);
  CHECK(p.k_batch_stride == 0);
  CHECK(p.v_batch_stride == 0);
  CHECK(p.q_row_stride == 4 * 64);
  REQUIRE(unsupported_reason(p, s).empty());
  auto why = [&](auto change) {
    AttnParams c = p;
    change(c);
    return unsupported_reason(c, s);
  };
  CHECK(why([](auto& c) { c.total_q = 0; }).find("total_q = 0 must be > 0 with cu_seqlens_q") !=
        std::string::npos);
  CHECK(why([](auto& c) { c.total_kv = -5; }).find("total_kv = -5 must be > 0") != std::string::npos);
  // The issue's example: set_contiguous_strides before cu_seqlens leaves dense batch strides.
  for (const char* field : {"q_batch_stride", "o_batch_stride", "k_batch_stride", "v_batch_stride"}) {
    INFO(field);
    const std::string w = why([&](auto& c) {
      const int64_t stride = int64_t(100) * 4 * 64;
      if (field[0] == 'q') c.q_batch_stride = stride;
      if (field[0] == 'o') c.o_batch_stride = stride;
      if (field[0] == 'k') c.k_batch_stride = stride;
      if (field[0] == 'v') c.v_batch_stride = stride;
    });
    CHECK(w.find(std::string(field) + " = 25600 must be 0 with cu_seqlens_q/cu_seqlens_kv") !=
          std::string::npos);
  }
  // Totals without varlen are not silently ignored.
  AttnParams dense = p;
  dense.cu_seqlens_q = dense.cu_seqlens_kv = nullptr;
  set_contiguous_strides(dense);
  CHECK(dense.q_batch_stride == 100 * 4 * 64);
  CHECK(unsupported_reason(dense, s).find("total_q/total_kv are given without cu_seqlens_q") !=
        std::string::npos);
  dense.total_q = dense.total_kv = 0;
  CHECK(unsupported_reason(dense, s).empty());
}

TEST_CASE("varlen_offsets_reason: offsets past total_q/total_kv are refused by name", "[cpu]") {
  AttnParams p;
  p.batch = 2, p.seqlen_q = 15, p.seqlen_kv = 15;
  p.cu_seqlens_q = p.cu_seqlens_kv = reinterpret_cast<const int*>(&p);  // only tested for null
  p.total_q = p.total_kv = 10;
  auto why = [&](std::vector<int> q, std::vector<int> kv) { return varlen_offsets_reason(p, q, kv, "chX"); };
  CHECK(why({0, 5, 10}, {0, 3, 10}).empty());
  CHECK(why({0, 5, 7}, {0, 3, 4}).empty());  // tensors may hold more rows than the offsets use
  // The issue's example: [0, 5, 20] on 10-row tensors.
  CHECK(why({0, 5, 20}, {0, 5, 10}) ==
        "chX: cu_seqlens_q[2] = 20 exceeds total_q = 10 (the rows of the packed q and o)");
  CHECK(why({0, 5, 10}, {0, 5, 11}) ==
        "chX: cu_seqlens_kv[2] = 11 exceeds total_kv = 10 (the rows of the packed k and v)");
  CHECK(why({1, 5, 10}, {0, 5, 10}).find("cu_seqlens_q[0] = 1 must be 0") != std::string::npos);
  CHECK(why({0, 5, 4}, {0, 5, 10}).find("cu_seqlens_q is not increasing") != std::string::npos);
  CHECK(why({0, 5, 10}, {0, 0, 16}).find("cu_seqlens_kv: sequence 1 has 16 rows, more than seqlen_kv = 15") !=
        std::string::npos);
  // Differences that overflow int are still caught, not wrapped.
  CHECK(why({0, 5, 10}, {0, -2147483647, 10}).find("not increasing") != std::string::npos);
  CHECK_THROWS_AS(why({0, 5}, {0, 5, 10}), InvalidArgument);  // a host copy of the wrong size
}

TEST_CASE("kv_cache_tables_reason: host copies of bad tables are named", "[cpu]") {
  AttnParams p;
  p.batch = 2, p.seqlen_kv = 64;
  p.cache_seqlens = reinterpret_cast<const int*>(&p);  // only tested for null
  p.block_table = reinterpret_cast<const int*>(&p);
  p.page_size = 16, p.max_pages_per_seq = 4, p.num_pages = 8;
  const std::vector<int> table = {0, 1, 2, 3, 4, 5, 6, 7};
  CHECK(kv_cache_tables_reason(p, {64, 17}, table, "chX").empty());
  CHECK(kv_cache_tables_reason(p, {64, 65}, table, "chX")
            .find("cache_seqlens[1] = 65 is outside 0..seqlen_kv = 64") != std::string::npos);
  CHECK(kv_cache_tables_reason(p, {-1, 5}, table, "chX").find("cache_seqlens[0] = -1") != std::string::npos);
  // Sequence 1 has 17 keys: it uses pages 0 and 1 of its row; an unused entry may hold anything.
  std::vector<int> bad = table;
  bad[7] = 99;
  CHECK(kv_cache_tables_reason(p, {64, 17}, bad, "chX").empty());
  bad[5] = 8;
  CHECK(kv_cache_tables_reason(p, {64, 17}, bad, "chX")
            .find("block_table[1][1] = 8 is outside 0..num_pages-1 = 7") != std::string::npos);
  CHECK_THROWS_AS(kv_cache_tables_reason(p, {64}, table, "chX"), InvalidArgument);
}

TEST_CASE("table checks read the tables in the order of the caller's stream", "[gpu][sanitize]") {
  // A table written on a non-blocking stream behind 200 ms of other work: a check that copied on the
  // legacy stream would read it before the write and pass a bad table.
  cudaStream_t stream;
  LAB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int* pinned = nullptr;
  LAB_CUDA_CHECK(cudaMallocHost(&pinned, 2 * sizeof(int)));
  pinned[0] = 20;   // cu_seqlens_q[2] past total_q = 10
  pinned[1] = 999;  // cache_seqlens[1] past the capacity
  auto busy = [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(200)); };
  {
    ProblemSpec s;
    s.varlen_q = {5, 5}, s.varlen_kv = {5, 5}, s.head_dim = 64, s.seed = test_seed();
    Problem prob(s);
    AttnParams p = prob.params;
    REQUIRE(p.total_q == 10);
    p.seqlen_q = 15;  // so that sequence 1's 15 rows pass the longest-sequence check
    REQUIRE(varlen_offsets_reason(p, "test", stream).empty());
    LAB_CUDA_CHECK(cudaLaunchHostFunc(stream, busy, nullptr));
    LAB_CUDA_CHECK(cudaMemcpyAsync(const_cast<int*>(p.cu_seqlens_q) + 2, pinned, sizeof(int),
                                   cudaMemcpyHostToDevice, stream));
    CHECK(varlen_offsets_reason(p, "test", stream) ==
          "test: cu_seqlens_q[2] = 20 exceeds total_q = 10 (the rows of the packed q and o)");
  }
  {
    ProblemSpec s;
    s.batch = 2, s.seqlen_kv = 64, s.cache_seqlens = {64, 10}, s.page_size = 16, s.head_dim = 64,
    s.seed = test_seed();
    Problem prob(s);
    REQUIRE(kv_cache_tables_reason(prob.params, "test", stream).empty());
    LAB_CUDA_CHECK(cudaLaunchHostFunc(stream, busy, nullptr));
    LAB_CUDA_CHECK(cudaMemcpyAsync(const_cast<int*>(prob.params.cache_seqlens) + 1, pinned + 1, sizeof(int),
                                   cudaMemcpyHostToDevice, stream));
    CHECK(kv_cache_tables_reason(prob.params, "test", stream).find("cache_seqlens[1] = 999") !=
          std::string::npos);
  }
  LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  LAB_CUDA_CHECK(cudaFreeHost(pinned));
  LAB_CUDA_CHECK(cudaStreamDestroy(stream));
}
