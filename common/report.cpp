#include "common/report.h"

#include <ctime>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace lab {

void fill_rates(ResultRow& r, double gemm_tflops, double read_gbps, double copy_gbps) {
  const double s = r.ms * 1e-3;
  r.tflops = s > 0 ? r.flops / s / 1e12 : 0;
  r.gbps = s > 0 ? r.bytes / s / 1e9 : 0;
  const double ridge = (gemm_tflops * 1e12) / (read_gbps * 1e9);  // FLOPs per byte
  const bool compute = r.bytes > 0 && r.flops / r.bytes > ridge;
  r.bound = compute ? "compute" : "memory";
  r.pct_peak = compute ? 100.0 * r.tflops / gemm_tflops : 100.0 * r.gbps / read_gbps;
  r.pct_copy = copy_gbps > 0 ? 100.0 * r.gbps / copy_gbps : 0;
}

std::string shape_string(const ResultRow& r) {
  std::ostringstream s;
  s << "b" << r.batch << " h" << r.heads_q;
  if (r.heads_kv != r.heads_q) s << "/" << r.heads_kv;
  s << " sq" << r.seqlen_q << " sk" << r.seqlen_kv << " d" << r.head_dim;
  if (r.causal) s << " causal";
  if (!r.features.empty()) s << " " << r.features;
  if (r.dtype != DType::fp16) s << " " << dtype_name(r.dtype);
  return s.str();
}

void print_table(std::FILE* f, const std::string& title, const std::vector<ResultRow>& rows) {
  std::fprintf(f, "\n%s\n", title.c_str());
  std::fprintf(f, "%-24s %-32s %10s %8s %8s %7s %8s %8s  %s\n", "chapter/variant", "shape", "ms",
               "TFLOPS", "GB/s", "%peak", "vs prev", "vs base", "check");
  for (const ResultRow& r : rows) {
    std::string name = r.chapter + (r.variant.empty() ? "" : "/" + r.variant);
    char speed[16] = "-", base[16] = "-";
    if (r.speedup_prev > 0) std::snprintf(speed, sizeof speed, "%.2fx", r.speedup_prev);
    if (r.speedup_base > 0) std::snprintf(base, sizeof base, "%.2fx", r.speedup_base);
    char pct[16];
    std::snprintf(pct, sizeof pct, "%.1f%c", r.pct_peak, r.bound == "compute" ? 'C' : 'M');
    if (r.ms <= 0) {
      std::fprintf(f, "%-24s %-32s %10s %8s %8s %7s %8s %8s  %s\n", name.c_str(),
                   shape_string(r).c_str(), "-", "-", "-", "-", "-", "-", r.check.c_str());
      continue;
    }
    std::fprintf(f, "%-24s %-32s %10.4f %8.1f %8.0f %7s %8s %8s  %s\n", name.c_str(),
                 shape_string(r).c_str(), r.ms, r.tflops, r.gbps, pct, speed, base, r.check.c_str());
  }
  std::fprintf(f, "(%%peak: C = of the measured fp16 GEMM rate, M = of the measured streaming-read bandwidth; "
                  "vs prev: speedup over the row above; vs base: over the first row of the shape)\n");
  std::fflush(f);
}

namespace {
const char* kHeader =
    "workload,chapter,variant,dtype,batch,heads_q,heads_kv,seqlen_q,seqlen_kv,head_dim,causal,"
    "features,dist,splits,ms,ms_p10,ms_p90,reps,flops,bytes,tflops,gbps,pct_peak,bound,pct_copy,"
    "speedup_prev,speedup_base,max_err,rel_err,check,gpu,driver,cuda,date";

std::string csv_escape(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string o = "\"";
  for (char c : s) o += c == '"' ? std::string("\"\"") : std::string(1, c);
  return o + "\"";
}
}  // namespace

void write_csv(const std::string& path, const std::vector<ResultRow>& rows, bool append) {
  bool header = true;
  if (append) {
    std::ifstream in(path);
    header = !in.good() || in.peek() == std::ifstream::traits_type::eof();
  }
  std::ofstream out(path, append ? std::ios::app : std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path);
  if (header) out << kHeader << "\n";
  char num[512];
  for (const ResultRow& r : rows) {
    out << r.workload << "," << r.chapter << "," << r.variant << "," << dtype_name(r.dtype) << ","
        << r.batch << "," << r.heads_q << "," << r.heads_kv << "," << r.seqlen_q << "," << r.seqlen_kv
        << "," << r.head_dim << "," << (r.causal ? 1 : 0) << "," << csv_escape(r.features) << ","
        << r.dist << "," << r.splits << ",";
    std::snprintf(num, sizeof num, "%.5f,%.5f,%.5f,%d,%.6e,%.6e,%.2f,%.1f,%.2f,%s,%.2f,%.3f,%.3f,%.3e,%.3e,",
                  r.ms, r.ms_p10, r.ms_p90, r.reps, r.flops, r.bytes, r.tflops, r.gbps, r.pct_peak,
                  r.bound.c_str(), r.pct_copy, r.speedup_prev, r.speedup_base, r.max_err, r.rel_err);
    out << num << csv_escape(r.check) << "," << csv_escape(r.gpu) << "," << r.driver << "," << r.cuda
        << "," << r.date << "\n";
  }
}

std::string today_utc() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

}  // namespace lab
