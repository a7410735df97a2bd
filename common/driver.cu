#include <unistd.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "common/cuda_check.h"
#include "common/driver.h"

namespace lab {

Problem::Problem(const ProblemSpec& s, cudaStream_t stream) : spec_(s) {
  AttnParams& p = params;
  p.dtype = s.dtype;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.head_dim = s.head_dim;
  p.causal = s.causal;
  p.softmax_scale = s.softmax_scale > 0 ? s.softmax_scale : 1.f / std::sqrt(float(s.head_dim));
  p.num_splits = s.num_splits;
  host.shape = p;

  const bool varlen = !s.varlen_q.empty();
  if (varlen) {
    if (s.varlen_kv.size() != s.varlen_q.size())
      throw InvalidArgument("ProblemSpec: varlen_q and varlen_kv must have the same length");
    p.batch = int(s.varlen_q.size());
    host.cu_seqlens_q.assign(1, 0);
    host.cu_seqlens_kv.assign(1, 0);
    for (int b = 0; b < p.batch; ++b) {
      host.cu_seqlens_q.push_back(host.cu_seqlens_q.back() + s.varlen_q[b]);
      host.cu_seqlens_kv.push_back(host.cu_seqlens_kv.back() + s.varlen_kv[b]);
    }
    p.seqlen_q = *std::max_element(s.varlen_q.begin(), s.varlen_q.end());
    p.seqlen_kv = *std::max_element(s.varlen_kv.begin(), s.varlen_kv.end());
  } else {
    p.batch = s.batch;
    p.seqlen_q = s.seqlen_q;
    p.seqlen_kv = s.seqlen_kv;
  }
  if (!s.cache_seqlens.empty()) {
    if (int(s.cache_seqlens.size()) != p.batch)
      throw InvalidArgument("ProblemSpec: cache_seqlens needs one length per sequence");
    host.cache_seqlens = s.cache_seqlens;
  }
  if (s.page_size > 0) {
    p.page_size = s.page_size;
    p.max_pages_per_seq = (p.seqlen_kv + s.page_size - 1) / s.page_size;
    const int64_t page_count = int64_t(p.batch) * p.max_pages_per_seq + 3;  // a few pages nobody uses
    if (page_count > INT_MAX)
      throw InvalidArgument("ProblemSpec: batch " + std::to_string(p.batch) + " x " +
                            std::to_string(p.max_pages_per_seq) + " pages per sequence = " +
                            std::to_string(page_count) + " pages; num_pages holds at most " +
                            std::to_string(INT_MAX) + " (use larger pages or fewer sequences)");
    p.num_pages = int(page_count);
    std::vector<int> pages(size_t(p.num_pages));
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), std::mt19937_64(s.seed * 77 + 5));
    host.block_table.assign(pages.begin(), pages.begin() + size_t(p.batch) * p.max_pages_per_seq);
  }
  if (s.alibi) host.alibi_slopes = alibi_slopes_standard(p.heads_q);

  // Layout: contiguous, plus row_pad elements after every row of heads.
  set_contiguous_strides(p);
  const int64_t d = p.head_dim;
  p.q_row_stride = p.o_row_stride = p.heads_q * d + s.row_pad;
  p.k_row_stride = p.v_row_stride = p.heads_kv * d + s.row_pad;
  const int64_t rows_q = varlen ? host.cu_seqlens_q.back() : int64_t(p.batch) * p.seqlen_q;
  const int64_t kv_per_batch = p.page_size ? p.page_size : p.seqlen_kv;
  const int64_t kv_batches = p.page_size ? p.num_pages : p.batch;
  const int64_t rows_kv = varlen ? host.cu_seqlens_kv.back() : kv_batches * kv_per_batch;
  p.q_batch_stride = p.o_batch_stride = varlen ? 0 : int64_t(p.seqlen_q) * p.q_row_stride;
  p.k_batch_stride = p.v_batch_stride = varlen ? 0 : kv_per_batch * p.k_row_stride;
  if (varlen) p.total_q = int(rows_q), p.total_kv = int(rows_kv);
  q_elems = o_elems = size_t(rows_q * p.q_row_stride);
  kv_elems = size_t(rows_kv * p.k_row_stride);
  lse_elems = s.lse ? size_t(p.batch) * p.heads_q * p.seqlen_q : 0;

  const size_t w = dtype_bytes(p.dtype);
  q_.resize(std::max<size_t>(q_elems * w, 16));
  k_.resize(std::max<size_t>(kv_elems * w, 16));
  v_.resize(std::max<size_t>(kv_elems * w, 16));
  o_.resize(std::max<size_t>(o_elems * w, 16));
  p.q = q_.get();
  p.k = k_.get();
  p.v = v_.get();
  p.o = o_.get();
  if (s.lse) {
    lse_.resize(lse_elems * 4);
    p.lse = lse_.as<float>();
  }

  const InputScales sc = input_scales(s.dist);
  fill_random(q_.get(), p.dtype, q_elems, int(p.q_row_stride), s.seed * 4 + 0, sc.q_std, 1.f, stream);
  fill_random(k_.get(), p.dtype, kv_elems, int(p.k_row_stride), s.seed * 4 + 1, sc.k_std,
              sc.kv_outlier_scale, stream);
  fill_random(v_.get(), p.dtype, kv_elems, int(p.v_row_stride), s.seed * 4 + 2, sc.v_std,
              sc.kv_outlier_scale, stream);

  // Metadata arrays: one device allocation, int32 then float.
  std::vector<int> ints;
  auto place = [&](const std::vector<int>& v) -> size_t {
    size_t at = ints.size();
    ints.insert(ints.end(), v.begin(), v.end());
    while (ints.size() % 4) ints.push_back(0);  // keep 16-byte alignment
    return at;
  };
  const size_t at_cuq = place(host.cu_seqlens_q), at_cuk = place(host.cu_seqlens_kv),
               at_cache = place(host.cache_seqlens), at_table = place(host.block_table);
  const size_t at_alibi = ints.size();
  const size_t bytes = ints.size() * 4 + host.alibi_slopes.size() * 4;
  if (bytes) {
    meta_.resize(bytes);
    LAB_CUDA_CHECK(cudaMemcpy(meta_.get(), ints.data(), ints.size() * 4, cudaMemcpyHostToDevice));
    if (!host.alibi_slopes.empty())
      LAB_CUDA_CHECK(cudaMemcpy(meta_.as<int>() + at_alibi, host.alibi_slopes.data(),
                                host.alibi_slopes.size() * 4, cudaMemcpyHostToDevice));
    int* m = meta_.as<int>();
    if (!host.cu_seqlens_q.empty()) p.cu_seqlens_q = m + at_cuq, p.cu_seqlens_kv = m + at_cuk;
    if (!host.cache_seqlens.empty()) p.cache_seqlens = m + at_cache;
    if (!host.block_table.empty()) p.block_table = m + at_table;
    if (!host.alibi_slopes.empty()) p.alibi_slopes = reinterpret_cast<float*>(m + at_alibi);
  }

  LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  host.shape = p;
  host.q = download_as_float(q_.get(), p.dtype, q_elems);
  host.k = download_as_float(k_.get(), p.dtype, kv_elems);
  host.v = download_as_float(v_.get(), p.dtype, kv_elems);
}

