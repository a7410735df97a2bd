// Tests of 06_gqa_alibi (every step) against the fp64 reference: GQA ratios, ALiBi, varlen
// (hybrid) batches, decoding with splits, NaN, the tile choice and the refusals. A case a step does
// not support (ALiBi and varlen before step 2, num_splits before step 4) runs on the steps that do.
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>

#include "06_gqa_alibi/kernel.h"
#include "common/device.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Chapter& ch() {
  static lab::Chapter c = ch06::chapter();
  return c;
}
const lab::Variant& final_step() { return ch().variants.back(); }

// Whether step v computes this problem (its Support), so each case runs on every step that can.
bool runs(const lab::Variant& v, const lab::ProblemSpec& s) {
  const lab::Support& sup = *v.support;
  return (sup.alibi || !s.alibi) && (sup.varlen || s.varlen_q.empty()) && (sup.splits || s.num_splits == 0);
}
}  // namespace

TEST_CASE("06_gqa_alibi matches the reference on awkward prefill shapes (GQA 1, 4, 8, MQA)", "[gpu]") {
  for (const lab::Variant& v : ch().variants)
    for (DType t : {DType::fp16, DType::bf16})
      for (int d : {64, 128})
        for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
          s.alibi = true, s.seed += 100;
          if (!runs(v, s)) continue;
          INFO("with ALiBi");
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("06_gqa_alibi: ALiBi with head counts that are not powers of two", "[gpu]") {
  struct H {
    int hq, hkv;
  };
  for (H h : {H{12, 12}, H{12, 4}, H{12, 3}, H{20, 4}, H{20, 20}, H{40, 8}, H{40, 1}})
    for (bool causal : {false, true})
      for (auto [sq, sk] : {std::pair<int, int>{300, 300}, {1, 1000}, {100, 777}, {513, 129}}) {
        lab::ProblemSpec s;
        s.batch = 2, s.heads_q = h.hq, s.heads_kv = h.hkv, s.seqlen_q = sq, s.seqlen_kv = sk;
        s.head_dim = 128, s.causal = causal, s.alibi = true, s.lse = true;
        s.dist = causal ? lab::Dist::large_logits : lab::Dist::normal;
        s.seed = lab::test_seed() + 13 * h.hq + h.hkv + sq;
        INFO(lab::describe(s) << " alibi");
        for (const lab::Variant& v : ch().variants)
          if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s));
      }
}

TEST_CASE("06_gqa_alibi: varlen batches mixing prefill and decode sequences", "[gpu]") {
  // Lengths 1..3000 in one launch; some sequences with more queries than keys (causal: rows that
  // see nothing), an empty KV, a long prefill next to single-token decodes.
  const std::vector<int> q_lens = {1, 3000, 17, 1, 700, 1, 64, 5};
  const std::vector<int> kv_lens = {4000, 3000, 17, 1, 1000, 2500, 0, 3};
  struct H {
    int hq, hkv;
  };
  for (H h : {H{8, 8}, H{8, 2}, H{12, 4}, H{8, 1}})
    for (bool causal : {false, true})
      for (bool alibi : {false, true}) {
        lab::ProblemSpec s;
        s.varlen_q = q_lens, s.varlen_kv = kv_lens;
        s.heads_q = h.hq, s.heads_kv = h.hkv, s.head_dim = 128, s.causal = causal, s.alibi = alibi;
        s.lse = true, s.seed = lab::test_seed() + 7 * h.hq + h.hkv + 2 * causal + alibi;
        INFO(lab::describe(s) << " varlen" << (alibi ? " alibi" : ""));
        for (const lab::Variant& v : ch().variants)
          if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s, false));
      }
  // d = 64 and bf16 with every sequence short enough to check every row.
  lab::ProblemSpec s;
  s.varlen_q = {1, 200, 1, 33}, s.varlen_kv = {900, 200, 1, 65};
  s.heads_q = 16, s.heads_kv = 4, s.head_dim = 64, s.dtype = DType::bf16, s.causal = true, s.alibi = true;
  s.lse = true, s.seed = lab::test_seed() + 99;
  for (const lab::Variant& v : ch().variants)
    if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s));
}

