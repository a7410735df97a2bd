// Steps 3 and 4's tile choice, a pure function of the problem and the GPU's shared memory per block, so
// the CPU tests can run it under every LAB_SMEM_CAP (kernel.h says what it returns).
#include <algorithm>
#include <string>
#include <vector>

#include "06_gqa_alibi/kernel.h"
#include "common/device.h"

namespace ch06 {

TilePlan plan_tile(int64_t packed_rows, int head_dim, int elem_bytes, size_t smem_limit) {
  auto bytes = [&](int B_r, int stages) {
    return size_t(B_r + 2 * stages * 64) * size_t((head_dim + 63) / 64 * 64) * size_t(elem_bytes);
  };
  std::vector<TilePlan> tries;  // in order of preference
  if (packed_rows <= 32) {
    const int m_frags = packed_rows <= 16 ? 1 : 2;
    for (int stages : {3, 2})
      tries.push_back({m_frags, true, stages, 16 * m_frags, bytes(16 * m_frags, stages)});
  }
  tries.push_back({2, false, 2, 128, bytes(128, 2)});
  size_t least = tries[0].smem_bytes;
  for (TilePlan& t : tries) {
    t.row_tiles = (packed_rows + t.B_r - 1) / t.B_r;
    if (t.smem_bytes <= smem_limit) return t;
    least = std::min(least, t.smem_bytes);
  }
  throw lab::InvalidArgument(std::string("06_gqa_alibi") + ": head_dim = " + std::to_string(head_dim) +
                             " needs " + std::to_string(least) +
                             " bytes of shared memory per block; this GPU allows " +
                             std::to_string(smem_limit) + " (LAB_SMEM_CAP or the device's opt-in limit)");
}

TilePlan plan_tile(const lab::AttnParams& p) {
  return plan_tile(int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv), p.head_dim, lab::dtype_bytes(p.dtype),
                   lab::device_limits().smem_per_block);
}

}  // namespace ch06
