// Chapter 07: the KV cache in int8 (scales per tensor, token, token and head, or group of
// channels) and FP8 (E4M3 and E5M2 by direct conversion, E4M3 with a scale per KV head). Decoding
// reads half the bytes of an fp16 cache and dequantizes in registers, in 05's kernel structure.
//   kernel.cu:          the decoding kernel, one instantiation per scheme (and fp16, the baseline)
//   quantize.cu/.h:     the quantizers (bulk and append) on the GPU, the cache layout
//   quantize_host.cpp:  the same rules on the host, the FP8 formats by hand, the dequantizer
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "04_flash_decoding/kernel.h"
#include "07_kv_quant/quantize.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch07 {

// head_dim 64, 128, 256; fp16 (Q, O, and the KV cache before quantization); seqlen_q = 1 (causal
// accepted: it masks nothing there); GQA/MQA (each query head reads its KV head, as in 05); lse;
// cache_seqlens; paged KV; num_splits; kv_quant: none and every scheme of lab::KvScheme (group
// sizes 32 and 64).
extern const lab::Support kSupport;

int num_splits_for(const lab::AttnParams& p);
size_t workspace_bytes(const lab::AttnParams& p);  // the partials of 04's combine
// Decodes from the cache p.kv_quant describes (none: the fp16 cache, as 05 does).
void forward(const lab::AttnParams& p, cudaStream_t stream);

// The variants: one per scheme, in this order. Each runs the same forward(); they differ in how
// the driver prepares the fp16 problem's K/V for them (lab::KvPrepare: quantize_bulk into a cache
// of that scheme). "fp16" reads the fp16 cache itself: the baseline of the speedups.
struct SchemeVariant {
  const char* name;
  lab::KvScheme scheme;
  int group_size;
};
inline const std::vector<SchemeVariant>& scheme_variants() {
  using lab::KvScheme;
  static const std::vector<SchemeVariant> v = {{"fp16", KvScheme::none, 0},
                                               {"int8_tensor", KvScheme::int8_tensor, 0},
                                               {"int8_token", KvScheme::int8_token, 0},
                                               {"int8_head", KvScheme::int8_head, 0},
                                               {"int8_group32", KvScheme::int8_group, 32},
                                               {"int8_group64", KvScheme::int8_group, 64},
                                               {"fp8_e4m3", KvScheme::fp8_e4m3, 0},
                                               {"fp8_e5m2", KvScheme::fp8_e5m2, 0},
                                               {"fp8_e4m3_head", KvScheme::fp8_e4m3_head, 0}};
  return v;
}

inline lab::Chapter chapter() {
  lab::Chapter c{"07_kv_quant", {}};
  for (const SchemeVariant& s : scheme_variants())
    c.variants.push_back({s.name, forward, &kSupport, workspace_bytes, num_splits_for,
                          s.scheme == lab::KvScheme::none ? nullptr : kv_prepare(s.scheme, s.group_size)});
  return c;
}

}  // namespace ch07
