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

// Throws CliError("--head-dim: 0 is out of range (allowed: 1..256)") and the like. `defaults`: the
// values of flags not given (decode chapters start from decode_cli_defaults()).
CliOptions parse_cli(const std::vector<std::string>& args, const CliOptions& defaults = CliOptions());
std::string cli_usage(const std::string& program, const std::vector<std::string>& variants,
                      const CliOptions& defaults = CliOptions());
// One query token per sequence against a 4096-token cache: b8 h32 d128 (the decode grid's shape).
CliOptions decode_cli_defaults();

// The value parsers every program of the lab uses (chapters, ladder, 07's table), so that all
// refuse alike: CliError("FLAG: 'VALUE' is ...", naming the flag).
int64_t parse_int_flag(const std::string& flag, const std::string& v, int64_t lo, int64_t hi);
double parse_number_flag(const std::string& flag, const std::string& v, double lo, double hi);
std::string parse_nonempty_flag(const std::string& flag, const std::string& v);
// The exit codes, as --help prints them.
extern const char* const kExitCodesHelp;
// A support check's reason ("03_flash_v2: head_dim = 96 is not supported ...") prefixed with the
// command-line flag of the field it names ("--head-dim: ..."); unchanged if it names none.
std::string with_flag(const std::string& why);

}  // namespace lab
