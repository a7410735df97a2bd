// 07_kv_quant: quantizing the fp16 KV cache on the GPU, in bulk and on append (the rules are in
// quantize.h). Neither is timed with the attention: an engine quantizes a token once, when it is
// written, and reads it at every later decoding step.
//
// One block per token row (all KV heads of one token of K, or of V): a thread converts 8 fp16
// values (one 16-byte load) into 8 codes (one 8-byte store). A scale over one head (d/8 threads)
// or one group of channels (g/8 threads) is a max over a few neighbouring lanes (shuffles); a
// scale over the whole token is a block reduction. Static scales (over the whole tensor, or a KV
// head over every token) come first, from an amax pass over the tensor.
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "07_kv_quant/quantize.h"
#include "common/cuda_check.h"

namespace ch07 {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
size_t align256(size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

KvCache cache_layout(const lab::AttnParams& p, KvScheme scheme, int group_size) {
  KvCache c;
  c.scheme = scheme;
  c.group_size = scheme == KvScheme::int8_group ? group_size : 0;
  c.heads_kv = p.heads_kv;
  c.head_dim = p.head_dim;
  const bool paged = p.block_table != nullptr;
  c.slots = paged ? p.num_pages : p.batch;
  c.rows = paged ? p.page_size : p.seqlen_kv;
  // The fp16 cache's layout, strides rounded up to 16 elements: 16-byte rows of 1-byte codes.
  c.head_stride = round_up(std::max<int64_t>({p.head_dim, p.k_head_stride, p.v_head_stride}), 16);
  c.row_stride =
      round_up(std::max<int64_t>({c.head_stride * p.heads_kv, p.k_row_stride, p.v_row_stride}), 16);
  c.slot_stride = c.row_stride * c.rows;
  c.batch = p.batch;
  c.block_table = p.block_table;
  c.max_pages_per_seq = p.max_pages_per_seq;
  return c;
}

size_t code_bytes(const KvCache& c) { return size_t(c.slots) * size_t(c.slot_stride); }

size_t scale_count(const KvCache& c) {
  const size_t tokens = size_t(c.slots) * c.rows;
  switch (c.scheme) {
    case KvScheme::int8_tensor:
      return 1;
    case KvScheme::int8_token:
      return tokens;
    case KvScheme::int8_head:
      return tokens * c.heads_kv;
    case KvScheme::int8_group:
      return tokens * c.heads_kv * size_t(c.head_dim / c.group_size);
    case KvScheme::fp8_e4m3_head:
      return size_t(c.heads_kv);
    default:
      return 0;
  }
}

size_t storage_bytes(const KvCache& c) {
  return 2 * align256(code_bytes(c)) + 2 * align256(scale_count(c) * lab::kKvScaleBytes);
}

void place(KvCache& c, void* storage) {
  char* at = static_cast<char*>(storage);
  c.k = reinterpret_cast<uint8_t*>(at), at += align256(code_bytes(c));
  c.v = reinterpret_cast<uint8_t*>(at), at += align256(code_bytes(c));
  const bool scales = scale_count(c) > 0;
  c.k_scale = scales ? reinterpret_cast<uint16_t*>(at) : nullptr;
  at += align256(scale_count(c) * lab::kKvScaleBytes);
  c.v_scale = scales ? reinterpret_cast<uint16_t*>(at) : nullptr;
}

void use_cache(lab::AttnParams& p, const KvCache& c) {
  p.k = c.k;
  p.v = c.v;
  p.k_batch_stride = p.v_batch_stride = c.slot_stride;
  p.k_row_stride = p.v_row_stride = c.row_stride;
  p.k_head_stride = p.v_head_stride = c.head_stride;
  p.kv_quant.scheme = c.scheme;
  p.kv_quant.group_size = c.group_size;
  p.kv_quant.k_scale = c.k_scale;
  p.kv_quant.v_scale = c.v_scale;
}

KvCache cache_of(const lab::AttnParams& p) {
  KvCache c = cache_layout(p, p.kv_quant.scheme, p.kv_quant.group_size);
  c.k = static_cast<uint8_t*>(const_cast<void*>(p.k));
  c.v = static_cast<uint8_t*>(const_cast<void*>(p.v));
  c.k_scale = const_cast<uint16_t*>(p.kv_quant.k_scale);
  c.v_scale = const_cast<uint16_t*>(p.kv_quant.v_scale);
  c.slot_stride = p.k_batch_stride, c.row_stride = p.k_row_stride, c.head_stride = p.k_head_stride;
  return c;
}

HostKvCache download(const KvCache& c) {
  HostKvCache h;
  h.layout = c;
  h.k.resize(code_bytes(c));
  h.v.resize(code_bytes(c));
  h.k_scale.resize(scale_count(c));
  h.v_scale.resize(scale_count(c));
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  LAB_CUDA_CHECK(cudaMemcpy(h.k.data(), c.k, h.k.size(), cudaMemcpyDeviceToHost));
  LAB_CUDA_CHECK(cudaMemcpy(h.v.data(), c.v, h.v.size(), cudaMemcpyDeviceToHost));
  if (!h.k_scale.empty()) {
    const size_t bytes = h.k_scale.size() * lab::kKvScaleBytes;
    LAB_CUDA_CHECK(cudaMemcpy(h.k_scale.data(), c.k_scale, bytes, cudaMemcpyDeviceToHost));
    LAB_CUDA_CHECK(cudaMemcpy(h.v_scale.data(), c.v_scale, bytes, cudaMemcpyDeviceToHost));
  }
  return h;
}

namespace {

constexpr int kThreads = 256;

// The rules of quantize.h, on the device; IEEE division and rounding (no fast-math), and the
// host's round-up to fp16 (scale_bits_at_least), so that the host quantizer gets the same bits.
__device__ __forceinline__ uint16_t int8_scale_dev(float amax) {
  return scale_bits_at_least(amax > 0.f && isfinite(amax) ? __fdiv_rn(amax, 127.f) : 1.f);
}
__device__ __forceinline__ uint16_t e4m3_scale_dev(float amax) {
  return scale_bits_at_least(amax > 0.f && isfinite(amax) ? __fdiv_rn(amax, 448.f) : 1.f);
}
__device__ __forceinline__ uint8_t encode_int8_dev(float x, float scale) {
  const float q = __fdiv_rn(x, scale);
  if (q != q) return 0;
  return uint8_t(int8_t(__float2int_rn(fminf(fmaxf(rintf(q), -127.f), 127.f))));
}

template <KvScheme S>
__device__ __forceinline__ uint8_t encode(float x, float scale) {
  if constexpr (S == KvScheme::fp8_e4m3)
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  else if constexpr (S == KvScheme::fp8_e5m2)
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
  else if constexpr (S == KvScheme::fp8_e4m3_head)
    return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
  else
    return encode_int8_dev(x, scale);
}

// Where the fp16 rows come from. Bulk: row r is (slot r / rows, row r % rows) of the fp16 cache.
// Append: row r is row r of a [n, heads_kv, head_dim] tensor, going to (seq[r], pos[r]).
struct Source {
  const __half* base[2];  // K, V
  int64_t slot_stride[2], row_stride[2], head_stride[2];
  const int* seq = nullptr;  // append only
  const int* pos = nullptr;
};

__device__ __forceinline__ void load8(const __half* at, float (&f)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(at);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = __half22float2(h[k]);
    f[2 * k] = x.x, f[2 * k + 1] = x.y;
  }
}

// max(*at, v) into *at, for fp16 bits of non-negative values (which order like their bits): there
// is no 16-bit atomicMax, so a compare-and-swap loop (16-bit atomicCAS: sm_70 and later).
__device__ void atomic_max_bits(uint16_t* at, uint16_t v) {
  uint16_t seen = *at;  // a stale value is smaller than the current one: one more round
  while (v > seen) {
    const uint16_t before = atomicCAS(at, seen, v);
    if (before == seen) break;
    seen = before;
  }
}

// Static scales, pass 1: amax over the tensor (int8_tensor) or over each KV head (fp8_e4m3_head),
// kept in the scale array as fp16 bits (the largest |x| of fp16 values is an fp16 value, exactly);
// the second pass turns them into scales. Each block covers kRowsPerAmaxBlock token rows; a thread
// keeps the max of its 8 channels over those rows, then one atomic per thread and channel vector.
constexpr int kRowsPerAmaxBlock = 64;
__global__ void __launch_bounds__(kThreads) amax_rows(Source src, KvCache dst, bool per_head) {
  const int is_v = blockIdx.y;
  const int64_t rows = int64_t(dst.slots) * dst.rows, r0 = int64_t(blockIdx.x) * kRowsPerAmaxBlock;
  const int64_t r1 = min(rows, r0 + kRowsPerAmaxBlock);
  const int vecs = dst.heads_kv * dst.head_dim / 8;
  uint16_t* out = is_v ? dst.v_scale : dst.k_scale;
  // Whole warps in every iteration (as in quantize_rows), so that the lanes of one bucket can
  // combine their maxima before the one atomic: all 32 lanes per tensor, the d/8 of a head.
  const int lanes = per_head ? dst.head_dim / 8 : 32;
  for (int base = 0; base < vecs; base += blockDim.x) {
    const int vi = base + threadIdx.x;
    const bool active = vi < vecs;
    const int h = active ? vi * 8 / dst.head_dim : 0, ch = vi * 8 % dst.head_dim;
    float m = 0.f;
    for (int64_t r = r0; active && r < r1; ++r) {
      const int64_t slot = r / dst.rows, row = r % dst.rows;
      float f[8];
      load8(src.base[is_v] + slot * src.slot_stride[is_v] + row * src.row_stride[is_v] +
                h * src.head_stride[is_v] + ch,
            f);
#pragma unroll
      for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));  // fmaxf drops NaN
    }
    for (int off = lanes / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (active && vi % lanes == 0)
      atomic_max_bits(&out[per_head ? h : 0], __half_as_ushort(__float2half_rn(m)));
  }
}

// Static scales, pass 2: amax -> scale, in place.
__global__ void amax_to_scale(KvCache dst, int count, bool fp8) {
  const int i = threadIdx.x + blockIdx.x * blockDim.x, is_v = blockIdx.y;
  if (i >= count) return;
  uint16_t* s = (is_v ? dst.v_scale : dst.k_scale) + i;
  const float amax = scale_value(*s);
  *s = fp8 ? e4m3_scale_dev(amax) : int8_scale_dev(amax);
}

// One token row (all KV heads) of K (blockIdx.y = 0) or V (1) per block.
template <KvScheme S, int G>
__global__ void __launch_bounds__(kThreads) quantize_rows(Source src, KvCache dst) {
  __shared__ float s_warp_max[kThreads / 32];
  const int r = blockIdx.x, is_v = blockIdx.y;
  int64_t slot, src_off;
  int row;
  if (src.seq) {
    const int b = src.seq[r], j = src.pos[r];
    if (b < 0 || b >= dst.batch || j < 0) return;  // a whole block leaves: no barrier is skipped
    if (dst.block_table) {
      if (j >= dst.max_pages_per_seq * dst.rows) return;
      slot = dst.block_table[int64_t(b) * dst.max_pages_per_seq + j / dst.rows];
      row = j % dst.rows;
      if (slot < 0 || slot >= dst.slots) return;
    } else {
      if (j >= dst.rows) return;
      slot = b, row = j;
    }
    src_off = int64_t(r) * src.row_stride[is_v];
  } else {
    slot = r / dst.rows, row = r % dst.rows;
    src_off = slot * src.slot_stride[is_v] + int64_t(row) * src.row_stride[is_v];
  }
  const __half* x = src.base[is_v] + src_off;
  uint8_t* codes = (is_v ? dst.v : dst.k) + slot * dst.slot_stride + row * dst.row_stride;
  uint16_t* scales = is_v ? dst.v_scale : dst.k_scale;
  const int D = dst.head_dim, vecs = dst.heads_kv * D / 8;
  auto at = [&](int vi) { return x + (vi * 8 / D) * src.head_stride[is_v] + vi * 8 % D; };

  float token_scale = 1.f;
  if constexpr (S == KvScheme::int8_token) {
    // One scale over the whole token (every KV head): a block-wide max.
    float m = 0.f;
    for (int vi = threadIdx.x; vi < vecs; vi += blockDim.x) {
      float f[8];
      load8(at(vi), f);
#pragma unroll
      for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x % 32 == 0) s_warp_max[threadIdx.x / 32] = m;
    __syncthreads();
    m = 0.f;
    for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, s_warp_max[w]);
    const uint16_t bits = int8_scale_dev(m);
    token_scale = scale_value(bits);  // codes from the stored scale, as they are read
    if (threadIdx.x == 0) scales[slot * dst.rows + row] = bits;
  }

