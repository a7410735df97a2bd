#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/fill.h"
#include "common/measure.h"

namespace lab {

GpuState gpu_state(std::string* reason) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess && n > 0) return GpuState::present;
  std::string why = e == cudaSuccess ? std::string("no CUDA device found")
                                     : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  cudaGetLastError();  // the error is reported here, not by the next CUDA call
  int driver = 0;
  const bool no_driver = cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0;
  if (no_driver && e == cudaErrorInsufficientDriver)
    why = "no CUDA driver installed (no GPU in this machine)";
  if (reason) *reason = why;
  return e == cudaSuccess || e == cudaErrorNoDevice || (no_driver && e == cudaErrorInsufficientDriver)
             ? GpuState::none
             : GpuState::unusable;
}

bool cuda_device_present() { return gpu_state() == GpuState::present; }

std::string no_gpu_message(const std::string& reason) { return "no usable GPU: " + reason; }

GpuInfo gpu_info() {
  GpuInfo g;
  int dev = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  LAB_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  g.name = prop.name;
  g.sm_count = prop.multiProcessorCount;
  g.cc_major = prop.major;
  g.cc_minor = prop.minor;
  g.l2_bytes = size_t(prop.l2CacheSize);
  g.mem_bytes = prop.totalGlobalMem;
  int drv = 0, rt = 0;
  LAB_CUDA_CHECK(cudaDriverGetVersion(&drv));
  LAB_CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%d.%d", drv / 1000, (drv % 1000) / 10);
  g.driver = buf;  // the CUDA version the driver supports; nvidia-smi has the driver build
  std::snprintf(buf, sizeof buf, "%d.%d", rt / 1000, (rt % 1000) / 10);
  g.cuda_runtime = buf;
  return g;
}

namespace {
// Streams n 16-byte words through the SMs, for the L2 flush and the read ceiling: each thread
// keeps UNROLL independent 16-byte loads in flight before it uses any of them (the ceiling's grid
// fills every SM); the xor of all words is compared with a constant, so the loads stay (the flush's buffer holds zeros: nothing is written; the ceiling's
// holds random data: the one word may be written, by chance, harmlessly).
// STREAMING: ld.global.cs (evict first) instead of ld.global.nc (through the read-only path).
template <int UNROLL, bool STREAMING>
__global__ void __launch_bounds__(256) stream_read_kernel(const uint4* __restrict__ p, size_t n,
                                                          uint32_t* sink) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = STREAMING ? __ldcs(p + i + u * stride) : __ldg(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;
}
}  // namespace

L2Flusher::L2Flusher() {
  int dev = 0, l2 = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  buf_.resize(std::max<size_t>(size_t(l2) * 2, size_t(8) << 20));
  LAB_CUDA_CHECK(cudaMemset(buf_.get(), 0, buf_.bytes()));
  const char* mode = std::getenv("LAB_L2_FLUSH");
  write_ = mode && std::string(mode) == "write";
}

void L2Flusher::flush(cudaStream_t s) {
  if (write_) {
    LAB_CUDA_CHECK(cudaMemsetAsync(buf_.get(), 0, buf_.bytes(), s));
    return;
  }
  // The last 16 bytes are the sink (never written): the loads cover the rest.
  const size_t words = buf_.bytes() / 16 - 1;
  uint4* base = static_cast<uint4*>(buf_.get());
  stream_read_kernel<1, false><<<1024, 256, 0, s>>>(base, words, reinterpret_cast<uint32_t*>(base + words));
  LAB_LAUNCH_CHECK();
}

namespace {
// Keeps the GPU busy for ~20 us, so that the start event is recorded after the host has already
// enqueued the work being timed: the events then measure GPU time, not launch latency.
__global__ void spin_kernel(long long ns) {
  const long long t0 = clock64();
  while (clock64() - t0 < ns * 2) {  // ~2 cycles per ns on current GPUs; only a lower bound matters
  }
}
}  // namespace

