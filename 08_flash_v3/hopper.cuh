// The Hopper (sm_90a) PTX instructions chapter 08 is built from, one small wrapper each, with the
// reason it exists. The PTX ISA is the reference: "Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate" (wgmma), "cp.async.bulk.tensor" (TMA), "mbarrier", "setmaxnreg", "bar/barrier".
//
//   wgmma.mma_async   D[64 x N] (+)= A[64 x 16] B[16 x N], fp16/bf16 in, fp32 accumulators, issued
//                     by a warpgroup (4 warps, 128 threads) and run asynchronously. A and B come
//                     from shared memory through 64-bit descriptors (SS), or A from registers (RS).
//   cp.async.bulk.tensor  one thread asks the tensor memory accelerator (TMA) for a whole tile;
//                     the bytes that land are counted on an mbarrier.
//   mbarrier          a shared-memory barrier with a phase bit: a phase completes when its expected
//                     arrivals and transaction bytes are all in; waiters name the phase's parity.
//
// Accumulator layout of m64nNk16 (fp32), warp w of the warpgroup, lane = 4 g + t:
//   d[4 i + 0, 1] = D[16 w + g    ][8 i + 2 t, + 1]      i = 0 .. N/8 - 1
//   d[4 i + 2, 3] = D[16 w + g + 8][8 i + 2 t, + 1]
// The RS form's A registers for rows 16 w .. 16 w + 15 are mma.m16n8k16's A fragment, so the S
// accumulators of keys 16 kk .. 16 kk + 15 (d[8 kk .. 8 kk + 7]) packed in pairs are P's A operand.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>  // printf of LAB_MBAR_TIMEOUT
#include <type_traits>

namespace ch08 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- wgmma: issue, order, wait ----

// Orders this thread's earlier register writes (accumulators, A fragments) before the wgmmas that
// follow read them: wgmma reads registers asynchronously, so plain data dependences are not enough.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Closes the wgmmas issued since the last commit into one group that wgmma_wait can name.
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups are still running; their accumulators are then valid.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Register fences. The "memory" clobber of wgmma_fence/commit/wait orders memory, not registers,
// and the compiler does not know that wgmma reads and writes its registers after the instruction
// issues: an empty asm that "reads and rewrites" each register pins the arithmetic on it (O's
// rescale, P's packing, S's reads) to its side of the fence, before wgmma_fence and after
// wgmma_wait, as CUTLASS's warpgroup_fence_operand does.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for the RS form's A fragments (P packed as fp16/bf16 pairs), K / 16 of 4 registers.
template <int K>
__device__ __forceinline__ void fence_fragments(uint32_t (&a)[K][4]) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) asm volatile("" : "+r"(a[k][q])::"memory");
}

// clang-format off
// Accumulator operands: N / 2 fp32 registers, %0 .. %(N/2 - 1), in blocks of 16.
#define CH08_R0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define CH08_R1 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CH08_R2 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define CH08_R3 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define CH08_R4 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79"
#define CH08_R5 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define CH08_ACC32 "{" CH08_R0 ", " CH08_R1 "}"
#define CH08_ACC48 "{" CH08_R0 ", " CH08_R1 ", " CH08_R2 "}"
#define CH08_ACC64 "{" CH08_R0 ", " CH08_R1 ", " CH08_R2 ", " CH08_R3 "}"
#define CH08_ACC80 "{" CH08_R0 ", " CH08_R1 ", " CH08_R2 ", " CH08_R3 ", " CH08_R4 "}"
#define CH08_ACC96 "{" CH08_R0 ", " CH08_R1 ", " CH08_R2 ", " CH08_R3 ", " CH08_R4 ", " CH08_R5 "}"
#define CH08_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
  "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define CH08_D32 CH08_F8(0), CH08_F8(8), CH08_F8(16), CH08_F8(24)
