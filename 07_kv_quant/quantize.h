// Chapter 07: quantizing an fp16 KV cache into int8 or FP8, on the GPU (quantize.cu: in bulk, and
// on append as new tokens are written) and on the host (quantize_host.cpp: the same rules, for
// tests and for the dequantized reference). What each scheme stores, and where its scales live, is
// defined once in common/attn.h (lab::KvScheme, lab::KvQuant); the kernels that read it are in
// kernel.cu.
//
// The rules, identical on the device and the host (so the two agree bit for bit):
//   int8 (symmetric):  scale = amax / 127 in fp32, stored as fp16 rounded UP (toward +inf), so
//                      that |x| / scale <= 127 still holds and no code clips; 1 when amax is 0 or
//                      not finite, and at least 2^-24 (the smallest fp16 above 0): a scale is never
//                      0, NaN or Inf. code = clamp(round_half_even(x / s), -127, 127), where s is
//                      the STORED scale (as fp32), and x reads back as code * s; a NaN element
//                      codes as 0. The fp16 rounding makes s at most 2^-10 (relative) larger than
//                      amax / 127 (at most 2^-24 larger where that is below fp16's normal range,
//                      amax < 127 * 2^-14): the step, and so the error bound s / 2, grow that much.
//   FP8 direct:        code = x rounded to nearest even in E4M3 (E5M2), saturated to the largest
//                      finite value (448; 57344), as cuda_fp8.h's __NV_SATFINITE conversion does.
//   FP8 E4M3 per head: scale = amax of the KV head / 448, rounded up to fp16 likewise (1 when 0),
//                      code = E4M3(x / s) with the stored s.
// amax of fp16 inputs is at most 65504, so a scale never overflows fp16 (a larger amax, possible
// only through int8_scale() and e4m3_scale() directly, gets 65504 and its codes clamp).
// amax is taken over what the scale covers: the whole tensor (int8_tensor, in bulk), one token's
// row over all KV heads (int8_token), one token and head (int8_head), one token, head and group
// of channels (int8_group), one KV head over every token (fp8_e4m3_head, in bulk).
//
// Static scales on append: int8_tensor and fp8_e4m3_head scales cover tokens that have not been
// written yet, so an engine calibrates them beforehand (or takes them from a bulk pass over a
// prompt). quantize_append() uses the scales already in the cache and clamps (int8) or saturates
// (FP8) what falls outside; every other scheme computes its scales from the rows it writes.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/attn.h"
#include "common/driver.h"
#include "common/reference.h"

