// GPU checks more than one chapter's tests share (declared in common/testing.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/testing.h"

namespace lab {

void require_bit_identical_runs(const Variant& v, const ProblemSpec& spec) {
  Problem prob(spec);
  const VariantInputs in = prepare_variant(prob, v, 0);
  std::vector<uint16_t> first;
  for (int run = 0; run < 3; ++run) {
    prob.poison_outputs(0);
    if (!forward_unless_capped(v, in.params)) return;  // refused under LAB_SMEM_CAP: nothing to compare
    LAB_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> o = download_bits(in.params.o, prob.o_elems);
    if (run == 0) first = o;
    else REQUIRE(std::memcmp(o.data(), first.data(), o.size() * 2) == 0);
  }
}

void check_bad_cache_tables(const Variant& v) {
  ProblemSpec s;
  s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 256, s.head_dim = 64;
  s.cache_seqlens = {256, 100}, s.page_size = 64, s.seed = test_seed();
  Problem prob(s);
  AttnParams& p = prob.params;
  prob.ensure_workspace(v.workspace ? v.workspace(p) : 0);
  const char* who = v.support ? v.support->chapter : "test";
  REQUIRE(kv_cache_tables_reason(p, who).empty());
  auto first_element_of = [&](int sequence) {  // head 0, element 0 of the sequence's output row
    prob.poison_outputs(0);
    v.forward(p, 0);  // launched anyway: the kernel must poison its rows, not read past the cache
    LAB_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint16_t> o = download_bits(p.o, prob.o_elems);
    return half_bits_to_float(o[size_t(sequence) * s.heads_q * s.head_dim], DType::fp16);
  };

  // A cache length above the capacity.
  int* lens = const_cast<int*>(p.cache_seqlens);
  const int too_long = 257, ok_len = 100;
  LAB_CUDA_CHECK(cudaMemcpy(lens + 1, &too_long, sizeof(int), cudaMemcpyHostToDevice));
  std::string why = kv_cache_tables_reason(p, who);
  INFO(why);
  CHECK(why.find("cache_seqlens[1] = 257") != std::string::npos);
  CHECK(std::isnan(first_element_of(1)));
  LAB_CUDA_CHECK(cudaMemcpy(lens + 1, &ok_len, sizeof(int), cudaMemcpyHostToDevice));

  // A page index outside the pool (sequence 0 uses page entry 2).
  int* table = const_cast<int*>(p.block_table);
  const int bad_page = p.num_pages;
  LAB_CUDA_CHECK(cudaMemcpy(table + 2, &bad_page, sizeof(int), cudaMemcpyHostToDevice));
  why = kv_cache_tables_reason(p, who);
  INFO(why);
  CHECK(why.find("block_table[0][2] = " + std::to_string(bad_page)) != std::string::npos);
  CHECK(std::isnan(first_element_of(0)));
}

void check_workspace_refused(const Variant& v) {
  ProblemSpec s;
  s.batch = 1, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 1, s.seqlen_kv = 4096, s.head_dim = 128;
  s.num_splits = 8, s.seed = test_seed();
  Problem prob(s);
  try {
    v.forward(prob.params, 0);
    FAIL("a forward without workspace was accepted");
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("workspace_bytes") != std::string::npos);
  }
}

