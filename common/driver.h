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

struct Variant {
  std::string name;  // "" when the chapter has one kernel
  ForwardFn forward = nullptr;
  const Support* support = nullptr;
  WorkspaceFn workspace = nullptr;  // nullptr: needs none
  SplitsFn splits = nullptr;        // split-KV chapters: the split count forward() will use
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
  void poison_outputs(cudaStream_t stream);
  CheckReport check(const CheckOptions& opt) const;  // downloads O (and lse) and compares
  ResultRow describe(const std::string& workload) const;  // shape columns of a result row

  size_t q_elems = 0, kv_elems = 0, o_elems = 0, lse_elems = 0;

 private:
  ProblemSpec spec_;
  DeviceBuffer q_, k_, v_, o_, lse_, workspace_, meta_;
};

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
  ResultRow row;
};

// unsupported -> skipped; else poison, run, check; time; check the last timed output again.
RunOutcome run_variant(Problem& prob, const std::string& chapter, const Variant& v,
                       const RunOptions& opt, const Ceilings& ceil, const GpuInfo& gpu,
                       L2Flusher* flusher, const std::string& workload, cudaStream_t stream = 0);

// A chapter's whole command-line program. Returns the process exit code.
int run_cli(int argc, char** argv, const Chapter& chapter);

ProblemSpec spec_from_cli(const CliOptions& o);

}  // namespace lab
