// Chapter 06: grouped-query attention, ALiBi and hybrid prefill + decode batches, in one kernel.
//   kernel.cu: 03's FlashAttention-2 kernel with the G query heads of a KV group packed into the
//              rows of the tile (each K/V tile loaded once per group), ALiBi as a score bias, varlen
//              (cu_seqlens) batches mixing prefill and decode sequences, and 04's split-KV.
#pragma once

#include <cuda_runtime.h>

#include "04_flash_decoding/kernel.h"
#include "common/attn.h"
#include "common/driver.h"

namespace ch06 {

// head_dim 64, 128; fp16, bf16; causal (bottom-right per sequence); GQA/MQA (heads_q a multiple of
// heads_kv); ALiBi (alibi_slopes, [heads_q], e.g. lab::alibi_slopes_standard); varlen
// (cu_seqlens_q/kv, seqlen_q/kv the longest); lse; num_splits.
extern const lab::Support kSupport;

int num_splits_for(const lab::AttnParams& p);
size_t workspace_bytes(const lab::AttnParams& p);  // 04's partials when splits > 1
void forward(const lab::AttnParams& p, cudaStream_t stream);

inline lab::Chapter chapter() {
  return {"06_gqa_alibi", {{"", forward, &kSupport, workspace_bytes, num_splits_for}}};
}

}  // namespace ch06
