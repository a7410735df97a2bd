// Tests of 02_flash_v1 against the fp64 reference.
#include "02_flash_v1/kernel.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Variant& flash_v1() { static lab::Chapter c = ch02::chapter(); return c.variants[0]; }

// 02 as it runs where a block may have only 99 KB of shared memory (sm_86/89/120), on any GPU.
void forward_99k(const lab::AttnParams& p, cudaStream_t stream) {
  ch02::forward_with_smem_cap(p, stream, 99 * 1024);
}
const lab::Variant& flash_v1_99k() {
  static lab::Variant v = [] {
    lab::Variant w = flash_v1();
    w.forward = forward_99k;
    return w;
  }();
  return v;
}
}  // namespace

TEST_CASE("02_flash_v1 matches the reference on awkward shapes", "[gpu]") {
  for (DType t : {DType::fp16, DType::bf16})
    for (int d : {64, 128})
      for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
        INFO(lab::describe(s));
        LAB_REQUIRE_PASS(lab::run_and_check(flash_v1(), s));
      }
}

TEST_CASE("02_flash_v1: any head_dim up to 128, strided rows", "[gpu]") {
  for (int d : {1, 16, 40, 72, 100, 127}) {
    lab::ProblemSpec s;
    s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 150, s.seqlen_kv = 190, s.head_dim = d;
    s.causal = d % 2 == 0;
    s.lse = true;
    s.row_pad = 3;
    s.seed = lab::test_seed() + d;
    INFO(lab::describe(s));
    LAB_REQUIRE_PASS(lab::run_and_check(flash_v1(), s));
  }
}

TEST_CASE("02_flash_v1: a small case for the sanitizers", "[gpu][sanitize]") {
  lab::ProblemSpec s;
  s.batch = 2, s.heads_q = 2, s.heads_kv = 1, s.seqlen_q = 130, s.seqlen_kv = 70, s.head_dim = 64;
  s.causal = true;
  s.lse = true;
  s.seed = lab::test_seed();
  LAB_REQUIRE_PASS(lab::run_and_check(flash_v1(), s));
}

TEST_CASE("02_flash_v1 refuses what it does not support", "[cpu]") {
  lab::AttnParams p;
  p.batch = 1, p.heads_q = 2, p.heads_kv = 2, p.seqlen_q = 8, p.seqlen_kv = 8, p.head_dim = 256;
  p.softmax_scale = 0.1f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[16];
  p.q = p.k = p.v = buf;
  p.o = buf;
  try {
    ch02::forward(p, 0);
    FAIL("head_dim 256 accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()) == "02_flash_v1: head_dim = 256 is not supported (supported: 1..128)");
  }
  p.head_dim = 64;
  lab::set_contiguous_strides(p);
  try {
    ch02::forward(p, 0);
    FAIL("missing workspace accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()).find("workspace") != std::string::npos);
  }
  // (batch, head) pairs on grid.x, counted in 64 bits.
  p.batch = 1 << 16, p.heads_q = p.heads_kv = 1 << 15, p.seqlen_q = p.seqlen_kv = 1;
  lab::set_contiguous_strides(p);
  p.workspace = buf, p.workspace_bytes = ~size_t(0);  // never touched: refused before
  try {
    ch02::forward(p, 0);
    FAIL("batch * heads_q = 2^31 accepted");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()) ==
          "02_flash_v1: batch * heads_q = 2147483648 is not supported (supported: up to 2147483647, the "
          "grid.x limit)");
  }
}

TEST_CASE("02_flash_v1: the NaN rule, a NaN in q, k or v", "[gpu]") {
  // 130 rows: three query tiles; the NaN key sits in the second key tile.
  for (bool causal : {true, false})
    for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
      lab::ProblemSpec s;
      s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 130, s.seqlen_kv = causal ? 130 : 200;
      s.head_dim = 64, s.causal = causal, s.seed = lab::test_seed();
      INFO(lab::describe(s));
      lab::check_nan_rule(flash_v1(), s, where);
      // A NaN in the first key: a tile whose scores are all NaN for the rows that see only it.
      lab::check_nan_rule(flash_v1(), s, where, 0);
    }
}

TEST_CASE("02_flash_v1: the launch plan follows the shared memory a block may have", "[cpu]") {
  // Hopper (227 KB) and A100 (163 KB) hold separate K_j and V_j buffers at every head_dim.
  for (size_t limit : {size_t(227) * 1024, size_t(163) * 1024})
    for (int d : {1, 64, 65, 128}) {
      INFO("limit " << limit << ", head_dim " << d);
      const ch02::Plan plan = ch02::plan_for(d, limit);
      CHECK_FALSE(plan.share_kv);
      CHECK(plan.smem_bytes == (d <= 64 ? 66816u : 115968u));
    }
  // 99 KB (sm_86/89/120): head_dim 65..128 shares K_j's buffer with V_j; 64 and below fit as they are.
  const size_t k99 = 99 * 1024;
  for (int d : {65, 100, 128}) {
    const ch02::Plan plan = ch02::plan_for(d, k99);
    CHECK(plan.share_kv);
    CHECK(plan.smem_bytes == 83200u);
    CHECK(plan.smem_bytes <= k99);
  }
  CHECK_FALSE(ch02::plan_for(64, k99).share_kv);
  // Exactly at the default's size: it fits; one byte less: shared.
  CHECK_FALSE(ch02::plan_for(128, 115968).share_kv);
  CHECK(ch02::plan_for(128, 115967).share_kv);
  // Below even the shared buffer: the shared plan, which the launcher refuses by name.
  CHECK(ch02::plan_for(128, 64 * 1024).share_kv);
  CHECK(ch02::plan_for(128, 64 * 1024).smem_bytes == 83200u);
}

TEST_CASE("02_flash_v1: V_j in K_j's buffer (the 99 KB plan) matches the reference", "[gpu]") {
  for (DType t : {DType::fp16, DType::bf16})
    for (int d : {72, 128})
      for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
        INFO(lab::describe(s));
        LAB_REQUIRE_PASS(lab::run_and_check(flash_v1_99k(), s));
      }
  for (bool causal : {true, false})
    for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
      lab::ProblemSpec s;
      s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 130, s.seqlen_kv = causal ? 130 : 200;
      s.head_dim = 128, s.causal = causal, s.seed = lab::test_seed();
      INFO(lab::describe(s));
      lab::check_nan_rule(flash_v1_99k(), s, where);
    }
}
