// The command line every chapter shares. Bad input exits with code 2 and one line naming the flag.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/attn.h"
#include "common/fill.h"

namespace lab {

struct CliError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CliOptions {
  int batch = 4, heads = 16, heads_kv = 0, seqlen_q = 1024, seqlen_kv = 0, head_dim = 128;
  DType dtype = DType::fp16;
  bool causal = false;
  bool alibi = false;
  bool lse = false;
  int splits = 0;
  int page_size = 0;
  Dist dist = Dist::normal;
  uint64_t seed = 1;
  bool check_all = false;
  int warmup = 3, iters = 20;
  std::string csv;
  std::string variant;
  bool ceilings = true;
  bool help = false;
};

// Throws CliError("--head-dim: 0 is out of range (allowed: 1..256)") and the like.
CliOptions parse_cli(const std::vector<std::string>& args);
std::string cli_usage(const std::string& program, const std::vector<std::string>& variants);

}  // namespace lab
