// KernelContext: what a kernel sees while it runs on a GPU execution
// thread: its thread index and Load/Store/Atomic on GPU virtual addresses.
//
// Every access translates through the MMU: the thread's micro-TLB, then
// the shared Tlb, then a page-table walk. A missing or insufficient PTE
// raises a replayable fault (FaultUnit) and the thread blocks until the
// driver replays it; then the access retries. If the driver cancels the
// fault, or an access is malformed (misaligned, beyond 48 bits), the
// kernel is cancelled with that error: from then on that thread's loads
// return 0, its stores and atomics do nothing, and cancelled() is true for
// every thread of the kernel (the other threads' accesses are dropped from
// their next TLB miss), so a kernel should test cancelled() in long
// loops. Other kernels are not affected.
//
// Accesses are relaxed atomics on the real bytes (GPU memory is weakly
// ordered); Load/Store need natural alignment.
//
// A KernelContext is owned by one execution thread for the duration of one
// kernel thread; it is not thread-safe and must not escape the kernel.
#ifndef USVM_GPU_KERNEL_CONTEXT_H_
#define USVM_GPU_KERNEL_CONTEXT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "usvm/base/error.h"
#include "usvm/gpu/access_counters.h"
#include "usvm/gpu/phys_addr.h"

namespace usvm::gpu {

class ExecutionEngine;

namespace detail {
struct LaunchState;

// One execution thread's micro-TLB: 4 KiB host translations, direct
// mapped, valid only for generation `gen` of the Tlb. Owned by the thread.
struct MicroTlb {
  static constexpr uint32_t kEntries = 64;
  struct Entry {
    uint64_t vpn = UINT64_MAX;  // va >> 12; UINT64_MAX = empty
    std::byte* host = nullptr;  // bytes of that 4 KiB page
    uint8_t perms = 0;          // Access bits allowed
    // The access counter of the page's region when the page is mapped
    // remotely and counters are on; null otherwise (always, when off).
    AccessCounters::Slot* counter = nullptr;
  };
  void Flush() {
    for (Entry& e : e_) e = Entry{};
  }
  Entry e_[kEntries];
  uint64_t gen = UINT64_MAX;
  // Stores and atomics until the next one held in flight
  // (LatencyModel::inflight_store_every).
  uint32_t inflight_countdown = UINT32_MAX;
};
}  // namespace detail

class KernelContext {
 public:
  KernelContext(const KernelContext&) = delete;
  KernelContext& operator=(const KernelContext&) = delete;

  uint32_t thread_id() const { return thread_id_; }
  uint32_t num_threads() const { return num_threads_; }
  uint64_t launch_id() const { return launch_id_; }
  // The GPU execution thread running this kernel thread.
  uint32_t engine() const { return engine_; }

  uint64_t Load(uint64_t va) {
    std::byte* p = Translate(va, kAccessRead, 7);
    return p ? std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).load(std::memory_order_relaxed) : 0;
  }
  void Store(uint64_t va, uint64_t v) {
    std::byte* p = Translate(va, kAccessWrite, 7);
    if (!p) return;
    InFlight();
    std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).store(v, std::memory_order_relaxed);
  }
  uint32_t Load32(uint64_t va) {
    std::byte* p = Translate(va, kAccessRead, 3);
    return p ? std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p)).load(std::memory_order_relaxed) : 0;
  }
  void Store32(uint64_t va, uint32_t v) {
    std::byte* p = Translate(va, kAccessWrite, 3);
    if (!p) return;
    InFlight();
    std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p)).store(v, std::memory_order_relaxed);
  }
  // Atomic fetch-add; the old value (0 if cancelled).
  uint64_t AtomicAdd(uint64_t va, uint64_t v) {
    std::byte* p = Translate(va, kAccessRead | kAccessWrite | kAccessAtomic, 7);
    if (!p) return 0;
    InFlight();
    return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).fetch_add(v, std::memory_order_acq_rel);
  }
  // Atomic compare-exchange; false (and `expected` unchanged) if cancelled.
  bool AtomicCas(uint64_t va, uint64_t& expected, uint64_t desired) {
    std::byte* p = Translate(va, kAccessRead | kAccessWrite | kAccessAtomic, 7);
    if (!p) return false;
    InFlight();
    return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p))
                    .compare_exchange_strong(expected, desired, std::memory_order_acq_rel);
  }

  // True once this kernel has been cancelled (by this thread or another).
  bool cancelled() const;
  // The cancel error (kOk if not cancelled).
  Error error() const;

  // Accesses, faults and stalls of this kernel thread so far.
  uint64_t accesses() const { return accesses_; }
  uint64_t faults() const { return faults_; }

 private:
  friend class ExecutionEngine;
  KernelContext(ExecutionEngine& engine, detail::LaunchState& launch, detail::MicroTlb& utlb,
                const std::atomic<uint64_t>& gen, AccessCounters* counters, uint32_t engine_index,
                uint32_t thread_id, uint32_t num_threads, uint64_t launch_id)
      : exec_(engine), launch_(launch), utlb_(utlb), gen_(gen), counters_(counters), engine_(engine_index),
        thread_id_(thread_id), num_threads_(num_threads), launch_id_(launch_id) {}

  // The host bytes of `va` for `access`, or nullptr if the kernel is (now)
  // cancelled. The hit path: one acquire load of the generation, one
  // micro-TLB probe, and one predictable branch for the access counters
  // (the entry's slot is null whenever counters are off).
  std::byte* Translate(uint64_t va, uint8_t access, uint64_t align_mask) {
    ++accesses_;
    const uint64_t gen = gen_.load(std::memory_order_acquire);
    const uint64_t vpn = va >> kPageShift;
    const detail::MicroTlb::Entry& e = utlb_.e_[vpn & (detail::MicroTlb::kEntries - 1)];
    if (gen == utlb_.gen && e.vpn == vpn && (e.perms & access) == access &&
        (va & align_mask) == 0) [[likely]] {
      if (e.counter) [[unlikely]]
        counters_->Count(e.counter);
      return e.host + (va & (kPageSize - 1));
    }
    return TranslateSlow(va, access, align_mask);
  }
  std::byte* TranslateSlow(uint64_t va, uint8_t access, uint64_t align_mask);
  // Between a write's translation and the write itself: now and then the
  // write is held in flight (LatencyModel::inflight_store_every).
  void InFlight() {
    if (--utlb_.inflight_countdown == 0) [[unlikely]]
      InFlightSlow();
  }
  void InFlightSlow();
  // From now on every access of this thread takes the slow path and is
  // dropped (the micro-TLB is only a cache; emptying it is always safe).
  void MarkCancelled() {
    cancelled_ = true;
    utlb_.Flush();
  }

  ExecutionEngine& exec_;
  detail::LaunchState& launch_;
  detail::MicroTlb& utlb_;
  const std::atomic<uint64_t>& gen_;
  AccessCounters* const counters_;  // the context's; null: none
  const uint32_t engine_;
  const uint32_t thread_id_;
  const uint32_t num_threads_;
  const uint64_t launch_id_;
  bool cancelled_ = false;
  uint64_t accesses_ = 0;
  uint64_t faults_ = 0;
  uint64_t stalls_ = 0;
  uint64_t stall_ns_ = 0;
  uint64_t checksum_ = 0;  // pattern kernels fold loaded values in here
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_KERNEL_CONTEXT_H_
