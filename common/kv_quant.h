// The KV-cache quantization descriptor (07_kv_quant), a part of lab::AttnParams that only chapter 07
// reads: every other chapter refuses a scheme other than none by name (common/attn.h's checks).
#pragma once

#include <cstdint>

namespace lab {

// KV cache quantization (07_kv_quant). With a scheme other than none, k and v point at 1-byte codes
// in the layout of the 16-bit cache ([batch, seqlen_kv, heads_kv, head_dim], paged: [num_pages,
// page_size, heads_kv, head_dim]; strides still in elements, now bytes), and an element reads as
//   int8_*:        x = code (int8, -127..127) * scale          (symmetric; scale >= amax / 127)
//   fp8_e4m3/e5m2: x = code as an FP8 E4M3/E5M2 number         (direct conversion, no scale)
//   fp8_e4m3_head: x = code as E4M3 * scale                     (scale >= amax of the KV head / 448)
// (07_kv_quant/quantize.h has the exact rules.) Scales are fp16 (IEEE half, kKvScaleBytes each:
// per-key scales are read beside 1-byte codes, and fp32 ones would add 12.5% to int8_group32's
// bytes), one tensor for K (k_scale) and one for V (v_scale), laid out as below, where
// "slot, row" is (b, j) for a contiguous cache and (page, j % page_size) for a paged one, and R is
// the rows per slot (seqlen_kv, or page_size):
//   int8_tensor:   [1]
//   int8_token:    [slots][R]                     one scale per token, over all KV heads
//   int8_head:     [slots][heads_kv][R]           one per token and KV head (head-major, so a
//                                                 decoding block reads its keys' scales contiguously)
//   int8_group:    [slots][heads_kv][R][head_dim / group_size]   one per token, head, channel group
//   fp8_e4m3_head: [heads_kv]                     one per KV head, static (calibrated) like int8_tensor
enum class KvScheme : int {
  none = 0,  // the cache holds dtype (16-bit) values
  int8_tensor,
  int8_token,
  int8_head,
  int8_group,
  fp8_e4m3,
  fp8_e5m2,
  fp8_e4m3_head,
};
constexpr int kKvSchemeCount = 8;

// "int8_head"; nullptr for a value outside the enum.
const char* kv_scheme_name(KvScheme s);
// Whether the scheme keeps scales (every int8 scheme and fp8_e4m3_head).
bool kv_scheme_has_scales(KvScheme s);

// Bytes of one stored scale: an fp16 number.
constexpr int kKvScaleBytes = 2;

struct KvQuant {
  KvScheme scheme = KvScheme::none;
  int group_size = 0;  // int8_group only: channels per scale (32 or 64)
  // Device, layout above; nullptr for none and direct FP8. The fp16 scales as their bits (uint16_t),
  // as the lab's host code handles fp16 everywhere: this header stays free of cuda_fp16.h, and the C
  // interface (which has no half type) passes the same type through unchanged.
  const uint16_t* k_scale = nullptr;
  const uint16_t* v_scale = nullptr;
};

}  // namespace lab