TEST_CASE("06_gqa_alibi: decoding, group ratios 1, 2, 4, 8 and MQA, with splits", "[gpu]") {
  for (int hkv : {32, 16, 8, 4, 1})
    for (int kv : {1, 17, 1000, 4097})
      for (int splits : {0, 1, 7, 64}) {
        lab::ProblemSpec s;
        s.batch = 3, s.heads_q = 32, s.heads_kv = hkv, s.seqlen_q = 1, s.seqlen_kv = kv, s.head_dim = 128;
        s.num_splits = splits, s.lse = true, s.alibi = kv == 4097;
        s.dist = kv == 1000 ? lab::Dist::large_logits : lab::Dist::normal;
        s.seed = lab::test_seed() + hkv * 100000 + kv + splits;
        INFO(lab::describe(s));
        for (const lab::Variant& v : ch().variants)
          if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s));
      }
  // A few query tokens (speculative decoding), causal, GQA: rows are (token, head) pairs; up to 8
  // tokens (32 packed rows) the decoding tile holds them all. Without splits every step runs.
  for (int sq : {2, 3, 8, 16, 17})
    for (int splits : {5, 0}) {
      lab::ProblemSpec s;
      s.batch = 2, s.heads_q = 32, s.heads_kv = 8, s.seqlen_q = sq, s.seqlen_kv = 2000, s.head_dim = 128;
      s.causal = true, s.lse = true, s.num_splits = splits,
      s.seed = lab::test_seed() + sq + (splits ? 0 : 1000);
      INFO(lab::describe(s));
      for (const lab::Variant& v : ch().variants)
        if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    }
}

TEST_CASE("06_gqa_alibi: the same input gives bit-identical output twice", "[gpu]") {
  lab::ProblemSpec s;
  s.varlen_q = {1, 700, 1, 300}, s.varlen_kv = {5000, 900, 33, 300};
  s.heads_q = 16, s.heads_kv = 4, s.head_dim = 128, s.causal = true, s.alibi = true;
  s.seed = lab::test_seed();
  for (const lab::Variant& v : ch().variants)
    if (runs(v, s)) lab::require_bit_identical_runs(v, s);
}

TEST_CASE("06_gqa_alibi: offsets that are not increasing are refused by name", "[gpu]") {
  lab::ProblemSpec s;
  s.varlen_q = {3, 5, 2}, s.varlen_kv = {10, 20, 30};
  s.heads_q = 4, s.heads_kv = 2, s.head_dim = 64, s.seed = lab::test_seed();
  lab::Problem prob(s);
  REQUIRE(lab::varlen_offsets_reason(prob.params, "06").empty());
  int* cu = const_cast<int*>(prob.params.cu_seqlens_q);
  const int bad = 2;  // cu_seqlens_q = {0, 3, 2, 10}
  LAB_CUDA_CHECK(cudaMemcpy(cu + 2, &bad, sizeof(int), cudaMemcpyHostToDevice));
  const std::string why = lab::varlen_offsets_reason(prob.params, "06");
  INFO(why);
  CHECK(why.find("cu_seqlens_q is not increasing: cu_seqlens_q[2] = 2 < cu_seqlens_q[1] = 3") !=
        std::string::npos);
}

