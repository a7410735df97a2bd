// The one problem description every chapter takes, and the checks that refuse what a chapter
// does not support. Layout is FlashAttention's: Q, O are [batch, seqlen_q, heads_q, head_dim],
// K, V are [batch, seqlen_kv, heads_kv, head_dim], head_dim contiguous; other strides are free.
#pragma once

// cudaStream_t without cuda_runtime.h (it is a pointer to this struct), so that this header stays
// includable from plain C++.
struct CUstream_st;

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/kv_quant.h"

namespace lab {

enum class DType : int { fp16 = 0, bf16 = 1 };

const char* dtype_name(DType t);
int dtype_bytes(DType t);

// Thrown for a problem a launcher refuses; what() names the field and what is allowed.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct AttnParams {
  // Device tensors.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // optional, [batch, heads_q, seqlen_q]: log(sum_j exp(s_ij)), natural log

  // NaN, one rule for the whole lab (FlashAttention's and PyTorch's): a NaN is never turned into
  // an answer. A NaN in q row i, or in any channel of a key row j that row i sees, makes every
  // channel of O row i and lse_i NaN; a NaN in V[j][c] makes O[i][c] NaN for every row i that sees
  // key j (it may also reach rows of the same key tile that do not see j, through 0 * NaN in P V).
  // Keys a row does not see (causal mask, beyond its cache length) never change it otherwise. The
  // same answer for every split count.

  // Strides in elements (head_dim stride is 1). set_contiguous_strides() fills the usual ones.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  DType dtype = DType::fp16;
  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;  // heads_q % heads_kv == 0: query head h reads KV head h / (heads_q / heads_kv)
  int seqlen_q = 0;  // with cu_seqlens_q: the longest sequence
  int seqlen_kv = 0; // with cu_seqlens_kv: the longest; with cache_seqlens: the cache capacity
  int head_dim = 0;
  float softmax_scale = 0.f;  // usually 1/sqrt(head_dim)
  // Causal mask aligned bottom-right as in FlashAttention: query i of a sequence with sq queries
  // and sk keys sees keys j <= i + sk - sq (rows with no visible key output 0 and lse = -inf).
  bool causal = false;

  // ALiBi, as FlashAttention defines it: s_ij -= alibi_slopes[h] * |i + sk - sq - j| (the
  // distance from the bottom-right diagonal, on both sides when not causal); device, [heads_q].
  const float* alibi_slopes = nullptr;

  // Varlen (packed) batches: sequence b's query rows are cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1
  // of a [total_q, heads_q, head_dim] tensor; device, [batch + 1]. The batch strides of packed
  // tensors must be 0 (q, o with cu_seqlens_q; k, v with cu_seqlens_kv unless paged): a non-zero
  // one is refused by name, as it would move every sequence past its packed rows.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_kv = nullptr;
  // With varlen: the rows the packed tensors hold (q and o: total_q, k and v: total_kv), so that
  // offsets past them are refused on the host and never followed on the device.
  int total_q = 0;
  int total_kv = 0;

  // KV cache: sequence b attends to its first cache_seqlens[b] keys; device, [batch].
  const int* cache_seqlens = nullptr;
  // Paged KV cache: K/V are [num_pages, page_size, heads_kv, head_dim] (k/v_batch_stride is the
  // page stride); key j of sequence b lives in page block_table[b * max_pages_per_seq + j / page_size].
  const int* block_table = nullptr;
  int page_size = 0;
  int max_pages_per_seq = 0;
  int num_pages = 0;

  int num_splits = 0;  // split-KV decoding: 0 picks a count from the problem and the GPU

  // Scratch memory for chapters that need it (see each chapter's workspace_bytes()).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  // Optional KV quantization descriptor (KvQuant, common/kv_quant.h). Appended last so that code written
  // before it keeps its meaning: the default (none) is the 16-bit cache every chapter reads.
  KvQuant kv_quant;
};

// Bytes of one stored K/V element: 1 with a quantized cache, else the dtype's 2.
int kv_element_bytes(const AttnParams& p);

// Strides for contiguous [batch, seqlen, heads, head_dim] tensors. For varlen packing set
// cu_seqlens_q/kv first: the packed tensors then get batch stride 0 (set total_q/total_kv yourself).
void set_contiguous_strides(AttnParams& p);

// Which part of AttnParams a chapter computes. Everything else is refused by name.
struct Support {
  const char* chapter = "";
  std::vector<int> head_dims;  // empty: any head_dim in [1, max_head_dim]
  int max_head_dim = 256;
  bool fp16 = true;
  bool bf16 = false;
  bool causal = false;
  bool gqa = false;           // heads_kv != heads_q
  bool lse = false;
  bool alibi = false;
  bool varlen = false;
  bool cache_seqlens = false;
  bool paged_kv = false;
  bool splits = false;        // honours num_splits (split-KV decoding)
  int max_splits = 0;         // num_splits above this is refused (0: no limit)
  int max_seqlen_q = 0;       // 0: no limit
  int vector_elems = 8;       // strides and pointers must be multiples of this many elements
                              // (of 16-bit dtype elements: for a 1-byte KV cache, the K/V strides
                              // must cover the same number of bytes, i.e. twice as many elements)
  // KV cache schemes besides none (07_kv_quant); empty: only the 16-bit cache.
  std::vector<KvScheme> kv_schemes;
  std::vector<int> kv_group_sizes;  // group sizes int8_group accepts
};

// Throws InvalidArgument naming the first field that is wrong or unsupported.
void check_params(const AttnParams& p, const Support& s);

// The same checks, returning the message instead of throwing ("" when supported).
std::string unsupported_reason(const AttnParams& p, const Support& s);

// The device-side KV-cache tables: every cache_seqlens[b] in 0..seqlen_kv (the capacity) and every
// block_table entry a sequence uses in 0..num_pages-1; "" when they are valid, else names the first
// bad entry. It copies the tables to the host in the order of `stream` (the stream the kernels will
// run on, so that tables written there are read as written) and waits for that stream
// (cudaStreamSynchronize): it synchronizes, so it runs before timing, not per launch. The decoding
// kernels never read outside the cache whatever the tables hold: a bad entry they meet turns that
// output row into NaN.
std::string kv_cache_tables_reason(const AttnParams& p, const char* chapter, CUstream_st* stream = nullptr);
// The same checks on host copies of the tables (cache_seqlens: [batch], or empty when p has none;
// block_table: [batch * max_pages_per_seq], or empty). Nothing touches the GPU.
std::string kv_cache_tables_reason(const AttnParams& p, const std::vector<int>& cache_seqlens,
                                   const std::vector<int>& block_table, const char* chapter);

// The same for varlen offsets: cu_seqlens_q and cu_seqlens_kv start at 0, never decrease, end at
// most at total_q / total_kv (the rows of the packed tensors), and no sequence is longer than
// seqlen_q / seqlen_kv (the longest, which sizes the grid). Synchronizes `stream` as above.
std::string varlen_offsets_reason(const AttnParams& p, const char* chapter, CUstream_st* stream = nullptr);
// On host copies of cu_seqlens_q and cu_seqlens_kv ([batch + 1] each); nothing touches the GPU.
std::string varlen_offsets_reason(const AttnParams& p, const std::vector<int>& cu_seqlens_q,
                                  const std::vector<int>& cu_seqlens_kv, const char* chapter);

}  // namespace lab
