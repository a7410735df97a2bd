#include "common/cli.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <climits>
#include <functional>
#include <map>
#include <sstream>

namespace lab {

namespace {

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  if (v.empty())
    throw CliError(flag + ": an empty value is not allowed (allowed: " + std::to_string(lo) + ".." +
                   std::to_string(hi) + ")");
  int64_t x = 0;
  const char* end = v.data() + v.size();
  auto [ptr, ec] = std::from_chars(v.data(), end, x);
  if (ec != std::errc() || ptr != end)
    throw CliError(flag + ": '" + v + "' is not an integer (allowed: " + std::to_string(lo) + ".." +
                   std::to_string(hi) + ")");
  if (x < lo || x > hi)
    throw CliError(flag + ": " + v + " is out of range (allowed: " + std::to_string(lo) + ".." +
                   std::to_string(hi) + ")");
  return x;
}

}  // namespace

const char* const kExitCodesHelp =
    "Exit codes: 0 ok, 1 a check failed, 2 bad input (one line naming the flag),\n"
    "            3 no usable GPU (with the CUDA runtime's reason).\n";

int64_t parse_int_flag(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  return parse_int(flag, v, lo, hi);
}

double parse_number_flag(const std::string& flag, const std::string& v, double lo, double hi) {
  std::ostringstream range;
  range << " (allowed: " << lo << ".." << hi << ")";
  const std::string allowed = range.str();
  double x = 0;
  size_t used = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size() || std::isspace(static_cast<unsigned char>(v[0])))
    throw CliError(flag + ": '" + v + "' is not a number" + allowed);
  if (!(x >= lo && x <= hi)) throw CliError(flag + ": " + v + " is out of range" + allowed);
  return x;
}

std::string parse_nonempty_flag(const std::string& flag, const std::string& v) {
  if (v.empty()) throw CliError(flag + ": an empty value is not allowed");
  return v;
}

std::string with_flag(const std::string& why) {
  // Field names as AttnParams spells them, longest first where one is a prefix of another.
  static const std::pair<const char*, const char*> fields[] = {
      {"head_dim", "--head-dim"},   {"heads_kv", "--heads-kv"},   {"heads_q", "--heads"},
      {"seqlen_q", "--seqlen-q"},   {"seqlen_kv", "--seqlen-kv"}, {"batch", "--batch"},
      {"dtype", "--dtype"},         {"causal", "--causal"},       {"alibi", "--alibi"},
      {"lse", "--lse"},             {"num_splits", "--splits"},   {"page_size", "--page-size"},
      {"max_pages_per_seq", "--page-size"}, {"num_pages", "--page-size"}, {"block_table", "--page-size"}};
  size_t best = std::string::npos;
  const char* flag = nullptr;
  for (auto [field, f] : fields) {
    const size_t at = why.find(field);
    if (at < best) best = at, flag = f;
  }
  return flag ? std::string(flag) + ": " + why : why;
}

CliOptions decode_cli_defaults() {
  CliOptions o;
  o.batch = 8, o.heads = 32, o.seqlen_q = 1, o.seqlen_kv = 4096, o.head_dim = 128;
  return o;
}