  // The same number of iterations for every thread, so that whole warps meet the shuffles; a lane
  // set of one head (d/8 lanes) or one group (g/8 lanes) is aligned and all active or all not.
  for (int base = 0; base < vecs; base += blockDim.x) {
    const int vi = base + threadIdx.x;
    const bool active = vi < vecs;
    const int h = active ? vi * 8 / D : 0, ch = vi * 8 % D;
    float f[8] = {};
    if (active) load8(at(vi), f);
    float scale = 1.f;
    if constexpr (S == KvScheme::int8_tensor) scale = scale_value(scales[0]);
    if constexpr (S == KvScheme::fp8_e4m3_head) scale = scale_value(scales[h]);
    if constexpr (S == KvScheme::int8_token) scale = token_scale;
    if constexpr (S == KvScheme::int8_head || S == KvScheme::int8_group) {
      const int lanes = (S == KvScheme::int8_head ? D : G) / 8;
      float m = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));
      for (int off = lanes / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      const uint16_t bits = int8_scale_dev(m);
      scale = scale_value(bits);
      if (active && vi % lanes == 0)
        scales[scale_index(S, G, slot, row, h, ch, dst.rows, dst.heads_kv, D)] = bits;
    }
    if (active) {
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < 8; ++e) w[e / 4] |= uint32_t(encode<S>(f[e], scale)) << (8 * (e % 4));
      *reinterpret_cast<uint2*>(codes + h * dst.head_stride + ch) = make_uint2(w[0], w[1]);
    }
  }
}