Timing time_it(const std::function<void(cudaStream_t)>& fn, cudaStream_t s, const TimingOptions& opt,
               L2Flusher* flusher) {
  for (int i = 0; i < opt.warmup; ++i) fn(s);
  LAB_CUDA_CHECK(cudaStreamSynchronize(s));

  cudaEvent_t start, stop;
  LAB_CUDA_CHECK(cudaEventCreate(&start));
  LAB_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  auto one = [&]() {
    if (opt.flush_l2 && flusher) flusher->flush(s);
    spin_kernel<<<1, 1, 0, s>>>(20000);
    LAB_LAUNCH_CHECK();
    LAB_CUDA_CHECK(cudaEventRecord(start, s));
    fn(s);
    LAB_CUDA_CHECK(cudaEventRecord(stop, s));
    LAB_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    LAB_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  };
  // The first repetition sizes the rest: at least min_iters, at most iters, within max_seconds.
  one();
  int iters = opt.iters;
  if (ms[0] > 0) iters = std::min(iters, int(opt.max_seconds * 1e3 / ms[0]));
  iters = std::max(iters, opt.min_iters);
  for (int i = 1; i < iters; ++i) one();
  LAB_CUDA_CHECK(cudaEventDestroy(start));
  LAB_CUDA_CHECK(cudaEventDestroy(stop));

  std::sort(ms.begin(), ms.end());
  auto pct = [&](double q) { return double(ms[size_t(q * (ms.size() - 1) + 0.5)]); };
  Timing t;
  t.reps = int(ms.size());
  t.min_ms = ms.front();
  t.median_ms = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
  t.p10_ms = pct(0.1);
  t.p90_ms = pct(0.9);
  return t;
}

namespace {
template <int UNROLL, bool STREAMING>
Timing time_stream_read(const DeviceBuffer& buf, uint32_t* sink, cudaStream_t s, const TimingOptions& opt) {
  auto kernel = stream_read_kernel<UNROLL, STREAMING>;
  int dev = 0, sms = 0, per_sm = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  LAB_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, 0));
  const size_t words = buf.bytes() / 16;
  const uint4* p = static_cast<const uint4*>(buf.get());
  return time_it([&](cudaStream_t st) {
    kernel<<<sms * std::max(1, per_sm), 256, 0, st>>>(p, words, sink);
    LAB_LAUNCH_CHECK();
  }, s, opt, nullptr);
}

void measure_read_into(Ceilings& c, const DeviceBuffer& buf, cudaStream_t s, const TimingOptions& opt) {
  DeviceBuffer sink(16);
  uint32_t* w = static_cast<uint32_t*>(sink.get());
  struct Shape {
    const char* name;
    Timing (*time)(const DeviceBuffer&, uint32_t*, cudaStream_t, const TimingOptions&);
  };
  const Shape shapes[] = {{"ldg x4", time_stream_read<4, false>}, {"ldg x8", time_stream_read<8, false>},
                          {"ldcs x4", time_stream_read<4, true>}, {"ldcs x8", time_stream_read<8, true>}};
  c.read_bytes = buf.bytes();
  for (const Shape& sh : shapes) {
    const Timing t = sh.time(buf, w, s, opt);
    if (c.read_ms == 0 || t.median_ms < c.read_ms) c.read_ms = t.median_ms, c.read_method = sh.name;
  }
  c.read_gbps = double(c.read_bytes) / (c.read_ms * 1e-3) / 1e9;
}

TimingOptions ceiling_timing() {
  TimingOptions opt;
  opt.warmup = 3;
  opt.iters = 30;
  opt.max_seconds = 2.0;
  opt.flush_l2 = false;  // buffers of 2 GiB do not fit in L2 anyway
  return opt;
}
}  // namespace

Ceilings measure_read_ceiling(cudaStream_t s, size_t bytes) {
  Ceilings c;
  DeviceBuffer buf(bytes / 16 * 16);
  fill_random(buf.get(), DType::fp16, buf.bytes() / 2, 128, 5, 1.f, 1.f, s);
  measure_read_into(c, buf, s, ceiling_timing());
  return c;
}

