// Per-device facts and the once-only kernel set-up every launcher shares. Never a lesson, so it
// lives here once and appears in no chapter's diff.
#pragma once

#include <cstddef>
#include <string>

namespace lab {

// What a launcher may plan for on the current device. Launch configurations are chosen from these
// numbers, never from the architecture's name, so a chapter runs (or refuses by name) on every GPU.
struct DeviceLimits {
  int device = 0;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  // Opt-in dynamic shared memory per block: the device's cudaDevAttrMaxSharedMemoryPerBlockOptin,
  // lowered to LAB_SMEM_CAP when that is set (see smem_cap_from_env).
  size_t smem_per_block = 0;
  size_t smem_per_block_device = 0;  // the device's own figure, before the cap
  size_t smem_per_sm = 0;
};

// The current device's limits, queried once per device.
const DeviceLimits& device_limits();

// LAB_SMEM_CAP: an upper bound on the shared memory per block the chapters may plan for, so that a
// Hopper GPU can run the configurations an sm_86/89/120 (99 KB: LAB_SMEM_CAP=101376 or 99K) or an
// A100 (163 KB: 166912 or 163K) would pick. Bytes, or KiB with a K suffix; 0 or unset: no cap.
// Throws InvalidArgument naming LAB_SMEM_CAP for anything else.
size_t smem_cap_from_env();
size_t parse_smem_cap(const std::string& text);  // the parser, for tests

// Raises `kernel`'s dynamic shared-memory limit to `smem_bytes` (once per kernel, device and size)
// and returns how many blocks of `threads` threads an SM holds. Throws InvalidArgument naming
// `who` when smem_bytes exceeds device_limits().smem_per_block: launchers refuse such shapes in
// their support checks first; this is the backstop, so no launch fails as a bare CUDA error. A build
// without code for this GPU's architecture is refused by name here too.
int configure_kernel(const void* kernel, int threads, size_t smem_bytes, const char* who);

// Throws InvalidArgument("<who>: needs sm_80 or newer (<what>); this GPU is sm_75") when the
// current device's compute capability is below major.minor: a chapter built for newer GPUs only
// refuses by name instead of failing with "no kernel image is available".
void require_compute_capability(int major, int minor, const char* who, const char* what);

}  // namespace lab
