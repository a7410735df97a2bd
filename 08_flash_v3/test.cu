// Tests of 08_flash_v3 (every step) against the fp64 reference, and of its host-side planning.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "08_flash_v3/kernel.h"
#include "common/device.h"
#include "common/testing.h"

using lab::DType;

namespace {
const lab::Chapter& ch() {
  static lab::Chapter c = ch08::chapter();
  return c;
}

// A valid problem with fake (aligned, never dereferenced) pointers, for the host-side checks.
lab::AttnParams host_params(int head_dim = 64, DType dtype = DType::fp16) {
  lab::AttnParams p;
  p.batch = 2, p.heads_q = 4, p.heads_kv = 2, p.seqlen_q = 1000, p.seqlen_kv = 333, p.head_dim = head_dim;
  p.dtype = dtype, p.softmax_scale = 0.1f, p.causal = true;
  lab::set_contiguous_strides(p);
  alignas(16) static char buf[64];
  p.q = p.k = p.v = buf;
  p.o = buf;
  return p;
}

std::string refusal(const std::function<void()>& f) {
  try {
    f();
  } catch (const lab::InvalidArgument& e) {
    return e.what();
  }
  return "";
}

// The GPU cases run on a compute capability 9.0 GPU. On any other the chapter must refuse by name
// (checked here, through every step), and the cases end there.
bool runs_here() {
  const lab::DeviceLimits& d = lab::device_limits();
  if (d.cc_major == 9 && d.cc_minor == 0) return true;
  lab::ProblemSpec s;
  s.seqlen_q = s.seqlen_kv = 64;
  lab::Problem prob(s);
  for (const lab::Variant& v : ch().variants) {
    INFO(v.name);
    CHECK(refusal([&] { v.forward(prob.params, 0); }).find("needs a GPU of compute capability 9.0") !=
          std::string::npos);
  }
  WARN("08_flash_v3 needs compute capability 9.0; this GPU is " << d.cc_major << "." << d.cc_minor
                                                                << ": only its refusal was tested");
  return false;
}
}  // namespace

TEST_CASE("08_flash_v3 matches the reference on awkward shapes", "[gpu]") {
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants)
    for (DType t : {DType::fp16, DType::bf16})
      for (int d : {64, 128})
        for (lab::ProblemSpec s : lab::awkward_prefill_shapes(d, t)) {
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("08_flash_v3: strided rows, GQA, lse, large logits", "[gpu]") {
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants)
    for (int d : {64, 128})
      for (DType t : {DType::fp16, DType::bf16})
        for (bool causal : {false, true}) {
          lab::ProblemSpec s;
          s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 200, s.seqlen_kv = 333;
          s.head_dim = d, s.dtype = t, s.causal = causal, s.lse = true, s.row_pad = 8;
          s.dist = causal ? lab::Dist::large_logits : lab::Dist::normal;
          s.seed = lab::test_seed() + d + 7 * causal;
          INFO(v.name << ": " << lab::describe(s));
          LAB_REQUIRE_PASS(lab::run_and_check(v, s));
        }
}

TEST_CASE("08_flash_v3: long sequences, checked on sampled rows", "[gpu]") {
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants)
    for (int d : {64, 128}) {
      lab::ProblemSpec s;
      s.batch = 1, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 4100, s.seqlen_kv = 4100, s.head_dim = d;
      s.causal = true, s.lse = true, s.seed = lab::test_seed() + d;
      INFO(v.name << ": " << lab::describe(s));
      LAB_REQUIRE_PASS(lab::run_and_check(v, s, false));
    }
}

TEST_CASE("08_flash_v3: the same input gives bit-identical output twice", "[gpu]") {
  // A race (a phase or a slot refilled too early) shows as outputs that differ run to run.
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants) {
    lab::ProblemSpec s;
    s.batch = 3, s.heads_q = 4, s.heads_kv = 4, s.seqlen_q = 700, s.seqlen_kv = 900, s.head_dim = 128;
    s.causal = true, s.seed = lab::test_seed();
    INFO(v.name);
    lab::require_bit_identical_runs(v, s);
  }
}