void Problem::ensure_workspace(size_t bytes) {
  if (bytes == 0) return;
  workspace_.resize(bytes);
  params.workspace = workspace_.get();
  params.workspace_bytes = workspace_.bytes();
}

void* Problem::kv_storage(size_t bytes) {
  kv_storage_.resize(std::max<size_t>(bytes, 16));
  return kv_storage_.get();
}

void Problem::poison_outputs(cudaStream_t stream) {
  poison(o_.get(), params.dtype, o_elems, stream);
  if (lse_elems) poison_f32(lse_.as<float>(), lse_elems, stream);
}

CheckReport Problem::check(const CheckOptions& opt, const HostProblem* inputs) const {
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> o = download_bits(o_.get(), o_elems);
  std::vector<float> lse;
  if (lse_elems) lse = download_f32(lse_.as<float>(), lse_elems);
  return check_output(inputs ? *inputs : host, o, lse, opt);
}

ResultRow Problem::describe(const std::string& workload) const {
  ResultRow r;
  const AttnParams& p = params;
  r.workload = workload;
  r.dtype = p.dtype;
  r.batch = p.batch;
  r.heads_q = p.heads_q;
  r.heads_kv = p.heads_kv;
  r.seqlen_q = p.seqlen_q;
  r.seqlen_kv = p.seqlen_kv;
  r.head_dim = p.head_dim;
  r.causal = p.causal;
  r.dist = dist_name(spec_.dist);
  std::string f;
  auto add = [&](const std::string& x) { f += (f.empty() ? "" : "+") + x; };
  if (p.alibi_slopes) add("alibi");
  if (p.cu_seqlens_q) add("varlen");
  if (p.cache_seqlens) add("cache_seqlens");
  if (p.block_table) add("paged" + std::to_string(p.page_size));
  if (spec_.row_pad) add("strided");
  r.features = f;
  r.flops = attn_flops(host);
  r.bytes = attn_bytes_stored(host, p.kv_quant);
  return r;
}

