#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

#include "common/cuda_check.h"
#include "common/fill.h"

namespace lab {

const char* dist_name(Dist d) {
  switch (d) {
    case Dist::normal: return "normal";
    case Dist::large_logits: return "large_logits";
    case Dist::outliers: return "outliers";
  }
  return "?";
}

bool parse_dist(const std::string& s, Dist& out) {
  for (Dist d : {Dist::normal, Dist::large_logits, Dist::outliers})
    if (s == dist_name(d)) {
      out = d;
      return true;
    }
  return false;
}

InputScales input_scales(Dist d) {
  switch (d) {
    case Dist::large_logits: return {3.f, 3.f, 1.f, 1.f};
    case Dist::outliers: return {1.f, 1.f, 1.f, 10.f};
    case Dist::normal: break;
  }
  return {1.f, 1.f, 1.f, 1.f};
}

namespace {

// splitmix64: a counter-based generator, so element i's value depends only on (seed, i).
__host__ __device__ inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <class T>
__device__ T to_storage(float x);
template <>
__device__ __half to_storage<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __nv_bfloat16 to_storage<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class T>
__global__ void fill_normal_kernel(T* out, size_t count, int channels, uint64_t seed, float stddev,
                                   float outlier_scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed ^ mix64(i));
    // Box-Muller on two 32-bit uniforms in (0, 1].
    const float u1 = (float((r >> 32) & 0xFFFFFFFFu) + 1.f) * 2.3283064e-10f;
    const float u2 = float(r & 0xFFFFFFFFu) * 2.3283064e-10f;
    float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    const int c = int(i % size_t(channels));
    const bool outlier = (mix64(seed * 31 + uint64_t(c)) & 15) == 0;
    out[i] = to_storage<T>(z * stddev * (outlier ? outlier_scale : 1.f));
  }
}

__global__ void fill_u16_kernel(uint16_t* out, size_t count, uint16_t bits) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
       i += size_t(gridDim.x) * blockDim.x)
    out[i] = bits;
}

__global__ void fill_u32_kernel(uint32_t* out, size_t count, uint32_t bits) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
       i += size_t(gridDim.x) * blockDim.x)
    out[i] = bits;
}

unsigned grid_for(size_t count) {
  const size_t blocks = (count + 255) / 256;
  return unsigned(blocks < 65536 ? (blocks ? blocks : 1) : 65536);
}

}  // namespace

void fill_random(void* dev, DType t, size_t count, int channels, uint64_t seed, float stddev,
                 float outlier_scale, cudaStream_t stream) {
  if (count == 0) return;
  if (channels <= 0) channels = 1;
  if (t == DType::fp16)
    fill_normal_kernel<<<grid_for(count), 256, 0, stream>>>(static_cast<__half*>(dev), count,
                                                            channels, seed, stddev, outlier_scale);
  else
    fill_normal_kernel<<<grid_for(count), 256, 0, stream>>>(static_cast<__nv_bfloat16*>(dev), count,
                                                            channels, seed, stddev, outlier_scale);
  LAB_LAUNCH_CHECK();
}

void poison(void* dev, DType t, size_t count, cudaStream_t stream) {
  if (count == 0) return;
  fill_u16_kernel<<<grid_for(count), 256, 0, stream>>>(static_cast<uint16_t*>(dev), count,
                                                       poison_bits(t));
  LAB_LAUNCH_CHECK();
}

void poison_f32(float* dev, size_t count, cudaStream_t stream) {
  if (count == 0) return;
  fill_u32_kernel<<<grid_for(count), 256, 0, stream>>>(reinterpret_cast<uint32_t*>(dev), count,
                                                       kPoisonF32);
  LAB_LAUNCH_CHECK();
}

float half_bits_to_float(uint16_t bits, DType t) {
  if (t == DType::bf16) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}

uint16_t float_to_half_bits(float x, DType t) {
  if (t == DType::bf16) {
    __nv_bfloat16_raw r = __nv_bfloat16_raw(__float2bfloat16_rn(x));
    return r.x;
  }
  __half_raw r = __half_raw(__float2half_rn(x));
  return r.x;
}

std::vector<uint16_t> download_bits(const void* dev, size_t count) {
  std::vector<uint16_t> bits(count);
  if (count) LAB_CUDA_CHECK(cudaMemcpy(bits.data(), dev, count * 2, cudaMemcpyDeviceToHost));
  return bits;
}

std::vector<float> download_as_float(const void* dev, DType t, size_t count) {
  std::vector<uint16_t> bits = download_bits(dev, count);
  std::vector<float> out(count);
  // A lookup table and all cores make the widening of multi-GB KV caches cheap.
  std::vector<float> table(65536);
  for (uint32_t b = 0; b < 65536; ++b) table[b] = half_bits_to_float(uint16_t(b), t);
  const unsigned n = std::max(1u, std::min(std::thread::hardware_concurrency(), 32u));
  std::vector<std::thread> pool;
  for (unsigned k = 0; k < n; ++k)
    pool.emplace_back([&, k] {
      for (size_t i = count * k / n; i < count * (k + 1) / n; ++i) out[i] = table[bits[i]];
    });
  for (auto& th : pool) th.join();
  return out;
}

std::vector<float> download_f32(const float* dev, size_t count) {
  std::vector<float> out(count);
  if (count) LAB_CUDA_CHECK(cudaMemcpy(out.data(), dev, count * 4, cudaMemcpyDeviceToHost));
  return out;
}

}  // namespace lab
