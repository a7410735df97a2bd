// What every 06 step shares and none teaches: the dtype x head_dim switch and the launch checks.
// It lives here once, so no step's diff shows it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <string>

#include "04_flash_decoding/kernel.h"
#include "common/attn.h"

namespace ch06 {

// Step<T, D>::run(p, args...) for p's dtype and head_dim (64 or 128: every step's Support refuses
// the others before this is reached).
template <template <class, int> class Step, class... Args>
auto dispatch(const lab::AttnParams& p, Args&&... args) {
  const bool half = p.dtype == lab::DType::fp16;
  switch (p.head_dim) {
    case 64:
      return half ? Step<__half, 64>::run(p, args...) : Step<__nv_bfloat16, 64>::run(p, args...);
    default:
      return half ? Step<__half, 128>::run(p, args...) : Step<__nv_bfloat16, 128>::run(p, args...);
  }
}

// The step's Support, then the grid: heads_kv on grid.y and batch on grid.z (65535 each), the
// packed rows seqlen_q * heads_q / heads_kv of one (sequence, KV head) and the key ranges in int
// (04's bound on seqlen_kv leaves room for a key range to end 2 tiles of 64 and one chunk rounding
// per split past seqlen_kv).
inline void check_launch_limits(const lab::AttnParams& p, const lab::Support& s) {
  ch04::check_split_kv_launch(p, s, true);
  if (int64_t(p.seqlen_q) * (p.heads_q / p.heads_kv) > (int64_t(1) << 30))
    throw lab::InvalidArgument(std::string(s.chapter) +
                               ": seqlen_q * heads_q / heads_kv above 2^30 is not supported");
}

}  // namespace ch06