#define CH08_D48 CH08_D32, CH08_F8(32), CH08_F8(40)
#define CH08_D64 CH08_D48, CH08_F8(48), CH08_F8(56)
#define CH08_D80 CH08_D64, CH08_F8(64), CH08_F8(72)
#define CH08_D96 CH08_D80, CH08_F8(80), CH08_F8(88)
// One SS wgmma: SHAPE is "m64nNk16.f32.f16.f16" (or .bf16), ACC and D the accumulators of that N,
// AB and SCALE_D the operand numbers of wgmma_ss's descriptors a, b and of its `accumulate`, the
// operands that follow the accumulators.
#define CH08_WGMMA_SS(SHAPE, ACC, D, AB, SCALE_D)                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned." SHAPE " " ACC ", " AB ", p, 1, 1, 0, 0;\n}\n" \
               : D                                                                           \
               : "l"(a), "l"(b), "r"(accumulate))
// clang-format on

// S = Q K^T (SS): D[64 x N] = A B (+ D when accumulate != 0), both operands K-major in shared
// memory (Q_i rows and K_j rows, head_dim contiguous). The trailing immediates are imm-scale-a = 1,
// imm-scale-b = 1 (no negation), imm-trans-a = 0, imm-trans-b = 0 (K-major, as stored); the
// predicate p is scale-d: false on the first k-step, so S needs no zeroing. N = B_c: the PTX ISA
// allows any multiple of 8 up to 256 for f16/bf16; these are the widths the kernels and the
// tuning sweep (bench/tune08.cu) use.
template <class T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  static_assert(N == 64 || N == 96 || N == 128 || N == 160 || N == 192, "S tiles are 64 to 192 keys wide");
  constexpr bool f16 = std::is_same_v<T, __half>;
  if constexpr (N == 64 && f16)
    CH08_WGMMA_SS("m64n64k16.f32.f16.f16", CH08_ACC32, CH08_D32, "%32, %33", "%34");
  else if constexpr (N == 64)
    CH08_WGMMA_SS("m64n64k16.f32.bf16.bf16", CH08_ACC32, CH08_D32, "%32, %33", "%34");
  else if constexpr (N == 96 && f16)
    CH08_WGMMA_SS("m64n96k16.f32.f16.f16", CH08_ACC48, CH08_D48, "%48, %49", "%50");
  else if constexpr (N == 96)
    CH08_WGMMA_SS("m64n96k16.f32.bf16.bf16", CH08_ACC48, CH08_D48, "%48, %49", "%50");
  else if constexpr (N == 128 && f16)
    CH08_WGMMA_SS("m64n128k16.f32.f16.f16", CH08_ACC64, CH08_D64, "%64, %65", "%66");
  else if constexpr (N == 128)
    CH08_WGMMA_SS("m64n128k16.f32.bf16.bf16", CH08_ACC64, CH08_D64, "%64, %65", "%66");
  else if constexpr (N == 160 && f16)
    CH08_WGMMA_SS("m64n160k16.f32.f16.f16", CH08_ACC80, CH08_D80, "%80, %81", "%82");
  else if constexpr (N == 160)
    CH08_WGMMA_SS("m64n160k16.f32.bf16.bf16", CH08_ACC80, CH08_D80, "%80, %81", "%82");
  else if constexpr (f16)
    CH08_WGMMA_SS("m64n192k16.f32.f16.f16", CH08_ACC96, CH08_D96, "%96, %97", "%98");
  else
    CH08_WGMMA_SS("m64n192k16.f32.bf16.bf16", CH08_ACC96, CH08_D96, "%96, %97", "%98");
}

// O += P V (RS): A = P from registers (4 x 32 bits: 8 fp16/bf16 per thread), B = V_j in shared
// memory as stored, [keys, d] with d contiguous: MN-major, hence imm-trans-b = 1. RS has no
// imm-trans-a (registers have no major-ness); imm-scale-a = imm-scale-b = 1; scale-d is a true
// predicate (always accumulate into O_i).
template <class T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  static_assert(N == 64 || N == 128, "O tiles are 64 or 128 wide (head_dim)");
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " CH08_ACC32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : CH08_D32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else if constexpr (N == 64) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " CH08_ACC32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : CH08_D32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " CH08_ACC64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : CH08_D64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " CH08_ACC64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : CH08_D64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
}

