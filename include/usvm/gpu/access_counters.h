// AccessCounters: the GPU's access counters and their notification
// buffer (NVIDIA's hardware access counters, serviced by UVM in
// kernel-open/nvidia-uvm/uvm_gpu_access_counters.c).
//
// What is counted: every access of a kernel of this context (an address
// space: one per GpuContext) to memory it maps *remotely* -- a system page
// frame or a peer GPU's VRAM; never this GPU's own VRAM. Accesses are
// counted per region of `granularity` bytes of GPU VA (64 KiB or 2 MiB).
// When a region's counter reaches `threshold` one notification for the
// region is queued; the counter then keeps counting but notifies again
// only after the driver clears it (Clear / ClearAll: UVM clears the
// counters of each serviced batch of notifications).
//
// Differences from the hardware: regions are GPU virtual (the hardware
// tracks physical memory and UVM reverse-maps it to VA); the count is of
// loads/stores/atomics as issued (the hardware counts memory transactions).
//
// The notification buffer is bounded (`buffer_entries`), like the fault
// buffer: a notification that finds it full is dropped, counted in
// AccessCounterStats::dropped, and the region's counter restarts from 0 so
// the region can notify again once the driver has made room.
//
// Disabled (the default): nothing is counted, no slot is ever created, and
// the execution engine's hot path pays one predictable branch (a null slot
// pointer in its micro-TLB entry).
//
// Driver side, in the same service path as faults:
//
//   auto batch = ac.TryFetch(256);            // oldest first
//   for (const AccessCounterNotification& n : batch) {
//     ... decide, maybe migrate [n.va, n.va + n.size) to this GPU ...
//     ac.Clear(n.va);
//   }
//
// When a notification is queued the unit rings its doorbell (installed by
// the Gpu: it wakes the fault unit's Fetch, which then returns an empty
// batch), so a driver blocked waiting for faults services it promptly.
//
// Locking: lock_ guards the region table, the queue and the stats. A
// region's counter is an atomic inside its slot, incremented lock-free by
// execution threads (the slot never moves or dies before the unit).
// The doorbell is called without lock_ held.
#ifndef USVM_GPU_ACCESS_COUNTERS_H_
#define USVM_GPU_ACCESS_COUNTERS_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpu/phys_addr.h"

namespace usvm::gpu {

struct AccessCounterConfig {
  bool enabled = false;
  // Bytes of VA one counter tracks: k64K or k2M (UVM accepts 64K, 2M,
  // 16M, 16G; its default is 2M, uvm_gpu_access_counters.c
  // UVM_PERF_ACCESS_COUNTER_GRANULARITY). usvm defaults to 64 KiB, the
  // finest, so small buffers are tracked per chunk.
  uint64_t granularity = k64K;
  // Remote accesses that trigger a notification, [1, 65535] (UVM:
  // UVM_PERF_ACCESS_COUNTER_THRESHOLD_DEFAULT 256, _MIN 1, _MAX 65535).
  uint32_t threshold = 256;
  // Notifications the buffer holds, >= 1.
  uint32_t buffer_entries = 256;
};

struct AccessCounterNotification {
  uint64_t va = 0;      // the region's base (granularity aligned)
  uint64_t size = 0;    // the granularity
  uint32_t count = 0;   // the counter when it notified (the threshold)
  // Where the counted access went (the last remote mapping seen for the
  // region): system memory, or the VRAM of peer GPU `peer`.
  MemKind aperture = MemKind::kSystem;
  uint8_t peer = 0;
};

struct AccessCounterStats {
  uint64_t regions = 0;        // regions with a counter (ever counted)
  uint64_t notifications = 0;  // queued
  uint64_t fetched = 0;
  uint64_t dropped = 0;        // found the buffer full (overflow)
  uint64_t clears = 0;         // Clear calls that reset a region, and ClearAll
};

class AccessCounters {
 public:
  // One region's counter. Only the unit creates them.
  struct Slot {
    uint64_t base = 0;                // constant
    std::atomic<uint32_t> count{0};   // lock-free: bumped by every counted access
    // Where the last remote mapping of the region pointed (advisory, for
    // the notification): relaxed atomics written on each micro-TLB fill.
    std::atomic<uint8_t> aperture{0}, peer{0};
  };

  // EINVAL: granularity not 64 KiB or 2 MiB, threshold outside [1, 65535],
  // buffer_entries zero.
  static Result<std::unique_ptr<AccessCounters>> TryCreate(const AccessCounterConfig& config);
  ~AccessCounters();
  AccessCounters(const AccessCounters&) = delete;
  AccessCounters& operator=(const AccessCounters&) = delete;

  bool enabled() const { return config_.enabled; }
  const AccessCounterConfig& config() const { return config_; }
  // Installed once by the owner before any access is counted: called
  // (without lock_) whenever a notification is queued.
  void SetDoorbell(std::function<void()> ring) { doorbell_ = std::move(ring); }

  // Device side. The slot of va's region, created on first use; null when
  // disabled or va is beyond 48 bits. `aperture`/`peer`: where the mapping
  // that will be counted points. Called on a micro-TLB fill.
  Slot* SlotFor(uint64_t va, MemKind aperture, uint32_t peer);
  // Counts one access to the slot's region (lock-free unless it crosses
  // the threshold).
  void Count(Slot* s) {
    if (s->count.fetch_add(1, std::memory_order_relaxed) + 1 == config_.threshold) [[unlikely]]
      Notify(s);
  }

  // Driver side. Up to `max` queued notifications, oldest first.
  std::vector<AccessCounterNotification> TryFetch(size_t max);
  // Resets the counter of va's region (it may notify again). EINVAL
  // beyond 48 bits; ENOENT when the region was never counted.
  Result<void> Clear(uint64_t va);
  // Resets every counter (UVM's "clear all").
  void ClearAll();

  AccessCounterStats Stats() const;
  size_t pending() const;
  // The region's current count (0 if never counted): tests.
  uint32_t DebugCount(uint64_t va) const;

 private:
  explicit AccessCounters(const AccessCounterConfig& c) : config_(c) {}
  void Notify(Slot* s);

  const AccessCounterConfig config_;
  std::function<void()> doorbell_;  // set before use, then constant

  mutable Mutex lock_;
  std::unordered_map<uint64_t, std::unique_ptr<Slot>> slots_ USVM_GUARDED_BY(lock_);  // by region base
  std::deque<AccessCounterNotification> queue_ USVM_GUARDED_BY(lock_);
  AccessCounterStats stats_ USVM_GUARDED_BY(lock_);
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_ACCESS_COUNTERS_H_