// Calls f(scheme, group) with both as compile-time constants.
template <class F>
void with_scheme(KvScheme s, int group, F&& f) {
  switch (s) {
    case KvScheme::int8_tensor:
      return f(std::integral_constant<KvScheme, KvScheme::int8_tensor>{}, std::integral_constant<int, 0>{});
    case KvScheme::int8_token:
      return f(std::integral_constant<KvScheme, KvScheme::int8_token>{}, std::integral_constant<int, 0>{});
    case KvScheme::int8_head:
      return f(std::integral_constant<KvScheme, KvScheme::int8_head>{}, std::integral_constant<int, 0>{});
    case KvScheme::int8_group:
      if (group == 32)
        return f(std::integral_constant<KvScheme, KvScheme::int8_group>{}, std::integral_constant<int, 32>{});
      if (group == 64)
        return f(std::integral_constant<KvScheme, KvScheme::int8_group>{}, std::integral_constant<int, 64>{});
      throw lab::InvalidArgument("07_kv_quant: kv_quant.group_size = " + std::to_string(group) +
                                 " is not supported (supported: 32, 64)");
    case KvScheme::fp8_e4m3:
      return f(std::integral_constant<KvScheme, KvScheme::fp8_e4m3>{}, std::integral_constant<int, 0>{});
    case KvScheme::fp8_e5m2:
      return f(std::integral_constant<KvScheme, KvScheme::fp8_e5m2>{}, std::integral_constant<int, 0>{});
    case KvScheme::fp8_e4m3_head:
      return f(std::integral_constant<KvScheme, KvScheme::fp8_e4m3_head>{}, std::integral_constant<int, 0>{});
    default:
      break;
  }
  const char* name = lab::kv_scheme_name(s);
  throw lab::InvalidArgument(std::string("07_kv_quant: kv_quant.scheme = ") +
                             (name ? name : std::to_string(int(s))) + " cannot be quantized into " +
                             "(supported: int8_tensor, int8_token, int8_head, int8_group, fp8_e4m3, "
                             "fp8_e5m2, fp8_e4m3_head)");
}

