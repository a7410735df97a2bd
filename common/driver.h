// The shared driver: builds a problem (device tensors + host mirror), runs a chapter's variants on
// it (check, time, check again) and reports. Each chapter's main.cu is a few lines on top of this.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "common/attn.h"
#include "common/buffer.h"
#include "common/cli.h"
#include "common/fill.h"
#include "common/measure.h"
#include "common/report.h"
#include "common/validate.h"

namespace lab {

using ForwardFn = void (*)(const AttnParams&, cudaStream_t);
using WorkspaceFn = size_t (*)(const AttnParams&);
using SplitsFn = int (*)(const AttnParams&);

// For a variant that reads K/V in another form than the problem holds them (07_kv_quant: a
// quantized cache made from the problem's fp16 K/V). The driver calls prepare() once per run,
// before checking and timing (not timed), on its own copy of the problem's params, and checks the
// output against the reference on the K/V that host_kv() says the kernel reads (the kernel's own
// error); the error against the problem's original K/V is reported beside it (RunOutcome::source_kv).
struct KvPrepare {
  // Device bytes prepare() needs, for the problem `p` (the unprepared params).
  size_t (*bytes)(const AttnParams& p) = nullptr;
  // Converts the K/V that p.k/p.v point at into `storage` and points p (k, v, strides, kv_quant)
  // at the result. Enqueued on `stream`.
  void (*prepare)(AttnParams& p, void* storage, cudaStream_t stream) = nullptr;
  // Fills hp.k and hp.v (already sized, in hp.shape's layout: the problem's own) with the values
  // the kernel reads from the prepared params, widened to float (synchronous).
  void (*host_kv)(const AttnParams& prepared, HostProblem& hp) = nullptr;
};

struct Variant {
  std::string name;  // "" when the chapter has one kernel
  ForwardFn forward = nullptr;
  const Support* support = nullptr;
  WorkspaceFn workspace = nullptr;  // nullptr: needs none
  SplitsFn splits = nullptr;        // split-KV chapters: the split count forward() will use
  const KvPrepare* kv_prepare = nullptr;  // nullptr: reads the problem's K/V as they are
};

struct Chapter {
  std::string name;  // directory name, e.g. "03_flash_v2"
  std::vector<Variant> variants;
};

struct ProblemSpec {
  int batch = 1, heads_q = 1, heads_kv = 1, seqlen_q = 1, seqlen_kv = 1, head_dim = 64;
  DType dtype = DType::fp16;
  bool causal = false;
  float softmax_scale = 0.f;  // 0: 1/sqrt(head_dim)
  Dist dist = Dist::normal;
  uint64_t seed = 1;
  bool lse = false;
  bool alibi = false;               // standard slopes for heads_q
  std::vector<int> varlen_q;        // per-sequence lengths: packed (cu_seqlens) layout
  std::vector<int> varlen_kv;
  std::vector<int> cache_seqlens;   // per-sequence KV lengths (seqlen_kv is the capacity)
  int page_size = 0;                // > 0: paged KV cache, pages in shuffled order
  int num_splits = 0;
  int row_pad = 0;                  // extra elements between rows (strided, non-contiguous layouts)
};

// Device tensors, their host copies and the AttnParams that point at them.
class Problem {
 public:
  explicit Problem(const ProblemSpec& spec, cudaStream_t stream = 0);
  const ProblemSpec& spec() const { return spec_; }
  AttnParams params;  // device pointers filled in
  HostProblem host;   // tensors and metadata on the host, for the reference

  void ensure_workspace(size_t bytes);
  void* kv_storage(size_t bytes);  // device memory for a variant's prepared K/V (KvPrepare)
  void poison_outputs(cudaStream_t stream);
  // Downloads O (and lse) and compares with the reference on `inputs` (default: this problem's
  // host tensors; a variant's prepared K/V: see prepare_variant).
  CheckReport check(const CheckOptions& opt, const HostProblem* inputs = nullptr) const;
  ResultRow describe(const std::string& workload) const;  // shape columns of a result row

  size_t q_elems = 0, kv_elems = 0, o_elems = 0, lse_elems = 0;

 private:
  ProblemSpec spec_;
  DeviceBuffer q_, k_, v_, o_, lse_, workspace_, meta_, kv_storage_;
};

// What a variant runs on: the problem's params with the workspace it asks for, and, for a variant
// with kv_prepare, its prepared K/V and their host copy (the reference inputs its check uses).
struct VariantInputs {
  AttnParams params;
  bool prepared = false;
  HostProblem host;  // when prepared: the problem's host tensors with K/V as the kernel reads them
};
// Prepares K/V (KvPrepare) and sizes the workspace; call after the support check, before launching.
VariantInputs prepare_variant(Problem& prob, const Variant& v, cudaStream_t stream = 0);

struct RunOptions {
  TimingOptions timing;
  CheckOptions check;
  bool time = true;
};

struct RunOutcome {
  bool skipped = false;  // the variant refuses this problem (message says why)
  bool ok = false;       // both checks passed
  std::string message;
  CheckReport before, after;
  // Variants with kv_prepare: the output against the reference on the problem's own K/V (the
  // error of the conversion, e.g. quantization, plus the kernel's). Reported, not checked.
  CheckReport source_kv;
  ResultRow row;
};

// unsupported -> skipped; else poison, run, check; time; check the last timed output again.
RunOutcome run_variant(Problem& prob, const std::string& chapter, const Variant& v,
                       const RunOptions& opt, const Ceilings& ceil, const GpuInfo& gpu,
                       L2Flusher* flusher, const std::string& workload, cudaStream_t stream = 0);

// A chapter's whole command-line program. Returns the process exit code (kExitOk ... kExitNoGpu,
// common/measure.h). `defaults`: the problem it runs with no flags (decode_cli_defaults() for the
// decoding chapters).
int run_cli(int argc, char** argv, const Chapter& chapter, const CliOptions& defaults = CliOptions());

// Why a problem is too large to build, before anything is allocated: "" when it fits. Products
// are computed without overflow; the answer names what was asked and what fits. device_free: the
// free device memory (0: not known yet, only the host side and the 32-bit limits are checked).
std::string problem_size_reason(const ProblemSpec& spec, size_t device_free = 0);
// Refuses an output path that cannot be written, naming `flag` (before any GPU work).
void check_writable(const std::string& flag, const std::string& path, bool directory);

ProblemSpec spec_from_cli(const CliOptions& o);

}  // namespace lab