TEST_CASE("08_flash_v3: the NaN rule, a NaN in q, k or v, in every step", "[gpu]") {
  // fmaxf drops a NaN score, so m_i stays finite and only l_i carries it: the epilogue must test
  // l != 0 (not l > 0) for lse_i to come out NaN (common/attn.h states the rule).
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants)
    for (int d : {64, 128})
      for (bool causal : {true, false})
        for (lab::NanIn where : {lab::NanIn::q, lab::NanIn::k, lab::NanIn::v}) {
          lab::ProblemSpec s;
          s.batch = 2, s.heads_q = 2, s.heads_kv = 2, s.seqlen_q = 200, s.seqlen_kv = causal ? 200 : 300;
          s.head_dim = d, s.causal = causal, s.seed = lab::test_seed();
          INFO(v.name << " " << lab::describe(s));
          lab::check_nan_rule(v, s, where);
          lab::check_nan_rule(v, s, where, 0);  // a first tile whose only visible score is NaN
        }
}

TEST_CASE("08_flash_v3: a small case for the sanitizers", "[gpu][sanitize]") {
  // memcheck, racecheck and synccheck: mbarrier phases and TMA writes over more than one round of
  // the ring (seqlen_kv 300 at d = 128: 5 tiles of 64 keys, 4 of 128 in ws and pingpong with
  // seqlen_kv 450), named barriers of pingpong, tails in both sequence dimensions.
  if (!runs_here()) return;
  for (const lab::Variant& v : ch().variants) {
    lab::ProblemSpec s;
    s.batch = 2, s.heads_q = 4, s.heads_kv = 2, s.seqlen_q = 150, s.seqlen_kv = 90, s.head_dim = 64;
    s.causal = true, s.lse = true, s.seed = lab::test_seed();
    INFO(v.name);
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    s.head_dim = 128, s.causal = false, s.seqlen_q = 70, s.seqlen_kv = 300;
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    s.causal = true, s.seqlen_q = 200, s.seqlen_kv = 450;  // 2 query tiles of 128, 4 key tiles
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
    // Causal with seqlen_q > seqlen_kv: the first query tiles see no key (T_c = 0), so the producer
    // issues Q alone and pingpong takes no turn; those rows write O = 0 and lse = -inf.
    s.seqlen_q = 300, s.seqlen_kv = 40;
    LAB_REQUIRE_PASS(lab::run_and_check(v, s));
  }
}

TEST_CASE("08_flash_v3 refuses what it does not support, naming the field", "[cpu]") {
  lab::AttnParams p = host_params();
  auto plan = [](const lab::AttnParams& q) {
    return refusal([&] { ch08::plan_launch(ch08::Step::tma, q, 9, 0, 227 * 1024); });
  };
  CHECK(plan(p).empty());
  lab::AttnParams q = p;
  q.head_dim = 96;
  lab::set_contiguous_strides(q);
  CHECK(plan(q) == "08_flash_v3: head_dim = 96 is not supported (supported: 64, 128)");
  q.head_dim = 256;
  lab::set_contiguous_strides(q);
  CHECK(plan(q) == "08_flash_v3: head_dim = 256 is not supported (supported: 64, 128)");
  q = p;
  q.dtype = static_cast<DType>(7);
  CHECK(plan(q).find("dtype") != std::string::npos);
  q = p;
  q.k_row_stride = 2 * 64 + 4;
  CHECK(plan(q).find("k_row_stride") != std::string::npos);
  q = p;
  q.v = static_cast<const char*>(p.v) + 8;
  CHECK(plan(q).find("v pointer is not 16-byte aligned") != std::string::npos);
  q = p;
  q.heads_kv = 3;
  CHECK(plan(q).find("heads_q = 4 is not a multiple of heads_kv = 3") != std::string::npos);
  q = p;
  q.cu_seqlens_q = q.cu_seqlens_kv = reinterpret_cast<const int*>(p.q);
  CHECK(plan(q).find("varlen") != std::string::npos);
  q = p;
  q.alibi_slopes = reinterpret_cast<const float*>(p.q);
  CHECK(plan(q).find("alibi") != std::string::npos);
  q = p;
  q.batch = 70000;
  lab::set_contiguous_strides(q);
  CHECK(plan(q).find("batch = 70000") != std::string::npos);
}

