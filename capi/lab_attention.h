/* The lab's chapters behind a plain C interface, so that Python (python/lab, through ctypes) or
 * any other language can call every chapter's forward on its own tensors and stream.
 *
 *   LabAttnParams p = {0};
 *   p.struct_size = sizeof p;  p.abi_version = LAB_ATTENTION_ABI_VERSION;
 *   ... pointers, strides (in elements), shape, softmax_scale ...
 *   size_t ws;  lab_workspace_bytes("03", NULL, &p, &ws);   (allocate ws bytes if > 0)
 *   if (lab_forward("03", NULL, &p, stream) != LAB_OK) puts(lab_last_error());
 *
 * A chapter is named by its directory ("03_flash_v2") or its two-digit prefix ("03"); a variant by
 * the name the chapter gives it ("fa2", "cublas"), NULL or "" for the chapter's default. Every
 * call is checked: a problem a chapter does not support is refused with a message naming the field
 * (the same message as the chapter's own command line), never computed wrong. Nothing here throws
 * or exits. Synchronization: lab_forward only enqueues work on the stream, except when the problem
 * has device tables (cu_seqlens_q/kv, cache_seqlens, block_table): then it first copies them to the
 * host in the order of that stream and waits for it (cudaStreamSynchronize), so that a bad table
 * is refused by name before anything is launched. No other call synchronizes.
 */
#ifndef LAB_ATTENTION_H
#define LAB_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever LabAttnParams or LabSupport change layout or meaning; callers put it in
 * abi_version. 4: KV cache scales are fp16 (they were fp32 in 3). 5: total_q, total_kv (varlen). */
#define LAB_ATTENTION_ABI_VERSION 5

/* Return codes. */
#define LAB_OK 0
#define LAB_ERR_INVALID_ARGUMENT 1 /* the problem is refused; the message names the field */
#define LAB_ERR_UNKNOWN_NAME 2     /* no such chapter or variant */
#define LAB_ERR_CUDA 3             /* a CUDA or cuBLAS call failed */
#define LAB_ERR_OTHER 4

#define LAB_DTYPE_FP16 0
#define LAB_DTYPE_BF16 1

/* KV cache schemes (lab::KvScheme in common/attn.h, which documents each): LabAttnParams.kv_scheme,
 * and bit (1 << scheme) of LabSupport.kv_schemes. lab_kv_scheme_name() gives their names. */
#define LAB_KV_NONE 0 /* a 16-bit cache of dtype values */
#define LAB_KV_INT8_TENSOR 1
#define LAB_KV_INT8_TOKEN 2
#define LAB_KV_INT8_HEAD 3
#define LAB_KV_INT8_GROUP 4 /* with kv_group_size 32 or 64 */
#define LAB_KV_FP8_E4M3 5
#define LAB_KV_FP8_E5M2 6
#define LAB_KV_FP8_E4M3_HEAD 7

/* lab::AttnParams (common/attn.h) field for field, in C types; see there for what each means.
 * Layout is FlashAttention's: Q, O [batch, seqlen_q, heads_q, head_dim], K, V
 * [batch, seqlen_kv, heads_kv, head_dim] (paged: [num_pages, page_size, heads_kv, head_dim]),
 * head_dim contiguous, all strides in elements. Device pointers unless said otherwise. */
typedef struct LabAttnParams {
  /* Set to sizeof(LabAttnParams) and LAB_ATTENTION_ABI_VERSION: a caller built against another
   * layout is refused instead of read wrong. */
  uint32_t struct_size;
  uint32_t abi_version;

  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse; /* optional, [batch, heads_q, seqlen_q] fp32, natural log */

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int32_t dtype; /* LAB_DTYPE_FP16 or LAB_DTYPE_BF16 */
  int32_t batch;
  int32_t heads_q;
  int32_t heads_kv;
  int32_t seqlen_q;  /* with cu_seqlens_q: the longest sequence */
  int32_t seqlen_kv; /* with cu_seqlens_kv: the longest; with cache_seqlens: the capacity */
  int32_t head_dim;
  float softmax_scale; /* usually 1/sqrt(head_dim); must be > 0 */
  int32_t causal;      /* 0 or 1; aligned bottom-right as in FlashAttention */

  const float* alibi_slopes;   /* optional, [heads_q] */
  const int32_t* cu_seqlens_q; /* optional (varlen), [batch + 1]; packed tensors: batch strides 0 */
  const int32_t* cu_seqlens_kv;
  int32_t total_q;  /* varlen, required: rows of the packed q and o (cu_seqlens_q[batch] <= total_q) */
  int32_t total_kv; /* varlen, required: rows of the packed k and v; both 0 without varlen */
  const int32_t* cache_seqlens; /* optional, [batch] */
  const int32_t* block_table;   /* optional (paged KV), [batch, max_pages_per_seq] */
  int32_t page_size;
  int32_t max_pages_per_seq;
  int32_t num_pages;

  int32_t num_splits; /* split-KV decoding: 0 lets the chapter choose */

  void* workspace; /* lab_workspace_bytes() bytes of device memory, or NULL when that is 0 */
  uint64_t workspace_bytes;

  /* KV cache quantization (lab::KvQuant, common/attn.h): LAB_KV_NONE (a 16-bit cache), else k, v
     point at 1-byte codes (strides in elements, now bytes) and kv_k_scale, kv_v_scale at fp16
     (IEEE half) scales, given as their 16-bit patterns (C has no half type), 2-byte aligned, in the
     layout attn.h documents (NULL for a scheme without scales). 07_kv_quant reads every scheme
     (LabSupport.kv_schemes); lab_kv_quantize() makes such a cache from an fp16 one. */
  int32_t kv_scheme;
  int32_t kv_group_size;
  const uint16_t* kv_k_scale;
  const uint16_t* kv_v_scale;
} LabAttnParams;

