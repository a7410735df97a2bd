// The C interface of capi/lab_attention.h on top of the chapters' own launchers: name lookup, a
// field-for-field copy of LabAttnParams into lab::AttnParams, and exceptions turned into return
// codes and a thread-local message (no C++ exception may cross into a C or Python caller).
#include "capi/lab_attention.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

// A chapter left out of the build (its architecture minimum, see add_chapter) is left out here too:
// LAB_HAVE_<DIR> comes with the chapter's library.
#if LAB_HAVE_01_NAIVE
#include "01_naive/kernel.h"
#endif
#if LAB_HAVE_02_FLASH_V1
#include "02_flash_v1/kernel.h"
#endif
#if LAB_HAVE_03_FLASH_V2
#include "03_flash_v2/kernel.h"
#endif
#if LAB_HAVE_04_FLASH_DECODING
#include "04_flash_decoding/kernel.h"
#endif
#if LAB_HAVE_05_DECODING_CUDA_CORE
#include "05_decoding_cuda_core/kernel.h"
#endif
#if LAB_HAVE_06_GQA_ALIBI
#include "06_gqa_alibi/kernel.h"
#endif
#if LAB_HAVE_07_KV_QUANT
#include "07_kv_quant/kernel.h"
#include "07_kv_quant/quantize.h"
#endif
#if LAB_HAVE_08_FLASH_V3
#include "08_flash_v3/kernel.h"
#endif
#include "common/cuda_check.h"
#include "common/driver.h"

// LabAttnParams mirrors lab::AttnParams field for field. When a field is added there (07's KV
// quantization descriptor, say), this stops the build until it is added to LabAttnParams, to
// to_attn_params() below and to python/lab's copy, with LAB_ATTENTION_ABI_VERSION bumped.
static_assert(sizeof(void*) != 8 || sizeof(lab::AttnParams) == 280,
              "lab::AttnParams changed: mirror it in LabAttnParams (capi/lab_attention.h)");
// The LAB_KV_* values are lab::KvScheme's; a scheme added there needs its LAB_KV_* here.
static_assert(LAB_KV_NONE == int(lab::KvScheme::none) &&
                  LAB_KV_INT8_TENSOR == int(lab::KvScheme::int8_tensor) &&
                  LAB_KV_INT8_TOKEN == int(lab::KvScheme::int8_token) &&
                  LAB_KV_INT8_HEAD == int(lab::KvScheme::int8_head) &&
                  LAB_KV_INT8_GROUP == int(lab::KvScheme::int8_group) &&
                  LAB_KV_FP8_E4M3 == int(lab::KvScheme::fp8_e4m3) &&
                  LAB_KV_FP8_E5M2 == int(lab::KvScheme::fp8_e5m2) &&
                  LAB_KV_FP8_E4M3_HEAD == int(lab::KvScheme::fp8_e4m3_head) && lab::kKvSchemeCount == 8,
              "lab::KvScheme changed: mirror it in the LAB_KV_* values (capi/lab_attention.h)");

