// Times 08_flash_v3's pingpong kernel (kernel.cu) over tile shapes (B_c keys per K/V tile, STAGES
// K/V tiles in the ring) on the prefill shapes where it is compared with cuDNN; every candidate is
// validated first, on an awkward small problem and then on the timed one.
//
//   cmake --build build --target tune08 && build/bin/tune08 [substring of candidate names]
//
// kernel.cu is included whole, so the sweep can instantiate its launch<T, D, B_c, STAGES> template
// with other tiles than tiles_for's. The build prints `-Xptxas -v` for every instantiation; the
// table below repeats each kernel's registers and local memory (spills) as the runtime reports them.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "08_flash_v3/kernel.cu"
#include "common/driver.h"

namespace {

struct Candidate {
  const char* name;
  int d;
  ch08::Tiles tiles;
  void (*launch)(const lab::AttnParams&, cudaStream_t);
  const void* kernel;
};

// NC: consumer warpgroups (B_r = 64 NC, a producer warpgroup besides).
template <int B_c, int STAGES, int NC>
constexpr ch08::Tiles tiles() {
  return ch08::Tiles{64 * NC, B_c, STAGES, 128 * (NC + 1)};
}

// The step's plan with these tiles: the same checks (fields, GPU, shared memory) as the product's.
template <int D, int B_c, int STAGES, int NC>
void run(const lab::AttnParams& p, cudaStream_t s) {
  const lab::DeviceLimits& d = lab::device_limits();
  const ch08::LaunchPlan plan = ch08::plan_launch(tiles<B_c, STAGES, NC>(), p, d.cc_major, d.cc_minor, d.smem_per_block);
  ch08::launch<__half, D, B_c, STAGES, NC>(plan, p, s);
}

template <int D, int B_c, int STAGES, int NC>
Candidate candidate(const char* name) {
  Candidate c{name, D, tiles<B_c, STAGES, NC>(), run<D, B_c, STAGES, NC>, nullptr};
  c.kernel = reinterpret_cast<const void*>(ch08::flash_forward_pingpong<__half, D, B_c, STAGES, NC>);
  return c;
}

lab::ProblemSpec prefill(int d, bool causal) {
  lab::ProblemSpec spec;
  spec.batch = 4, spec.heads_q = spec.heads_kv = d == 64 ? 32 : 16;
  spec.seqlen_q = spec.seqlen_kv = 4096, spec.head_dim = d, spec.causal = causal, spec.seed = 5;
  return spec;
}

// Not a multiple of any B_c, seqlen_q != seqlen_kv, causal, lse: every row checked.
lab::ProblemSpec awkward(int d) {
  lab::ProblemSpec spec;
  spec.batch = 2, spec.heads_q = 4, spec.heads_kv = 2;
  spec.seqlen_q = 300, spec.seqlen_kv = 457, spec.head_dim = d, spec.causal = true, spec.lse = true;
  spec.seed = 7;
  return spec;
}

}  // namespace

int main(int argc, char** argv) try {
  const char* only = argc > 1 ? argv[1] : "";
  // The first of each head_dim is the product's choice (tiles_for). 3wg: three consumer warpgroups
  // (B_r = 192, 160 registers each: S 64 fp32, P 32, O 32 at d = 64, B_c = 128); 2wg: two (240
  // registers: B_c = 192 fits, S 96, P 48, O 32). At d = 128 S and O take 64 each: two consumers,
  // B_c at most 128. (FMA-pipe exponentials for part of S were tried too: docs/NOTES-08.md.)
  // clang-format off
  const Candidate cands[] = {
      candidate<64, 128, 3, 3>("d64  Bc128 S3 3wg (plan)"),
      candidate<64, 128, 2, 3>("d64  Bc128 S2 3wg"),
      candidate<64, 128, 4, 3>("d64  Bc128 S4 3wg"),
      candidate<64, 96, 3, 3>("d64  Bc96  S3 3wg"),
      candidate<64, 128, 3, 2>("d64  Bc128 S3 2wg"),
      candidate<64, 128, 4, 2>("d64  Bc128 S4 2wg"),
      candidate<64, 160, 3, 2>("d64  Bc160 S3 2wg"),
      candidate<64, 192, 3, 2>("d64  Bc192 S3 2wg"),
      candidate<64, 192, 4, 2>("d64  Bc192 S4 2wg"),
      candidate<128, 128, 3, 2>("d128 Bc128 S3 (plan)"),
      candidate<128, 128, 2, 2>("d128 Bc128 S2"),
      candidate<128, 64, 4, 2>("d128 Bc64  S4"),
  };
  // clang-format on
  const lab::GpuInfo gpu = lab::gpu_info();
  const lab::DeviceLimits& limits = lab::device_limits();
  std::printf("%s: fp16, %zu bytes of shared memory per block\n", gpu.name.c_str(), limits.smem_per_block);
  std::printf("%-22s %5s %6s %8s\n", "candidate", "regs", "local", "smem");
  for (const Candidate& c : cands) {
    cudaFuncAttributes attr;
    LAB_CUDA_CHECK(cudaFuncGetAttributes(&attr, c.kernel));
    const size_t smem = ch08::smem_bytes(c.tiles, c.d);
    std::printf("%-22s %5d %6zu %8zu%s\n", c.name, attr.numRegs, attr.localSizeBytes, smem,
                smem > limits.smem_per_block ? "  (does not fit: skipped)" : "");
  }
  const lab::Ceilings ceil = lab::measure_ceilings(0, size_t(1) << 30, 8192);
  std::printf("GEMM ceiling %.1f TFLOPS\n", ceil.gemm_tflops);
  std::fflush(stdout);

  lab::L2Flusher flusher;
  int failed = 0;
  for (int d : {64, 128}) {
    lab::Problem small(awkward(d));
    for (bool causal : {false, true}) {
      lab::Problem prob(prefill(d, causal));
      const lab::ProblemSpec& sp = prob.spec();
      std::printf("-- d%d b%d h%d s%d %s\n", d, sp.batch, sp.heads_q, sp.seqlen_q,
                  causal ? "causal" : "full");
      for (const Candidate& c : cands) {
        if (c.d != d || !std::strstr(c.name, only)) continue;
        lab::Variant v{c.name, c.launch, &ch08::kSupport, nullptr};
        lab::RunOptions ro;
        ro.timing.max_seconds = 0.5;
        ro.check.sampled_rows_per_head = 1;
        ro.check.max_sampled_rows = 48;
        lab::RunOutcome r;
        if (!causal) {  // once per candidate: the awkward shape, all rows, not timed
          lab::RunOptions check_all;
          check_all.time = false;
          r = lab::run_variant(small, "tune08", v, check_all, ceil, gpu, nullptr, "check");
          if (!r.ok) r.message = "on the awkward shape: " + r.message;
        }
        if (causal || r.ok) r = lab::run_variant(prob, "tune08", v, ro, ceil, gpu, &flusher, "prefill");
        std::printf("%-22s %8.4f ms (p10 %.4f p90 %.4f) %6.1f TFLOPS %5.1f%%  %s\n", c.name, r.row.ms,
                    r.row.ms_p10, r.row.ms_p90, r.row.tflops, r.row.pct_peak,
                    (r.ok ? std::string("ok") : (r.skipped ? "skipped: " : "FAIL: ") + r.message).c_str());
        std::fflush(stdout);
        failed += !r.ok && !r.skipped;
      }
    }
  }
  return failed ? 1 : 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "tune08: %s\n", e.what());
  return 1;
}