void check_cache(const KvCache& c) {
  if (c.head_dim % 16 != 0 || c.head_dim > 256 || c.head_dim <= 0)
    throw lab::InvalidArgument("07_kv_quant: head_dim = " + std::to_string(c.head_dim) +
                               " is not supported by the quantizer (supported: multiples of 16 up to 256)");
  if (c.row_stride % 16 || c.head_stride % 16 || c.slot_stride % 16)
    throw lab::InvalidArgument("07_kv_quant: the cache's strides must be multiples of 16 bytes");
  if (!c.k || !c.v || (scale_count(c) > 0 && (!c.k_scale || !c.v_scale)))
    throw lab::InvalidArgument("07_kv_quant: the cache has no memory (see place())");
}

}  // namespace

void quantize_bulk(const lab::AttnParams& src, const KvCache& dst, cudaStream_t stream) {
  check_cache(dst);
  if (src.dtype != lab::DType::fp16 || src.kv_quant.scheme != KvScheme::none)
    throw lab::InvalidArgument(
        "07_kv_quant: the quantizer reads an fp16 KV cache (dtype = fp16, kv_quant.scheme = none)");
  if (src.cu_seqlens_kv)
    throw lab::InvalidArgument(
        "07_kv_quant: cu_seqlens_kv (varlen) caches are not supported by the quantizer");
  if (src.k_head_stride % 8 || src.k_row_stride % 8 || src.k_batch_stride % 8 || src.v_head_stride % 8 ||
      src.v_row_stride % 8 || src.v_batch_stride % 8)
    throw lab::InvalidArgument("07_kv_quant: the fp16 cache's strides must be multiples of 8 elements");
  Source s;
  s.base[0] = static_cast<const __half*>(src.k), s.base[1] = static_cast<const __half*>(src.v);
  s.slot_stride[0] = src.k_batch_stride, s.slot_stride[1] = src.v_batch_stride;
  s.row_stride[0] = src.k_row_stride, s.row_stride[1] = src.v_row_stride;
  s.head_stride[0] = src.k_head_stride, s.head_stride[1] = src.v_head_stride;
  const int64_t rows = int64_t(dst.slots) * dst.rows;
  if (rows <= 0) return;
  // One block per token row, on the grid's x dimension (at most 2^31 - 1 blocks).
  if (rows > int64_t(INT_MAX))
    throw lab::InvalidArgument("07_kv_quant: the quantizer takes at most " + std::to_string(INT_MAX) +
                               " token rows; " + (src.block_table ? "num_pages * page_size" : "batch * seqlen_kv") +
                               " = " + std::to_string(rows));

  const bool per_tensor = dst.scheme == KvScheme::int8_tensor,
             per_head = dst.scheme == KvScheme::fp8_e4m3_head;
  if (per_tensor || per_head) {
    const size_t n = scale_count(dst);
    LAB_CUDA_CHECK(cudaMemsetAsync(dst.k_scale, 0, n * lab::kKvScaleBytes, stream));
    LAB_CUDA_CHECK(cudaMemsetAsync(dst.v_scale, 0, n * lab::kKvScaleBytes, stream));
    const dim3 grid(unsigned((rows + kRowsPerAmaxBlock - 1) / kRowsPerAmaxBlock), 2);
    amax_rows<<<grid, kThreads, 0, stream>>>(s, dst, per_head);
    LAB_LAUNCH_CHECK();
    amax_to_scale<<<dim3(unsigned((n + 127) / 128), 2), 128, 0, stream>>>(dst, int(n), per_head);
    LAB_LAUNCH_CHECK();
  }
  with_scheme(dst.scheme, dst.group_size, [&](auto S, auto G) {
    quantize_rows<decltype(S)::value, decltype(G)::value>
        <<<dim3(unsigned(rows), 2), kThreads, 0, stream>>>(s, dst);
    LAB_LAUNCH_CHECK();
  });
}

