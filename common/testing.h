// What every chapter's test.cu includes: Catch2 (v2 or v3) and a one-call GPU check.
#pragma once

#if LAB_CATCH2_V3
#include <catch2/catch_test_macros.hpp>
#include <catch2/catch_approx.hpp>
#include <catch2/generators/catch_generators.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif

#include "common/driver.h"

namespace lab {

// The seed of this test run: LAB_TEST_SEED if set, else drawn fresh and printed by the test main,
// so every run draws new inputs and a failing run can be repeated.
uint64_t test_seed();

// The awkward prefill shapes every attention chapter is tested on: seqlen 1, 17,
// 1000 and other non-multiples of the tiles, seqlen_q != seqlen_kv both ways (with causal, rows
// that see no key at all), large logits and outliers, GQA ratios 1, 4, 8 and MQA, batch 1 and
// batch > #SMs. Seeds differ per shape and per run.
std::vector<ProblemSpec> awkward_prefill_shapes(int head_dim, DType dtype);
// The awkward decode shapes: KV lengths 0, 1, 17, 1000, 4097 and mixed lengths in one batch
// (cache_seqlens), paged caches with pages in shuffled order (page sizes 16 to 256), large logits
// and outliers, GQA and MQA, batch 1 and batch > #SMs; seqlen_q queries per sequence (causal on
// every other shape when seqlen_q > 1).
std::vector<ProblemSpec> awkward_decode_shapes(int head_dim, DType dtype, int seqlen_q = 1);
std::string describe(const ProblemSpec& s);

// Runs the variant. Under LAB_SMEM_CAP a chapter may refuse, by name, a shape whose tiles need
// more shared memory than the cap allows (bench/gpu_check.sh smemcap): that refusal is reported
// (a warning) and false returned, so the caller skips what it would have checked. Without a cap,
// or for any other reason, a refusal throws and fails the test.
inline bool forward_unless_capped(const Variant& v, const AttnParams& p, cudaStream_t stream = 0) {
  try {
    v.forward(p, stream);
    return true;
  } catch (const InvalidArgument& e) {
    if (std::string(e.what()).find("(LAB_SMEM_CAP)") == std::string::npos) throw;
    WARN("refused under LAB_SMEM_CAP: " << e.what());
    return false;
  }
}

// Builds the problem, poisons the outputs, runs the variant once and checks every row
// (sampled rows only when `all_rows` is false and the problem is large). A variant with
// kv_prepare is checked against the reference on the K/V it reads (see KvPrepare).
inline CheckReport run_and_check(const Variant& v, const ProblemSpec& spec, bool all_rows = true) {
  Problem prob(spec);
  if (v.support) check_params(prob.params, *v.support);
  if (prob.params.cache_seqlens || prob.params.block_table) {
    const std::string why = kv_cache_tables_reason(prob.params, "run_and_check");
    if (!why.empty()) throw InvalidArgument(why);
  }
  if (prob.params.cu_seqlens_q) {
    const std::string why = varlen_offsets_reason(prob.params, "run_and_check");
    if (!why.empty()) throw InvalidArgument(why);
  }
  const VariantInputs in = prepare_variant(prob, v, 0);  // workspace; a variant's prepared K/V
  prob.poison_outputs(0);
  if (!forward_unless_capped(v, in.params)) {
    CheckReport refused;
    refused.ok = true;
    refused.failure = "refused under LAB_SMEM_CAP";
    return refused;
  }
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  CheckOptions opt;
  opt.all_rows = all_rows;
  opt.seed = spec.seed;
  return prob.check(opt, in.prepared ? &in.host : nullptr);
}

// Shared GPU checks (common/test_checks.cpp), used by the chapters whose tests need them:
// - the same problem, run 3 times, gives bit-identical O (a race shows as outputs that differ);
void require_bit_identical_runs(const Variant& v, const ProblemSpec& spec);
// - a cache length above the capacity and a page index outside the pool are named by
//   kv_cache_tables_reason and, launched anyway, turn the affected rows into NaN;
void check_bad_cache_tables(const Variant& v);
// - a split launch (8 splits) without its workspace is refused, naming workspace_bytes.
void check_workspace_refused(const Variant& v);
// - the NaN rule (common/attn.h): one NaN written into q (sequence 0, head 0, last row), k or v
//   (sequence 0, KV head 0, key `key`, default the middle of its keys) makes exactly the outputs the
//   rule names NaN (q, k: O rows and lse; v: that channel of O), and every other output matches the
//   fp64 reference (which follows the rule) within the usual tolerance. With cache_seqlens, a NaN
//   key and value past sequence 1's length must change nothing. The spec's num_splits is used.
//   For variants that read the problem's K/V as they are (no kv_prepare); varlen specs work too.
enum class NanIn { q, k, v };
void check_nan_rule(const Variant& v, ProblemSpec spec, NanIn where, int key = -1);

}  // namespace lab

// Fails with the check's one-line summary (errors, rows, the first bad element).
#define LAB_REQUIRE_PASS(report)      \
  do {                                \
    const auto& lab_r_ = (report);    \
    INFO(lab_r_.summary());           \
    REQUIRE(lab_r_.ok);               \
  } while (0)