TEST_CASE("06_gqa_alibi: offsets past the packed tensors, launched anyway, touch nothing outside them",
          "[gpu][sanitize]") {
  // The host check refuses cu_seqlens past total_q/total_kv (varlen_offsets_reason); a kernel
  // launched without it must skip such a sequence on the device. The tensors hold exactly the
  // 10 packed rows, so under compute-sanitizer memcheck any access past them is an error.
  lab::ProblemSpec s;
  s.varlen_q = {5, 5}, s.varlen_kv = {5, 5};
  s.heads_q = 4, s.heads_kv = 2, s.head_dim = 64, s.seed = lab::test_seed();
  for (bool past_q : {true, false}) {
    lab::Problem prob(s);
    REQUIRE(prob.params.total_q == 10);
    REQUIRE(prob.params.total_kv == 10);
    int* cu = const_cast<int*>(past_q ? prob.params.cu_seqlens_q : prob.params.cu_seqlens_kv);
    const int bad = 20;  // {0, 5, 20}: sequence 1 ends 10 rows past the tensors
    LAB_CUDA_CHECK(cudaMemcpy(cu + 2, &bad, sizeof(int), cudaMemcpyHostToDevice));
    INFO(lab::varlen_offsets_reason(prob.params, "06"));
    REQUIRE(lab::varlen_offsets_reason(prob.params, "06").find("exceeds total_") != std::string::npos);
    for (const lab::Variant& v : ch().variants) {
      if (!runs(v, s)) continue;
      INFO(v.name << (past_q ? ": cu_seqlens_q" : ": cu_seqlens_kv") << " past the tensors");
      const lab::VariantInputs in = lab::prepare_variant(prob, v);
      prob.poison_outputs(0);
      v.forward(in.params, 0);
      LAB_CUDA_CHECK(cudaDeviceSynchronize());
      // Sequence 1 is skipped: its 5 rows of O keep the poison.
      const std::vector<uint16_t> o = lab::download_bits(prob.params.o, prob.o_elems);
      const size_t row = size_t(s.heads_q) * s.head_dim;
      for (size_t e = 5 * row; e < 10 * row; ++e) REQUIRE(o[e] == lab::kPoisonFp16);
    }
  }
}

TEST_CASE("06_gqa_alibi: a small case for the sanitizers", "[gpu][sanitize]") {
  lab::ProblemSpec s;
  s.varlen_q = {1, 150, 1, 20}, s.varlen_kv = {300, 150, 0, 90};
  s.heads_q = 12, s.heads_kv = 4, s.head_dim = 64, s.causal = true, s.alibi = true, s.lse = true;
  s.seed = lab::test_seed();
  for (const lab::Variant& v : ch().variants)
    if (runs(v, s)) LAB_REQUIRE_PASS(lab::run_and_check(v, s));
  lab::ProblemSpec d;
  d.batch = 2, d.heads_q = 8, d.heads_kv = 2, d.seqlen_q = 1, d.seqlen_kv = 700, d.head_dim = 128;
  d.num_splits = 3, d.lse = true, d.alibi = true, d.seed = lab::test_seed() + 1;
  for (const lab::Variant& v : ch().variants)
    if (runs(v, d)) LAB_REQUIRE_PASS(lab::run_and_check(v, d));
}

TEST_CASE("06_gqa_alibi refuses what it does not support, naming the field", "[cpu]") {
  lab::AttnParams p;
  p.batch = 2, p.heads_q = 32, p.heads_kv = 8, p.seqlen_q = 100, p.seqlen_kv = 1024, p.head_dim = 128;
  p.softmax_scale = 0.088f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[16];
  p.q = p.k = p.v = buf;
  p.o = buf;
  CHECK(lab::unsupported_reason(p, ch06::kSupport).empty());
  auto refused = [&](lab::AttnParams bad, const std::string& field) {
    const std::string why = lab::unsupported_reason(bad, ch06::kSupport);
    INFO(why);
    CHECK(why.find(field) != std::string::npos);
  };
  lab::AttnParams bad = p;
  bad.heads_kv = 6;
  refused(bad, "heads_q = 32 is not a multiple of heads_kv = 6");
  bad = p, bad.head_dim = 96;
  lab::set_contiguous_strides(bad);
  refused(bad, "head_dim = 96");
  bad = p, bad.cu_seqlens_q = reinterpret_cast<const int*>(buf);
  refused(bad, "cu_seqlens_q and cu_seqlens_kv must be given together");
  bad = p, bad.cache_seqlens = reinterpret_cast<const int*>(buf);
  refused(bad, "cache_seqlens");
  bad = p, bad.seqlen_q = -3;
  refused(bad, "seqlen_q = -3");
  bad = p, bad.o = nullptr;
  refused(bad, "o is a null pointer");
}

