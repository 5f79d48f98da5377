// The policies' names and tunables as configuration (SvmConfig,
// DeviceConfig); policy.h has the policies themselves.
#ifndef USVM_DRIVER_POLICY_PARAMS_H_
#define USVM_DRIVER_POLICY_PARAMS_H_

#include <cstdint>

namespace usvm::driver {

// Tunables, with UVM's defaults (NVIDIA open-gpu-kernel-modules,
// kernel-open/nvidia-uvm: uvm_perf_prefetch.c, uvm_perf_thrashing.c).
struct PolicyParams {
  // density: a subtree of the block's bitmap tree is brought whole once
  // more than this percentage of its pages is resident or faulting
  // (uvm_perf_prefetch_threshold, default 51).
  uint32_t density_threshold = 51;
  // tree: a node of 64 KiB leaves is brought whole once more than this
  // percentage of it is resident (UVMSmart TBNp: 50%).
  uint32_t tree_threshold = 50;
  // uvm thrashing: a block that comes back to a GPU this many times
  // within an epoch is thrashing (uvm_perf_thrashing_threshold, 3) ...
  uint32_t thrashing_threshold = 3;
  // ... and after this many throttles it is pinned
  // (uvm_perf_thrashing_pin_threshold, 10).
  uint32_t pin_threshold = 10;
  // Time unit (uvm_perf_thrashing_lapse_usec, 500 us); the nap of a
  // throttled fault (uvm_perf_thrashing_nap, 1 lapse), the epoch after
  // which a block's counts start again (uvm_perf_thrashing_epoch, 2000
  // lapses) and how long a pin lasts (uvm_perf_thrashing_pin, 300 lapses).
  uint64_t lapse_ns = 500'000;
  uint32_t nap_lapses = 1;
  uint32_t epoch_lapses = 2000;
  uint32_t pin_lapses = 300;
};

}  // namespace usvm::driver

#endif  // USVM_DRIVER_POLICY_PARAMS_H_