/* What a variant computes (lab::Support): anything else it refuses by name. */
typedef struct LabSupport {
  uint32_t struct_size;  /* set to sizeof(LabSupport) before the call */
  int32_t num_head_dims; /* 0: any head_dim in 1..max_head_dim */
  int32_t head_dims[16];
  int32_t max_head_dim;
  int32_t fp16, bf16, causal, gqa, lse, alibi, varlen, cache_seqlens, paged_kv, splits;
  int32_t max_seqlen_q; /* 0: no limit */
  int32_t vector_elems; /* strides and pointers must be multiples of this many elements */
  int32_t needs_workspace;
  uint32_t kv_schemes;        /* bit (1 << LAB_KV_*) set for each kv_scheme accepted; bit 0 always */
  int32_t num_kv_group_sizes; /* the kv_group_size values LAB_KV_INT8_GROUP accepts */
  int32_t kv_group_sizes[8];
} LabSupport;

/* LAB_ATTENTION_ABI_VERSION and sizeof(LabAttnParams) as the library was built. */
int lab_abi_version(void);
size_t lab_params_size(void);

/* Runs the chapter's forward on `cuda_stream` (a cudaStream_t; NULL for the default stream) on
 * the current device. Returns LAB_OK or an error code; lab_last_error() then says why. */
int lab_forward(const char* chapter, const char* variant, const LabAttnParams* p, void* cuda_stream);

/* The workspace lab_forward needs for this problem (0 for most chapters). Checks the problem
 * first, so an unsupported one is refused here with the same message. */
int lab_workspace_bytes(const char* chapter, const char* variant, const LabAttnParams* p, size_t* bytes);

/* The message of this thread's last failed call ("" if none). Valid until the next call. */
const char* lab_last_error(void);

/* The variants, chapter by chapter in lab order: i in 0..lab_num_variants()-1. */
int lab_num_variants(void);
const char* lab_variant_chapter(int i); /* "03_flash_v2" */
const char* lab_variant_name(int i);    /* "fa2"; "" for a chapter with one kernel */
int lab_variant_is_default(int i);      /* 1 for the variant used when none is named */
int lab_variant_support(int i, LabSupport* out);

/* "int8_head" for LAB_KV_INT8_HEAD, "none" for LAB_KV_NONE; NULL outside the LAB_KV_* values. */
const char* lab_kv_scheme_name(int kv_scheme);

/* Quantizing a KV cache for 07_kv_quant (its bulk quantizer, 07_kv_quant/quantize.h): `p` describes
 * the fp16 cache as for lab_forward (k, v, their strides, batch and seqlen_kv, or block_table,
 * num_pages and page_size when paged; heads_kv, head_dim, dtype = LAB_DTYPE_FP16, kv_scheme =
 * LAB_KV_NONE; the query fields are not read). Every slot and row of the cache is quantized, its
 * whole capacity; the codes keep the fp16 cache's layout and strides (K's and V's must be equal),
 * in bytes instead of elements, so that lab_forward takes the same params with k, v pointing at the
 * codes and kv_scheme, kv_group_size, kv_k_scale, kv_v_scale set. Scales are computed per K and per
 * V (int8_tensor and fp8_e4m3_head too: from this cache, as a calibration pass would).
 *
 *   lab_kv_scale_bytes: the bytes of K's scales (V's are the same): 2 per fp16 scale; 0 for
 *                       fp8_e4m3, fp8_e5m2.
 *   lab_kv_quantize:    writes codes and scales; enqueued on `cuda_stream`, like lab_forward.
 * k_codes, v_codes: 16-byte aligned device memory covering the cache's extent; k_scale, v_scale:
 * lab_kv_scale_bytes() each, 2-byte aligned, receiving fp16 scales (rounded up from amax / 127, or
 * / 448: the rules are in 07_kv_quant/quantize.h), NULL for a scheme without scales. */
int lab_kv_scale_bytes(const LabAttnParams* p, int kv_scheme, int kv_group_size, size_t* bytes);
int lab_kv_quantize(const LabAttnParams* p, int kv_scheme, int kv_group_size, void* k_codes, void* v_codes,
                    uint16_t* k_scale, uint16_t* v_scale, void* cuda_stream);

/* The lab's streaming-read ceiling on the current device (common/measure.h): GB/s of a read of
 * `bytes` of device memory (many times the L2: 2^31 is what the ladder uses), the best of a few load
 * shapes, median of many repetitions. What a decoding kernel's GB/s is a percentage of. Synchronous;
 * allocates `bytes` for the duration of the call. */
int lab_read_ceiling_gbps(size_t bytes, double* gbps);

#ifdef __cplusplus
}
#endif

#endif /* LAB_ATTENTION_H */
