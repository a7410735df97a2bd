// Tests of 03_flash_v2 (both steps) against the fp64 reference.
#include <cstring>

#include "03_flash_v2/kernel.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Chapter& ch() { static lab::Chapter c = ch03::chapter(); return c; }
}  // namespace

TEST_CASE("03_flash_v2 matches the reference on awkward shapes", "[gpu]") {
  for (const lab::Variant& v : ch().variants)
    for (DType t : {DType::fp16, DType::bf16})
      for (int d : {64, 128})
        for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("03_flash_v2: head_dim 32, 96 and 256, strided rows, lse", "[gpu]") {
  for (const lab::Variant& v : ch().variants)
    for (int d : {32, 96, 256})
      for (DType t : {DType::fp16, DType::bf16})
        for (bool causal : {false, true}) {
          lab::ProblemSpec s;
          s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 200, s.seqlen_kv = 333;
          s.head_dim = d, s.dtype = t, s.causal = causal, s.lse = true, s.row_pad = 8;
          s.dist = causal ? lab::Dist::large_logits : lab::Dist::normal;
          s.seed = lab::test_seed() + d + 7 * causal;
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("03_flash_v2: long sequences, checked on sampled rows", "[gpu]") {
  for (const lab::Variant& v : ch().variants) {
    lab::ProblemSpec s;
    s.batch = 1, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 4100, s.seqlen_kv = 4100, s.head_dim = 128;
    s.causal = true, s.lse = true, s.seed = lab::test_seed();
    INFO(v.name << ": " << lab::describe(s));
    LAB_REQUIRE_PASS(lab::run_and_check(v, s, false));
  }
}

TEST_CASE("03_flash_v2: the same input gives bit-identical output twice", "[gpu]") {
  // A race (a missing barrier in the cp.async pipeline) shows as outputs that differ run to run.
  for (const lab::Variant& v : ch().variants) {
    lab::ProblemSpec s;
    s.batch = 3, s.heads_q = 4, s.heads_kv = 4, s.seqlen_q = 700, s.seqlen_kv = 900, s.head_dim = 128;
    s.causal = true, s.seed = lab::test_seed();
    INFO(v.name);
    lab::require_bit_identical_runs(v, s);
  }
}

TEST_CASE("03_flash_v2: a small case for the sanitizers", "[gpu][sanitize]") {
  for (const lab::Variant& v : ch().variants) {
    lab::ProblemSpec s;
    s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 150, s.seqlen_kv = 90, s.head_dim = 64;
    s.causal = true, s.lse = true, s.seed = lab::test_seed();
    INFO(v.name);
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    s.head_dim = 128, s.causal = false, s.seqlen_q = 70, s.seqlen_kv = 200;
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
  }
}

TEST_CASE("03_flash_v2 refuses what it does not support, naming the field", "[cpu]") {
  lab::AttnParams p;
  p.batch = 1, p.heads_q = 2, p.heads_kv = 2, p.seqlen_q = 8, p.seqlen_kv = 8, p.head_dim = 80;
  p.softmax_scale = 0.1f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[64];
  p.q = p.k = p.v = buf;
  p.o = buf;
  auto message = [](const lab::AttnParams& bad) -> std::string {
    try {
      ch03::forward(bad, 0);
    } catch (const lab::InvalidArgument& e) {
      return e.what();
    }
    return "";
  };
  CHECK(message(p) == "03_flash_v2: head_dim = 80 is not supported (supported: 32, 64, 96, 128, 256)");
  p.head_dim = 64;
  lab::set_contiguous_strides(p);
  lab::AttnParams q = p;
  q.k_row_stride = 2 * 64 + 4;
  CHECK(message(q).find("k_row_stride") != std::string::npos);
  q = p;
  q.v = buf + 8;
  CHECK(message(q).find("v pointer is not 16-byte aligned") != std::string::npos);
  q = p;
  q.heads_kv = 3;
  CHECK(message(q).find("heads_q = 2 is not a multiple of heads_kv = 3") != std::string::npos);
  q = p;
  q.cu_seqlens_q = q.cu_seqlens_kv = reinterpret_cast<const int*>(buf);
  CHECK(message(q).find("varlen") != std::string::npos);
  q = p;
  q.batch = 70000;
  lab::set_contiguous_strides(q);
  CHECK(message(q).find("batch = 70000") != std::string::npos);
}

TEST_CASE("03_flash_v2: the NaN rule, a NaN in q, k or v, in every step", "[gpu]") {
  for (const lab::Variant& v : ch().variants)
    for (int d : {64, 128})
      for (bool causal : {true, false})
        for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
          lab::ProblemSpec s;
          s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 200, s.seqlen_kv = causal ? 200 : 300;
          s.head_dim = d, s.causal = causal, s.seed = lab::test_seed();
          INFO(v.name << " " << lab::describe(s));
          lab::check_nan_rule(v, s, where);
          lab::check_nan_rule(v, s, where, 0);  // a first tile whose only visible score is NaN
        }
}