void quantize_append(const KvCache& dst, const void* k_new, const void* v_new, const int* seq, const int* pos,
                     int n, cudaStream_t stream) {
  check_cache(dst);
  if (n <= 0) return;
  if (!k_new || !v_new || !seq || !pos)
    throw lab::InvalidArgument("07_kv_quant: quantize_append needs k_new, v_new, seq and pos");
  Source s;
  s.base[0] = static_cast<const __half*>(k_new), s.base[1] = static_cast<const __half*>(v_new);
  for (int i = 0; i < 2; ++i) {
    s.slot_stride[i] = 0;
    s.row_stride[i] = int64_t(dst.heads_kv) * dst.head_dim;
    s.head_stride[i] = dst.head_dim;
  }
  s.seq = seq, s.pos = pos;
  with_scheme(dst.scheme, dst.group_size, [&](auto S, auto G) {
    quantize_rows<decltype(S)::value, decltype(G)::value>
        <<<dim3(unsigned(n), 2), kThreads, 0, stream>>>(s, dst);
    LAB_LAUNCH_CHECK();
  });
}

// ---- the driver's hook ----

namespace {

template <KvScheme S, int G>
size_t prepare_bytes(const lab::AttnParams& p) {
  return storage_bytes(cache_layout(p, S, G));
}

template <KvScheme S, int G>
void prepare(lab::AttnParams& p, void* storage, cudaStream_t stream) {
  KvCache c = cache_layout(p, S, G);
  place(c, storage);
  quantize_bulk(p, c, stream);
  use_cache(p, c);
}

void host_kv(const lab::AttnParams& prepared, lab::HostProblem& hp) {
  dequantize_host(download(cache_of(prepared)), hp);
}

template <KvScheme S, int G>
const lab::KvPrepare* hook() {
  static const lab::KvPrepare h{prepare_bytes<S, G>, prepare<S, G>, host_kv};
  return &h;
}

}  // namespace

const lab::KvPrepare* kv_prepare(KvScheme scheme, int group_size) {
  const lab::KvPrepare* h = nullptr;
  with_scheme(scheme, group_size,
              [&](auto S, auto G) { h = hook<decltype(S)::value, decltype(G)::value>(); });
  return h;
}

}  // namespace ch07