TEST_CASE("08_flash_v3 refuses every GPU but compute capability 9.0, by name", "[cpu]") {
  const lab::AttnParams p = host_params(128, DType::bf16);
  for (auto cc : {std::pair<int, int>{8, 0}, {8, 6}, {8, 9}, {10, 0}, {12, 0}, {9, 1}}) {
    INFO(cc.first << "." << cc.second);
    for (ch08::Step step : {ch08::Step::wgmma, ch08::Step::tma, ch08::Step::ws, ch08::Step::pingpong}) {
      const std::string why = refusal([&] { ch08::plan_launch(step, p, cc.first, cc.second, 227 * 1024); });
      CHECK(why ==
            "08_flash_v3: needs a GPU of compute capability 9.0 (sm_90a: H100, H200, GH200); this GPU is " +
                std::to_string(cc.first) + "." + std::to_string(cc.second));
    }
  }
  CHECK(ch08::device_reason(9, 0).empty());
  // A bad field is named before the GPU is: the C API and Python report it on any machine.
  lab::AttnParams q = p;
  q.head_dim = 80;
  CHECK(refusal([&] { ch08::plan_launch(ch08::Step::tma, q, 8, 0, 227 * 1024); }).find("head_dim = 80") !=
        std::string::npos);
}

TEST_CASE("08_flash_v3: a plan for given tiles makes the step's checks (bench/tune08's candidates)", "[cpu]") {
  const lab::AttnParams p = host_params(64);
  const ch08::LaunchPlan step = ch08::plan_launch(ch08::Step::pingpong, p, 9, 0, 227 * 1024);
  const ch08::LaunchPlan same = ch08::plan_launch(ch08::tiles_for(ch08::Step::pingpong, 64), p, 9, 0, 227 * 1024);
  CHECK(same.smem == step.smem);
  CHECK(same.grid_x == step.grid_x);
  const ch08::LaunchPlan two = ch08::plan_launch(ch08::Tiles{128, 192, 3, 384}, p, 9, 0, 227 * 1024);
  CHECK(two.smem == ch08::smem_bytes(two.tiles, 64));
  CHECK(two.grid_x == (1000 + 127) / 128);
  // Tiles past the GPU's shared memory, or another GPU: refused by name, as for the step.
  CHECK(refusal([&] { ch08::plan_launch(ch08::Tiles{128, 192, 6, 384}, p, 9, 0, 227 * 1024); })
            .find("bytes of shared memory") != std::string::npos);
  CHECK(refusal([&] { ch08::plan_launch(ch08::Tiles{128, 128, 3, 384}, p, 8, 0, 227 * 1024); })
            .find("compute capability 9.0") != std::string::npos);
}

TEST_CASE("08_flash_v3 plans its launches from the arithmetic", "[cpu]") {
  for (ch08::Step step : {ch08::Step::wgmma, ch08::Step::tma, ch08::Step::ws, ch08::Step::pingpong})
    for (int d : {64, 128}) {
      INFO("step " << int(step) << ", head_dim " << d);
      const lab::AttnParams p = host_params(d);
      const ch08::LaunchPlan plan = ch08::plan_launch(step, p, 9, 0, 227 * 1024);
      const bool pp = step == ch08::Step::pingpong, ws = step == ch08::Step::ws || pp;
      const int consumers = pp && d == 64 ? 3 : ws ? 2 : 1;  // 64 rows per consumer warpgroup
      CHECK(plan.tiles.B_r == 64 * consumers);
      CHECK(plan.tiles.threads == 128 * (consumers + (ws ? 1 : 0)));
      CHECK(plan.tiles.B_c == (d == 64 || ws ? 128 : 64));
      CHECK(plan.tiles.stages == (pp ? 3 : 2));
      // Q_i (B_r x d) and `stages` K/V pairs (B_c x d each), 2 bytes per element, + 1 KB alignment:
      // one warpgroup: 72 KB + 1 KB at d = 64, 80 KB + 1 KB at d = 128 (two blocks per SM);
      // ws: 80 KB + 1 KB at d = 64, 160 KB + 1 KB at d = 128 (one block per SM);
      // pingpong: 120 KB + 1 KB at d = 64 (B_r = 192), 224 KB + 1 KB at d = 128 (under the 227 KB a
      // block may have).
      const int kb = pp ? (d == 64 ? 121 : 225) : ws ? (d == 64 ? 81 : 161) : (d == 64 ? 73 : 81);
      CHECK(plan.smem == size_t(kb) * 1024);
      CHECK(plan.grid_x == (1000 + plan.tiles.B_r - 1) / plan.tiles.B_r);
      CHECK(plan.grid_y == 4);
      CHECK(plan.grid_z == 2);
      // LAB_SMEM_CAP below the plan is refused by name, before any launch.
      CHECK(refusal([&] { ch08::plan_launch(step, p, 9, 0, 64 * 1024); }).find("bytes of shared memory") !=
            std::string::npos);
    }
}