namespace {

#if !LAB_HAVE_07_KV_QUANT
// 07's quantizer is not in this build: the KV-cache functions refuse, by name, instead of linking.
[[noreturn]] void no_kv_quant() {
  throw lab::InvalidArgument("07_kv_quant is not in this build (it needs sm_80 or newer; "
                             "see the configure messages)");
}
#endif

struct Registered {
  lab::Chapter chapter;
  std::string default_variant;  // the chapter's main kernel: used when the caller names none
};

#if LAB_HAVE_07_KV_QUANT
// 07's variants differ only in how its own driver turns the fp16 problem into a cache of their
// scheme (lab::KvPrepare); each step runs one forward(), which reads the scheme from p.kv_quant.
// Here the caller brings the cache (lab_kv_quantize makes one) and names its scheme in kv_scheme,
// so each step is exported once, with every scheme in its Support: "" (kernel.cu, the default) and
// "dequant" (kernel_dequant.cu, step 1).
lab::Chapter kv_quant_chapter() {
  lab::Chapter c = ch07::chapter();
  c.variants = {{"", ch07::forward, &ch07::kSupport, ch07::workspace_bytes, ch07::num_splits_for, nullptr},
                {"dequant", ch07::forward_dequant, &ch07::kSupport, ch07::workspace_bytes_dequant,
                 ch07::num_splits_for_dequant, nullptr}};
  return c;
}
#endif

// The registry: every chapter the library exports, in lab order, and its default variant.
// Adding a chapter is one line here (and its kernel.h include above); its library is linked in
// already, since add_chapter() in the top-level CMakeLists.txt collects LAB_CHAPTER_LIBS.
const std::vector<Registered>& registry() {
  static const std::vector<Registered> chapters = {
#if LAB_HAVE_01_NAIVE
      {ch01::chapter(), "naive"},
#endif
#if LAB_HAVE_02_FLASH_V1
      {ch02::chapter(), ""},
#endif
#if LAB_HAVE_03_FLASH_V2
      {ch03::chapter(), "fa2"},
#endif
#if LAB_HAVE_04_FLASH_DECODING
      {ch04::chapter(), ""},
#endif
#if LAB_HAVE_05_DECODING_CUDA_CORE
      {ch05::chapter(), ""},
#endif
#if LAB_HAVE_06_GQA_ALIBI
      {ch06::chapter(), ""},
#endif
#if LAB_HAVE_07_KV_QUANT
      {kv_quant_chapter(), ""},
#endif
#if LAB_HAVE_08_FLASH_V3
      {ch08::chapter(), "pingpong"},  // built only for sm_90a; refuses other GPUs by name
#endif
  };
  return chapters;
}

// One (chapter, variant) pair of the flat list that lab_num_variants() counts.
struct Entry {
  const Registered* chapter;
  const lab::Variant* variant;
};

const std::vector<Entry>& entries() {
  static const std::vector<Entry> all = [] {
    std::vector<Entry> out;
    for (const Registered& r : registry())
      for (const lab::Variant& v : r.chapter.variants) out.push_back({&r, &v});
    return out;
  }();
  return all;
}

thread_local std::string t_last_error;

// Thrown for a chapter or variant name the registry does not know (code LAB_ERR_UNKNOWN_NAME).
struct UnknownName : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string variant_names(const lab::Chapter& c) {
  std::string s;
  for (const lab::Variant& v : c.variants) s += (s.empty() ? "\"" : ", \"") + v.name + "\"";
  return s;
}

// "03_flash_v2" or "03" -> the chapter; NULL/"" variant -> its default.
const lab::Variant& find_variant(const char* chapter, const char* variant) {
  const std::string want = chapter ? chapter : "";
  const Registered* found = nullptr;
  std::string known;
  for (const Registered& r : registry()) {
    const std::string& name = r.chapter.name;
    if (want == name || (want.size() == 2 && name.compare(0, 3, want + "_") == 0)) found = &r;
    known += (known.empty() ? "" : ", ") + name;
  }
  if (!found) throw UnknownName("chapter = \"" + want + "\" is unknown (known: " + known + ")");
  const std::string v = variant && *variant ? variant : found->default_variant;
  for (const lab::Variant& candidate : found->chapter.variants)
    if (candidate.name == v) return candidate;
  throw UnknownName("variant = \"" + v + "\" is unknown in " + found->chapter.name +
                    " (known: " + variant_names(found->chapter) + ")");
}

lab::AttnParams to_attn_params(const LabAttnParams* c) {
  if (!c) throw lab::InvalidArgument("params is a null pointer");
  if (c->abi_version != LAB_ATTENTION_ABI_VERSION)
    throw lab::InvalidArgument("abi_version = " + std::to_string(c->abi_version) +
                               " does not match the library's " + std::to_string(LAB_ATTENTION_ABI_VERSION));
  if (c->struct_size != sizeof(LabAttnParams))
    throw lab::InvalidArgument(
        "struct_size = " + std::to_string(c->struct_size) +
        " does not match the library's sizeof(LabAttnParams) = " + std::to_string(sizeof(LabAttnParams)));
  if (c->dtype != LAB_DTYPE_FP16 && c->dtype != LAB_DTYPE_BF16)
    throw lab::InvalidArgument("dtype = " + std::to_string(c->dtype) +
                               " is unknown (supported: 0 = fp16, 1 = bf16)");
  if (c->causal != 0 && c->causal != 1)
    throw lab::InvalidArgument("causal = " + std::to_string(c->causal) + " must be 0 or 1");
  lab::AttnParams p;
  p.q = c->q, p.k = c->k, p.v = c->v, p.o = c->o, p.lse = c->lse;
  p.q_batch_stride = c->q_batch_stride, p.q_row_stride = c->q_row_stride, p.q_head_stride = c->q_head_stride;
  p.k_batch_stride = c->k_batch_stride, p.k_row_stride = c->k_row_stride, p.k_head_stride = c->k_head_stride;
  p.v_batch_stride = c->v_batch_stride, p.v_row_stride = c->v_row_stride, p.v_head_stride = c->v_head_stride;
  p.o_batch_stride = c->o_batch_stride, p.o_row_stride = c->o_row_stride, p.o_head_stride = c->o_head_stride;
  p.dtype = c->dtype == LAB_DTYPE_FP16 ? lab::DType::fp16 : lab::DType::bf16;
  p.batch = c->batch, p.heads_q = c->heads_q, p.heads_kv = c->heads_kv;
  p.seqlen_q = c->seqlen_q, p.seqlen_kv = c->seqlen_kv, p.head_dim = c->head_dim;
  p.softmax_scale = c->softmax_scale;
  p.causal = c->causal != 0;
  p.alibi_slopes = c->alibi_slopes;
  p.cu_seqlens_q = c->cu_seqlens_q, p.cu_seqlens_kv = c->cu_seqlens_kv;
  p.total_q = c->total_q, p.total_kv = c->total_kv;
  p.cache_seqlens = c->cache_seqlens;
  p.block_table = c->block_table;
  p.page_size = c->page_size, p.max_pages_per_seq = c->max_pages_per_seq, p.num_pages = c->num_pages;
  p.num_splits = c->num_splits;
  p.workspace = c->workspace;
  p.workspace_bytes = size_t(c->workspace_bytes);
  p.kv_quant.scheme = static_cast<lab::KvScheme>(c->kv_scheme);
  p.kv_quant.group_size = c->kv_group_size;
  p.kv_quant.k_scale = c->kv_k_scale;
  p.kv_quant.v_scale = c->kv_v_scale;
  return p;
}

// Runs `body`, turning every exception into a return code and this thread's message.
template <class Body>
int guarded(Body body) {
  t_last_error.clear();
  try {
    body();
    return LAB_OK;
  } catch (const lab::InvalidArgument& e) {
    t_last_error = e.what();
    return LAB_ERR_INVALID_ARGUMENT;
  } catch (const UnknownName& e) {
    t_last_error = e.what();
    return LAB_ERR_UNKNOWN_NAME;
  } catch (const lab::CudaError& e) {
    t_last_error = e.what();
    return LAB_ERR_CUDA;
  } catch (const std::exception& e) {
    t_last_error = e.what();
    return LAB_ERR_OTHER;
  } catch (...) {
    t_last_error = "unknown C++ exception";
    return LAB_ERR_OTHER;
  }
}

#if LAB_HAVE_07_KV_QUANT
// The quantized cache that lab_kv_quantize writes for the fp16 cache `p` describes: 07's layout
// (07_kv_quant/quantize.h) with the fp16 cache's own strides, so that lab_forward takes the same
// params. Checks what the quantizer itself does not, by name; no memory is placed yet.
ch07::KvCache quantized_layout(const lab::AttnParams& p, int scheme, int group_size) {
  const lab::Support& s = ch07::kSupport;
  const std::string who = std::string(s.chapter) + ": ";
  const char* name = lab::kv_scheme_name(lab::KvScheme(scheme));
  std::string supported;
  bool listed = false;
  for (lab::KvScheme k : s.kv_schemes) {
    supported += (supported.empty() ? "" : ", ") + std::string(lab::kv_scheme_name(k));
    listed |= int(k) == scheme;
  }
  if (!listed)
    throw lab::InvalidArgument(who + "kv_scheme = " + (name ? name : std::to_string(scheme)) +
                               " cannot be quantized into (supported: " + supported + ")");
  if (lab::KvScheme(scheme) == lab::KvScheme::int8_group) {
    if (std::find(s.kv_group_sizes.begin(), s.kv_group_sizes.end(), group_size) == s.kv_group_sizes.end()) {
      std::string sizes;
      for (int g : s.kv_group_sizes) sizes += (sizes.empty() ? "" : ", ") + std::to_string(g);
      throw lab::InvalidArgument(who + "kv_group_size = " + std::to_string(group_size) +
                                 " is not supported (supported: " + sizes + ")");
    }
    if (p.head_dim % group_size != 0)
      throw lab::InvalidArgument(who + "kv_group_size = " + std::to_string(group_size) +
                                 " does not divide head_dim = " + std::to_string(p.head_dim));
  } else if (group_size != 0) {
    throw lab::InvalidArgument(who + "kv_group_size = " + std::to_string(group_size) +
                               " is only used by int8_group (" + name + " needs 0)");
  }
  const bool paged = p.block_table != nullptr;
  for (auto [field, value] : {std::pair<const char*, int>{"heads_kv", p.heads_kv},
                              {paged ? "num_pages" : "batch", paged ? p.num_pages : p.batch},
                              {paged ? "page_size" : "seqlen_kv", paged ? p.page_size : p.seqlen_kv}})
    if (value <= 0) throw lab::InvalidArgument(who + field + " = " + std::to_string(value) + " must be > 0");
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 16 != 0)
    throw lab::InvalidArgument(who + "head_dim = " + std::to_string(p.head_dim) +
                               " is not supported by the quantizer (supported: multiples of 16 up to 256)");
  ch07::KvCache c = ch07::cache_layout(p, lab::KvScheme(scheme), group_size);
  c.slot_stride = p.k_batch_stride, c.row_stride = p.k_row_stride, c.head_stride = p.k_head_stride;
  return c;
}
#endif

