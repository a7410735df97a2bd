// 07_kv_quant_table (bench/): chapter 07's table. For every scheme (07_kv_quant's step 2, kernel.cu):
//   accuracy: the decoded output against the fp64 reference on the original fp16 K/V (the
//             quantization error, as a model would see it), for normal K/V and for K/V with
//             outlier channels; and against the reference on the dequantized K/V (the kernel's
//             own error, which must pass the fp16 tolerance);
//   bytes:    stored per token and KV head, K and V, scales included;
//   speed:    decoding time at b8 kv4096, b32 kv4096 and b1 kv32768 (d 128, 32 heads), GB/s of the
//             bytes stored, % of the streaming-read ceiling measured in the same run (and of the
//             copy, pct_copy), speedup over the chapter's own fp16 variant on the same shape.
// Prints a table and writes kv_quant.csv; exits 1 if any check fails.
//
//   07_kv_quant_table [--out DIR] [--seed N] [--max-seconds S]
#include <algorithm>
#include <climits>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "07_kv_quant/kernel.h"
#include "common/cuda_check.h"
#include "common/driver.h"

namespace {

struct Accuracy {
  lab::CheckReport source, kernel;  // against the original K/V, against the dequantized K/V
};

lab::ProblemSpec decode_spec(int batch, int seqlen_kv, lab::Dist dist, uint64_t seed) {
  lab::ProblemSpec s;
  s.batch = batch, s.heads_q = s.heads_kv = 32, s.seqlen_q = 1, s.seqlen_kv = seqlen_kv, s.head_dim = 128;
  s.dist = dist, s.seed = seed;
  return s;
}

int usage(const char* why) {
  if (why) {  // one line, like every program of the lab
    std::fprintf(stderr, "07_kv_quant_table: error: %s\n", why);
    return lab::kExitBadInput;
  }
  std::printf("usage: 07_kv_quant_table [--out DIR] [--seed N] [--max-seconds S]\n"
              "  --out DIR        where kv_quant.csv goes (default: .)\n"
              "  --seed N         input seed (1)\n"
              "  --max-seconds S  timing budget per configuration (2.0)\n%s",
              lab::kExitCodesHelp);
  return lab::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir = ".";
  uint64_t seed = 1;
  double max_seconds = 2.0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    try {
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw lab::CliError(a + " needs a value");
        return argv[++i];
      };
      if (a == "--out")
        out_dir = lab::parse_nonempty_flag(a, value());
      else if (a == "--seed")
        seed = uint64_t(lab::parse_int_flag(a, value(), 0, INT64_MAX));
      else if (a == "--max-seconds")
        max_seconds = lab::parse_number_flag(a, value(), 0.01, 3600);
      else if (a == "--help" || a == "-h")
        return usage(nullptr);
      else
        throw lab::CliError("unknown flag '" + a + "' (see --help)");
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
      std::fprintf(stderr, "07_kv_quant_table: error: %s\n", lab::no_gpu_message(no_gpu).c_str());
      return lab::kExitNoGpu;
    }
    // Step 2 (kernel.cu) on every scheme, in scheme_variants() order: the ladder times step 1.
    lab::Chapter chapter = ch07::chapter();
    chapter.variants.erase(std::remove_if(chapter.variants.begin(), chapter.variants.end(),
                                          [](const lab::Variant& v) { return v.name.rfind("dequant_", 0) == 0; }),
                           chapter.variants.end());
    const lab::GpuInfo gpu = lab::gpu_info();
    std::printf("07_kv_quant_table on %s (%d SMs, CUDA %s)\n", gpu.name.c_str(), gpu.sm_count,
                gpu.cuda_runtime.c_str());
    const lab::Ceilings ceil = lab::measure_ceilings();
    std::printf("measured ceilings: read %.0f GB/s (%s), copy %.0f GB/s (read + write), fp16 GEMM %.0f TFLOPS\n",
                ceil.read_gbps, ceil.read_method.c_str(), ceil.copy_gbps, ceil.gemm_tflops);
    int failures = 0;

