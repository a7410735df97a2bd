// Chapter 07: the KV cache in int8 (scales per tensor, token, token and head, or scale group of
// channels) and FP8 (E4M3 and E5M2 by direct conversion, E4M3 with a scale per KV head). Decoding
// reads half the bytes of an fp16 cache and dequantizes in registers, in two steps:
//   kernel_dequant.cu:  step 1, 05's kernel reading 1-byte codes, converted and scaled per key
//   kernel.cu:          step 2, the fast kernel: two heads per block, 256-thread blocks, dp4a q . k,
//                       fixed scales folded into q and O, pointer stepping
//   dequant.cuh:        the conversions of codes to fp32, shared by both steps
//   quantize.cu/.h:     the quantizers (bulk and append) on the GPU, the cache layout
//   quantize_host.cpp:  the same rules on the host, the FP8 formats by hand, the dequantizer
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <vector>

#include "04_flash_decoding/kernel.h"
#include "07_kv_quant/quantize.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch07 {

// head_dim 64, 128, 256; fp16 (Q, O, and the KV cache before quantization); seqlen_q = 1 (causal
// accepted: it masks nothing there); GQA/MQA (each query head reads its KV head, as in 05); lse;
// cache_seqlens; paged KV; num_splits; kv_quant: none and every scheme of lab::KvScheme (scale
// group sizes 32 and 64).
// Both steps support the same.
extern const lab::Support kSupport;

// Keys are counted in int in both kernels; a split's range rounded up to whole steps (at most 256
// splits of 256 keys) must stay below INT_MAX, so seqlen_kv above this is refused by name.
constexpr int kMaxSeqlenKv = INT_MAX - (1 << 20);
// The support check and the bound above; both launchers call it before any GPU work.
void check_launch(const lab::AttnParams& p);

// Step 2 (kernel.cu). Decodes from the cache p.kv_quant describes (none: the fp16 cache).
int num_splits_for(const lab::AttnParams& p);
size_t workspace_bytes(const lab::AttnParams& p);  // the partials of 04's combine
void forward(const lab::AttnParams& p, cudaStream_t stream);

// Step 1 (kernel_dequant.cu): the same call, 05's kernel structure.
int num_splits_for_dequant(const lab::AttnParams& p);
size_t workspace_bytes_dequant(const lab::AttnParams& p);
void forward_dequant(const lab::AttnParams& p, cudaStream_t stream);

// The schemes, in this order. A variant is a (step, scheme) pair: "int8_head" is step 2 (kernel.cu)
// on an int8_head cache, "dequant_int8_head" step 1 on the same cache; they differ in how the
// driver prepares the fp16 problem's K/V for them (lab::KvPrepare: quantize_bulk into a cache of
// that scheme). "fp16" is step 2 reading the fp16 cache itself: the baseline of the speedups.
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

// Variants: "fp16", then per scheme step 1 ("dequant_" + scheme) and step 2 (the scheme's name),
// so that the ladder's "vs prev" column of a step-2 row is what step 2 bought on that scheme.
inline lab::Chapter chapter() {
  lab::Chapter c{"07_kv_quant", {}};
  for (const SchemeVariant& s : scheme_variants()) {
    if (s.scheme == lab::KvScheme::none) {
      c.variants.push_back({s.name, forward, &kSupport, workspace_bytes, num_splits_for, nullptr});
      continue;
    }
    const lab::KvPrepare* prepare = kv_prepare(s.scheme, s.group_size);
    c.variants.push_back({std::string("dequant_") + s.name, forward_dequant, &kSupport,
                          workspace_bytes_dequant, num_splits_for_dequant, prepare});
    c.variants.push_back({s.name, forward, &kSupport, workspace_bytes, num_splits_for, prepare});
  }
  return c;
}

}  // namespace ch07