namespace ch07 {

using lab::KvScheme;

// A quantized KV cache: where its codes and scales are and how they are laid out. The codes keep
// the fp16 cache's layout ([slots, rows, heads_kv, head_dim]; slots are sequences, or pages when
// paged), with strides rounded up to 16 elements so that every row stays 16-byte aligned; the
// scales follow common/attn.h.
struct KvCache {
  KvScheme scheme = KvScheme::none;
  int group_size = 0;  // int8_group: 32 or 64
  uint8_t* k = nullptr;
  uint8_t* v = nullptr;
  uint16_t* k_scale = nullptr;  // fp16 bits, as lab::KvQuant's
  uint16_t* v_scale = nullptr;
  int64_t slot_stride = 0, row_stride = 0, head_stride = 0;  // elements (= bytes)
  int slots = 0;                                             // batch, or num_pages when paged
  int rows = 0;  // seqlen_kv (the capacity), or page_size when paged
  int heads_kv = 0, head_dim = 0;
  // For append: how a (sequence, position) finds its slot and row.
  int batch = 0;
  const int* block_table = nullptr;  // device; nullptr: contiguous
  int max_pages_per_seq = 0;
};

// Where the scale of (slot, row, head, channel) is in a scale tensor of the cache's scheme
// (common/attn.h's layouts); 0 for schemes without scales.
__host__ __device__ inline int64_t scale_index(KvScheme scheme, int group_size, int64_t slot, int row,
                                               int head, int channel, int rows, int heads_kv, int head_dim) {
  switch (scheme) {
    case KvScheme::int8_token:
      return slot * rows + row;
    case KvScheme::int8_head:
      return (slot * heads_kv + head) * rows + row;
    case KvScheme::int8_group:
      return ((slot * heads_kv + head) * rows + row) * (head_dim / group_size) + channel / group_size;
    case KvScheme::fp8_e4m3_head:
      return head;
    default:
      return 0;  // int8_tensor: one scale; none, fp8_e4m3, fp8_e5m2: no scale
  }
}

// A stored scale (fp16 bits) as the float it is; the same conversion on the host and the device.
__host__ __device__ inline float scale_value(uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}

// The fp16 scale stored for the fp32 quotient `x` (amax / 127, or / 448; x >= 0): the smallest fp16
// value >= x, so that dividing by it never pushes an element past the largest code; at least 2^-24
// (x may underflow to 0 in fp32, and a scale must never be 0) and at most 65504 (see above). Round
// to nearest, then one step up if that fell below x (positive fp16 values order like their bits):
// one function for the host and the device quantizer, so that both store the same bits.
__host__ __device__ inline uint16_t scale_bits_at_least(float x) {
  x = x < 65504.f ? x : 65504.f;
  __half_raw r = __half_raw(__float2half_rn(x));
  if (scale_value(r.x) < x) ++r.x;
  return r.x > 0 ? r.x : uint16_t(1);
}

// The layout of a cache in `scheme` for the fp16 problem `p` (no memory yet: see place()).
KvCache cache_layout(const lab::AttnParams& p, KvScheme scheme, int group_size);
size_t code_bytes(const KvCache& c);     // of K (V is the same)
size_t scale_count(const KvCache& c);    // fp16 scales of K (V's are the same)
size_t storage_bytes(const KvCache& c);  // codes and scales of K and V, each part 256-byte aligned
void place(KvCache& c, void* storage);   // points k, v, k_scale, v_scale into `storage`
// Points p's K/V (pointers, strides, kv_quant) at the cache; and back from such params.
void use_cache(lab::AttnParams& p, const KvCache& c);
KvCache cache_of(const lab::AttnParams& p);

// Bulk: quantizes every row of the fp16 K and V that `src` describes (every slot and row, the
// whole capacity) into `dst`, computing all scales. Enqueued on `stream`.
void quantize_bulk(const lab::AttnParams& src, const KvCache& dst, cudaStream_t stream);

// Append: quantizes `n` new tokens into the cache. k_new and v_new are fp16 [n, heads_kv,
// head_dim] (contiguous, device); token r goes to position pos[r] of sequence seq[r] (device
// arrays), through the block table when paged. Static scales (int8_tensor, fp8_e4m3_head) must
// already be in the cache (see above); rows whose (seq, pos) fall outside the cache are skipped,
// never written outside it.
void quantize_append(const KvCache& dst, const void* k_new, const void* v_new, const int* seq, const int* pos,
                     int n, cudaStream_t stream);

// ---- host side (quantize_host.cpp) ----

// The codes and scales of a cache, on the host; `layout` has no usable pointers. Scales are fp16
// bits, as stored: scale_value() reads one.
struct HostKvCache {
  KvCache layout;
  std::vector<uint8_t> k, v;
  std::vector<uint16_t> k_scale, v_scale;
};
HostKvCache download(const KvCache& c);  // synchronous

// FP8 by hand: round to nearest even, saturating to the largest finite value; NaN stays NaN.
uint8_t encode_e4m3(float x);
uint8_t encode_e5m2(float x);
float decode_e4m3(uint8_t code);
float decode_e5m2(uint8_t code);
// The scales (fp16 bits, the rules above) and int8 codes. encode_int8 takes the stored scale as
// a float: scale_value(int8_scale(amax)).
uint16_t int8_scale(float amax);
uint16_t e4m3_scale(float amax);
int8_t encode_int8(float x, float scale);

// The host quantizer: the same codes and scales as quantize_bulk(), from the host problem's fp16
// values (hp.k, hp.v in hp.shape's layout).
HostKvCache quantize_host(const lab::HostProblem& hp, KvScheme scheme, int group_size);
// One element, dequantized: what the decoding kernel reads at (slot, row, head, channel).
float dequantize(const HostKvCache& c, bool is_v, int slot, int row, int head, int channel);
// Writes every dequantized element into hp.k and hp.v (hp.shape's layout, already sized).
void dequantize_host(const HostKvCache& c, lab::HostProblem& hp);

// ---- the driver's hook (lab::KvPrepare) for each quantized variant ----
// bytes: storage_bytes; prepare: quantize_bulk into the storage, then use_cache; host_kv:
// download and dequantize_host.
const lab::KvPrepare* kv_prepare(KvScheme scheme, int group_size);

}  // namespace ch07