TEST_CASE("06_gqa_alibi: steps 1 to 3 refuse what only a later step computes, by name", "[cpu]") {
  lab::AttnParams p;
  p.batch = 2, p.heads_q = 32, p.heads_kv = 8, p.seqlen_q = 1, p.seqlen_kv = 1024, p.head_dim = 128;
  p.softmax_scale = 0.088f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[16];
  p.q = p.k = p.v = buf;
  p.o = buf;
  for (const lab::Variant& v : ch().variants) CHECK(lab::unsupported_reason(p, *v.support).empty());
  lab::AttnParams bad = p;
  bad.alibi_slopes = reinterpret_cast<const float*>(buf);
  CHECK(lab::unsupported_reason(bad, ch06::kSupportGqa).find("alibi_slopes") != std::string::npos);
  CHECK(lab::unsupported_reason(bad, ch06::kSupportAlibi).empty());
  bad = p, bad.num_splits = 4;
  CHECK(lab::unsupported_reason(bad, ch06::kSupportAlibi).find("num_splits") != std::string::npos);
  CHECK(lab::unsupported_reason(bad, ch06::kSupportDecodeTile).find("num_splits") != std::string::npos);
  CHECK(lab::unsupported_reason(bad, ch06::kSupport).empty());
  bad = p, bad.cu_seqlens_q = bad.cu_seqlens_kv = reinterpret_cast<const int*>(buf);
  CHECK(lab::unsupported_reason(bad, ch06::kSupportGqa).find("varlen") != std::string::npos);
}

TEST_CASE("06_gqa_alibi: the tile fits the GPU's shared memory per block (LAB_SMEM_CAP)", "[cpu]") {
  const size_t hopper = 232448, a100 = lab::parse_smem_cap("163K"), rtx = lab::parse_smem_cap("99K");
  REQUIRE(rtx == 101376);
  // Decoding at d = 128 (GQA 32/8: 4 packed rows; 32/1: 32 rows): three K/V stages where they fit.
  for (size_t limit : {hopper, a100}) {
    const ch06::TilePlan t = ch06::plan_tile(4, 128, 2, limit);
    CHECK((t.key_warps && t.m_frags == 1 && t.stages == 3 && t.B_r == 16 && t.smem_bytes == 102400));
    CHECK(t.row_tiles == 1);
    const ch06::TilePlan u = ch06::plan_tile(32, 128, 2, limit);
    CHECK((u.key_warps && u.m_frags == 2 && u.stages == 3 && u.B_r == 32 && u.smem_bytes == 106496));
  }
  // 99 KB (sm_86/89/120): two stages, the same tile.
  const ch06::TilePlan t = ch06::plan_tile(4, 128, 2, rtx);
  CHECK((t.key_warps && t.m_frags == 1 && t.stages == 2 && t.smem_bytes == 69632));
  const ch06::TilePlan u = ch06::plan_tile(17, 128, 2, rtx);
  CHECK((u.key_warps && u.m_frags == 2 && u.stages == 2 && u.smem_bytes == 73728));
  // d = 64 keeps three stages everywhere; prefill (more than 32 packed rows) is 03's tile.
  CHECK(ch06::plan_tile(8, 64, 2, rtx).stages == 3);
  for (size_t limit : {hopper, a100, rtx}) {
    const ch06::TilePlan p = ch06::plan_tile(33, 128, 2, limit);
    CHECK((!p.key_warps && p.B_r == 128 && p.stages == 2 && p.smem_bytes == 98304 && p.row_tiles == 1));
    CHECK(ch06::plan_tile(516, 128, 2, limit).row_tiles == 5);  // 4 tiles of 128 rows and 4 rows
  }
  // Nothing fits: refused by name, with what it needs and what the GPU allows.
  try {
    ch06::plan_tile(4000, 128, 2, lab::parse_smem_cap("64K"));
    FAIL("a tile larger than the limit was planned");
  } catch (const lab::InvalidArgument& e) {
    CHECK(std::string(e.what()) ==
          "06_gqa_alibi: head_dim = 128 needs 98304 bytes of shared memory per block; this GPU allows 65536 "
          "(LAB_SMEM_CAP or the device's opt-in limit)");
  }
}