[[maybe_unused]] bool aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

const Entry* entry_at(int i) {
  return i >= 0 && size_t(i) < entries().size() ? &entries()[size_t(i)] : nullptr;
}

}  // namespace

extern "C" {

int lab_abi_version(void) { return LAB_ATTENTION_ABI_VERSION; }
size_t lab_params_size(void) { return sizeof(LabAttnParams); }

int lab_forward(const char* chapter, const char* variant, const LabAttnParams* p, void* cuda_stream) {
  return guarded([&] {
    const lab::Variant& v = find_variant(chapter, variant);
    const lab::AttnParams ap = to_attn_params(p);
    // Device-side tables (varlen offsets, cache lengths, page table) are checked on the host, by
    // name, after the chapter's own checks: it costs a copy and a synchronization of the caller's
    // stream per call with such tables (read in that stream's order, so tables written there are
    // read as written), and it keeps a bad table from reading or writing outside the tensors.
    const cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
    if (v.support) lab::check_params(ap, *v.support);
    if (ap.cache_seqlens || ap.block_table) {
      const std::string why = lab::kv_cache_tables_reason(ap, chapter ? chapter : "", stream);
      if (!why.empty()) throw lab::InvalidArgument(why);
    }
    if (ap.cu_seqlens_q) {
      const std::string why = lab::varlen_offsets_reason(ap, chapter ? chapter : "", stream);
      if (!why.empty()) throw lab::InvalidArgument(why);
    }
    v.forward(ap, stream);
  });
}

int lab_workspace_bytes(const char* chapter, const char* variant, const LabAttnParams* p, size_t* bytes) {
  return guarded([&] {
    if (!bytes) throw lab::InvalidArgument("bytes is a null pointer");
    *bytes = 0;
    const lab::Variant& v = find_variant(chapter, variant);
    const lab::AttnParams ap = to_attn_params(p);
    // The size formulas assume a valid shape (a negative seqlen would wrap around).
    if (v.support) lab::check_params(ap, *v.support);
    *bytes = v.workspace ? v.workspace(ap) : 0;
  });
}

const char* lab_last_error(void) { return t_last_error.c_str(); }

int lab_read_ceiling_gbps(size_t bytes, double* gbps) {
  return guarded([&] {
    if (!gbps) throw lab::InvalidArgument("gbps is a null pointer");
    if (bytes < (size_t(1) << 20)) throw lab::InvalidArgument("bytes = " + std::to_string(bytes) + " is below 1 MiB");
    *gbps = lab::measure_read_ceiling(0, bytes).read_gbps;
  });
}

int lab_num_variants(void) {
  int n = 0;
  guarded([&] { n = int(entries().size()); });
  return n;
}

const char* lab_variant_chapter(int i) {
  const Entry* e = entry_at(i);
  return e ? e->chapter->chapter.name.c_str() : nullptr;
}

const char* lab_variant_name(int i) {
  const Entry* e = entry_at(i);
  return e ? e->variant->name.c_str() : nullptr;
}

int lab_variant_is_default(int i) {
  const Entry* e = entry_at(i);
  return e && e->variant->name == e->chapter->default_variant ? 1 : 0;
}

int lab_variant_support(int i, LabSupport* out) {
  return guarded([&] {
    const Entry* e = entry_at(i);
    if (!e)
      throw UnknownName("variant index " + std::to_string(i) + " is out of range (0.." +
                        std::to_string(int(entries().size()) - 1) + ")");
    if (!out) throw lab::InvalidArgument("out is a null pointer");
    if (out->struct_size != sizeof(LabSupport))
      throw lab::InvalidArgument(
          "struct_size = " + std::to_string(out->struct_size) +
          " does not match the library's sizeof(LabSupport) = " + std::to_string(sizeof(LabSupport)));
    const lab::Support none{};  // a variant without a Support refuses nothing it can check here
    const lab::Support& s = e->variant->support ? *e->variant->support : none;
    LabSupport r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    const size_t max_dims = sizeof r.head_dims / sizeof r.head_dims[0];
    if (s.head_dims.size() > max_dims)
      throw std::length_error("more than " + std::to_string(max_dims) + " head_dims in " +
                              e->chapter->chapter.name);
    r.num_head_dims = int32_t(s.head_dims.size());
    std::copy(s.head_dims.begin(), s.head_dims.end(), r.head_dims);
    r.max_head_dim = s.max_head_dim;
    r.fp16 = s.fp16, r.bf16 = s.bf16, r.causal = s.causal, r.gqa = s.gqa, r.lse = s.lse;
    r.alibi = s.alibi, r.varlen = s.varlen, r.cache_seqlens = s.cache_seqlens;
    r.paged_kv = s.paged_kv, r.splits = s.splits;
    r.max_seqlen_q = s.max_seqlen_q;
    r.vector_elems = s.vector_elems;
    r.needs_workspace = e->variant->workspace != nullptr;
    r.kv_schemes = 1u << LAB_KV_NONE;
    for (lab::KvScheme k : s.kv_schemes) r.kv_schemes |= 1u << int(k);
    const size_t max_sizes = sizeof r.kv_group_sizes / sizeof r.kv_group_sizes[0];
    if (s.kv_group_sizes.size() > max_sizes)
      throw std::length_error("more than " + std::to_string(max_sizes) + " kv_group_sizes in " +
                              e->chapter->chapter.name);
    r.num_kv_group_sizes = int32_t(s.kv_group_sizes.size());
    std::copy(s.kv_group_sizes.begin(), s.kv_group_sizes.end(), r.kv_group_sizes);
    *out = r;
  });
}

const char* lab_kv_scheme_name(int kv_scheme) {
  return kv_scheme >= 0 && kv_scheme < lab::kKvSchemeCount ? lab::kv_scheme_name(lab::KvScheme(kv_scheme))
                                                           : nullptr;
}

int lab_kv_scale_bytes(const LabAttnParams* p, int kv_scheme, int kv_group_size, size_t* bytes) {
  return guarded([&] {
    if (!bytes) throw lab::InvalidArgument("bytes is a null pointer");
    *bytes = 0;
#if !LAB_HAVE_07_KV_QUANT
    no_kv_quant();
#else
    *bytes =
        ch07::scale_count(quantized_layout(to_attn_params(p), kv_scheme, kv_group_size)) * lab::kKvScaleBytes;
#endif
  });
}

int lab_kv_quantize(const LabAttnParams* p, int kv_scheme, int kv_group_size, void* k_codes, void* v_codes,
                    uint16_t* k_scale, uint16_t* v_scale, void* cuda_stream) {
  return guarded([&] {
#if !LAB_HAVE_07_KV_QUANT
    (void)p, (void)kv_scheme, (void)kv_group_size, (void)k_codes, (void)v_codes, (void)k_scale, (void)v_scale,
        (void)cuda_stream;
    no_kv_quant();
#else
    const lab::AttnParams src = to_attn_params(p);
    ch07::KvCache c = quantized_layout(src, kv_scheme, kv_group_size);
    const std::string who = "07_kv_quant: ";
    // One set of strides for both code tensors (the cache's), and what 07's kernel reads: 16-byte
    // rows of codes.
    if (src.v_batch_stride != src.k_batch_stride || src.v_row_stride != src.k_row_stride ||
        src.v_head_stride != src.k_head_stride)
      throw lab::InvalidArgument(who + "v's strides (" + std::to_string(src.v_batch_stride) + ", " +
                                 std::to_string(src.v_row_stride) + ", " + std::to_string(src.v_head_stride) +
                                 ") differ from k's (" + std::to_string(src.k_batch_stride) + ", " +
                                 std::to_string(src.k_row_stride) + ", " + std::to_string(src.k_head_stride) +
                                 "): the codes of K and V share one layout");
    if (src.k_batch_stride < 0 || src.k_row_stride < int64_t(src.head_dim) ||
        src.k_head_stride < int64_t(src.head_dim))
      throw lab::InvalidArgument(who + "k's strides must be >= 0 and its row and head strides >= head_dim");
    struct Named {
      const char* name;
      const void* ptr;
    };
    for (Named t :
         {Named{"k", src.k}, Named{"v", src.v}, Named{"k_codes", k_codes}, Named{"v_codes", v_codes}}) {
      if (!t.ptr) throw lab::InvalidArgument(who + t.name + " is a null pointer");
      if (!aligned(t.ptr, 16)) throw lab::InvalidArgument(who + t.name + " pointer is not 16-byte aligned");
    }
    const bool scales = ch07::scale_count(c) > 0;
    if (scales && (!k_scale || !v_scale))
      throw lab::InvalidArgument(who + (k_scale ? "v_scale" : "k_scale") + " is a null pointer (" +
                                 lab::kv_scheme_name(c.scheme) + " has scales)");
    if (!scales && (k_scale || v_scale))
      throw lab::InvalidArgument(who + "k_scale/v_scale are given but " + lab::kv_scheme_name(c.scheme) +
                                 " has no scales");
    if (!aligned(k_scale, lab::kKvScaleBytes) || !aligned(v_scale, lab::kKvScaleBytes))
      throw lab::InvalidArgument(who + "k_scale/v_scale pointers must be 2-byte aligned (fp16 scales)");
    c.k = static_cast<uint8_t*>(k_codes), c.v = static_cast<uint8_t*>(v_codes);
    c.k_scale = k_scale, c.v_scale = v_scale;
    ch07::quantize_bulk(src, c, static_cast<cudaStream_t>(cuda_stream));  // checks dtype, strides
#endif
  });
}

}  // extern "C"
