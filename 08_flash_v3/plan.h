// Chapter 08's host-side planning, kept apart from the kernels so that the CPU tests can check it
// without a GPU: what the chapter supports (and the GPU it needs), the tile shapes and shared
// memory of each step, the parameters of every tensor map, and the bit layouts the kernels rely on
// (the wgmma shared-memory descriptor and the 128-byte swizzle), as constexpr functions.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums: types only, nothing from the driver library is linked

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/attn.h"

#if defined(__CUDACC__)
#define CH08_HD __host__ __device__
#else
#define CH08_HD
#endif

namespace ch08 {

// head_dim 64 and 128; fp16 and bf16; causal; GQA/MQA; lse. On a compute capability 9.0 GPU only.
extern const lab::Support kSupport;

enum class Step { wgmma, tma, ws, pingpong };

// B_r query rows per block (64 per consumer warpgroup: 4 warps x 16 rows, the M = 64 of wgmma),
// B_c keys per K/V tile, how many K/V tiles are in shared memory at once (stages), and threads per
// block. S = Q K^T is m64 n(B_c) k16 and O += P V is m64 n(d) k16 per consumer warpgroup.
//   wgmma, tma: one warpgroup; B_c = 128 at d = 64 and 64 at d = 128 (16 KB K/V tiles; S and O
//               fit the 255 registers of a 128-thread block), two K/V stages: 73 / 81 KB.
//   ws:         a producer and two consumer warpgroups (384 threads, one block per SM); the
//               consumers' 240 registers hold S and O of a 64 x 128 tile at d = 128 (64 + 64 fp32),
//               so B_c = 128 at both head dims; two stages: 81 KB at d = 64, 161 KB at d = 128.
//   pingpong:   as ws, with 3 stages: a slot is held until P V of its tile is done, one iteration
//               later than in ws; 225 KB at d = 128. At d = 64 three consumer warpgroups (B_r = 192,
//               512 threads, 160 registers each): the exponentials cost as much as the GEMMs there,
//               and a third consumer keeps the tensor cores fed (FlashAttention-3's choice; 19%
//               faster on the H200, docs/NOTES-08.md); 121 KB.
struct Tiles {
  int B_r, B_c, stages, threads;
};
constexpr CH08_HD Tiles tiles_for(Step step, int head_dim) {
  if (step == Step::ws) return Tiles{128, 128, 2, 384};
  if (step == Step::pingpong) return head_dim == 64 ? Tiles{192, 128, 3, 512} : Tiles{128, 128, 3, 384};
  return head_dim == 64 ? Tiles{64, 128, 2, 128} : Tiles{64, 64, 2, 128};
}

// Dynamic shared memory of a block: Q_i, `stages` pairs of K_j/V_j tiles, and 1 KB to align the
// base to 1024 bytes (the 128-byte swizzle repeats every 8 rows of 128 bytes, and both TMA and
// wgmma compute it from address bits, so every tile must start on a 1024-byte boundary).
constexpr CH08_HD size_t smem_bytes(const Tiles& t, int head_dim) {
  return 1024 + size_t(t.B_r + 2 * t.stages * t.B_c) * head_dim * 2;
}

// ---- layouts shared by the kernels and the tests ----

// A tile of ROWS x d 16-bit elements lives in shared memory as d / 64 column blocks of ROWS rows
// of 128 bytes (64 elements); the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its row.
// This is the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B (it XORs address bits 4-6 with
// bits 7-9) and the one a wgmma descriptor with swizzle mode 1 (128B) reads, given 1024-byte
// aligned blocks. Byte offset of chunk c (0 .. d/8 - 1) of row r:
constexpr CH08_HD uint32_t sw128_offset(int rows, int r, int c) {
  return uint32_t((c / 8) * rows * 128 + r * 128 + (((c % 8) ^ (r % 8)) * 16));
}

// The 64-bit wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4         bits 16-29  leading dimension byte offset >> 4
//   bits 32-45  stride dimension byte offset >> 4      bits 49-51  base offset (0: every matrix
//   here starts within the first 128 bytes of a 1024-byte aligned pattern)
//   bits 62-63  swizzle mode: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
// Fields hold 14 bits of (value & 0x3FFFF) >> 4: shared addresses below 256 KB, in 16-byte units.
constexpr CH08_HD uint64_t sw128_desc(uint32_t start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((start & 0x3FFFF) >> 4) | uint64_t((lbo_bytes & 0x3FFFF) >> 4) << 16 |
         uint64_t((sbo_bytes & 0x3FFFF) >> 4) << 32 | uint64_t(1) << 62;
}

// The descriptors of the two products (the kernels' only uses of sw128_desc), tested on the CPU
// against the canonical layouts of the PTX ISA (test.cu):
//   K-major (Q_i as A, K_j as B of S = Q K^T): rows of 128 bytes, 8-row groups SBO = 1024 bytes
//   apart; the leading byte offset is unused for this layout (16, i.e. 1); the k16-th 16 columns
//   start 32 k16 bytes into their 64-column block, and block k16 / 4 starts rows x 128 bytes on.
constexpr CH08_HD uint64_t kmajor_desc(uint32_t tile, int rows, int k16) {
  return sw128_desc(tile + (k16 / 4) * rows * 128 + (k16 % 4) * 32, 16, 1024);
}
//   MN-major (V_j as B of O += P V, [keys, d] with d contiguous, imm-trans-b = 1): keys
//   16 k16 .. 16 k16 + 15 start 16 rows (2048 bytes) on; 8-key groups SBO = 1024 bytes apart;
//   64-column blocks LBO = rows x 128 bytes apart.
constexpr CH08_HD uint64_t mn_major_desc(uint32_t tile, int rows, int k16) {
  return sw128_desc(tile + k16 * 16 * 128, rows * 128, 1024);
}

// ---- the launch plan ----

// "" when a GPU of this compute capability runs the chapter; else why not, by name. The kernels
// are compiled for sm_90a (wgmma and setmaxnreg exist only there), and sm_90a code runs on
// compute capability 9.0 alone: not on 8.x, and not on 10.x or 12.x either.
std::string device_reason(int cc_major, int cc_minor);

struct LaunchPlan {
  Tiles tiles;
  size_t smem = 0;
  int grid_x = 0, grid_y = 0, grid_z = 0;  // (query tiles, heads_q, batch)
};

// Everything a launcher decides before touching the GPU, from the problem and the device's numbers
// (lab::device_limits() in the launchers, any numbers in the tests). Throws lab::InvalidArgument
// naming the field, the GPU or the shared memory that does not fit.
LaunchPlan plan_launch(Step step, const lab::AttnParams& p, int cc_major, int cc_minor,
                       size_t smem_per_block);
// The same for given tiles (the step's are tiles_for's; a tuning sweep's, bench/tune08.cu, others).
LaunchPlan plan_launch(const Tiles& tiles, const lab::AttnParams& p, int cc_major, int cc_minor,
                       size_t smem_per_block);

// ---- tensor maps (step 2 on) ----

// The arguments of cuTensorMapEncodeTiled for one [batch, seqlen, heads, head_dim] tensor read in
// boxes of box_rows x 64 elements, 128-byte swizzled: dimension 0 is head_dim (contiguous), then
// seqlen, heads, batch. Rows past seqlen read as zeros (the tail of the last tile).
struct TmaTile {
  CUtensorMapDataType dtype = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const void* base = nullptr;
  uint64_t dims[4] = {};
  uint64_t strides_bytes[3] = {};  // of dimensions 1, 2, 3 (dimension 0 is contiguous)
  uint32_t box[4] = {};
  uint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B;
};

// Pure: computes and checks the parameters (16-byte aligned base and strides, strides below 2^40,
// dimensions in 1 .. 2^32, box rows in 1 .. 256, head_dim a multiple of the 64-element box);
// throws lab::InvalidArgument naming `tensor` ("q", "k", "v") and the field.
TmaTile tma_tile(const char* tensor, lab::DType dtype, const void* base, int head_dim, int seqlen, int heads,
                 int batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows);

// Encodes one, through cuTensorMapEncodeTiled reached with cudaGetDriverEntryPointByVersion (the
// driver's own entry point, so nothing new is linked). Throws lab::CudaError if the driver refuses.
CUtensorMap encode_tma_tile(const TmaTile& t);

}  // namespace ch08
