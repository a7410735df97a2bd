// Results: one row per timed configuration; CSV first, tables for people drawn from the same rows.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "common/attn.h"

namespace lab {

struct ResultRow {
  std::string workload;  // "prefill", "decode", ...
  std::string chapter, variant;
  DType dtype = DType::fp16;
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  bool causal = false;
  std::string features;  // e.g. "alibi", "paged64", "varlen"; empty for plain attention
  std::string dist = "normal";
  int splits = 0;
  double ms = 0, ms_p10 = 0, ms_p90 = 0;
  int reps = 0;
  double flops = 0, bytes = 0;
  double tflops = 0, gbps = 0, pct_peak = 0;
  std::string bound;    // "compute" (pct_peak of the GEMM ceiling) or "memory" (of the read ceiling)
  double pct_copy = 0;  // gbps as % of the copy ceiling (read + write), for comparison with older runs
  double speedup_prev = 0;  // over the row before it in the ladder, same shape (0: none)
  double speedup_base = 0;  // over the ladder's first row for this shape (the cuBLAS baseline)
  double max_err = 0, rel_err = 0;
  std::string check;  // "PASS all", "PASS sampled", "FAIL ..."
  std::string gpu, driver, cuda, date;
};

// Fills tflops, gbps, pct_peak, bound and pct_copy from ms, flops, bytes and the measured ceilings
// (common/measure.h): a problem whose FLOPs per byte exceed GEMM rate / read bandwidth is
// compute-bound (pct_peak of the GEMM rate), otherwise memory-bound (pct_peak of the streaming
// read: the bytes are read once and the little written is counted too). pct_copy: 0 without a copy.
void fill_rates(ResultRow& r, double gemm_tflops, double read_gbps, double copy_gbps = 0);

std::string shape_string(const ResultRow& r);  // "b4 h16/16 sq4096 sk4096 d128 causal"
void print_table(std::FILE* f, const std::string& title, const std::vector<ResultRow>& rows);
// Writes rows as CSV; appends (without a header) when `append` and the file is not empty.
void write_csv(const std::string& path, const std::vector<ResultRow>& rows, bool append);
std::string today_utc();

}  // namespace lab