TEST_CASE("06_gqa_alibi: a NaN in q, k or v reaches every row that sees it, with one split or many",
          "[gpu]") {
  // GQA 8/2 (heads 0-3 read KV head 0), 1 query token (decoding tile) and 40 (prefill tile), keys
  // 0..999; the NaN goes into q (token 0, head 1), K (key 500, KV head 0) or V (key 500, KV head
  // 1, channel 5). The rule (common/attn.h): O and lse of the rows that see it become NaN (for V:
  // channel 5 of O only), every other row stays finite.
  for (const lab::Variant& v : ch().variants)
    for (int sq : {1, 40})
      for (int splits : {0, 1, 8})
        for (int where : {0, 1, 2}) {
          lab::ProblemSpec s;
          s.batch = 1, s.heads_q = 8, s.heads_kv = 2, s.seqlen_q = sq, s.seqlen_kv = 1000, s.head_dim = 128;
          s.lse = true, s.num_splits = splits, s.seed = lab::test_seed() + 31 * sq + where;
          if (!runs(v, s)) continue;
          INFO(v.name << ": sq " << sq << ", " << splits << " splits, NaN in "
                      << "qkv"[where]);
          lab::Problem prob(s);
          const lab::AttnParams& p = prob.params;
          const uint16_t nan = lab::float_to_half_bits(NAN, s.dtype);
          const int j = 500, c = 5;
          if (where == 0)
            LAB_CUDA_CHECK(cudaMemcpy(static_cast<uint16_t*>(const_cast<void*>(p.q)) + 1 * p.q_head_stride,
                                      &nan, 2, cudaMemcpyHostToDevice));
          if (where == 1)
            LAB_CUDA_CHECK(cudaMemcpy(static_cast<uint16_t*>(const_cast<void*>(p.k)) + j * p.k_row_stride,
                                      &nan, 2, cudaMemcpyHostToDevice));
          if (where == 2)
            LAB_CUDA_CHECK(cudaMemcpy(
                static_cast<uint16_t*>(const_cast<void*>(p.v)) + j * p.v_row_stride + p.v_head_stride + c,
                &nan, 2, cudaMemcpyHostToDevice));
          const lab::VariantInputs in = lab::prepare_variant(prob, v, 0);
          prob.poison_outputs(0);
          v.forward(in.params, 0);
          LAB_CUDA_CHECK(cudaDeviceSynchronize());
          const std::vector<uint16_t> o = lab::download_bits(p.o, prob.o_elems);
          std::vector<float> lse(prob.lse_elems);
          LAB_CUDA_CHECK(cudaMemcpy(lse.data(), p.lse, lse.size() * 4, cudaMemcpyDeviceToHost));
          for (int i = 0; i < sq; ++i)
            for (int h = 0; h < 8; ++h) {
              // Not causal: every row sees key 500.
              const bool row_nan = (where == 0 && i == 0 && h == 1) || (where == 1 && h < 4);
              const float l = lse[size_t(h) * sq + i];
              INFO("row " << i << ", head " << h << ": lse " << l);
              CHECK(std::isnan(l) == row_nan);
              for (int e = 0; e < 128; ++e) {
                const float x = lab::half_bits_to_float(o[(size_t(i) * 8 + h) * 128 + e], s.dtype);
                const bool want_nan = row_nan || (where == 2 && h >= 4 && e == c);
                if (std::isnan(x) != want_nan) {
                  INFO("channel " << e << ": " << x);
                  CHECK(std::isnan(x) == want_nan);
                }
              }
            }
        }
}

TEST_CASE("06_gqa_alibi: key ranges stay in int: seqlen_kv near INT_MAX is refused by name", "[cpu]") {
  lab::AttnParams p;
  p.batch = 1, p.heads_q = 8, p.heads_kv = 2, p.seqlen_q = 1, p.seqlen_kv = 2147480000, p.head_dim = 128;
  p.softmax_scale = 0.088f;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[16];
  p.q = p.k = p.v = buf;
  p.o = buf;
  for (auto forward : {ch06::forward_gqa, ch06::forward_alibi, ch06::forward}) {
    try {
      forward(p, 0);
      FAIL("seqlen_kv = 2147480000 was accepted");
    } catch (const lab::InvalidArgument& e) {
      CHECK(std::string(e.what()).find("06_gqa_alibi: seqlen_kv = 2147480000 is not supported (") !=
            std::string::npos);
    }
  }
  CHECK_THROWS_AS(ch06::num_splits_for(p), lab::InvalidArgument);
}
