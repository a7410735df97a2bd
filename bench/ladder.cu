// The ladder: every chapter over the standard shape grids (README "How to read the numbers"), in one process, on one GPU.
// Each configuration is validated against the fp64 reference (sampled rows: every edge row of the
// first and last (batch, head) plus random rows), timed (median, L2 flushed), run and validated
// again from poisoned outputs; results print as one table per workload and go to CSV.
//
//   ladder [--grid prefill|decode|all] [--quick] [--only CH[,CH...]] [--out DIR] [--max-seconds S]
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

// Chapters left out of this build (their architecture minimum, see add_chapter) are left out here.
#if LAB_HAVE_01_NAIVE
#include "01_naive/kernel.h"
#endif
#if LAB_HAVE_02_FLASH_V1
#include "02_flash_v1/kernel.h"
#endif
#if LAB_HAVE_03_FLASH_V2
#include "03_flash_v2/kernel.h"
#endif
#if LAB_HAVE_04_FLASH_DECODING
#include "04_flash_decoding/kernel.h"
#endif
#if LAB_HAVE_05_DECODING_CUDA_CORE
#include "05_decoding_cuda_core/kernel.h"
#endif
#if LAB_HAVE_06_GQA_ALIBI
#include "06_gqa_alibi/kernel.h"
#endif
#if LAB_HAVE_07_KV_QUANT
#include "07_kv_quant/kernel.h"
#endif
#if LAB_HAVE_08_FLASH_V3
#include "08_flash_v3/kernel.h"
#endif
#include "common/cuda_check.h"
#include "common/device.h"
#include "common/driver.h"

