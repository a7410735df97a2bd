// Tests of 03_flash_v2 (every step) against the fp64 reference.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "03_flash_v2/kernel.h"
#include "common/cuda_check.h"
#include "common/fill.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Chapter& ch() { static lab::Chapter c = ch03::chapter(); return c; }
const lab::Variant& loop_order() { return ch().variants[0]; }

// Step 0 as it runs where a block may have only 99 KB of shared memory (sm_86/89/120), on any GPU.
void forward_loop_order_99k(const lab::AttnParams& p, cudaStream_t stream) {
  ch03::forward_loop_order_with_smem_cap(p, stream, 99 * 1024);
}
const lab::Variant& loop_order_99k() {
  static lab::Variant v = [] {
    lab::Variant w = loop_order();
    w.forward = forward_loop_order_99k;
    return w;
  }();
  return v;
}

// A small problem whose tensors all point at one dummy buffer: a refusal happens before any read.
alignas(16) char refusal_buffer[64];
lab::AttnParams refusal_params(int head_dim) {
  lab::AttnParams p;
  p.batch = 1, p.heads_q = 2, p.heads_kv = 2, p.seqlen_q = 8, p.seqlen_kv = 8, p.head_dim = head_dim;
  p.softmax_scale = 0.1f;
  lab::set_contiguous_strides(p);
  p.q = p.k = p.v = refusal_buffer;
  p.o = refusal_buffer;
  return p;
}
std::string refusal(lab::ForwardFn forward, const lab::AttnParams& p) {
  try {
    forward(p, 0);
  } catch (const lab::InvalidArgument& e) {
    return e.what();
  }
  return "";
}

// Step 0 takes any head_dim up to 128; steps 1-3 a list that reaches 256.
bool takes_head_dim(const lab::Variant& v, int d) {
  const std::vector<int>& dims = v.support->head_dims;
  return dims.empty() ? d <= v.support->max_head_dim : std::find(dims.begin(), dims.end(), d) != dims.end();
}
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
          if (!takes_head_dim(v, d)) continue;  // step 0 at 256: refused (the [cpu] test below)
          lab::ProblemSpec s;
          s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 200, s.seqlen_kv = 333;
          s.head_dim = d, s.dtype = t, s.causal = causal, s.lse = true, s.row_pad = 8;
          s.dist = causal ? lab::Dist::large_logits : lab::Dist::normal;
          s.seed = lab::test_seed() + d + 7 * causal;
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("03_flash_v2 step 0 (loop_order): any head_dim up to 128, strided rows", "[gpu]") {
  REQUIRE(loop_order().name == "loop_order");
  for (int d : {1, 16, 40, 72, 100, 127})
    for (DType t : {DType::fp16, DType::bf16}) {
      lab::ProblemSpec s;
      s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 150, s.seqlen_kv = 190, s.head_dim = d;
      s.dtype = t, s.causal = d % 2 == 0, s.lse = true, s.row_pad = 3;
      s.dist = d % 3 == 0 ? lab::Dist::large_logits : lab::Dist::normal;
      s.seed = lab::test_seed() + d;
      INFO(lab::describe(s));
      LAB_REQUIRE_PASS(lab::run_and_check(loop_order(), s));
    }
}

