// The fp64 CPU reference: the definition every chapter is checked against.
//   s_ij = scale * q_i . k_j - alibi_slope_h * |i + sk - sq - j|        (ALiBi only if given)
//   key j is visible to query i unless causal and j > i + sk - sq      (bottom-right aligned)
//   p_ij = exp(s_ij - lse_i) over visible keys,   lse_i = log sum_j exp(s_ij)
//   o_i  = sum_j p_ij v_j                        (0, with lse = -inf, when no key is visible)
//   NaN (common/attn.h's rule): a NaN score (q_i or a visible k_j) makes o_i and lse_i NaN; a NaN in
//   v_j[c] makes o_i[c] NaN for every row that sees key j, whatever its weight; unseen keys never count.
#pragma once

#include <vector>

#include "common/attn.h"

namespace lab {

// A problem on the host: AttnParams' scalars and strides, with host copies of the tensors (in the
// device layout, widened to float) and of the metadata arrays. Device pointers are not used.
struct HostProblem {
  AttnParams shape;
  std::vector<float> q, k, v;
  std::vector<int> cu_seqlens_q, cu_seqlens_kv, cache_seqlens, block_table;
  std::vector<float> alibi_slopes;
};

// Lengths of sequence b after varlen offsets and cache lengths.
int seqlen_q_of(const HostProblem& hp, int b);
int seqlen_kv_of(const HostProblem& hp, int b);
// Number of keys query row i of sequence b sees.
int visible_keys(bool causal, int i, int sq, int sk);

// Element offsets of a Q/O row and of a K/V row (handles varlen and paged KV).
int64_t q_offset(const AttnParams& p, int b, int i, int h);
int64_t o_offset(const AttnParams& p, int b, int i, int h);
int64_t kv_offset(const HostProblem& hp, bool is_v, int b, int j, int h_kv);
int64_t lse_offset(const AttnParams& p, int b, int h, int i);

// The standard ALiBi slopes for n heads (Press et al.; non-powers of two interleave the next
// power of two's slopes, as BLOOM and MPT do).
std::vector<float> alibi_slopes_standard(int heads);

// Attention probabilities of row (b, h, i) over keys 0..sk-1 (zero where masked). Returns lse.
double reference_probs(const HostProblem& hp, int b, int h, int i, std::vector<double>& p);
// Output row (b, h, i) into out[0..head_dim). Returns lse (-inf when no key is visible).
double reference_row(const HostProblem& hp, int b, int h, int i, double* out);

}  // namespace lab
