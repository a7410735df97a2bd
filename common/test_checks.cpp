// GPU checks more than one chapter's tests share (declared in common/testing.h).
#include <cmath>
#include <cstring>
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
    v.forward(in.params, 0);
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

}  // namespace lab