TEST_CASE("08_flash_v3: the wgmma descriptor and the 128-byte swizzle", "[cpu]") {
  // Descriptor fields (PTX ISA, Matrix Descriptor Format): start >> 4 in bits 0-13, LBO >> 4 in
  // 16-29, SBO >> 4 in 32-45, swizzle mode 1 (128B) in 62-63.
  const uint64_t d = ch08::sw128_desc(0x2420, 16, 1024);
  CHECK((d & 0x3FFF) == 0x2420 >> 4);
  CHECK(((d >> 16) & 0x3FFF) == 1);
  CHECK(((d >> 32) & 0x3FFF) == 64);
  CHECK(((d >> 49) & 0x7) == 0);
  CHECK((d >> 62) == 1);
  CHECK(((d >> 14) & 0x3) == 0);  // reserved bits stay clear
  CHECK(((d >> 30) & 0x3) == 0);
  CHECK(((d >> 46) & 0x7) == 0);
  CHECK(((d >> 52) & 0x3FF) == 0);
  // V's leading byte offset at d = 128, B_c = 64: the second 64-column block, 8 KB on.
  CHECK(((ch08::sw128_desc(0, 64 * 128, 1024) >> 16) & 0x3FFF) == 512);
  // Shared addresses up to 256 KB: bit 17 of the address is the top bit of the field.
  CHECK((ch08::sw128_desc(0x3FFF0, 16, 1024) & 0x3FFF) == 0x3FFF);

  // sw128_offset is TMA's SWIZZLE_128B: within a 1024-byte aligned block, byte address bits 4-6
  // XOR bits 7-9. Check every chunk of a 64 x 128 tile against that rule, and that the tile is a
  // permutation of its bytes.
  std::vector<int> seen(64 * 128 * 2 / 16, 0);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 16; ++c) {
      const uint32_t plain = uint32_t((c / 8) * 64 * 128 + r * 128 + (c % 8) * 16);  // unswizzled
      const uint32_t swizzled = plain ^ (((plain >> 7) & 7) << 4);
      CHECK(ch08::sw128_offset(64, r, c) == swizzled);
      ++seen[ch08::sw128_offset(64, r, c) / 16];
    }
  CHECK(std::count(seen.begin(), seen.end(), 1) == int(seen.size()));
}

namespace {
// The descriptor's fields, as the tensor cores read them.
struct Desc {
  uint32_t start, lbo, sbo;
};
Desc decode(uint64_t d) {
  CHECK((d >> 62) == 1);        // 128-byte swizzle
  CHECK(((d >> 49) & 7) == 0);  // base offset
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4};
}
// 128-byte swizzle of a shared-memory byte address: the 16-byte chunk (bits 4-6) XOR the row of
// the 1024-byte pattern (bits 7-9).
uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7) << 4); }
}  // namespace

