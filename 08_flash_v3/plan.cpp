// Chapter 08's host-side planning (plan.h): support, launch plans and tensor-map parameters.
#include "08_flash_v3/plan.h"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <mutex>

#include "08_flash_v3/kernel.h"
#include "common/cuda_check.h"
#include "common/device.h"

namespace ch08 {

const lab::Support kSupport = [] {
  lab::Support s;
  s.chapter = "08_flash_v3";
  s.head_dims = {64, 128};
  s.bf16 = true;
  s.causal = true;
  s.gqa = true;
  s.lse = true;
  s.vector_elems = 8;  // TMA wants 16-byte aligned rows and strides
  return s;
}();

std::string device_reason(int cc_major, int cc_minor) {
  if (cc_major == 9 && cc_minor == 0) return "";
  return "08_flash_v3: needs a GPU of compute capability 9.0 (sm_90a: H100, H200, GH200); this GPU is " +
         std::to_string(cc_major) + "." + std::to_string(cc_minor);
}

LaunchPlan plan_launch(Step step, const lab::AttnParams& p, int cc_major, int cc_minor,
                       size_t smem_per_block) {
  return plan_launch(tiles_for(step, p.head_dim), p, cc_major, cc_minor, smem_per_block);
}

LaunchPlan plan_launch(const Tiles& tiles, const lab::AttnParams& p, int cc_major, int cc_minor,
                       size_t smem_per_block) {
  lab::check_params(p, kSupport);
  const std::string why = device_reason(cc_major, cc_minor);
  if (!why.empty()) throw lab::InvalidArgument(why);
  // Grid: (query tiles, heads_q, batch); CUDA allows 65535 in y and z.
  if (p.heads_q > 65535)
    throw lab::InvalidArgument("08_flash_v3: heads_q = " + std::to_string(p.heads_q) +
                               " is not supported (supported: 1..65535)");
  if (p.batch > 65535)
    throw lab::InvalidArgument("08_flash_v3: batch = " + std::to_string(p.batch) +
                               " is not supported (supported: 1..65535)");
  LaunchPlan plan;
  plan.tiles = tiles;
  plan.smem = smem_bytes(plan.tiles, p.head_dim);
  if (plan.smem > smem_per_block)
    throw lab::InvalidArgument(
        "08_flash_v3: needs " + std::to_string(plan.smem) +
        " bytes of shared memory per block at head_dim = " + std::to_string(p.head_dim) +
        "; this GPU allows " + std::to_string(smem_per_block) +
        (lab::smem_cap_from_env() ? " (LAB_SMEM_CAP)" : ""));
  plan.grid_x = (p.seqlen_q + plan.tiles.B_r - 1) / plan.tiles.B_r;
  plan.grid_y = p.heads_q;
  plan.grid_z = p.batch;
  return plan;
}

TmaTile tma_tile(const char* tensor, lab::DType dtype, const void* base, int head_dim, int seqlen, int heads,
                 int batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  const std::string who = std::string("08_flash_v3: tensor map of ") + tensor + ": ";
  auto refuse = [&](const std::string& what) { throw lab::InvalidArgument(who + what); };
  const int64_t elem = lab::dtype_bytes(dtype);
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0)
    refuse(std::string(tensor) + " pointer is not 16-byte aligned");
  if (head_dim <= 0 || head_dim % 64 != 0)
    refuse("head_dim = " + std::to_string(head_dim) + " is not a multiple of the 64-element (128-byte) box");
  if (box_rows < 1 || box_rows > 256) refuse("box_rows = " + std::to_string(box_rows) + " is outside 1..256");
  const struct {
    const char* name;
    int value;
  } dims[] = {{"seqlen", seqlen}, {"heads", heads}, {"batch", batch}};
  for (auto& d : dims)  // int, so at most 2^31 - 1: within TMA's 2^32
    if (d.value < 1) refuse(std::string(d.name) + " = " + std::to_string(d.value) + " must be > 0");
  const struct {
    const char* name;
    int64_t elems;
  } strides[] = {{"row_stride", row_stride}, {"head_stride", head_stride}, {"batch_stride", batch_stride}};
  TmaTile t;
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = strides[i].elems * elem;
    if (bytes < 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40))
      refuse(std::string(tensor) + "_" + strides[i].name + " = " + std::to_string(strides[i].elems) +
             " elements is not a multiple of 16 bytes below 2^40");
    t.strides_bytes[i] = uint64_t(bytes);
  }
  t.dtype = dtype == lab::DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  t.base = base;
  t.dims[0] = uint64_t(head_dim), t.dims[1] = uint64_t(seqlen), t.dims[2] = uint64_t(heads),
  t.dims[3] = uint64_t(batch);
  // 64 elements x 2 bytes = 128 bytes: the widest inner box SWIZZLE_128B allows.
  t.box[0] = 64, t.box[1] = uint32_t(box_rows), t.box[2] = 1, t.box[3] = 1;
  return t;
}

LaunchPlan plan_on_this_gpu(Step step, const lab::AttnParams& p) {
  lab::check_params(p, kSupport);  // bad fields first, so they are named even without a GPU
  const lab::DeviceLimits& d = lab::device_limits();
  return plan_launch(step, p, d.cc_major, d.cc_minor, d.smem_per_block);
}

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_function() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    // The CUDA 12.0 signature of the symbol, whatever driver runs it (cudaGetDriverEntryPoint,
    // deprecated in CUDA 13, on toolkits older than 12.5, which lack the ByVersion form).
#if CUDART_VERSION >= 12050
    LAB_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found));
#else
    LAB_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found));
#endif
    if (found != cudaDriverEntryPointSuccess || !p)
      throw lab::CudaError(
          "08_flash_v3: the driver has no cuTensorMapEncodeTiled (CUDA 12.0 or newer needed)");
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

}  // namespace

CUtensorMap encode_tma_tile(const TmaTile& t) {
  alignas(64) CUtensorMap map;  // the driver wants it 64-byte aligned
  const CUresult r = encode_function()(&map, t.dtype, 4, const_cast<void*>(t.base), t.dims, t.strides_bytes,
                                       t.box, t.element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, t.swizzle,
                                       CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw lab::CudaError("08_flash_v3: cuTensorMapEncodeTiled failed with CUresult " +
                         std::to_string(int(r)));
  return map;
}

}  // namespace ch08
