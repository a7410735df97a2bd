// How the lab measures: one timing routine, one FLOP/byte formula, ceilings measured in the same run.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <string>

#include "common/buffer.h"
#include "common/reference.h"

namespace lab {

struct GpuInfo {
  std::string name;  // e.g. "NVIDIA H100 80GB HBM3"
  std::string driver, cuda_runtime;
  int sm_count = 0, cc_major = 0, cc_minor = 0;
  size_t l2_bytes = 0, mem_bytes = 0;
};
GpuInfo gpu_info();

// Whether this process has a GPU to run on. `none`: the runtime says there is no device
// (cudaErrorNoDevice), or no CUDA driver is installed at all (cudaDriverGetVersion gives 0): a
// machine without a GPU, where GPU tests skip. `unusable`: there is a driver but the runtime
// refuses it (too old for this runtime, a broken installation...): GPU tests fail, and `reason`
// holds the runtime's own message.
enum class GpuState { present, none, unusable };
GpuState gpu_state(std::string* reason = nullptr);
bool cuda_device_present();  // gpu_state() == present
// The one line every program prints before exiting with kExitNoGpu.
std::string no_gpu_message(const std::string& reason);

// The exit codes of every program of the lab (the chapters, the ladder, 07's table).
constexpr int kExitOk = 0, kExitCheckFailed = 1, kExitBadInput = 2, kExitNoGpu = 3;

// Reads a buffer of 2x the L2 size before every timed repetition, so that each repetition reads
// its inputs from HBM and finds the L2 full of clean lines. A flush that writes the buffer instead
// (a memset, PyTorch's `buf.zero_()`) leaves the L2 full of dirty lines, and the timed kernel pays
// for writing them back as it evicts them: 50 MB on an H100, +37% of the traffic of a 134 MB
// decoding problem. LAB_L2_FLUSH=write selects that flush, to measure the difference.
class L2Flusher {
 public:
  L2Flusher();
  void flush(cudaStream_t s);
  const char* method() const { return write_ ? "write (LAB_L2_FLUSH=write)" : "read"; }

 private:
  DeviceBuffer buf_;
  bool write_ = false;
};

struct TimingOptions {
  int warmup = 3;
  int iters = 20;           // at most this many timed repetitions ...
  int min_iters = 3;        // ... and at least this many
  double max_seconds = 3.0; // fewer repetitions when they would take longer than this in total
  bool flush_l2 = true;
};

struct Timing {
  double median_ms = 0, min_ms = 0, p10_ms = 0, p90_ms = 0;
  int reps = 0;
};

// CUDA events around `fn` only; L2 flushed (outside the events) before each repetition.
Timing time_it(const std::function<void(cudaStream_t)>& fn, cudaStream_t s, const TimingOptions& opt,
               L2Flusher* flusher);

// The device's ceilings, measured, each the median of many repetitions on random data:
//   read: a streaming read of a buffer many times the L2 (16-byte loads, several in flight per
//         thread, an xor reduction so that no load can be dropped): what a kernel that reads its
//         inputs once and writes almost nothing (decoding) can reach. The best of a few load
//         shapes (loads in flight x cache hint) is kept, and `read_method` names it;
//   copy: a device-to-device cudaMemcpy, bytes read + written (decoding beats it: it writes
//         almost nothing, and a copy's writes turn the bus around);
//   gemm: a cuBLAS fp16 GEMM with fp32 accumulation, the tensor-core rate.
struct Ceilings {
  double read_gbps = 0, copy_gbps = 0;
  double gemm_tflops = 0;
  double read_ms = 0, copy_ms = 0, gemm_ms = 0;
  size_t read_bytes = 0, copy_bytes = 0;
  std::string read_method;  // e.g. "ldg x8": the load shape that gave read_gbps
  int gemm_n = 0;
};
Ceilings measure_ceilings(cudaStream_t s = 0, size_t copy_bytes = size_t(2) << 30, int gemm_n = 8192);
// The streaming-read ceiling alone, over a buffer of `bytes` (read_* fields of Ceilings).
Ceilings measure_read_ceiling(cudaStream_t s = 0, size_t bytes = size_t(2) << 30);

// Work done by one attention forward, defined once for the whole lab:
//   FLOPs = 4 * head_dim * heads_q * sum over query rows of the keys that row sees
//           (QK^T and PV each count 2 per multiply-add; causal counts visible keys only)
//   bytes = Q + O + K + V, each element read or written once; K/V counted once per KV head
//           (GQA reads them once per group), at their stored width.
double attn_flops(const HostProblem& hp);
double attn_bytes(const HostProblem& hp, double kv_bytes_per_element = 2.0,
                  double kv_scale_bytes_per_token_head = 0.0);

// Scale bytes a KV cache stored as `kq` keeps, per token and KV head, for one of K and V, at
// kKvScaleBytes (2, fp16) per scale: 2 per token and head for int8_head, 2 * head_dim / group_size
// for int8_group, 2 / heads_kv for int8_token; per-tensor scales (int8_tensor: one scale,
// fp8_e4m3_head: heads_kv scales) spread over the problem's tokens and heads; 0 without scales.
double kv_scale_bytes_per_token_head(const HostProblem& hp, const KvQuant& kq);
// attn_bytes with K/V at the width `kq` stores them (1 byte plus scales, or the dtype's 2 bytes).
double attn_bytes_stored(const HostProblem& hp, const KvQuant& kq);

}  // namespace lab
