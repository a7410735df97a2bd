// Times 07_kv_quant's fast kernel (kernel.cu, step 2) over launch parameters on the shapes of
// chapter 07's table (d 128, 32 heads: b8 and b32 at 4096 keys, b1 at 32768): threads per block,
// keys per thread group in flight (kU), heads per block, and the split count (auto, auto / 2,
// 2 auto), for fp16 and every quantized scheme. Each candidate is checked against the reference on
// the K/V it reads (as 07_kv_quant_table does), timed (median, L2 flushed), checked again from
// poisoned outputs, and printed with GB/s of the bytes stored, % of the streaming-read ceiling and the
// speedup over the product fp16 path (ch07::forward) timed in the same process.
//
//   cmake --build build --target tune07 && build/bin/tune07 [--shapes b8,b32,b1] [--schemes fp16,int8_head]
//                                                          [--max-seconds S] [--iters N]
//
// kernel.cu is included whole, so the sweep can instantiate its launch<S, SCALE_GROUP, D, HPB,
// THREADS, U> template with other parameters. Rows marked * are the product's choice (auto splits,
// default template parameters): they are what 07_kv_quant_table times. Rows marked F are the fused
// candidate (launch_fused below): the last block of each (batch, head group) to finish merges the
// splits, in place of 04's combine launch.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "07_kv_quant/kernel.cu"
#include "common/driver.h"