VariantInputs prepare_variant(Problem& prob, const Variant& v, cudaStream_t stream) {
  VariantInputs in;
  in.params = prob.params;
  if (v.kv_prepare) {
    const KvPrepare& kp = *v.kv_prepare;
    kp.prepare(in.params, prob.kv_storage(kp.bytes(prob.params)), stream);
    LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    in.prepared = true;
    const HostProblem& src = prob.host;
    in.host.shape = src.shape;
    in.host.q = src.q;
    in.host.cu_seqlens_q = src.cu_seqlens_q, in.host.cu_seqlens_kv = src.cu_seqlens_kv;
    in.host.cache_seqlens = src.cache_seqlens, in.host.block_table = src.block_table;
    in.host.alibi_slopes = src.alibi_slopes;
    in.host.k.resize(src.k.size());
    in.host.v.resize(src.v.size());
    kp.host_kv(in.params, in.host);
  }
  // The workspace can depend on the prepared form (07: split counts differ per scheme).
  if (v.workspace) {
    prob.ensure_workspace(v.workspace(in.params));
    in.params.workspace = prob.params.workspace;
    in.params.workspace_bytes = prob.params.workspace_bytes;
  }
  return in;
}

RunOutcome run_variant(Problem& prob, const std::string& chapter, const Variant& v,
                       const RunOptions& opt, const Ceilings& ceil, const GpuInfo& gpu,
                       L2Flusher* flusher, const std::string& workload, cudaStream_t stream) {
  RunOutcome out;
  out.row = prob.describe(workload);
  out.row.chapter = chapter;
  out.row.variant = v.name;
  out.row.gpu = gpu.name;
  out.row.driver = gpu.driver;
  out.row.cuda = gpu.cuda_runtime;
  out.row.date = today_utc();
  out.row.splits = prob.params.num_splits;
  if (v.support) {
    std::string why = unsupported_reason(prob.params, *v.support);
    if (!why.empty()) {
      out.skipped = true;
      out.message = why;
      return out;
    }
  }
  if (prob.params.cache_seqlens || prob.params.block_table) {
    const std::string why = kv_cache_tables_reason(prob.params, chapter.c_str(), stream);
    if (!why.empty()) throw InvalidArgument(why);
  }
  if (prob.params.cu_seqlens_q) {
    const std::string why = varlen_offsets_reason(prob.params, chapter.c_str(), stream);
    if (!why.empty()) throw InvalidArgument(why);
  }
  const VariantInputs in = prepare_variant(prob, v, stream);
  const AttnParams& p = in.params;
  const HostProblem* inputs = in.prepared ? &in.host : nullptr;
  if (in.prepared) out.row.bytes = attn_bytes_stored(prob.host, p.kv_quant);  // as stored: 1 byte + scales
  if (v.splits) out.row.splits = v.splits(p);

  prob.poison_outputs(stream);
  try {
    v.forward(p, stream);
  } catch (const InvalidArgument& e) {
    // Refused by the launcher on this device (e.g. more shared memory than it, or LAB_SMEM_CAP,
    // allows): a skip with the launcher's message, as for the support check above.
    out.skipped = true;
    out.message = e.what();
    return out;
  }
  LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  out.before = prob.check(opt.check, inputs);
  if (in.prepared) out.source_kv = prob.check(opt.check);
  out.row.max_err = out.before.max_abs_err;
  out.row.rel_err = out.before.rel_l2_err;
  out.row.check = out.before.ok ? (out.before.sampled ? "PASS sampled" : "PASS all") : "FAIL";
  if (!out.before.ok) {
    out.message = out.before.summary();
    return out;
  }
  if (opt.time) {
    Timing t = time_it([&](cudaStream_t s) { v.forward(p, s); }, stream, opt.timing, flusher);
    out.row.ms = t.median_ms;
    out.row.ms_p10 = t.p10_ms;
    out.row.ms_p90 = t.p90_ms;
    out.row.reps = t.reps;
    if (ceil.gemm_tflops > 0) fill_rates(out.row, ceil.gemm_tflops, ceil.read_gbps, ceil.copy_gbps);
    else fill_rates(out.row, 1, 1), out.row.pct_peak = 0;
    // Once more after timing, from poisoned outputs: a launch that stopped writing some rows, or
    // whose result depends on what the earlier runs left behind, fails here.
    prob.poison_outputs(stream);
    v.forward(p, stream);
    LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    out.after = prob.check(opt.check, inputs);
    if (!out.after.ok) {
      out.row.check = "FAIL after timing";
      out.message = "after timing: " + out.after.summary();
      return out;
    }
  }
  out.ok = true;
  out.message = out.before.summary();
  if (in.prepared) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "; against the original K/V: max_abs %.2e  rel_l2 %.2e",
                  out.source_kv.max_abs_err, out.source_kv.rel_l2_err);
    out.message += " (on the K/V it reads)" + std::string(buf);
  }
  return out;
}

