// Validation of a chapter's output against the fp64 reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/reference.h"

namespace lab {

// Tolerances follow from the storage precision of the output (eps = 2^-10 for fp16, 2^-7 for bf16):
//   max |out - ref| <= 8 eps * max(1, max |ref|),   ||out - ref|| / ||ref|| <= 2 eps,
//   |lse - lse_ref| <= 1e-3 (lse is fp32 and never rounded to 16 bits).
// NaN/Inf, and any element still holding the poison pattern, always fail.
struct Tolerance {
  double max_abs;  // before scaling by max(1, max |ref|)
  double rel_l2;
  double lse_abs;
};
Tolerance tolerance_for(DType t);

struct CheckOptions {
  bool all_rows = false;           // check every query row (can be slow for long sequences)
  double budget_flops = 4e9;       // otherwise: all rows if the reference costs less than this
  int sampled_rows_per_head = 12;  // ... else this many random rows per (batch, head) + edges
  int max_sampled_rows = 0;        // > 0: keep at most this many of those (always the first and last)
  uint64_t seed = 1;
};

struct CheckReport {
  bool ok = false;
  double max_abs_err = 0, rel_l2_err = 0, lse_max_err = 0, max_abs_ref = 0;
  int64_t rows_checked = 0, rows_total = 0;
  int64_t nan_or_inf = 0, unwritten = 0, lse_unwritten = 0;
  bool sampled = false;
  std::string failure;  // the first reason for failing, with the element where it happened
  std::string summary() const;  // one line: "ok  max_abs 1.2e-03 rel_l2 3.4e-04 (all 4096 rows)"
};

// `o_bits` is the downloaded output (16-bit storage, same layout as the device tensor);
// `lse` the downloaded lse (empty when the chapter did not write one).
CheckReport check_output(const HostProblem& hp, const std::vector<uint16_t>& o_bits,
                         const std::vector<float>& lse, const CheckOptions& opt);

}  // namespace lab