// Step 3 candidate (tune07 only, not in the product path): decode_split<..., MergeInLastBlock> merges
// the splits itself, in place of 04's combine launch. Each block writes its partials as before,
// then takes a ticket for its (batch, head group); the block that takes the last one merges the
// group's splits (as 04's combine does) and writes O and lse. The tickets sit at the start of the
// workspace, the partials after them (launch_fused below); they must be zero before the first
// launch, and each launch leaves them zero (the last block resets its ticket): a caller-provided
// workspace must have its ticket words zeroed once (tune07 does it before each candidate's check).
namespace ch07 {
namespace {

size_t ticket_bytes(const lab::AttnParams& p, int hpb) {
  return (size_t(p.batch) * (p.heads_q / hpb) * sizeof(unsigned) + 255) / 256 * 256;
}

// decode_split's Epilogue: run at the end of the kernel by every thread of the block.
struct MergeInLastBlock {
  template <int HPB, int D, int THREADS>
  static __device__ void run(const lab::AttnParams& p, int splits, const float* o_partial,
                             const float* lse_partial, int b, int kv0, int gqa_ratio, int r) {
    if (splits == 1) return;  // O was written directly
    __shared__ bool last;
    __shared__ float weight[HPB][ch04::kMaxSplits], lse_of[HPB], inv_sum[HPB];
    unsigned* ticket = static_cast<unsigned*>(p.workspace) + int64_t(b) * gridDim.y + blockIdx.y;
    __threadfence();  // this thread's partials, visible device-wide before the ticket is taken
    __syncthreads();
    if (threadIdx.x == 0) {
      last = atomicAdd(ticket, 1u) == unsigned(splits - 1);
      if (last) *ticket = 0;  // every block of this launch has taken its ticket: reset for the next
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // the other blocks' partials, read after their tickets (from L2: __ldcg)
    const int64_t rows = int64_t(p.batch) * p.heads_q;
    // One warp per head: lse = m + log sum_s exp(lse_s - m), weights exp(lse_s - m); NaN stays NaN.
    const int lane = threadIdx.x % 32;
    for (int hf = threadIdx.x / 32; hf < HPB; hf += THREADS / 32) {
      const int64_t row = int64_t(b) * p.heads_q + (kv0 + hf) * gqa_ratio + r;
      float m = -INFINITY;
      bool nan = false;
      for (int s = lane; s < splits; s += 32) {
        const float l = __ldcg(lse_partial + s * rows + row);
        nan |= l != l;
        m = fmaxf(m, l);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      nan = __any_sync(0xffffffffu, nan);
      float sum = 0.f;
      for (int s = lane; s < splits; s += 32) {
        const float w = m == -INFINITY ? 0.f : expf(__ldcg(lse_partial + s * rows + row) - m);
        weight[hf][s] = w;
        sum += w;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        lse_of[hf] = nan ? NAN : (m == -INFINITY ? -INFINITY : m + logf(sum));
        inv_sum[hf] = nan ? NAN : (sum > 0.f ? 1.f / sum : 0.f);
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < HPB * D; e += THREADS) {
      const int hf = e / D, h_out = (kv0 + hf) * gqa_ratio + r;
      const int64_t row = int64_t(b) * p.heads_q + h_out;
      float acc = 0.f;
      for (int s = 0; s < splits; ++s)
        acc += weight[hf][s] * __ldcg(o_partial + (s * rows + row) * D + e % D);
      __half* O = static_cast<__half*>(p.o) + b * p.o_batch_stride + h_out * p.o_head_stride;
      O[e % D] = __float2half_rn(acc * inv_sum[hf]);
    }
    if (threadIdx.x < HPB && p.lse)
      p.lse[int64_t(b) * p.heads_q + (kv0 + threadIdx.x) * gqa_ratio + r] = lse_of[threadIdx.x];
  }
};

// launch<...>'s split rule, one launch of decode_split<..., MergeInLastBlock>, no combine.
template <KvScheme S, int SCALE_GROUP, int D, int HPB, int THREADS, int U>
int launch_fused(const lab::AttnParams& p, cudaStream_t stream, bool run) {
  const int splits = launch<S, SCALE_GROUP, D, HPB, THREADS, U>(p, stream, false);
  if (!run) return splits;
  const auto kernel = decode_split<S, SCALE_GROUP, D, HPB, THREADS, U, MergeInLastBlock>;
  lab::configure_kernel(reinterpret_cast<const void*>(kernel), THREADS, 0, "tune07");
  float *o = nullptr, *lse = nullptr;
  if (splits > 1) {
    const size_t need = ticket_bytes(p, HPB) + ch04::partials_bytes(p, splits);
    if (!p.workspace || p.workspace_bytes < need)
      throw lab::InvalidArgument("tune07: fused: workspace too small");
    o = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + ticket_bytes(p, HPB));
    lse = o + size_t(splits) * p.batch * p.heads_q * D;
  }
  kernel<<<dim3(splits, p.heads_q / HPB, p.batch), THREADS, 0, stream>>>(p, splits, o, lse);
  LAB_LAUNCH_CHECK();
  return splits;
}

}  // namespace
}  // namespace ch07

namespace {

using lab::KvScheme;
using LaunchFn = int (*)(const lab::AttnParams&, cudaStream_t, bool);  // launch<...>(p, stream, run)

struct Config {
  int threads, u, hpb;
  LaunchFn launch;
  bool product;        // the template defaults: what ch07::forward launches at d 128, 32 heads
  bool fused = false;  // launch_fused: the splits merged by the kernel's last block, no combine launch
};

// d = 128 only. Register budgets: `-Xptxas -v` on this target (min_blocks_per_sm keeps the
// product's threads per SM, so the same registers per thread, for every block size). fp16 U8 at
// 128 threads spills ~200 bytes under 7 blocks' 72 registers (left out); at 256 threads ~130.
template <KvScheme S, int G>
std::vector<Config> configs() {
  using ch07::launch;
  if constexpr (S == KvScheme::none)
    return {{128, 4, 1, launch<S, G, 128, 1, 128, 4>, true},
            {256, 4, 1, launch<S, G, 128, 1, 256, 4>, false},
            {256, 8, 1, launch<S, G, 128, 1, 256, 8>, false},
            {128, 4, 2, launch<S, G, 128, 2, 128, 4>, false},
            {128, 4, 1, ch07::launch_fused<S, G, 128, 1, 128, 4>, false, true}};
  else
    return {{256, 4, 2, launch<S, G, 128, 2, 256, 4>, true},
            {256, 8, 2, launch<S, G, 128, 2, 256, 8>, false},
            {128, 4, 2, launch<S, G, 128, 2, 128, 4>, false},
            {128, 8, 2, launch<S, G, 128, 2, 128, 8>, false},
            {512, 4, 2, launch<S, G, 128, 2, 512, 4>, false},
            {512, 8, 2, launch<S, G, 128, 2, 512, 8>, false},
            {256, 4, 4, launch<S, G, 128, 4, 256, 4>, false},
            {256, 4, 2, ch07::launch_fused<S, G, 128, 2, 256, 4>, false, true},
            {512, 4, 2, ch07::launch_fused<S, G, 128, 2, 512, 4>, false, true}};
}

std::vector<Config> configs_of(const ch07::SchemeVariant& sv) {
  switch (sv.scheme) {
    case KvScheme::int8_tensor:
      return configs<KvScheme::int8_tensor, 0>();
    case KvScheme::int8_token:
      return configs<KvScheme::int8_token, 0>();
    case KvScheme::int8_head:
      return configs<KvScheme::int8_head, 0>();
    case KvScheme::int8_group:
      return sv.group_size == 32 ? configs<KvScheme::int8_group, 32>() : configs<KvScheme::int8_group, 64>();
    case KvScheme::fp8_e4m3:
      return configs<KvScheme::fp8_e4m3, 0>();
    case KvScheme::fp8_e5m2:
      return configs<KvScheme::fp8_e5m2, 0>();
    case KvScheme::fp8_e4m3_head:
      return configs<KvScheme::fp8_e4m3_head, 0>();
    default:
      return configs<KvScheme::none, 0>();
  }
}

struct Shape {
  const char* name;
  int batch, seqlen_kv;
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t end = std::min(s.find(',', at), s.size());
    if (end > at) out.push_back(s.substr(at, end - at));
    at = end + 1;
  }
  return out;
}

int usage(const char* why) {
  if (why) {
    std::fprintf(stderr, "tune07: error: %s\n", why);
    return lab::kExitBadInput;
  }
  std::printf(
      "usage: tune07 [--shapes b8,b32,b1] [--schemes NAME,...] [--max-seconds S] [--iters N]\n"
      "  --shapes       which of b8 (kv 4096), b32 (kv 4096), b1 (kv 32768) (all)\n"
      "  --schemes      fp16 and 07's scheme names (all: fp16 %s)\n"
      "  --max-seconds  timing budget per candidate (0.2)\n"
      "  --iters        at most this many timed repetitions per candidate (30)\n%s",
      "int8_tensor int8_token int8_head int8_group32 int8_group64 fp8_e4m3 fp8_e5m2 fp8_e4m3_head",
      lab::kExitCodesHelp);
  return lab::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  const Shape all_shapes[] = {{"b8", 8, 4096}, {"b32", 32, 4096}, {"b1", 1, 32768}};
  std::set<std::string> want_shapes, want_schemes;
  lab::TimingOptions topt;
  topt.warmup = 3, topt.iters = 30, topt.min_iters = 5, topt.max_seconds = 0.2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    try {
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw lab::CliError(a + " needs a value");
        return argv[++i];
      };
      if (a == "--shapes")
        for (const std::string& s : split_commas(value())) want_shapes.insert(s);
      else if (a == "--schemes")
        for (const std::string& s : split_commas(value())) want_schemes.insert(s);
      else if (a == "--max-seconds")
        topt.max_seconds = lab::parse_number_flag(a, value(), 0.001, 3600);
      else if (a == "--iters")
        topt.iters = int(lab::parse_int_flag(a, value(), 1, 100000)),
        topt.min_iters = std::min(topt.min_iters, topt.iters);
      else if (a == "--help" || a == "-h")
        return usage(nullptr);
      else
        throw lab::CliError("unknown flag '" + a + "' (see --help)");
    } catch (const std::exception& e) {
      return usage(e.what());
    }
  }
  for (const std::string& s : want_shapes)
    if (s != "b8" && s != "b32" && s != "b1") return usage(("unknown shape '" + s + "'").c_str());
  for (const std::string& s : want_schemes) {
    bool known = false;
    for (const ch07::SchemeVariant& sv : ch07::scheme_variants()) known = known || s == sv.name;
    if (!known) return usage(("unknown scheme '" + s + "'").c_str());
  }

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  try {
    std::string no_gpu;
    if (lab::gpu_state(&no_gpu) != lab::GpuState::present) {
      std::fprintf(stderr, "tune07: error: %s\n", lab::no_gpu_message(no_gpu).c_str());
      return lab::kExitNoGpu;
    }
    const lab::GpuInfo gpu = lab::gpu_info();
    // The streaming-read ceiling only (decoding reads K/V once): the yardstick of the % column.
    const lab::Ceilings ceil = lab::measure_read_ceiling();
    std::printf(
        "tune07 on %s (%d SMs): streaming read %.0f GB/s (%s); timing: median of <= %d, <= %.2f s, "
        "L2 flushed\n",
        gpu.name.c_str(), gpu.sm_count, ceil.read_gbps, ceil.read_method.c_str(), topt.iters,
        topt.max_seconds);
    std::printf("%-4s %-14s %-12s %-9s %9s %7s %6s %7s  %s\n", "shape", "scheme", "config", "splits", "ms",
                "GB/s", "%read", "vs fp16", "check");
    lab::L2Flusher flusher;
    lab::CheckOptions copt;
    copt.budget_flops = 1e8;  // sampled rows unless the whole check is this cheap
    copt.sampled_rows_per_head = 1;
    copt.max_sampled_rows = 48;
    lab::CheckOptions copt_all = copt;  // the fused candidates (new merge code): every row
    copt_all.all_rows = true;
    int failures = 0;
    struct Best {
      double product_x = 0, best_x = 0;
      std::string best;
    };
    std::vector<std::pair<std::string, std::map<std::string, Best>>> summary;

    for (const Shape& sh : all_shapes) {
      if (!want_shapes.empty() && !want_shapes.count(sh.name)) continue;
      lab::ProblemSpec spec;
      spec.batch = sh.batch, spec.heads_q = spec.heads_kv = 32, spec.seqlen_q = 1;
      spec.seqlen_kv = sh.seqlen_kv, spec.head_dim = 128, spec.seed = 1;
      lab::Problem prob(spec);
      std::printf("-- %s: b%d kv%d d128 h32 (inputs ready at %.1f s)\n", sh.name, sh.batch, sh.seqlen_kv,
                  elapsed());
      // The product fp16 path: the baseline of every speedup below.
      double fp16_ms = 0;
      {
        lab::AttnParams p = prob.params;
        prob.ensure_workspace(ch07::workspace_bytes(p));
        p.workspace = prob.params.workspace, p.workspace_bytes = prob.params.workspace_bytes;
        prob.poison_outputs(0);
        ch07::forward(p, 0);
        LAB_CUDA_CHECK(cudaDeviceSynchronize());
        const lab::CheckReport r = prob.check(copt);
        if (!r.ok) throw std::runtime_error(std::string("the fp16 baseline fails: ") + r.summary());
        fp16_ms = lab::time_it([&](cudaStream_t s) { ch07::forward(p, s); }, 0, topt, &flusher).median_ms;
        const double gbps = lab::attn_bytes_stored(prob.host, p.kv_quant) / (fp16_ms * 1e6);
        std::printf("%-4s %-14s %-12s %-9d %9.4f %7.0f %5.1f%% %7s  baseline (ch07::forward)\n", sh.name,
                    "fp16", "product", ch07::num_splits_for(p), fp16_ms, gbps, 100 * gbps / ceil.read_gbps,
                    "1.00x");
      }
      summary.push_back({sh.name, {}});
      for (const ch07::SchemeVariant& sv : ch07::scheme_variants()) {
        if (!want_schemes.empty() && !want_schemes.count(sv.name)) continue;
        const lab::Variant v{
            sv.name,
            ch07::forward,
            &ch07::kSupport,
            ch07::workspace_bytes,
            ch07::num_splits_for,
            sv.scheme == KvScheme::none ? nullptr : ch07::kv_prepare(sv.scheme, sv.group_size)};
        const lab::VariantInputs in = lab::prepare_variant(prob, v);  // quantizes K/V (once per scheme)
        const lab::HostProblem* ref = in.prepared ? &in.host : nullptr;
        const double bytes = lab::attn_bytes_stored(prob.host, in.params.kv_quant);
        Best& best = summary.back().second[sv.name];
        for (const Config& cf : configs_of(sv)) {
          lab::AttnParams p = in.params;
          p.num_splits = 0;
          const int autos = cf.launch(p, 0, false);
          std::vector<int> counts = {autos};
          for (int n : {autos / 2, 2 * autos})
            if (n >= 1 && n <= ch04::kMaxSplits && n != autos) counts.push_back(n);
          char config[32];
          std::snprintf(config, sizeof config, "T%d U%d H%d%s", cf.threads, cf.u, cf.hpb,
                        cf.fused ? " F" : "");
          for (size_t ci = 0; ci < counts.size(); ++ci) {
            p.num_splits = ci == 0 ? 0 : counts[ci];  // 0: the launcher's own rule
            const size_t tickets = cf.fused ? ch07::ticket_bytes(p, cf.hpb) : 0;
            prob.ensure_workspace(tickets + ch04::partials_bytes(p, counts[ci]));
            p.workspace = prob.params.workspace, p.workspace_bytes = prob.params.workspace_bytes;
            // The fused candidates' tickets start at zero (the other candidates' partials were there).
            if (tickets) LAB_CUDA_CHECK(cudaMemset(p.workspace, 0, tickets));
            char splits[16];
            std::snprintf(splits, sizeof splits, ci == 0 ? "auto=%d" : "%d", counts[ci]);
            auto run = [&](cudaStream_t s) { cf.launch(p, s, true); };
            auto check = [&]() {
              prob.poison_outputs(0);
              run(0);
              LAB_CUDA_CHECK(cudaDeviceSynchronize());
              return prob.check(cf.fused ? copt_all : copt, ref);
            };
            lab::CheckReport before;
            try {
              ch07::check_launch(p);
              before = check();
            } catch (const lab::InvalidArgument& e) {  // a refused configuration: say so, go on
              std::printf("%-4s %-14s %-12s %-9s refused: %s\n", sh.name, sv.name, config, splits, e.what());
              continue;
            }
            if (!before.ok) {
              ++failures;
              std::printf("%-4s %-14s %-12s %-9s FAIL %s\n", sh.name, sv.name, config, splits,
                          before.summary().c_str());
              continue;
            }
            const double ms = lab::time_it(run, 0, topt, &flusher).median_ms;
            const lab::CheckReport after = check();  // from poisoned outputs, after the timed runs
            if (!after.ok) ++failures;
            const double gbps = bytes / (ms * 1e6), x = fp16_ms / ms;
            const bool product = cf.product && ci == 0;
            std::printf("%-4s %-14s %-12s %-9s %9.4f %7.0f %5.1f%% %6.2fx  %s%s\n", sh.name, sv.name, config,
                        splits, ms, gbps, 100 * gbps / ceil.read_gbps, x,
                        after.ok ? "ok" : ("FAIL after timing: " + after.summary()).c_str(),
                        product ? " *" : "");
            std::fflush(stdout);
            if (!after.ok) continue;
            if (product) best.product_x = x;
            if (x > best.best_x) best.best_x = x, best.best = std::string(config) + " " + splits;
          }
        }
      }
    }

    std::printf("\nper shape and scheme: the product's speedup over fp16 (*), the best candidate's\n");
    for (const auto& [shape, schemes] : summary)
      for (const auto& [scheme, b] : schemes)
        std::printf("%-4s %-14s product %5.2fx  best %5.2fx  %s\n", shape.c_str(), scheme.c_str(),
                    b.product_x, b.best_x, b.best.c_str());
    std::printf("%d failed checks; %.1f s in all\n", failures, elapsed());
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tune07: error: %s\n", e.what());
    return 1;
  }
}
