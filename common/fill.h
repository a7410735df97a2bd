// Seeded random inputs (generated on the GPU, reproducible on any run), output poisoning, and
// host-side fp16/bf16 conversion.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/attn.h"

namespace lab {

// Input distributions. `large_logits` scales Q and K so that scale * q.k has a standard deviation
// near 9: softmax rows are peaked and the online-softmax rescaling really runs. `outliers` gives
// one channel in 16 of K and V a 10x larger spread, as the KV caches of real LLMs have.
enum class Dist { normal, large_logits, outliers };
const char* dist_name(Dist d);
bool parse_dist(const std::string& s, Dist& out);

struct InputScales {
  float q_std, k_std, v_std;
  float kv_outlier_scale;  // multiplies the spread of outlier channels of K and V
};
InputScales input_scales(Dist d);

// Fills `count` elements; element i belongs to channel i % channels (the head_dim index for
// contiguous tensors). Channels with (hash(seed_channel) % 16 == 0) are outliers.
void fill_random(void* dev, DType t, size_t count, int channels, uint64_t seed, float stddev,
                 float outlier_scale, cudaStream_t stream = 0);

// A NaN with a payload that kernels do not produce: left in place, it marks an unwritten element.
constexpr uint16_t kPoisonFp16 = 0x7E5A;
constexpr uint16_t kPoisonBf16 = 0x7FDA;
constexpr uint32_t kPoisonF32 = 0x7FC0FFEEu;
inline uint16_t poison_bits(DType t) { return t == DType::fp16 ? kPoisonFp16 : kPoisonBf16; }
void poison(void* dev, DType t, size_t count, cudaStream_t stream = 0);
void poison_f32(float* dev, size_t count, cudaStream_t stream = 0);

// Host conversions between float and the 16-bit storage formats (round to nearest even).
float half_bits_to_float(uint16_t bits, DType t);
uint16_t float_to_half_bits(float x, DType t);

// Copies a device tensor to the host and widens it to float (synchronizes).
std::vector<float> download_as_float(const void* dev, DType t, size_t count);
std::vector<uint16_t> download_bits(const void* dev, size_t count);
std::vector<float> download_f32(const float* dev, size_t count);

}  // namespace lab