ProblemSpec spec_from_cli(const CliOptions& o) {
  ProblemSpec s;
  s.batch = o.batch;
  s.heads_q = o.heads;
  s.heads_kv = o.heads_kv;
  s.seqlen_q = o.seqlen_q;
  s.seqlen_kv = o.seqlen_kv;
  s.head_dim = o.head_dim;
  s.dtype = o.dtype;
  s.causal = o.causal;
  s.alibi = o.alibi;
  s.lse = o.lse;
  s.dist = o.dist;
  s.seed = o.seed;
  s.page_size = o.page_size;
  s.num_splits = o.splits;
  return s;
}

std::string problem_size_reason(const ProblemSpec& s, size_t device_free) {
  // Every factor is at most 2^20 and there are at most four, so these int64 products cannot overflow.
  const int64_t d = s.head_dim, w = int64_t(dtype_bytes(s.dtype));
  const int64_t rows_q = int64_t(s.batch) * s.seqlen_q;
  int64_t rows_kv = int64_t(s.batch) * s.seqlen_kv;
  auto gib = [](long double bytes) {
    char b[48];
    std::snprintf(b, sizeof b, "%.2f GiB", double(bytes / (1024.0L * 1024 * 1024)));
    return std::string(b);
  };
  if (s.page_size > 0) {
    const int64_t per_seq = (int64_t(s.seqlen_kv) + s.page_size - 1) / s.page_size;
    const int64_t pages = int64_t(s.batch) * per_seq + 3;
    if (pages > INT_MAX)
      return "--page-size: --batch " + std::to_string(s.batch) + " x --seqlen-kv " +
             std::to_string(s.seqlen_kv) + " in pages of " + std::to_string(s.page_size) + " tokens is " +
             std::to_string(pages) + " pages; at most " + std::to_string(INT_MAX) + " fit in num_pages";
    rows_kv = pages * s.page_size;
  }
  // Row counts are ints in AttnParams (total_q, total_kv, cu_seqlens).
  if (rows_q > INT_MAX || rows_kv > INT_MAX) {
    const bool q = rows_q > INT_MAX;
    return "--batch: " + std::to_string(s.batch) + (q ? " x --seqlen-q " : " x --seqlen-kv ") +
           std::to_string(q ? s.seqlen_q : s.seqlen_kv) + " = " + std::to_string(q ? rows_q : rows_kv) +
           " rows; at most " + std::to_string(INT_MAX) + " fit";
  }
  const int64_t q_elems = rows_q * s.heads_q * d, kv_elems = rows_kv * s.heads_kv * d;
  const long double device = (long double)(2 * q_elems + 2 * kv_elems) * w +
                             (s.lse ? 4.0L * s.batch * s.heads_q * s.seqlen_q : 0.0L);
  // The host keeps Q, K, V as floats for the fp64 reference, and O as downloaded.
  const long double host = 4.0L * (q_elems + 2 * kv_elems) + 2.0L * q_elems;
  const long double host_total = (long double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE);
  if (host_total > 0 && host > host_total / 2)
    return "--batch/--seqlen/--heads/--head-dim: the problem needs " + gib(host) +
           " of host memory (the reference's copies of Q, K, V and O); this machine has " + gib(host_total) +
           ", at most half of it is used";
  if (device_free > 0 && device > (long double)device_free * 0.9L)
    return "--batch/--seqlen/--heads/--head-dim: the problem needs " + gib(device) +
           " of device memory (Q, K, V, O); this GPU has " + gib(device_free) + " free, 90% of it is used";
  return "";
}