TEST_CASE("03_flash_v2 step 0 (loop_order): a NaN in q or K makes the rows that see it NaN", "[gpu]") {
  // The lab's NaN rule (common/attn.h): never an answer made from a NaN, never a NaN where no row
  // saw one. Causal, seqlen 150 (three query tiles, three key tiles): key 70 is seen by rows >= 70.
  lab::ProblemSpec s;
  s.batch = 1, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 150, s.seqlen_kv = 150, s.head_dim = 64;
  s.causal = true, s.lse = true, s.seed = lab::test_seed();
  const int q_row = 5, k_row = 70, hd = s.heads_q * s.head_dim;  // head 0, channel 3
  for (bool in_q : {true, false}) {
    lab::Problem prob(s);
    const uint16_t nan_bits = lab::float_to_half_bits(NAN, s.dtype);
    void* target = const_cast<void*>(in_q ? prob.params.q : prob.params.k);
    LAB_CUDA_CHECK(cudaMemcpy(static_cast<uint16_t*>(target) + size_t(in_q ? q_row : k_row) * hd + 3,
                              &nan_bits, sizeof(nan_bits), cudaMemcpyHostToDevice));
    prob.poison_outputs(0);
    loop_order().forward(prob.params, 0);
    LAB_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> o = lab::download_bits(prob.params.o, prob.o_elems);
    std::vector<float> lse(prob.lse_elems);
    LAB_CUDA_CHECK(
        cudaMemcpy(lse.data(), prob.params.lse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (int row = 0; row < s.seqlen_q; ++row)
      for (int h = 0; h < s.heads_q; ++h) {
        const bool nan_row = h == 0 && (in_q ? row == q_row : row >= k_row);
        INFO((in_q ? "NaN in q" : "NaN in K") << ": row " << row << ", head " << h);
        const float l = lse[size_t(h) * s.seqlen_q + row];
        uint32_t l_bits;
        std::memcpy(&l_bits, &l, sizeof(l));
        CHECK(l_bits != lab::kPoisonF32);  // written: the poison is a NaN too
        CHECK(std::isnan(l) == nan_row);
        for (int c = 0; c < s.head_dim; ++c) {
          const uint16_t bits = o[size_t(row) * hd + h * s.head_dim + c];
          CHECK(bits != lab::poison_bits(s.dtype));
          CHECK(std::isnan(lab::half_bits_to_float(bits, s.dtype)) == nan_row);
        }
      }
  }
}

TEST_CASE("03_flash_v2 step 0 (loop_order): the launch plan follows the shared memory a block may have",
          "[cpu]") {
  // Hopper (227 KB) and A100 (163 KB) hold separate K_j and V_j buffers at every head_dim.
  for (size_t limit : {size_t(227) * 1024, size_t(163) * 1024})
    for (int d : {1, 64, 65, 128}) {
      INFO("limit " << limit << ", head_dim " << d);
      const ch03::Plan plan = ch03::plan_loop_order(d, limit);
      CHECK_FALSE(plan.share_kv);
      CHECK(plan.smem_bytes == (d <= 64 ? 66560u : 115712u));
    }
  // 99 KB (sm_86/89/120): head_dim 65..128 shares K_j's buffer with V_j; 64 and below fit as they are.
  const size_t k99 = 99 * 1024;
  for (int d : {65, 100, 128}) {
    const ch03::Plan plan = ch03::plan_loop_order(d, k99);
    CHECK(plan.share_kv);
    CHECK(plan.smem_bytes == 82944u);
    CHECK(plan.smem_bytes <= k99);
  }
  CHECK_FALSE(ch03::plan_loop_order(64, k99).share_kv);
  // Exactly at the default's size: it fits; one byte less: shared.
  CHECK_FALSE(ch03::plan_loop_order(128, 115712).share_kv);
  CHECK(ch03::plan_loop_order(128, 115711).share_kv);
  CHECK_FALSE(ch03::plan_loop_order(64, 66560).share_kv);
  CHECK(ch03::plan_loop_order(64, 66559).share_kv);
  CHECK(ch03::plan_loop_order(64, 66559).smem_bytes == 50176u);
  // Below even the shared buffer: the shared plan, which the launcher refuses by name.
  CHECK(ch03::plan_loop_order(128, 64 * 1024).share_kv);
  CHECK(ch03::plan_loop_order(128, 64 * 1024).smem_bytes == 82944u);
}

TEST_CASE("03_flash_v2 step 0 (loop_order): V_j in K_j's buffer (the 99 KB plan) matches the reference",
          "[gpu]") {
  for (DType t : {DType::fp16, DType::bf16})
    for (int d : {72, 128})
      for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
        INFO(lab::describe(s));
        LAB_REQUIRE_PASS(lab::run_and_check(loop_order_99k(), s));
      }
  for (bool causal : {true, false})
    for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
      lab::ProblemSpec s;
      s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 130, s.seqlen_kv = causal ? 130 : 200;
      s.head_dim = 128, s.causal = causal, s.seed = lab::test_seed();
      INFO(lab::describe(s));
      lab::check_nan_rule(loop_order_99k(), s, where);
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
  lab::AttnParams p = refusal_params(80);
  CHECK(refusal(ch03::forward, p) ==
        "03_flash_v2: head_dim = 80 is not supported (supported: 32, 64, 96, 128, 256)");
  p = refusal_params(64);
  lab::AttnParams q = p;
  q.k_row_stride = 2 * 64 + 4;
  CHECK(refusal(ch03::forward, q).find("k_row_stride") != std::string::npos);
  q = p;
  q.v = refusal_buffer + 8;
  CHECK(refusal(ch03::forward, q).find("v pointer is not 16-byte aligned") != std::string::npos);
  q = p;
  q.batch = 70000;
  lab::set_contiguous_strides(q);
  CHECK(refusal(ch03::forward, q).find("batch = 70000") != std::string::npos);
  for (lab::ForwardFn forward : {ch03::forward, ch03::forward_loop_order}) {
    q = p;
    q.heads_kv = 3;
    CHECK(refusal(forward, q).find("heads_q = 2 is not a multiple of heads_kv = 3") != std::string::npos);
    q = p;
    q.cu_seqlens_q = q.cu_seqlens_kv = reinterpret_cast<const int*>(refusal_buffer);
    CHECK(refusal(forward, q).find("varlen") != std::string::npos);
  }
}

TEST_CASE("03_flash_v2 step 0 (loop_order) refuses what it does not support, naming the field", "[cpu]") {
  CHECK(refusal(ch03::forward_loop_order, refusal_params(256)) ==
        "03_flash_v2/loop_order: head_dim = 256 is not supported (supported: 1..128)");
  lab::AttnParams q = refusal_params(64);
  q.seqlen_q = 65535 * 64 + 1;
  lab::set_contiguous_strides(q);
  CHECK(refusal(ch03::forward_loop_order, q).find("seqlen_q = 4194241") != std::string::npos);
  // (batch, head) pairs on grid.x, counted in 64 bits.
  q = refusal_params(64);
  q.batch = 1 << 16, q.heads_q = q.heads_kv = 1 << 15, q.seqlen_q = q.seqlen_kv = 1;
  lab::set_contiguous_strides(q);
  CHECK(refusal(ch03::forward_loop_order, q) ==
        "03_flash_v2/loop_order: batch * heads_q = 2147483648 is not supported (supported: up to "
        "2147483647, the grid.x limit)");
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