CliOptions parse_cli(const std::vector<std::string>& args, const CliOptions& defaults) {
  CliOptions o = defaults;
  constexpr int kMaxLen = 1 << 20, kMaxHeads = 1024;
  using Setter = std::function<void(const std::string&, const std::string&)>;
  auto integer = [](int& dst, int64_t lo, int64_t hi) -> Setter {
    return [&dst, lo, hi](const std::string& f, const std::string& v) { dst = int(parse_int(f, v, lo, hi)); };
  };
  std::map<std::string, Setter> with_value = {
      {"--batch", integer(o.batch, 1, 65535)},  // the kernels put batch on a grid dimension
      {"--heads", integer(o.heads, 1, kMaxHeads)},
      {"--heads-kv", integer(o.heads_kv, 1, kMaxHeads)},
      {"--seqlen-q", integer(o.seqlen_q, 1, kMaxLen)},
      {"--seqlen-kv", integer(o.seqlen_kv, 1, kMaxLen)},
      {"--seqlen", [&](const std::string& f, const std::string& v) {
         o.seqlen_q = o.seqlen_kv = int(parse_int(f, v, 1, kMaxLen));
       }},
      {"--head-dim", integer(o.head_dim, 1, 256)},
      {"--splits", integer(o.splits, 0, 1024)},
      {"--page-size", [&](const std::string& f, const std::string& v) {
         o.page_size = int(parse_int(f, v, 16, 1 << 16));
         if (o.page_size & (o.page_size - 1))
           throw CliError(f + ": " + v + " is not allowed (a power of two >= 16)");
       }},
      {"--warmup", integer(o.warmup, 0, 1000)},
      {"--iters", integer(o.iters, 1, 100000)},
      {"--dtype", [&](const std::string& f, const std::string& v) {
         if (v == "fp16") o.dtype = DType::fp16;
         else if (v == "bf16") o.dtype = DType::bf16;
         else throw CliError(f + ": '" + v + "' is not allowed (allowed: fp16, bf16)");
       }},
      {"--dist", [&](const std::string& f, const std::string& v) {
         if (!parse_dist(v, o.dist))
           throw CliError(f + ": '" + v + "' is not allowed (allowed: normal, large_logits, outliers)");
       }},
      {"--seed", [&](const std::string& f, const std::string& v) {
         o.seed = uint64_t(parse_int(f, v, 0, INT64_MAX));
       }},
      {"--csv", [&](const std::string& f, const std::string& v) { o.csv = parse_nonempty_flag(f, v); }},
      {"--variant",
       [&](const std::string& f, const std::string& v) { o.variant = parse_nonempty_flag(f, v); }},
  };
  std::map<std::string, bool*> switches = {
      {"--causal", &o.causal}, {"--alibi", &o.alibi}, {"--lse", &o.lse},
      {"--check", &o.check_all}, {"--help", &o.help}, {"-h", &o.help}};
  bool no_ceilings = false;
  switches["--no-ceilings"] = &no_ceilings;

  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i], value;
    const size_t eq = flag.find('=');
    const bool inline_value = flag.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    }
    if (auto s = switches.find(flag); s != switches.end()) {
      if (inline_value) throw CliError(flag + " takes no value");
      *s->second = true;
      continue;
    }
    auto w = with_value.find(flag);
    if (w == with_value.end()) throw CliError("unknown flag '" + flag + "' (see --help)");
    if (!inline_value) {
      if (i + 1 >= args.size() || (args[i + 1].rfind("--", 0) == 0 && args[i + 1].size() > 2 &&
                                   !std::isdigit(static_cast<unsigned char>(args[i + 1][2]))))
        throw CliError(flag + " needs a value");
      value = args[++i];
    }
    w->second(flag, value);
  }
  o.ceilings = !no_ceilings;
  if (o.help) return o;
  if (o.heads_kv == 0) o.heads_kv = o.heads;
  if (o.seqlen_kv == 0) o.seqlen_kv = o.seqlen_q;
  if (o.heads % o.heads_kv != 0)
    throw CliError("--heads-kv: " + std::to_string(o.heads_kv) + " does not divide --heads " +
                   std::to_string(o.heads) + " (heads must be a multiple of heads-kv)");
  return o;
}

std::string cli_usage(const std::string& program, const std::vector<std::string>& variants,
                      const CliOptions& d) {
  std::ostringstream s;
  s << "usage: " << program << " [flags]\n"
    << "Runs the chapter's kernel(s) on one problem: validates against the fp64 CPU reference,\n"
    << "times (median of repetitions, L2 flushed), validates again, prints a table.\n"
    << kExitCodesHelp << "\n"
    << "  --batch N          sequences (default " << d.batch << ")\n"
    << "  --heads N          query heads (" << d.heads << ")\n"
    << "  --heads-kv N       key/value heads, must divide --heads (default: --heads)\n"
    << "  --seqlen-q N       query length (" << d.seqlen_q << ")\n"
    << "  --seqlen-kv N      key/value length (default: "
    << (d.seqlen_kv ? std::to_string(d.seqlen_kv) : std::string("--seqlen-q")) << ")\n"
    << "  --seqlen N         both lengths\n"
    << "  --head-dim N       1..256, as the chapter supports (" << d.head_dim << ")\n"
    << "  --dtype T          fp16 | bf16 (fp16)\n"
    << "  --causal           causal mask, bottom-right aligned as in FlashAttention\n"
    << "  --alibi            ALiBi bias with the standard slopes\n"
    << "  --lse              also write and check the log-sum-exp\n"
    << "  --splits N         split-KV count for decoding chapters (0: heuristic)\n"
    << "  --page-size N      paged KV cache with pages of N tokens (power of two >= 16)\n"
    << "  --dist D           normal | large_logits | outliers (normal)\n"
    << "  --seed N           random seed (1)\n"
    << "  --check            check every row against the reference (default: every row when\n"
    << "                     cheap, else a seeded sample incl. first/last rows and tile edges)\n"
    << "  --warmup N         untimed runs (3)\n"
    << "  --iters N          at most N timed runs (20; fewer if they would exceed ~3 s)\n"
    << "  --csv PATH         append result rows to PATH\n"
    << "  --variant NAME     run one variant only:";
  for (const auto& v : variants) s << " " << (v.empty() ? "(default)" : v);
  s << "\n  --no-ceilings      skip measuring the read, copy and GEMM ceilings (no %peak)\n"
    << "  --help             this text\n";
  return s.str();
}

}  // namespace lab