Ceilings measure_ceilings(cudaStream_t s, size_t copy_bytes, int n) {
  Ceilings c;
  const TimingOptions opt = ceiling_timing();
  {
    DeviceBuffer src(copy_bytes), dst(copy_bytes);
    fill_random(src.get(), DType::fp16, copy_bytes / 2, 128, 7, 1.f, 1.f, s);
    measure_read_into(c, src, s, opt);  // the copy's source: the same bytes, read only
    Timing t = time_it([&](cudaStream_t st) {
      LAB_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), copy_bytes, cudaMemcpyDeviceToDevice, st));
    }, s, opt, nullptr);
    c.copy_ms = t.median_ms;
    c.copy_bytes = copy_bytes;
    c.copy_gbps = 2.0 * double(copy_bytes) / (t.median_ms * 1e-3) / 1e9;
  }
  {
    const size_t elems = size_t(n) * n;
    DeviceBuffer a(elems * 2), b(elems * 2), d(elems * 2);
    fill_random(a.get(), DType::fp16, elems, n, 11, 1.f, 1.f, s);
    fill_random(b.get(), DType::fp16, elems, n, 12, 1.f, 1.f, s);
    cublasHandle_t h;
    LAB_CUBLAS_CHECK(cublasCreate(&h));
    LAB_CUBLAS_CHECK(cublasSetStream(h, s));
    const float alpha = 1.f, beta = 0.f;
    Timing t = time_it([&](cudaStream_t) {
      LAB_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.get(), CUDA_R_16F,
                                    n, b.get(), CUDA_R_16F, n, &beta, d.get(), CUDA_R_16F, n,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }, s, opt, nullptr);
    LAB_CUBLAS_CHECK(cublasDestroy(h));
    c.gemm_ms = t.median_ms;
    c.gemm_n = n;
    c.gemm_tflops = 2.0 * double(n) * n * n / (t.median_ms * 1e-3) / 1e12;
  }
  return c;
}

double attn_flops(const HostProblem& hp) {
  const AttnParams& p = hp.shape;
  double pairs = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int sq = seqlen_q_of(hp, b), sk = seqlen_kv_of(hp, b);
    if (!p.causal) {
      pairs += double(sq) * sk;
    } else {
      for (int i = 0; i < sq; ++i) pairs += visible_keys(true, i, sq, sk);
    }
  }
  return 4.0 * p.head_dim * p.heads_q * pairs;
}

double attn_bytes(const HostProblem& hp, double kv_bytes_per_element, double kv_scale_bytes) {
  const AttnParams& p = hp.shape;
  const double w = dtype_bytes(p.dtype);
  double q_rows = 0, kv_rows = 0;
  for (int b = 0; b < p.batch; ++b) {
    q_rows += seqlen_q_of(hp, b);
    kv_rows += seqlen_kv_of(hp, b);
  }
  const double q_and_o = 2.0 * q_rows * p.heads_q * p.head_dim * w;
  const double k_and_v = 2.0 * kv_rows * p.heads_kv * (p.head_dim * kv_bytes_per_element + kv_scale_bytes);
  return q_and_o + k_and_v;
}

double kv_scale_bytes_per_token_head(const HostProblem& hp, const KvQuant& kq) {
  const AttnParams& p = hp.shape;
  double tokens = 0;  // the tokens attention reads, summed over the batch
  for (int b = 0; b < p.batch; ++b) tokens += seqlen_kv_of(hp, b);
  const double token_heads = std::max(1.0, tokens * p.heads_kv);
  const double s = kKvScaleBytes;  // one fp16 scale
  switch (kq.scheme) {
    case KvScheme::int8_tensor: return s / token_heads;
    case KvScheme::int8_token: return s / p.heads_kv;
    case KvScheme::int8_head: return s;
    case KvScheme::int8_group: return kq.group_size > 0 ? s * p.head_dim / kq.group_size : 0.0;
    case KvScheme::fp8_e4m3_head: return s * p.heads_kv / token_heads;
    default: return 0.0;
  }
}

double attn_bytes_stored(const HostProblem& hp, const KvQuant& kq) {
  if (kq.scheme == KvScheme::none) return attn_bytes(hp);
  return attn_bytes(hp, 1.0, kv_scale_bytes_per_token_head(hp, kq));
}

}  // namespace lab