namespace {

// Ladder order: the unfused library baseline first, then each chapter's steps. 07's variants
// (fp16, then every quantized KV scheme) decode only; their GB/s count the bytes they store.
std::vector<lab::Chapter> all_chapters() {
  std::vector<lab::Chapter> all;
#if LAB_HAVE_01_NAIVE
  lab::Chapter c01 = ch01::chapter();
  std::reverse(c01.variants.begin(), c01.variants.end());  // cublas, then naive
  all.push_back(c01);
#endif
#if LAB_HAVE_02_FLASH_V1
  all.push_back(ch02::chapter());
#endif
#if LAB_HAVE_03_FLASH_V2
  all.push_back(ch03::chapter());
#endif
#if LAB_HAVE_04_FLASH_DECODING
  all.push_back(ch04::chapter());
#endif
#if LAB_HAVE_05_DECODING_CUDA_CORE
  all.push_back(ch05::chapter());
#endif
#if LAB_HAVE_06_GQA_ALIBI
  all.push_back(ch06::chapter());
#endif
#if LAB_HAVE_07_KV_QUANT
  all.push_back(ch07::chapter());
#endif
#if LAB_HAVE_08_FLASH_V3
  // Hopper only (sm_90a code): on another GPU it would refuse every shape, so it is left out.
  const lab::DeviceLimits& d = lab::device_limits();
  const std::string why = ch08::device_reason(d.cc_major, d.cc_minor);
  if (why.empty()) all.push_back(ch08::chapter());
  else std::printf("08_flash_v3 left out: %s\n", why.c_str());
#endif
  return all;
}

struct Config {
  std::string workload, group;  // group: the table it belongs to, e.g. "prefill d128 causal"
  lab::ProblemSpec spec;
  std::vector<std::string> chapters;  // empty: every chapter; else only these (by directory name)
};

// FlashAttention's benchmark grid: fp16, hidden 2048 (heads = 2048 / d), d in {64, 128},
// seqlen 512..16k with batch = 16k / seqlen, causal and not.
std::vector<Config> prefill_grid(bool quick) {
  std::vector<Config> out;
  for (int d : {64, 128})
    for (bool causal : {false, true})
      for (int s : {512, 1024, 2048, 4096, 8192, 16384}) {
        if (quick && s != 1024 && s != 4096) continue;
        Config c;
        c.workload = "prefill";
        c.group = "prefill d" + std::to_string(d) + (causal ? " causal" : " full");
        c.spec.batch = 16384 / s, c.spec.heads_q = c.spec.heads_kv = 2048 / d;
        c.spec.seqlen_q = c.spec.seqlen_kv = s, c.spec.head_dim = d, c.spec.causal = causal;
        out.push_back(c);
      }
  // bf16 at the headline shapes: the same kernels, the other 16-bit input type.
  for (int d : {64, 128})
    for (bool causal : {false, true}) {
      Config c;
      c.workload = "prefill";
      c.group = "prefill bf16";
      c.spec.batch = 4, c.spec.heads_q = c.spec.heads_kv = 2048 / d, c.spec.seqlen_q = c.spec.seqlen_kv = 4096;
      c.spec.head_dim = d, c.spec.causal = causal, c.spec.dtype = lab::DType::bf16;
      out.push_back(c);
    }
  return out;
}

// Decode: one query token per sequence against a KV cache; 32 query heads, d = 128, MHA and GQA 32/8.
std::vector<Config> decode_grid(bool quick) {
  std::vector<Config> out;
  const std::pair<int, int> batch_kv[] = {{1, 1024}, {1, 8192},   {1, 32768}, {8, 4096},
                                          {32, 4096}, {128, 1024}, {128, 4096}, {64, 16384}};
  for (int hkv : {32, 8})
    for (auto [b, kv] : batch_kv) {
      if (quick && !((b == 1 && kv == 32768) || (b == 8 && kv == 4096))) continue;
      Config c;
      c.workload = "decode";
      c.group = std::string("decode ") + (hkv == 32 ? "MHA 32/32" : "GQA 32/8");
      c.spec.batch = b, c.spec.heads_q = 32, c.spec.heads_kv = hkv, c.spec.seqlen_q = 1;
      c.spec.seqlen_kv = kv, c.spec.head_dim = 128;
      out.push_back(c);
    }
  return out;
}

// The KV cache as engines keep it: pages in shuffled order (page sizes 16..256, against the
// contiguous rows of the decode grid), and the split count swept around the heuristic's choice.
// Chapters without paged KV or split-KV refuse these shapes and are skipped.
std::vector<Config> decode_cache_grid(bool quick) {
  std::vector<Config> out;
  const std::pair<int, int> batch_kv[] = {{1, 32768}, {8, 4096}, {32, 4096}};
  for (auto [b, kv] : batch_kv)
    for (int page : {16, 64, 256}) {
      if (quick && page != 64) continue;
      Config c;
      c.workload = "decode_paged";
      c.group = "decode paged MHA 32/32";
      c.spec.batch = b, c.spec.heads_q = c.spec.heads_kv = 32, c.spec.seqlen_q = 1;
      c.spec.seqlen_kv = kv, c.spec.head_dim = 128, c.spec.page_size = page;
      c.chapters = {"04_flash_decoding", "05_decoding_cuda_core"};
      out.push_back(c);
    }
  for (auto [b, kv] : {std::pair<int, int>{1, 32768}, {8, 4096}})
    for (int splits : {1, 2, 4, 8, 16, 32, 64, 128}) {
      if (quick && splits != 1 && splits != 16) continue;
      Config c;
      c.workload = "decode_splits";
      c.group = "decode splits MHA 32/32";
      c.spec.batch = b, c.spec.heads_q = c.spec.heads_kv = 32, c.spec.seqlen_q = 1;
      c.spec.seqlen_kv = kv, c.spec.head_dim = 128, c.spec.num_splits = splits;
      c.chapters = {"04_flash_decoding", "05_decoding_cuda_core"};
      out.push_back(c);
    }
  return out;
}

// GQA and ALiBi in prefill: d 128, seqlen 4096, 32 query heads, against MHA at the same heads_q
// (chapters 03 and 06; others refuse ALiBi and are skipped).
std::vector<Config> prefill_gqa_grid(bool quick) {
  std::vector<Config> out;
  for (bool causal : {false, true})
    for (int hkv : {32, 8, 1})
      for (bool alibi : {false, true}) {
        if (quick && (hkv == 1 || causal)) continue;
        Config c;
        c.workload = "prefill_gqa";
        c.group = std::string("prefill GQA/ALiBi d128 s4096") + (causal ? " causal" : " full");
        c.spec.batch = 2, c.spec.heads_q = 32, c.spec.heads_kv = hkv, c.spec.seqlen_q = c.spec.seqlen_kv = 4096;
        c.spec.head_dim = 128, c.spec.causal = causal, c.spec.alibi = alibi;
        c.chapters = {"03_flash_v2", "06_gqa_alibi"};
        out.push_back(c);
      }
  return out;
}

std::string short_shape(const lab::ProblemSpec& s) {
  std::ostringstream o;
  o << "d" << s.head_dim << " b" << s.batch << " h" << s.heads_q;
  if (s.heads_kv != s.heads_q) o << "/" << s.heads_kv;
  o << " sq" << s.seqlen_q << " sk" << s.seqlen_kv << (s.causal ? " causal" : "");
  if (s.page_size) o << " page" << s.page_size;
  if (s.alibi) o << " alibi";
  if (s.num_splits) o << " splits" << s.num_splits;
  return o.str();
}

int usage(const char* why) {
  if (why) {  // one line, like every program of the lab
    std::fprintf(stderr, "ladder: error: %s\n", why);
    return lab::kExitBadInput;
  }
  std::printf("usage: ladder [--grid prefill|decode|all] [--quick] [--only CH[,CH...]] [--out DIR]\n"
              "              [--max-seconds S] [--seed N]\n"
              "  --grid         which grid (all)\n"
              "  --quick        two shapes per table instead of the whole grid\n"
              "  --only         chapters to run, by directory name (default: every chapter)\n"
              "  --out DIR      where ladder.csv and ceilings.csv go (default: .)\n"
              "  --max-seconds  timing budget per configuration (1.0)\n"
              "  --seed N       input seed (1)\n%s",
              lab::kExitCodesHelp);
  return lab::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  std::string grid = "all", out_dir = ".", only;
  bool quick = false;
  double max_seconds = 1.0;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw lab::CliError(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--grid") {
        grid = value();
        if (grid != "prefill" && grid != "decode" && grid != "all")
          throw lab::CliError("--grid: '" + grid + "' is not allowed (allowed: prefill, decode, all)");
      } else if (a == "--quick") quick = true;
      else if (a == "--only") {
        // Every name must be a chapter of this build: a typo would otherwise run nothing and pass.
        const std::string list = lab::parse_nonempty_flag(a, value());
        std::vector<std::string> known;
        std::string allowed;
        for (auto& ch : all_chapters())
          known.push_back(ch.name), allowed += (allowed.empty() ? "" : ", ") + ch.name;
        std::stringstream names(list + ",");
        for (std::string n; std::getline(names, n, ',');)
          if (std::find(known.begin(), known.end(), n) == known.end())
            throw lab::CliError("--only: '" + n + "' is not a chapter of this build (allowed: " + allowed +
                                ")");
        only = "," + list + ",";
      } else if (a == "--out") out_dir = lab::parse_nonempty_flag(a, value());
      else if (a == "--max-seconds") max_seconds = lab::parse_number_flag(a, value(), 0.01, 3600);
      else if (a == "--seed") seed = uint64_t(lab::parse_int_flag(a, value(), 0, INT64_MAX));
      else if (a == "--help" || a == "-h") return usage(nullptr);
      else throw lab::CliError("unknown flag '" + a + "' (see --help)");
    } catch (const std::exception& e) {
      return usage(e.what());
    }
  }
  try {
    lab::check_writable("--out", out_dir, true);
  } catch (const std::exception& e) {
    return usage(e.what());
  }

  try {
    std::string no_gpu;
    if (lab::gpu_state(&no_gpu) != lab::GpuState::present) {
      std::fprintf(stderr, "ladder: error: %s\n", lab::no_gpu_message(no_gpu).c_str());
      return lab::kExitNoGpu;
    }
    const lab::GpuInfo gpu = lab::gpu_info();
    std::printf("ladder on %s (%d SMs, %.0f MB L2, CUDA %s)\n", gpu.name.c_str(), gpu.sm_count,
                gpu.l2_bytes / 1e6, gpu.cuda_runtime.c_str());
    const lab::Ceilings ceil = lab::measure_ceilings();
    std::printf("measured ceilings: read %.0f GB/s (%zu MiB, %s), copy %.0f GB/s (read + write), fp16 GEMM "
                "%.1f TFLOPS (%d^3)\n",
                ceil.read_gbps, ceil.read_bytes >> 20, ceil.read_method.c_str(), ceil.copy_gbps, ceil.gemm_tflops,
                ceil.gemm_n);
    {
      FILE* f = std::fopen((out_dir + "/ceilings.csv").c_str(), "w");
      if (!f) throw std::runtime_error("cannot write " + out_dir + "/ceilings.csv");
      std::fprintf(f, "gpu,driver,cuda,date,read_gbps,read_bytes,read_ms,read_method,copy_gbps,copy_bytes,copy_ms,"
                      "gemm_tflops,gemm_n,gemm_ms\n");
      std::fprintf(f, "%s,%s,%s,%s,%.1f,%zu,%.4f,%s,%.1f,%zu,%.4f,%.1f,%d,%.4f\n", gpu.name.c_str(),
                   gpu.driver.c_str(), gpu.cuda_runtime.c_str(), lab::today_utc().c_str(), ceil.read_gbps,
                   ceil.read_bytes, ceil.read_ms, ceil.read_method.c_str(), ceil.copy_gbps, ceil.copy_bytes,
                   ceil.copy_ms, ceil.gemm_tflops, ceil.gemm_n, ceil.gemm_ms);
      std::fclose(f);
    }

    std::vector<Config> configs;
    if (grid != "decode") for (auto& c : prefill_grid(quick)) configs.push_back(c);
    if (grid != "prefill") for (auto& c : decode_grid(quick)) configs.push_back(c);
    if (grid != "decode") for (auto& c : prefill_gqa_grid(quick)) configs.push_back(c);
    if (grid != "prefill") for (auto& c : decode_cache_grid(quick)) configs.push_back(c);
    std::vector<lab::Chapter> chapters;
    for (auto& ch : all_chapters())
      if (only.empty() || only.find("," + ch.name + ",") != std::string::npos) chapters.push_back(ch);
    // 07's KV cache schemes (both steps on each: 17 variants) are timed by its own table program
    // (bench/gpu_check.sh kvquant, docs/results/<gpu>/kv_quant.csv, step 2 only); the ladder runs
    // them only when asked (--only 07_kv_quant).
    auto runs = [&](const Config& c, const lab::Chapter& ch) {
      if (ch.name == "07_kv_quant" && only.empty()) return false;
      return c.chapters.empty() || std::find(c.chapters.begin(), c.chapters.end(), ch.name) != c.chapters.end();
    };
    size_t total = 0;
    for (auto& c : configs)
      for (auto& ch : chapters)
        if (runs(c, ch)) total += ch.variants.size();

    lab::RunOptions ro;
    ro.timing.warmup = 2;
    ro.timing.iters = 30;
    ro.timing.min_iters = 3;
    ro.timing.max_seconds = max_seconds;
    ro.check.sampled_rows_per_head = 2;
    ro.check.max_sampled_rows = 160;
    lab::L2Flusher flusher;
    std::printf("L2 flush before each repetition: %s 2x L2\n", flusher.method());

    std::vector<lab::ResultRow> rows;
    std::map<std::string, std::vector<lab::ResultRow>> tables;
    std::vector<std::string> table_order;
    size_t step = 0;
    int failures = 0;
    const auto t_start = std::chrono::steady_clock::now();
    for (const Config& c : configs) {
      lab::ProblemSpec spec = c.spec;
      spec.seed = seed + step;
      lab::Problem prob(spec);
      ro.check.seed = spec.seed;
      double prev_ms = 0, base_ms = 0;
      for (const lab::Chapter& ch : chapters)
        for (const lab::Variant& v : ch.variants) {
          if (!runs(c, ch)) continue;
          ++step;
          const std::string name = ch.name + (v.name.empty() ? "" : "/" + v.name);
          const double elapsed =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
          std::printf("[%zu/%zu %4.0fs] %-22s %-36s ", step, total, elapsed, name.c_str(),
                      short_shape(spec).c_str());
          std::fflush(stdout);
          lab::RunOutcome r;
          try {
            r = lab::run_variant(prob, ch.name, v, ro, ceil, gpu, &flusher, c.workload);
          } catch (const lab::CudaError& e) {
            // Out of memory for a naive chapter's S at the longest sequences, for example.
            cudaGetLastError();
            r.skipped = true;
            r.message = e.what();
          }
          if (r.skipped) {
            std::printf("skipped: %s\n", r.message.c_str());
            prev_ms = 0;
            continue;
          }
          if (!r.ok) {
            ++failures;
            std::printf("FAILED: %s\n", r.message.c_str());
          } else {
            std::printf("%9.4f ms %7.1f TFLOPS %6.0f GB/s  %s\n", r.row.ms, r.row.tflops, r.row.gbps,
                        r.row.check.c_str());
          }
          // vs prev: the row just above, only if it ran and passed; vs base: the cuBLAS baseline.
          if (r.ok && prev_ms > 0) r.row.speedup_prev = prev_ms / r.row.ms;
          if (r.ok && ch.name == "01_naive" && v.name == "cublas") base_ms = r.row.ms;
          if (r.ok && base_ms > 0) r.row.speedup_base = base_ms / r.row.ms;
          prev_ms = r.ok ? r.row.ms : 0;
          rows.push_back(r.row);
          if (!tables.count(c.group)) table_order.push_back(c.group);
          tables[c.group].push_back(r.row);
          lab::write_csv(out_dir + "/ladder.csv", {r.row}, rows.size() > 1);
        }
    }
    // Hybrid batches (06): 32 sequences with 4096 keys of context, GQA 32/8, d 128, causal. n_pre of
    // them bring a 512-token prefill chunk, the rest one decode token. One varlen launch serves them
    // all; against it, the prefill part and the decode part as two launches of the same kernel.
    const bool hybrid = grid != "prefill" &&
                        std::any_of(chapters.begin(), chapters.end(), [](auto& ch) { return ch.name == "06_gqa_alibi"; });
#if LAB_HAVE_06_GQA_ALIBI
    for (int n_pre : {0, 2, 4, 8, 16, 32}) {
      if (!hybrid || (quick && n_pre != 4)) continue;
      const int n = 32, q_pre = 512, kv = 4096;
      lab::ProblemSpec hs;
      hs.heads_q = 32, hs.heads_kv = 8, hs.head_dim = 128, hs.causal = true, hs.seed = seed + 900 + n_pre;
      for (int i = 0; i < n; ++i) hs.varlen_q.push_back(i < n_pre ? q_pre : 1), hs.varlen_kv.push_back(kv);
      lab::Problem hy(hs);
      ro.check.seed = hs.seed;
      lab::Variant one = ch06::chapter().variants.back();  // the final step
      one.name = "one_launch";
      const std::string frac = "prefill" + std::to_string(n_pre) + "/" + std::to_string(n);
      std::printf("[hybrid] 06_gqa_alibi one launch, %s       ", frac.c_str());
      lab::RunOutcome r = lab::run_variant(hy, "06_gqa_alibi", one, ro, ceil, gpu, &flusher, "hybrid");
      r.row.features += "+" + frac;
      std::printf("%9.4f ms  %s\n", r.row.ms, r.ok ? r.row.check.c_str() : r.message.c_str());
      if (!r.ok) ++failures;
      rows.push_back(r.row);
      if (!tables.count("hybrid")) table_order.push_back("hybrid");
      tables["hybrid"].push_back(r.row);
      lab::write_csv(out_dir + "/ladder.csv", {r.row}, true);
      if (n_pre == 0 || n_pre == n || !r.ok) continue;

      // The same sequences as two batches, launched back to back (each checked on its own first).
      lab::ProblemSpec ps = hs, ds = hs;
      ps.varlen_q.clear(), ps.varlen_kv.clear(), ds.varlen_q.clear(), ds.varlen_kv.clear();
      ps.batch = n_pre, ps.seqlen_q = q_pre, ps.seqlen_kv = kv, ps.seed = hs.seed + 1;
      ds.batch = n - n_pre, ds.seqlen_q = 1, ds.seqlen_kv = kv, ds.seed = hs.seed + 2;
      lab::Problem pp(ps), dp(ds);
      const lab::Chapter c06 = ch06::chapter();
      const lab::Variant& v = c06.variants.back();
      pp.ensure_workspace(v.workspace(pp.params));
      dp.ensure_workspace(v.workspace(dp.params));
      auto both = [&](cudaStream_t st) { v.forward(pp.params, st); v.forward(dp.params, st); };
      pp.poison_outputs(0), dp.poison_outputs(0);
      both(0);
      LAB_CUDA_CHECK(cudaDeviceSynchronize());
      const lab::CheckReport cp = pp.check(ro.check), cd = dp.check(ro.check);
      lab::ResultRow two = r.row;
      two.variant = "two_launches";
      two.check = cp.ok && cd.ok ? "PASS sampled" : "FAIL";
      two.max_err = std::max(cp.max_abs_err, cd.max_abs_err);
      two.rel_err = std::max(cp.rel_l2_err, cd.rel_l2_err);
      const lab::Timing tm = lab::time_it(both, 0, ro.timing, &flusher);
      two.ms = tm.median_ms, two.ms_p10 = tm.p10_ms, two.ms_p90 = tm.p90_ms, two.reps = tm.reps;
      lab::fill_rates(two, ceil.gemm_tflops, ceil.read_gbps, ceil.copy_gbps);
      two.speedup_prev = r.row.ms / two.ms;  // vs the one launch above: < 1 means one launch wins
      std::printf("[hybrid] 06_gqa_alibi two launches, %s      %9.4f ms  %s (one launch: %.2fx)\n", frac.c_str(),
                  two.ms, two.check.c_str(), two.ms / r.row.ms);
      if (!(cp.ok && cd.ok)) ++failures;
      rows.push_back(two);
      tables["hybrid"].push_back(two);
      lab::write_csv(out_dir + "/ladder.csv", {two}, true);
    }
#else
    (void)hybrid;
#endif

    for (const std::string& g : table_order) lab::print_table(stdout, g, tables[g]);
    std::printf("\nceilings: read %.0f GB/s, copy %.0f GB/s, fp16 GEMM %.1f TFLOPS; %zu rows in %s/ladder.csv; "
                "%d failed\n",
                ceil.read_gbps, ceil.copy_gbps, ceil.gemm_tflops, rows.size(), out_dir.c_str(), failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ladder: error: %s\n", e.what());
    return 1;
  }
}
