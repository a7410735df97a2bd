#include "common/device.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "common/attn.h"
#include "common/cuda_check.h"

namespace lab {

size_t parse_smem_cap(const std::string& text) {
  const std::string bad = "LAB_SMEM_CAP: '" + text +
                          "' is not a size (bytes, or KiB with a K suffix, e.g. 101376 or 99K)";
  if (text.empty()) return 0;
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 9) throw InvalidArgument(bad);
  const std::string suffix = text.substr(digits);
  size_t value = std::stoul(text.substr(0, digits));
  if (suffix == "K" || suffix == "k") value *= 1024;
  else if (!suffix.empty()) throw InvalidArgument(bad);
  if (value != 0 && value < 16 * 1024)
    throw InvalidArgument("LAB_SMEM_CAP: " + text + " is below 16 KiB; no chapter plans for that");
  return value;
}

size_t smem_cap_from_env() {
  const char* env = std::getenv("LAB_SMEM_CAP");
  return env ? parse_smem_cap(env) : 0;
}

const DeviceLimits& device_limits() {
  static std::mutex mu;
  static std::map<int, DeviceLimits> known;
  int dev = 0;
  LAB_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  DeviceLimits d;
  d.device = dev;
  int v = 0;
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  d.smem_per_block_device = size_t(v);
  LAB_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  d.smem_per_sm = size_t(v);
  const size_t cap = smem_cap_from_env();
  d.smem_per_block = cap ? std::min(cap, d.smem_per_block_device) : d.smem_per_block_device;
  return known.emplace(dev, d).first->second;
}

void require_compute_capability(int major, int minor, const char* who, const char* what) {
  const DeviceLimits& d = device_limits();
  if (d.cc_major > major || (d.cc_major == major && d.cc_minor >= minor)) return;
  throw InvalidArgument(std::string(who) + ": needs sm_" + std::to_string(major * 10 + minor) +
                        " or newer (" + what + "); this GPU is sm_" +
                        std::to_string(d.cc_major * 10 + d.cc_minor));
}

int configure_kernel(const void* kernel, int threads, size_t smem_bytes, const char* who) {
  const DeviceLimits& d = device_limits();
  if (smem_bytes > d.smem_per_block)
    throw InvalidArgument(std::string(who) + ": needs " + std::to_string(smem_bytes) +
                          " bytes of shared memory per block; this GPU allows " +
                          std::to_string(d.smem_per_block) +
                          (d.smem_per_block < d.smem_per_block_device ? " (LAB_SMEM_CAP)" : ""));
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> configured;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, d.device, smem_bytes, threads);
  auto it = configured.find(key);
  if (it != configured.end()) return it->second;
  // A build whose architecture list has no code this GPU can run (a chapter compiled for sm_80+ or
  // sm_90a only, on an older GPU): refused by name, not as "no kernel image is available" later.
  cudaFuncAttributes attr;
  const cudaError_t found = cudaFuncGetAttributes(&attr, kernel);
  if (found == cudaErrorNoKernelImageForDevice || found == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();
    throw InvalidArgument(std::string(who) + ": this build has no code for this GPU (sm_" +
                          std::to_string(d.cc_major * 10 + d.cc_minor) +
                          "); configure with -DCMAKE_CUDA_ARCHITECTURES=native or include " +
                          std::to_string(d.cc_major * 10 + d.cc_minor) + " in the list");
  }
  LAB_CUDA_CHECK(found);
  LAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
  int blocks = 0;
  LAB_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes));
  configured.emplace(key, blocks);
  return blocks;
}

}  // namespace lab
