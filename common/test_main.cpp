// Shared Catch2 main. Tests tagged [gpu] need a CUDA device: without one, a run asked for "[gpu]"
// exits with 77 (ctest's SKIP_RETURN_CODE, shown as "Skipped"), and other runs leave them out.
#if LAB_CATCH2_V3
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/driver.h"
#include "common/measure.h"

namespace lab {

namespace {
uint64_t g_seed = 0;
}

uint64_t test_seed() { return g_seed; }

std::vector<ProblemSpec> awkward_prefill_shapes(int d, DType dtype) {
  struct S { int b, hq, hkv, sq, sk; bool causal; Dist dist; };
  const S shapes[] = {
      {1, 1, 1, 1, 1, false, Dist::normal},        {1, 2, 2, 1, 1000, true, Dist::normal},
      {2, 2, 2, 17, 17, true, Dist::normal},       {1, 2, 2, 17, 1000, true, Dist::normal},
      {1, 2, 2, 1000, 17, true, Dist::normal},     {2, 3, 3, 1000, 1000, false, Dist::normal},
      {1, 2, 2, 1000, 1000, true, Dist::large_logits}, {1, 4, 4, 129, 257, false, Dist::outliers},
      {1, 2, 2, 257, 129, false, Dist::large_logits},  {200, 1, 1, 33, 65, true, Dist::normal},
      {1, 8, 2, 300, 300, true, Dist::normal},     {1, 8, 1, 100, 200, false, Dist::large_logits},
      {1, 16, 2, 64, 128, true, Dist::normal},     {1, 2, 2, 1025, 1025, true, Dist::normal},
  };
  std::vector<ProblemSpec> out;
  uint64_t k = 0;
  for (const S& s : shapes) {
    ProblemSpec p;
    p.batch = s.b, p.heads_q = s.hq, p.heads_kv = s.hkv, p.seqlen_q = s.sq, p.seqlen_kv = s.sk;
    p.head_dim = d, p.causal = s.causal, p.dist = s.dist, p.dtype = dtype, p.lse = true;
    p.seed = test_seed() * 1000 + (++k);
    out.push_back(p);
  }
  return out;
}

std::vector<ProblemSpec> awkward_decode_shapes(int d, DType dtype, int seqlen_q) {
  struct S { int b, hq, hkv, sk; std::vector<int> lens; int page; Dist dist; };
  const S shapes[] = {
      {1, 2, 2, 1, {}, 0, Dist::normal},
      {1, 2, 2, 17, {}, 0, Dist::normal},
      {2, 4, 4, 1000, {}, 0, Dist::large_logits},
      {1, 2, 2, 4097, {}, 0, Dist::normal},
      {3, 4, 1, 1000, {}, 0, Dist::outliers},                    // MQA
      {4, 8, 2, 4097, {1, 4097, 17, 1000}, 0, Dist::normal},     // GQA 4, mixed lengths
      {5, 4, 4, 3000, {0, 3000, 1, 64, 2049}, 0, Dist::large_logits},  // an empty cache too
      {3, 4, 4, 1000, {1000, 999, 513}, 16, Dist::normal},       // paged, the smallest pages
      {4, 8, 8, 4097, {4097, 1, 2000, 4096}, 64, Dist::large_logits},
      {2, 4, 2, 3000, {}, 256, Dist::outliers},
      {2, 2, 2, 700, {700, 5}, 32, Dist::normal},
      {200, 1, 1, 65, {}, 0, Dist::normal},                      // batch > #SMs
  };
  std::vector<ProblemSpec> out;
  uint64_t k = 0;
  for (const S& s : shapes) {
    ProblemSpec p;
    p.batch = s.b, p.heads_q = s.hq, p.heads_kv = s.hkv, p.seqlen_q = seqlen_q, p.seqlen_kv = s.sk;
    p.cache_seqlens = s.lens, p.page_size = s.page, p.dist = s.dist;
    p.head_dim = d, p.dtype = dtype, p.lse = true;
    p.causal = seqlen_q > 1 && k % 2 == 0;
    p.seed = test_seed() * 1000 + 500 + (++k);
    out.push_back(p);
  }
  return out;
}

std::string describe(const ProblemSpec& s) {
  std::ostringstream o;
  o << "b" << s.batch << " h" << s.heads_q << "/" << s.heads_kv << " sq" << s.seqlen_q << " sk"
    << s.seqlen_kv << " d" << s.head_dim << (s.causal ? " causal " : " ") << dtype_name(s.dtype)
    << " " << dist_name(s.dist) << (s.lse ? " lse" : "") << (s.row_pad ? " strided" : "")
    << (s.cache_seqlens.empty() ? "" : " cache_seqlens") << (s.page_size ? " page " + std::to_string(s.page_size) : "")
    << (s.num_splits ? " splits " + std::to_string(s.num_splits) : "") << " seed " << s.seed;
  return o.str();
}

}  // namespace lab

int main(int argc, char** argv) {
  if (const char* env = std::getenv("LAB_TEST_SEED")) lab::g_seed = std::strtoull(env, nullptr, 10);
  else lab::g_seed = std::random_device{}() % 100000;
  std::printf("test seed: %llu (LAB_TEST_SEED=%llu repeats this run)\n",
              (unsigned long long)lab::g_seed, (unsigned long long)lab::g_seed);
  std::vector<char*> args(argv, argv + argc);
  std::string why;
  const lab::GpuState gpu = lab::gpu_state(&why);
  bool gpu_tests_failed = false;
  if (gpu != lab::GpuState::present) {
    // Skipped only where there is no GPU; a GPU the runtime cannot use fails the GPU tests, so
    // that a machine with a too-old driver does not report 100% passed.
    const bool unusable = gpu == lab::GpuState::unusable;
    for (int i = 1; i < argc; ++i)
      if (std::string(argv[i]) == "[gpu]") {
        std::printf("%s: %s\n",
                    unusable ? "GPU tests FAIL, the GPU is unusable" : "skipping the GPU tests", why.c_str());
        return unusable ? 1 : 77;
      }
    static char exclude_gpu[] = "~[gpu]";
    bool has_filter = false;
    for (int i = 1; i < argc; ++i) has_filter |= argv[i][0] != '-';
    if (!has_filter) {
      args.push_back(exclude_gpu);
      // A run of every test leaves the GPU tests out here; with an unusable GPU it fails for them.
      gpu_tests_failed = unusable;
      if (unusable)
        std::printf("GPU tests left out and this run FAILS: the GPU is unusable: %s\n", why.c_str());
    }
  }
  const int rc = Catch::Session().run(int(args.size()), args.data());
  return rc == 0 && gpu_tests_failed ? 1 : rc;
}