void check_writable(const std::string& flag, const std::string& path, bool directory) {
  if (directory) {
    if (access(path.c_str(), W_OK | X_OK) != 0)
      throw CliError(flag + ": '" + path + "' is not a writable directory");
    return;
  }
  std::ofstream f(path, std::ios::app);
  if (!f) throw CliError(flag + ": cannot write '" + path + "'");
}

int run_cli(int argc, char** argv, const Chapter& chapter, const CliOptions& defaults) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::vector<std::string> names;
  for (const Variant& v : chapter.variants) names.push_back(v.name);
  CliOptions o;
  try {
    o = parse_cli(args, defaults);
    if (!o.help && !o.csv.empty()) check_writable("--csv", o.csv, false);
  } catch (const CliError& e) {
    std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), e.what());
    return kExitBadInput;
  }
  if (o.help) {
    std::printf("%s", cli_usage(chapter.name, names, defaults).c_str());
    return kExitOk;
  }
  std::vector<const Variant*> chosen;
  for (const Variant& v : chapter.variants)
    if (o.variant.empty() || o.variant == v.name) chosen.push_back(&v);
  if (chosen.empty()) {
    std::string all;
    for (auto& n : names) all += (all.empty() ? "" : ", ") + n;
    std::fprintf(stderr, "%s: error: --variant: '%s' is not allowed (allowed: %s)\n",
                 chapter.name.c_str(), o.variant.c_str(), all.c_str());
    return kExitBadInput;
  }
  try {
    const ProblemSpec spec = spec_from_cli(o);
    // Refuse unsupported problems before allocating anything.
    {
      AttnParams shape;
      shape.dtype = spec.dtype, shape.batch = spec.batch, shape.heads_q = spec.heads_q;
      shape.heads_kv = spec.heads_kv, shape.seqlen_q = spec.seqlen_q, shape.seqlen_kv = spec.seqlen_kv;
      shape.head_dim = spec.head_dim, shape.causal = spec.causal, shape.num_splits = spec.num_splits;
      shape.softmax_scale = 1.f / std::sqrt(float(spec.head_dim));
      set_contiguous_strides(shape);
      alignas(16) static const char dummy[16] = {};
      shape.q = shape.k = shape.v = dummy;
      shape.o = const_cast<char*>(dummy);
      shape.lse = spec.lse ? reinterpret_cast<float*>(const_cast<char*>(dummy)) : nullptr;
      shape.alibi_slopes = spec.alibi ? reinterpret_cast<const float*>(dummy) : nullptr;
      const std::string too_large = problem_size_reason(spec);
      if (!too_large.empty()) {
        std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), too_large.c_str());
        return kExitBadInput;
      }
      if (spec.page_size) {  // problem_size_reason() has bounded the page count
        shape.block_table = reinterpret_cast<const int*>(dummy);
        shape.page_size = spec.page_size;
        shape.max_pages_per_seq = (spec.seqlen_kv + spec.page_size - 1) / spec.page_size;
        shape.num_pages = shape.max_pages_per_seq * spec.batch;
      }
      // Refused by every chosen variant: bad input (exit 2), not an empty success.
      std::string first_reason;
      size_t refused = 0;
      for (const Variant* v : chosen) {
        std::string why = v->support ? unsupported_reason(shape, *v->support) : "";
        if (!why.empty()) ++refused, first_reason = first_reason.empty() ? why : first_reason;
      }
      if (refused == chosen.size()) {
        std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), with_flag(first_reason).c_str());
        return kExitBadInput;
      }
    }
    std::string no_gpu;
    if (gpu_state(&no_gpu) != GpuState::present) {
      std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), no_gpu_message(no_gpu).c_str());
      return kExitNoGpu;
    }
    {
      size_t free_bytes = 0, total_bytes = 0;
      LAB_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
      const std::string too_large = problem_size_reason(spec, free_bytes);
      if (!too_large.empty()) {
        std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), too_large.c_str());
        return kExitBadInput;
      }
    }
    const GpuInfo gpu = gpu_info();
    std::printf("%s on %s (%d SMs, CUDA %s, driver supports %s)\n", chapter.name.c_str(),
                gpu.name.c_str(), gpu.sm_count, gpu.cuda_runtime.c_str(), gpu.driver.c_str());
    Ceilings ceil;
    if (o.ceilings) {
      ceil = measure_ceilings();
      std::printf("measured ceilings: read %.0f GB/s, copy %.0f GB/s (read + write), fp16 GEMM %.0f TFLOPS\n",
                  ceil.read_gbps, ceil.copy_gbps, ceil.gemm_tflops);
    }
    Problem prob(spec);
    L2Flusher flusher;
    RunOptions ro;
    ro.timing.warmup = o.warmup;
    ro.timing.iters = o.iters;
    ro.timing.min_iters = std::min(3, o.iters);
    ro.check.all_rows = o.check_all;
    ro.check.seed = o.seed;
    std::vector<ResultRow> rows;
    int failures = 0;
    std::string refusal;
    for (const Variant* v : chosen) {
      RunOutcome r = run_variant(prob, chapter.name, *v, ro, ceil, gpu, &flusher, "cli");
      const std::string name = chapter.name + (v->name.empty() ? "" : "/" + v->name);
      if (r.skipped) {
        std::printf("%-24s skipped: %s\n", name.c_str(), r.message.c_str());
        if (refusal.empty()) refusal = r.message;
        continue;
      }
      std::printf("%-24s check: %s\n", name.c_str(), r.message.c_str());
      if (!r.ok) ++failures;
      if (!rows.empty() && r.ok && rows.back().ms > 0) r.row.speedup_prev = rows.back().ms / r.row.ms;
      rows.push_back(r.row);
    }
    if (rows.empty()) {  // every variant refused this problem on this device: bad input, not a pass
      std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), with_flag(refusal).c_str());
      return kExitBadInput;
    }
    print_table(stdout, chapter.name, rows);
    if (!o.csv.empty()) write_csv(o.csv, rows, true);
    return failures ? kExitCheckFailed : kExitOk;
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), with_flag(e.what()).c_str());
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", chapter.name.c_str(), e.what());
    return kExitCheckFailed;
  }
}

}  // namespace lab
