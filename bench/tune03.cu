// Times one of 03_flash_v2's kernels over tile configurations (B_r, B_c, unroll of the QK^T
// k-loop) on the prefill shapes of the ladder; every configuration is validated first. This is how
// the Tiles<> choices in 03_flash_v2 were made (logs in docs/results/<gpu>/tuning/).
//
//   cmake --build build --target tune03_fa2 tune03_overlap && build/bin/tune03_fa2
//
// TUNE_KERNEL names the kernel file (kernel.cu or kernel_overlap.cu): it is included whole, so the
// sweep can instantiate its launch<T, D, B_r, B_c, QK_UNROLL> template with other parameters.
#include <cstdio>

#include TUNE_KERNEL
#include "common/driver.h"

namespace {

struct Candidate {
  const char* name;
  int d;
  void (*launch)(const lab::AttnParams&, cudaStream_t);
};

template <int D, int B_r, int B_c, int U>
void run(const lab::AttnParams& p, cudaStream_t s) {
  ch03::launch<__half, D, B_r, B_c, U>(p, s);
}

}  // namespace

int main() {
  // Each entry must fit the 255 registers of two blocks per SM: check `-Xptxas -v` for spills.
  const Candidate cands[] = {
      {"d64  Br128 Bc64 U4", 64, run<64, 128, 64, 4>},   {"d64  Br128 Bc64 U1", 64, run<64, 128, 64, 1>},
      {"d64  Br128 Bc32 U4", 64, run<64, 128, 32, 4>},   {"d128 Br128 Bc64 U2", 128, run<128, 128, 64, 2>},
      {"d128 Br128 Bc64 U8", 128, run<128, 128, 64, 8>}, {"d128 Br128 Bc32 U8", 128, run<128, 128, 32, 8>},
      {"d128 Br128 Bc32 U1", 128, run<128, 128, 32, 1>},
  };
  const lab::GpuInfo gpu = lab::gpu_info();
  const lab::Ceilings ceil = lab::measure_ceilings(0, size_t(1) << 30, 8192);
  std::printf("%s (%s): copy %.0f GB/s, GEMM %.1f TFLOPS\n", gpu.name.c_str(), TUNE_KERNEL,
              ceil.copy_gbps, ceil.gemm_tflops);
  lab::L2Flusher flusher;
  for (int d : {64, 128})
    for (int s : {1024, 4096})
      for (bool causal : {false, true}) {
        lab::ProblemSpec spec;
        spec.batch = 16384 / s, spec.heads_q = spec.heads_kv = 2048 / d;
        spec.seqlen_q = spec.seqlen_kv = s, spec.head_dim = d, spec.causal = causal, spec.seed = 5;
        lab::Problem prob(spec);
        for (const Candidate& c : cands) {
          if (c.d != d) continue;
          lab::Variant v{c.name, c.launch, &ch03::kSupport, nullptr};
          lab::RunOptions ro;
          ro.timing.max_seconds = 0.5;
          ro.check.sampled_rows_per_head = 1;
          ro.check.max_sampled_rows = 48;
          lab::RunOutcome r = lab::run_variant(prob, "tune03", v, ro, ceil, gpu, &flusher, "prefill");
          std::printf("%-20s s%-6d %-6s %8.4f ms (p10 %.4f p90 %.4f) %6.1f TFLOPS %5.1f%%  %s\n", c.name,
                      s, causal ? "causal" : "full", r.row.ms, r.row.ms_p10, r.row.ms_p90, r.row.tflops,
                      r.row.pct_peak, r.ok ? "ok" : r.message.c_str());
          std::fflush(stdout);
        }
      }
  return 0;
}
