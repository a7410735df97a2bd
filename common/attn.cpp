#include "common/attn.h"

#include <cuda_runtime.h>

#include "common/cuda_check.h"

#include <cmath>
#include <sstream>

namespace lab {

const char* dtype_name(DType t) { return t == DType::fp16 ? "fp16" : "bf16"; }
int dtype_bytes(DType) { return 2; }

const char* kv_scheme_name(KvScheme s) {
  switch (s) {
    case KvScheme::none: return "none";
    case KvScheme::int8_tensor: return "int8_tensor";
    case KvScheme::int8_token: return "int8_token";
    case KvScheme::int8_head: return "int8_head";
    case KvScheme::int8_group: return "int8_group";
    case KvScheme::fp8_e4m3: return "fp8_e4m3";
    case KvScheme::fp8_e5m2: return "fp8_e5m2";
    case KvScheme::fp8_e4m3_head: return "fp8_e4m3_head";
  }
  return nullptr;
}

bool kv_scheme_has_scales(KvScheme s) {
  return s != KvScheme::none && s != KvScheme::fp8_e4m3 && s != KvScheme::fp8_e5m2;
}

int kv_element_bytes(const AttnParams& p) {
  return p.kv_quant.scheme == KvScheme::none ? dtype_bytes(p.dtype) : 1;
}

void set_contiguous_strides(AttnParams& p) {
  const int64_t d = p.head_dim;
  p.q_head_stride = p.o_head_stride = d;
  p.q_row_stride = p.o_row_stride = int64_t(p.heads_q) * d;
  p.q_batch_stride = p.o_batch_stride = int64_t(p.seqlen_q) * p.heads_q * d;
  p.k_head_stride = p.v_head_stride = d;
  p.k_row_stride = p.v_row_stride = int64_t(p.heads_kv) * d;
  const int64_t kv_rows = p.block_table ? p.page_size : p.seqlen_kv;
  p.k_batch_stride = p.v_batch_stride = kv_rows * p.heads_kv * d;
  // Packed (varlen) tensors have no batch stride: sequence b starts at its cu_seqlens row.
  if (p.cu_seqlens_q) p.q_batch_stride = p.o_batch_stride = 0;
  if (p.cu_seqlens_kv && !p.block_table) p.k_batch_stride = p.v_batch_stride = 0;
}

namespace {

std::string join(const std::vector<int>& v) {
  std::ostringstream s;
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  return s.str();
}

bool aligned(const void* ptr, int bytes) { return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0; }

}  // namespace

// The KV quantization descriptor: a scheme the chapter lists (by name; an unknown value by its
// number), its group size and its scale pointers. "" when fine.
template <class Who>
static std::string kv_quant_reason(const AttnParams& p, const Support& s, const Who& who) {
  const KvQuant& kq = p.kv_quant;
  // The 16-bit cache every chapter reads: nothing to check (and nothing built, on every launch).
  if (kq.scheme == KvScheme::none && kq.group_size == 0 && !kq.k_scale && !kq.v_scale) return "";
  auto supported = [&] {
    std::string list = "none";
    for (KvScheme k : s.kv_schemes)
      if (k != KvScheme::none) list += std::string(", ") + kv_scheme_name(k);
    if (s.kv_schemes.empty()) list += "; quantized KV caches: see 07_kv_quant";
    return list;
  };
  const char* name = kv_scheme_name(kq.scheme);
  if (!name)
    return who() + "kv_quant.scheme = " + std::to_string(int(kq.scheme)) + " is unknown (supported: " +
           supported() + ")";
  bool listed = kq.scheme == KvScheme::none;
  for (KvScheme k : s.kv_schemes) listed |= k == kq.scheme;
  if (!listed) return who() + "kv_quant.scheme = " + name + " is not supported (supported: " + supported() + ")";
  if (kq.scheme == KvScheme::int8_group) {
    bool ok = false;
    for (int g : s.kv_group_sizes) ok |= g == kq.group_size;
    if (!ok)
      return who() + "kv_quant.group_size = " + std::to_string(kq.group_size) +
             " is not supported (supported: " + join(s.kv_group_sizes) + ")";
    if (p.head_dim % kq.group_size != 0)
      return who() + "kv_quant.group_size = " + std::to_string(kq.group_size) + " does not divide head_dim = " +
             std::to_string(p.head_dim);
  } else if (kq.group_size != 0) {
    return who() + "kv_quant.group_size = " + std::to_string(kq.group_size) + " is only used by int8_group (" +
           name + " needs 0)";
  }
  if (kv_scheme_has_scales(kq.scheme)) {
    if (!kq.k_scale) return who() + "kv_quant.k_scale is a null pointer (" + name + " needs scales)";
    if (!kq.v_scale) return who() + "kv_quant.v_scale is a null pointer (" + name + " needs scales)";
    if (!aligned(kq.k_scale, kKvScaleBytes) || !aligned(kq.v_scale, kKvScaleBytes))
      return who() + "kv_quant scale pointers must be 2-byte aligned (fp16 scales)";
  } else if (kq.k_scale || kq.v_scale) {
    // A caller passing scales expects them applied: refuse rather than ignore them.
    return who() + "kv_quant.k_scale/v_scale are given but " + name + " has no scales";
  }
  return "";
}

std::string unsupported_reason(const AttnParams& p, const Support& s) {
  // Runs on every launch: nothing is allocated unless a message is returned.
  auto who = [&] { return std::string(s.chapter) + ": "; };
  std::string bad;
  auto positive = [&](const char* name, int64_t v) {
    if (v <= 0) bad = who() + name + " = " + std::to_string(v) + " must be > 0";
    return v > 0;
  };
  if (!positive("batch", p.batch) || !positive("heads_q", p.heads_q) ||
      !positive("heads_kv", p.heads_kv) || !positive("seqlen_q", p.seqlen_q) ||
      !positive("seqlen_kv", p.seqlen_kv) || !positive("head_dim", p.head_dim))
    return bad;

  if (p.heads_q % p.heads_kv != 0)
    return who() + "heads_q = " + std::to_string(p.heads_q) + " is not a multiple of heads_kv = " +
           std::to_string(p.heads_kv);
  if (p.heads_kv != p.heads_q && !s.gqa)
    return who() + "heads_kv = " + std::to_string(p.heads_kv) +
           " != heads_q is not supported (GQA/MQA: see 06_gqa_alibi)";

  if (!s.head_dims.empty()) {
    bool ok = false;
    for (int d : s.head_dims) ok |= d == p.head_dim;
    if (!ok)
      return who() + "head_dim = " + std::to_string(p.head_dim) + " is not supported (supported: " +
             join(s.head_dims) + ")";
  } else if (p.head_dim > s.max_head_dim) {
    return who() + "head_dim = " + std::to_string(p.head_dim) + " is not supported (supported: 1.." +
           std::to_string(s.max_head_dim) + ")";
  }
  if (p.head_dim % s.vector_elems != 0)
    return who() + "head_dim = " + std::to_string(p.head_dim) + " must be a multiple of " +
           std::to_string(s.vector_elems);

  if (p.dtype != DType::fp16 && p.dtype != DType::bf16)
    return who() + "dtype = " + std::to_string(int(p.dtype)) + " is unknown (supported: fp16, bf16)";
  if ((p.dtype == DType::fp16 && !s.fp16) || (p.dtype == DType::bf16 && !s.bf16))
    return who() + "dtype = " + dtype_name(p.dtype) + " is not supported (supported:" +
           (s.fp16 ? " fp16" : "") + (s.bf16 ? " bf16" : "") + ")";

  if (!(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.f))
    return who() + "softmax_scale = " + std::to_string(p.softmax_scale) + " must be finite and > 0";

  {
    const std::string why = kv_quant_reason(p, s, who);
    if (!why.empty()) return why;
  }
  // 16-byte loads of a 1-byte KV cache hold twice as many elements.
  const int kv_vec_elems = s.vector_elems * dtype_bytes(p.dtype) / kv_element_bytes(p);
  if (p.head_dim % kv_vec_elems != 0)
    return who() + "head_dim = " + std::to_string(p.head_dim) + " must be a multiple of " +
           std::to_string(kv_vec_elems) + " for a 1-byte KV cache";

  if (!p.q) return who() + "q is a null pointer";
  if (!p.k) return who() + "k is a null pointer";
  if (!p.v) return who() + "v is a null pointer";
  if (!p.o) return who() + "o is a null pointer";

  // 16-byte vector loads need 16-byte aligned rows.
  const int vec_bytes = s.vector_elems * dtype_bytes(p.dtype);
  struct Named { const char* name; const void* ptr; };
  for (Named t : {Named{"q", p.q}, Named{"k", p.k}, Named{"v", p.v}, Named{"o", p.o}})
    if (!aligned(t.ptr, vec_bytes))
      return who() + t.name + " pointer is not " + std::to_string(vec_bytes) + "-byte aligned";
  struct Stride { const char* name; int64_t value; bool kv; };
  for (Stride t : {Stride{"q_batch_stride", p.q_batch_stride, false},
                   Stride{"q_row_stride", p.q_row_stride, false},
                   Stride{"q_head_stride", p.q_head_stride, false},
                   Stride{"k_batch_stride", p.k_batch_stride, true},
                   Stride{"k_row_stride", p.k_row_stride, true},
                   Stride{"k_head_stride", p.k_head_stride, true},
                   Stride{"v_batch_stride", p.v_batch_stride, true},
                   Stride{"v_row_stride", p.v_row_stride, true},
                   Stride{"v_head_stride", p.v_head_stride, true},
                   Stride{"o_batch_stride", p.o_batch_stride, false},
                   Stride{"o_row_stride", p.o_row_stride, false},
                   Stride{"o_head_stride", p.o_head_stride, false}}) {
    const int elems = t.kv ? kv_vec_elems : s.vector_elems;
    if (t.value < 0) return who() + t.name + " = " + std::to_string(t.value) + " must be >= 0";
    if (t.value % elems != 0)
      return who() + t.name + " = " + std::to_string(t.value) + " is not a multiple of " +
             std::to_string(elems) + " elements (rows must stay " + std::to_string(vec_bytes) +
             "-byte aligned)";
  }
  if (p.q_row_stride < int64_t(p.head_dim) || p.k_row_stride < int64_t(p.head_dim) ||
      p.v_row_stride < int64_t(p.head_dim) || p.o_row_stride < int64_t(p.head_dim))
    return who() + "row strides must be >= head_dim (did you call set_contiguous_strides?)";
  if (p.q_head_stride < int64_t(p.head_dim) || p.k_head_stride < int64_t(p.head_dim) ||
      p.v_head_stride < int64_t(p.head_dim) || p.o_head_stride < int64_t(p.head_dim))
    return who() + "head strides must be >= head_dim (did you call set_contiguous_strides?)";

  if (p.causal && !s.causal) return who() + "causal = true is not supported";
  if (p.lse && !s.lse) return who() + "lse output is not supported";
  if (p.lse && !aligned(p.lse, 4)) return who() + "lse pointer is not 4-byte aligned";
  if (p.alibi_slopes && !s.alibi) return who() + "alibi_slopes are not supported (see 06_gqa_alibi)";
  if ((p.cu_seqlens_q || p.cu_seqlens_kv) && !s.varlen)
    return who() + "cu_seqlens_q/cu_seqlens_kv (varlen) are not supported (see 06_gqa_alibi)";
  if (bool(p.cu_seqlens_q) != bool(p.cu_seqlens_kv))
    return who() + "cu_seqlens_q and cu_seqlens_kv must be given together";
  if (p.cu_seqlens_q) {
    // The packed row counts bound every offset the tables give (varlen_offsets_reason checks them).
    if (p.total_q <= 0)
      return who() + "total_q = " + std::to_string(p.total_q) +
             " must be > 0 with cu_seqlens_q (the rows of the packed q and o)";
    if (p.total_kv <= 0)
      return who() + "total_kv = " + std::to_string(p.total_kv) +
             " must be > 0 with cu_seqlens_kv (the rows of the packed k and v)";
    // A batch stride would move sequence b by b strides past its packed rows.
    struct Packed {
      const char* name;
      int64_t value;
      bool applies;
    };
    for (Packed t :
         {Packed{"q_batch_stride", p.q_batch_stride, true}, Packed{"o_batch_stride", p.o_batch_stride, true},
          Packed{"k_batch_stride", p.k_batch_stride, !p.block_table},
          Packed{"v_batch_stride", p.v_batch_stride, !p.block_table}})
      if (t.applies && t.value != 0)
        return who() + t.name + " = " + std::to_string(t.value) +
               " must be 0 with cu_seqlens_q/cu_seqlens_kv (packed tensors have no batch stride)";
  } else if (p.total_q != 0 || p.total_kv != 0) {
    return who() +
           "total_q/total_kv are given without cu_seqlens_q/cu_seqlens_kv (they are the varlen row counts)";
  }
  if (p.cache_seqlens && !s.cache_seqlens) return who() + "cache_seqlens are not supported";
  if (p.block_table && !s.paged_kv) return who() + "block_table (paged KV) is not supported";
  if (p.block_table) {
    if (p.page_size < 16 || (p.page_size & (p.page_size - 1)))
      return who() + "page_size = " + std::to_string(p.page_size) + " must be a power of two >= 16";
    if (p.max_pages_per_seq <= 0)
      return who() + "max_pages_per_seq = " + std::to_string(p.max_pages_per_seq) + " must be > 0";
    if (int64_t(p.max_pages_per_seq) * p.page_size < p.seqlen_kv)
      return who() + "seqlen_kv = " + std::to_string(p.seqlen_kv) +
             " exceeds the block table's capacity max_pages_per_seq * page_size = " +
             std::to_string(int64_t(p.max_pages_per_seq) * p.page_size);
    if (p.num_pages <= 0) return who() + "num_pages = " + std::to_string(p.num_pages) + " must be > 0";
  }
  if (s.max_seqlen_q > 0 && p.seqlen_q > s.max_seqlen_q)
    return who() + "seqlen_q = " + std::to_string(p.seqlen_q) + " is not supported (supported: " +
           (s.max_seqlen_q == 1 ? "1" : "1.." + std::to_string(s.max_seqlen_q)) + ")";
  if (p.num_splits < 0) return who() + "num_splits = " + std::to_string(p.num_splits) + " must be >= 0";
  if (p.num_splits > 0 && !s.splits)
    return who() + "num_splits = " + std::to_string(p.num_splits) +
           " is not supported (split-KV decoding: see 04_flash_decoding)";
  if (s.max_splits > 0 && p.num_splits > s.max_splits)
    return who() + "num_splits = " + std::to_string(p.num_splits) + " is not supported (supported: 0.." +
           std::to_string(s.max_splits) + ")";
  return "";
}

std::string kv_cache_tables_reason(const AttnParams& p, const std::vector<int>& cache_seqlens,
                                   const std::vector<int>& block_table, const char* chapter) {
  const std::string who = std::string(chapter) + ": ";
  if ((p.cache_seqlens && cache_seqlens.size() != size_t(p.batch)) ||
      (p.block_table && block_table.size() != size_t(p.batch) * p.max_pages_per_seq))
    throw InvalidArgument(who + "kv_cache_tables_reason: host tables of the wrong size");
  std::vector<int> lens(size_t(p.batch), p.seqlen_kv);
  if (p.cache_seqlens) {
    lens = cache_seqlens;
    for (int b = 0; b < p.batch; ++b)
      if (lens[b] < 0 || lens[b] > p.seqlen_kv)
        return who + "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
               " is outside 0..seqlen_kv = " + std::to_string(p.seqlen_kv) + " (the cache capacity)";
  }
  if (p.block_table) {
    for (int b = 0; b < p.batch; ++b)
      for (int j = 0; j < (lens[b] + p.page_size - 1) / p.page_size; ++j) {
        const int page = block_table[size_t(b) * p.max_pages_per_seq + j];
        if (page < 0 || page >= p.num_pages)
          return who + "block_table[" + std::to_string(b) + "][" + std::to_string(j) + "] = " +
                 std::to_string(page) + " is outside 0..num_pages-1 = " + std::to_string(p.num_pages - 1);
      }
  }
  return "";
}

namespace {

// `n` ints of device memory, read in the order of `stream`: the copy waits for the work enqueued
// there before it (a table written by the caller on a non-blocking stream is read as written).
std::vector<int> download_ints(const int* device, size_t n, cudaStream_t stream) {
  std::vector<int> host(n);
  LAB_CUDA_CHECK(cudaMemcpyAsync(host.data(), device, n * sizeof(int), cudaMemcpyDeviceToHost, stream));
  LAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

}  // namespace

std::string kv_cache_tables_reason(const AttnParams& p, const char* chapter, CUstream_st* stream) {
  std::vector<int> lens, table;
  if (p.cache_seqlens) lens = download_ints(p.cache_seqlens, size_t(p.batch), stream);
  if (p.block_table) table = download_ints(p.block_table, size_t(p.batch) * p.max_pages_per_seq, stream);
  return kv_cache_tables_reason(p, lens, table, chapter);
}

std::string varlen_offsets_reason(const AttnParams& p, const std::vector<int>& cu_seqlens_q,
                                  const std::vector<int>& cu_seqlens_kv, const char* chapter) {
  if (!p.cu_seqlens_q || !p.cu_seqlens_kv) return "";
  const std::string who = std::string(chapter) + ": ";
  if (cu_seqlens_q.size() != size_t(p.batch) + 1 || cu_seqlens_kv.size() != size_t(p.batch) + 1)
    throw InvalidArgument(who + "varlen_offsets_reason: host offsets of the wrong size (batch + 1 each)");
  struct Named {
    const char* name;
    const std::vector<int>& cu;
    int longest;
    const char* longest_name;
    int total;
    const char* total_name;
    const char* tensors;
  };
  for (const Named& t :
       {Named{"cu_seqlens_q", cu_seqlens_q, p.seqlen_q, "seqlen_q", p.total_q, "total_q", "q and o"},
        Named{"cu_seqlens_kv", cu_seqlens_kv, p.seqlen_kv, "seqlen_kv", p.total_kv, "total_kv", "k and v"}}) {
    const std::vector<int>& cu = t.cu;
    if (cu[0] != 0) return who + t.name + "[0] = " + std::to_string(cu[0]) + " must be 0";
    for (int b = 0; b < p.batch; ++b) {
      const int64_t len = int64_t(cu[b + 1]) - cu[b];
      if (len < 0)
        return who + t.name + " is not increasing: " + t.name + "[" + std::to_string(b + 1) + "] = " +
               std::to_string(cu[b + 1]) + " < " + t.name + "[" + std::to_string(b) + "] = " + std::to_string(cu[b]);
      if (len > t.longest)
        return who + t.name + ": sequence " + std::to_string(b) + " has " + std::to_string(len) +
               " rows, more than " + t.longest_name + " = " + std::to_string(t.longest) + " (the longest)";
    }
    // Offsets past the packed tensors would read and write outside them.
    if (cu[size_t(p.batch)] > t.total)
      return who + t.name + "[" + std::to_string(p.batch) + "] = " + std::to_string(cu[size_t(p.batch)]) +
             " exceeds " + t.total_name + " = " + std::to_string(t.total) + " (the rows of the packed " +
             t.tensors + ")";
  }
  return "";
}

std::string varlen_offsets_reason(const AttnParams& p, const char* chapter, CUstream_st* stream) {
  if (!p.cu_seqlens_q || !p.cu_seqlens_kv) return "";
  return varlen_offsets_reason(p, download_ints(p.cu_seqlens_q, size_t(p.batch) + 1, stream),
                               download_ints(p.cu_seqlens_kv, size_t(p.batch) + 1, stream), chapter);
}

void check_params(const AttnParams& p, const Support& s) {
  std::string why = unsupported_reason(p, s);
  if (!why.empty()) throw InvalidArgument(why);
}

}  // namespace lab