    // 1. Accuracy, every row of b8 h32 kv4096 d128, normal and outlier-channel K/V.
    std::map<std::string, std::map<lab::Dist, Accuracy>> acc;
    const lab::Dist dists[] = {lab::Dist::normal, lab::Dist::outliers};
    for (lab::Dist dist : dists) {
      lab::Problem prob(decode_spec(8, 4096, dist, seed));
      lab::CheckOptions opt;
      opt.all_rows = true;
      opt.seed = seed;
      for (const lab::Variant& v : chapter.variants) {
        const lab::VariantInputs in = lab::prepare_variant(prob, v);
        prob.poison_outputs(0);
        v.forward(in.params, 0);
        LAB_CUDA_CHECK(cudaDeviceSynchronize());
        Accuracy a;
        a.source = prob.check(opt);
        a.kernel = in.prepared ? prob.check(opt, &in.host) : a.source;
        if (!a.kernel.ok) ++failures;
        std::printf("accuracy %-8s %-14s vs fp16 K/V: rel_l2 %.2e max_abs %.2e | vs the K/V it reads: %s\n",
                    lab::dist_name(dist), v.name.c_str(), a.source.rel_l2_err, a.source.max_abs_err,
                    a.kernel.summary().c_str());
        acc[v.name][dist] = a;
      }
    }

    // 2. Speed: checked (sampled rows), timed with L2 flushed, checked again (run_variant).
    lab::RunOptions ro;
    ro.timing.warmup = 3;
    ro.timing.iters = 50;
    ro.timing.min_iters = 5;
    ro.timing.max_seconds = max_seconds;
    ro.check.sampled_rows_per_head = 2;
    ro.check.max_sampled_rows = 160;
    ro.check.seed = seed;
    lab::L2Flusher flusher;
    struct Row {
      lab::ResultRow r;
      std::string scheme;
      int group = 0;
      double kv_bytes_per_token_head = 0, speedup = 0;
      std::string target;
    };
    std::vector<Row> rows;
    const std::pair<int, int> shapes[] = {{8, 4096}, {32, 4096}, {1, 32768}};
    for (auto [batch, kv] : shapes) {
      lab::Problem prob(decode_spec(batch, kv, lab::Dist::normal, seed));
      double fp16_ms = 0;
      for (size_t vi = 0; vi < chapter.variants.size(); ++vi) {
        const lab::Variant& v = chapter.variants[vi];
        const ch07::SchemeVariant& sv = ch07::scheme_variants()[vi];
        lab::RunOutcome o = lab::run_variant(prob, chapter.name, v, ro, ceil, gpu, &flusher, "decode");
        if (o.skipped) throw std::runtime_error(v.name + " was skipped: " + o.message);
        if (!o.ok) ++failures;
        Row row;
        row.r = o.row;
        lab::KvQuant kq;
        kq.scheme = sv.scheme, kq.group_size = sv.group_size;
        row.scheme = lab::kv_scheme_name(sv.scheme);
        row.group = sv.group_size;
        // K and V, per token and KV head, as stored: codes (or fp16 values) and scales.
        const double element_bytes = sv.scheme == lab::KvScheme::none ? 2.0 : 1.0;
        row.kv_bytes_per_token_head =
            2.0 * (prob.params.head_dim * element_bytes + lab::kv_scale_bytes_per_token_head(prob.host, kq));
        if (v.name == "fp16" && o.ok) fp16_ms = o.row.ms;
        if (o.ok && fp16_ms > 0) row.speedup = fp16_ms / o.row.ms;
        // The chapter's targets (batch >= 8, 4k keys and more): every quantized scheme 1.8x the fp16
        // variant; the fp16 variant itself at 95% of the read ceiling (pct_peak of a memory-bound row).
        if (batch >= 8 && kv >= 4096)
          row.target = o.ok && (v.name == "fp16" ? o.row.pct_peak >= 95.0 : row.speedup >= 1.8) ? "met" : "missed";
        std::printf("speed b%-3d kv%-6d %-14s %9.4f ms %7.0f GB/s %5.1f%% of read  %5.2fx fp16  %s %s\n",
                    batch, kv, v.name.c_str(), o.row.ms, o.row.gbps, o.row.pct_peak, row.speedup,
                    o.row.check.c_str(), row.target.c_str());
        if (!o.ok) std::printf("  %s\n", o.message.c_str());
        rows.push_back(row);
      }
    }