#undef CH08_R0
#undef CH08_R1
#undef CH08_R2
#undef CH08_R3
#undef CH08_R4
#undef CH08_R5
#undef CH08_ACC32
#undef CH08_ACC48
#undef CH08_ACC64
#undef CH08_ACC80
#undef CH08_ACC96
#undef CH08_F8
#undef CH08_D32
#undef CH08_D48
#undef CH08_D64
#undef CH08_D80
#undef CH08_D96
#undef CH08_WGMMA_SS

// ---- proxies ----

// wgmma and TMA access shared memory through the async proxy; writes made by ordinary stores or
// cp.async (the generic proxy) become visible to them only after this fence (then a barrier).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- mbarrier ----

// One 8-byte barrier in shared memory expecting `count` arrivals per phase; the phase starts at 0.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the inits visible to the other threads and to the TMA unit (which arrives through
// complete_tx) before anyone uses the barriers; a __syncthreads follows it.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives and raises the phase's transaction count by `bytes`: the phase then also waits for that
// many bytes of TMA copies, which count down as they land (complete_tx).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One arrival (a consumer saying it is done with a stage), with release semantics.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed (acquire: the data it guarded is
// visible). Right after init the barrier is in phase 0, so waiting for parity 1 returns at once
// (the phase "before" 0 counts as completed) and waiting for parity 0 blocks until phase 0 ends.
// try_wait may give up after a hardware time limit, hence the loop. Built with -DLAB_MBAR_TIMEOUT
// (a debug switch; without it this code is not compiled at all), a wait still open after 2^28
// tries names its barrier and traps: a wrong parity or arrival count fails loudly, not as a hang.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
#ifdef LAB_MBAR_TIMEOUT
  uint32_t tries = 0;
#endif
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#ifdef LAB_MBAR_TIMEOUT
    if (!done && ++tries == (1u << 28)) {
      printf(
          "08_flash_v3: mbarrier wait timed out: barrier at shared 0x%x, parity %u, block (%d, %d, %d), "
          "thread %d\n",
          bar, parity, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
      __trap();
    }
#endif
  } while (!done);
}

// ---- TMA: tile loads described by a tensor map ----
// `map` is the generic address of a __grid_constant__ kernel parameter; coordinates are element
// indices, innermost dimension first, and may run past the tensor (those elements read as zero).
// The copy's bytes count down the transaction count of `bar`.

// A 2D box (e.g. [rows, d] of a matrix).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
// A 3D box (e.g. [rows, d] of one head of a [seqlen, heads, d] tensor).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, "
      "%5}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
// A 4D box: {column, row, head, batch} of a [batch, seqlen, heads, d] tensor (what 08 reads).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, "
      "%5, %6}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// ---- warp specialization (for the producer/consumer steps) ----

// A producer warpgroup that only issues TMA needs few registers; it gives them back so that the
// consumer warpgroups can raise theirs (all warps of a warpgroup execute it together).
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
// Named barriers 1..15 (0 is __syncthreads): THREADS threads meet without stopping the rest of
// the block; arrive signals without waiting (a warpgroup telling the other it may go). The id is
// an immediate: with an id in a register ptxas must reserve all 16 barriers.
template <int ID, int THREADS>
__device__ __forceinline__ void named_barrier_sync() {
  static_assert(ID >= 1 && ID <= 15 && THREADS % 32 == 0, "ids 1..15, whole warps");
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}
template <int ID, int THREADS>
__device__ __forceinline__ void named_barrier_arrive() {
  static_assert(ID >= 1 && ID <= 15 && THREADS % 32 == 0, "ids 1..15, whole warps");
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

}  // namespace ch08