TEST_CASE("08_flash_v3: the descriptors address the tiles as they are stored", "[cpu]") {
  // The canonical 128-byte-swizzled layouts of the PTX ISA (wgmma "Shared Memory Matrix Layout";
  // CUTLASS writes them as ((8,m),(T,2)):((8T,SBO),(1,T)) for K-major and
  // ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) for MN-major, T = 8 16-bit elements), then the swizzle,
  // against where sw128_offset (what TMA and the cp.async copies write) put each element.
  const uint32_t base = 5 * 1024;  // any 1024-byte aligned tile
  for (int d : {64, 128})
    for (int rows : {64, 128}) {
      INFO("d " << d << ", rows " << rows);
      auto stored = [&](int r, int col) {
        return base + ch08::sw128_offset(rows, r, col / 8) + (col % 8) * 2;
      };
      // K-major (Q_i, K_j): operand row m, column k of the k16-th 16-column slice.
      for (int k16 = 0; k16 < d / 16; ++k16) {
        const Desc a = decode(ch08::kmajor_desc(base, rows, k16));
        for (int m = 0; m < rows; ++m)
          for (int k = 0; k < 16; ++k) {
            const uint32_t addr = a.start + (m / 8) * a.sbo + (m % 8) * 128 + (k / 8) * 16 + (k % 8) * 2;
            if (swizzle128(addr) != stored(m, 16 * k16 + k))
              FAIL("K-major k16 " << k16 << " m " << m << " k " << k);
          }
      }
      // MN-major (V_j): key k of the k16-th 16 keys, column n of d (two 64-column blocks at d 128).
      for (int k16 = 0; k16 < rows / 16; ++k16) {
        const Desc v = decode(ch08::mn_major_desc(base, rows, k16));
        for (int k = 0; k < 16; ++k)
          for (int n = 0; n < d; ++n) {
            const uint32_t addr = v.start + (n / 64) * v.lbo + (n % 64) * 2 + (k % 8) * 128 + (k / 8) * v.sbo;
            if (swizzle128(addr) != stored(16 * k16 + k, n))
              FAIL("MN-major k16 " << k16 << " k " << k << " n " << n);
          }
      }
    }
  // Consumer 2's rows of Q_i (ws, pingpong) start 64 rows into each 128-row column block.
  const Desc q2 = decode(ch08::kmajor_desc(base + 64 * 128, 128, 5));
  CHECK(q2.start == base + 128 * 128 + 64 * 128 + 32);
}

TEST_CASE("08_flash_v3: tensor-map parameters", "[cpu]") {
  alignas(16) static char buf[64];
  // [batch 3, seqlen 1000, heads 8, d 128] bf16, contiguous: strides 8 x 128 x 2 = 2 KB per row,
  // 256 bytes per head, 2 MB per batch; boxes of 64 columns x 64 rows.
  ch08::TmaTile t = ch08::tma_tile("k", DType::bf16, buf, 128, 1000, 8, 3, 8 * 128, 128, 1000 * 8 * 128, 64);
  CHECK(t.dtype == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16);
  CHECK(t.base == buf);
  CHECK(t.dims[0] == 128);
  CHECK(t.dims[1] == 1000);
  CHECK(t.dims[2] == 8);
  CHECK(t.dims[3] == 3);
  CHECK(t.strides_bytes[0] == 2048);
  CHECK(t.strides_bytes[1] == 256);
  CHECK(t.strides_bytes[2] == 2048000);
  CHECK(t.box[0] == 64);  // 128 bytes: SWIZZLE_128B's widest inner box
  CHECK(t.box[1] == 64);
  CHECK(t.box[2] == 1);
  CHECK(t.box[3] == 1);
  CHECK(t.swizzle == CU_TENSOR_MAP_SWIZZLE_128B);
  for (uint32_t e : t.element_strides) CHECK(e == 1);
  CHECK(ch08::tma_tile("q", DType::fp16, buf, 64, 5, 1, 1, 64, 64, 320, 64).dtype ==
        CU_TENSOR_MAP_DATA_TYPE_FLOAT16);

  auto why = [&](auto&& f) { return refusal([&] { f(); }); };
  CHECK(why([&] { ch08::tma_tile("v", DType::fp16, buf, 128, 10, 2, 1, 260, 128, 2600, 64); }) ==
        "08_flash_v3: tensor map of v: v_row_stride = 260 elements is not a multiple of 16 bytes below 2^40");
  CHECK(why([&] { ch08::tma_tile("q", DType::fp16, buf + 8, 64, 10, 2, 1, 128, 64, 1280, 64); }) ==
        "08_flash_v3: tensor map of q: q pointer is not 16-byte aligned");
  CHECK(why([&] {
          ch08::tma_tile("k", DType::fp16, buf, 96, 10, 2, 1, 192, 96, 1920, 64);
        }).find("head_dim = 96") != std::string::npos);
  CHECK(why([&] {
          ch08::tma_tile("k", DType::fp16, buf, 64, 10, 2, 1, 128, 64, 1280, 257);
        }).find("box_rows = 257") != std::string::npos);
  CHECK(why([&] {
          ch08::tma_tile("k", DType::fp16, buf, 64, 0, 2, 1, 128, 64, 1280, 64);
        }).find("seqlen = 0") != std::string::npos);
  CHECK(why([&] {
          ch08::tma_tile("k", DType::fp16, buf, 64, 10, 2, 1, 128, 64, int64_t(1) << 39, 64);
        }).find("k_batch_stride") != std::string::npos);
}