    // 3. The table for people, and the CSV the README's tables are drawn from.
    std::printf("\n%-14s %9s | %-19s | %-19s | %-9s | %s\n", "scheme", "B/tok/hd", "normal rel/max",
                "outliers rel/max", "kernel", "b8 kv4k: GB/s, %read, vs fp16");
    for (const Row& row : rows) {
      if (row.r.batch != 8) continue;
      const auto& a = acc[row.r.variant];
      std::printf("%-14s %9.2f | %.2e / %.2e | %.2e / %.2e | %.2e | %.0f, %.1f%%, %.2fx %s\n",
                  row.r.variant.c_str(), row.kv_bytes_per_token_head,
                  a.at(lab::Dist::normal).source.rel_l2_err, a.at(lab::Dist::normal).source.max_abs_err,
                  a.at(lab::Dist::outliers).source.rel_l2_err, a.at(lab::Dist::outliers).source.max_abs_err,
                  a.at(lab::Dist::normal).kernel.rel_l2_err, row.r.gbps, row.r.pct_peak, row.speedup,
                  row.target.c_str());
    }
    const std::string path = out_dir + "/kv_quant.csv";
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) throw std::runtime_error("cannot write " + path);
    std::fprintf(
        f,
        "chapter,variant,scheme,group_size,dtype,batch,heads_q,heads_kv,seqlen_q,seqlen_kv,head_dim,causal,"
        "kv_bytes_per_token_head,splits,ms,ms_p10,ms_p90,reps,tflops,gbps,pct_peak,speedup_vs_fp16,target,"
        "max_err,rel_err,check,quant_rel_l2_normal,quant_max_abs_normal,quant_rel_l2_outliers,"
        "quant_max_abs_outliers,kernel_rel_l2_normal,kernel_max_abs_normal,kernel_rel_l2_outliers,"
        "kernel_max_abs_outliers,pct_copy,read_gbps,copy_gbps,gpu,driver,cuda,date\n");
    for (const Row& row : rows) {
      const lab::ResultRow& r = row.r;
      const auto& a = acc[r.variant];
      const Accuracy &n = a.at(lab::Dist::normal), &o = a.at(lab::Dist::outliers);
      std::fprintf(
          f,
          "%s,%s,%s,%d,%s,%d,%d,%d,%d,%d,%d,%d,%.4f,%d,%.5f,%.5f,%.5f,%d,%.4f,%.1f,%.2f,%.3f,%s,%.3e,%.3e,%s,"
          "%.3e,%.3e,%.3e,%.3e,%.3e,%.3e,%.3e,%.3e,%.2f,%.1f,%.1f,%s,%s,%s,%s\n",
          r.chapter.c_str(), r.variant.c_str(), row.scheme.c_str(), row.group, lab::dtype_name(r.dtype),
          r.batch, r.heads_q, r.heads_kv, r.seqlen_q, r.seqlen_kv, r.head_dim, int(r.causal),
          row.kv_bytes_per_token_head, r.splits, r.ms, r.ms_p10, r.ms_p90, r.reps, r.tflops, r.gbps,
          r.pct_peak, row.speedup, row.target.c_str(), r.max_err, r.rel_err, r.check.c_str(),
          n.source.rel_l2_err, n.source.max_abs_err, o.source.rel_l2_err, o.source.max_abs_err,
          n.kernel.rel_l2_err, n.kernel.max_abs_err, o.kernel.rel_l2_err, o.kernel.max_abs_err,
          r.pct_copy, ceil.read_gbps, ceil.copy_gbps, r.gpu.c_str(), r.driver.c_str(), r.cuda.c_str(),
          r.date.c_str());
    }
    std::fclose(f);
    int met = 0, missed = 0;
    for (const Row& row : rows) met += row.target == "met", missed += row.target == "missed";
    std::printf(
        "\nspeed targets (batch >= 8, KV >= 4096: every scheme >= 1.8x fp16, fp16 >= 95%% of the read ceiling): "
        "%d met, %d missed\n", met,
        missed);
    std::printf("%zu rows in %s; %d failed checks\n", rows.size(), path.c_str(), failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "07_kv_quant_table: error: %s\n", e.what());
    return 1;
  }
}