void check_nan_rule(const Variant& v, ProblemSpec spec, NanIn where, int key) {
  spec.lse = v.support && v.support->lse;
  Problem prob(spec);
  const AttnParams& p = prob.params;
  HostProblem& host = prob.host;
  const uint16_t nan_bits = p.dtype == DType::fp16 ? 0x7e00 : 0x7fc0;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto poison = [&](const void* device, std::vector<float>& copy, int64_t at) {
    copy[size_t(at)] = nan;
    LAB_CUDA_CHECK(cudaMemcpy(static_cast<uint16_t*>(const_cast<void*>(device)) + at, &nan_bits, 2,
                              cudaMemcpyHostToDevice));
  };
  const int d = p.head_dim, c0 = std::min(5, d - 1);
  const int keys0 = seqlen_kv_of(host, 0);
  REQUIRE(keys0 > 0);
  const int j0 = key >= 0 ? key : keys0 / 2;
  REQUIRE(j0 < keys0);
  switch (where) {
    case NanIn::q:
      poison(p.q, host.q, q_offset(p, 0, seqlen_q_of(host, 0) - 1, 0) + std::min(3, d - 1));
      break;
    case NanIn::k:
      poison(p.k, host.k, kv_offset(host, false, 0, j0, 0) + c0);
      break;
    case NanIn::v:
      poison(p.v, host.v, kv_offset(host, true, 0, j0, 0) + c0);
      break;
  }
  // A key the rule says no row reads: past sequence 1's cache length.
  if (!host.cache_seqlens.empty() && p.batch > 1 && host.cache_seqlens[1] < p.seqlen_kv) {
    poison(p.k, host.k, kv_offset(host, false, 1, p.seqlen_kv - 1, 0));
    poison(p.v, host.v, kv_offset(host, true, 1, p.seqlen_kv - 1, 0) + c0);
  }

  const VariantInputs in = prepare_variant(prob, v, 0);
  REQUIRE_FALSE(in.prepared);  // the NaN is written into the K/V the kernel reads
  prob.poison_outputs(0);
  if (!forward_unless_capped(v, in.params)) return;  // refused under LAB_SMEM_CAP: nothing to check
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint16_t> o = download_bits(p.o, prob.o_elems);
  const std::vector<float> lse = prob.lse_elems ? download_f32(p.lse, prob.lse_elems) : std::vector<float>();

  // The reference rows, and the scale of the max-abs tolerance (common/validate.h).
  const int group = p.heads_q / p.heads_kv;
  std::vector<std::vector<double>> ref;
  std::vector<double> ref_lse;
  double max_ref = 1.0;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_q; ++h)
      for (int i = 0; i < seqlen_q_of(host, b); ++i) {
        std::vector<double> row(static_cast<size_t>(d));
        ref_lse.push_back(reference_row(host, b, h, i, row.data()));
        for (double x : row)
          if (std::isfinite(x)) max_ref = std::max(max_ref, std::fabs(x));
        ref.push_back(row);
      }
  const Tolerance tol = tolerance_for(p.dtype);
  // O row i of sequence b: varlen tensors are packed (row cu_seqlens_q[b] + i, batch 0).
  auto o_at = [&](int b, int i, int h) {
    return host.cu_seqlens_q.empty() ? o_offset(p, b, i, h)
                                     : o_offset(p, 0, host.cu_seqlens_q[size_t(b)] + i, h);
  };
  size_t n = 0;
  int64_t nan_rows = 0;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_q; ++h)
      for (int i = 0; i < seqlen_q_of(host, b); ++i, ++n) {
        INFO("sequence " << b << ", head " << h << ", row " << i << " (NaN in "
                         << (where == NanIn::q   ? "q"
                             : where == NanIn::k ? "k"
                                                 : "v")
                         << ", key " << j0 << ")");
        bool row_nan = false;
        for (int c = 0; c < d; ++c) {
          INFO("channel " << c << ", reference " << ref[n][size_t(c)]);
          const float got = half_bits_to_float(o[size_t(o_at(b, i, h) + c)], p.dtype);
          if (std::isnan(ref[n][size_t(c)])) {
            REQUIRE(std::isnan(got));
            row_nan = true;
          } else if (where == NanIn::v && b == 0 && h / group == 0 && c == c0 && std::isnan(got)) {
            // Allowed: 0 * NaN in P V reaches rows of the key's tile that do not see it.
          } else {
            REQUIRE(std::isfinite(got));
            REQUIRE(std::fabs(got - ref[n][size_t(c)]) <= tol.max_abs * max_ref);
          }
        }
        nan_rows += row_nan;
        if (lse.empty()) continue;
        const float got_lse = lse[size_t(lse_offset(p, b, h, i))];
        INFO("lse " << got_lse << ", reference " << ref_lse[n]);
        if (std::isnan(ref_lse[n]))
          REQUIRE(std::isnan(got_lse));
        else if (std::isinf(ref_lse[n]))
          REQUIRE(got_lse == float(ref_lse[n]));
        else
          REQUIRE(std::fabs(got_lse - ref_lse[n]) <= tol.lse_abs);
      }
  REQUIRE(nan_rows > 0);  // the premise: the NaN was seen by some row
}

}  // namespace lab
