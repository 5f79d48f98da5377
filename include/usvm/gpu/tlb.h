// Tlb: one GPU's translation cache and its shootdown protocol.
//
// Two levels, as on real GPUs:
//   - the shared TLB (this class): set-associative, a configurable number
//     of entries for each page size (4 KiB, 64 KiB, 2 MiB), caching leaf
//     PTEs of the page table; filled by the page walker on a miss;
//   - one micro-TLB per execution thread (KernelContext), caching 4 KiB
//     host translations, invalidated wholesale when the generation moves.
//
// Invalidation. Invalidate(range) bumps the TLB generation, drops every
// shared entry that overlaps the range, and returns a Fence that signals
// when (a) the modelled invalidation latency has passed and (b) every
// execution thread has drained: it has either observed the new generation
// (and so dropped its micro-TLB and finished every access that used an
// older translation) or is outside any kernel. After the fence signals, no
// access can complete through a translation of the old page table: the
// driver may then free or reuse the old physical pages.
//
// The race between a walker that read an old PTE and an invalidation that
// follows is closed by the generation: Fill(va, pte, gen) is dropped if
// the generation moved since the walker started (checked under the lock
// that Invalidate bumps it under).
//
// Walker protocol (execution threads; `slot` is the thread's index):
//   Enter(slot) -> gen   before the first access of a stretch of work
//   Publish(slot, gen)   when it sees a newer generation (after dropping
//                        its micro-TLB; every earlier access is complete)
//   Leave(slot)          before blocking or idling
// Enter uses a seq_cst store/reload pair against Invalidate's seq_cst
// increment/scan (Dekker), so a thread entering never misses a bump.
//
// Locking: a SpinLock guards the shared entries; the generation and the
// slots are atomics (see the field comments).
#ifndef USVM_GPU_TLB_H_
#define USVM_GPU_TLB_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpu/fence.h"
#include "usvm/gpu/latency_model.h"
#include "usvm/gpu/page_table.h"

namespace usvm::gpu {

struct TlbConfig {
  // Shared-TLB entries per page size (0: that size is never cached).
  uint32_t entries_4k = 512;
  uint32_t entries_64k = 64;
  uint32_t entries_2m = 32;
  uint32_t ways = 4;
};

struct TlbStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t fills = 0;
  uint64_t stale_fills_dropped = 0;
  uint64_t invalidations = 0;
  uint64_t entries_invalidated = 0;
};

class Tlb {
 public:
  static constexpr uint64_t kIdle = UINT64_MAX;

  // EINVAL for ways == 0 or more than 4096 entries of a size; `walkers`
  // (execution threads) must be in [1, 256].
  static Result<std::unique_ptr<Tlb>> TryCreate(const TlbConfig& config, uint32_t walkers,
                                                const LatencyModel& latency, Env& env);
  ~Tlb();
  Tlb(const Tlb&) = delete;
  Tlb& operator=(const Tlb&) = delete;

  // Shared-TLB lookup for va; the cached leaf.
  std::optional<Mapping> Lookup(uint64_t va);
  // Caches a leaf that a walker read at generation `gen`; dropped if the
  // generation has moved since.
  void Fill(const Mapping& m, uint64_t gen);

  // Starts invalidating [va, va + size); the fence signals as described
  // above. EINVAL for an empty, unaligned or out-of-range range.
  Result<Fence> Invalidate(uint64_t va, uint64_t size);
  Fence InvalidateAll();

  // Walker protocol (see above). REQUIRES: slot < walkers.
  uint64_t Enter(uint32_t slot);
  void Publish(uint32_t slot, uint64_t gen) { shootdown_->slots[slot].seen.store(gen, std::memory_order_release); }
  void Leave(uint32_t slot) { shootdown_->slots[slot].seen.store(kIdle, std::memory_order_release); }
  // The generation counter, read on every translated access.
  const std::atomic<uint64_t>& generation() const { return shootdown_->gen; }

  TlbStats Stats() const;

 private:
  struct Entry {
    uint64_t tag = 0;  // (va >> shift) + 1; 0 = empty
    Pte pte;
  };
  struct SizeClass {
    uint32_t shift = 0;
    uint32_t sets = 0;
    uint32_t ways = 0;
    std::vector<Entry> entries;     // sets * ways
    std::vector<uint8_t> next_way;  // round-robin victim per set
  };
  struct alignas(64) Slot {
    std::atomic<uint64_t> seen{kIdle};
  };
  // Shared with the fences this TLB hands out, so a fence may outlive it.
  struct Shootdown {
    explicit Shootdown(uint32_t n) : slots(n) {}
    // Atomic: bumped (seq_cst) under lock_ by Invalidate, read lock-free
    // by walkers on every access.
    std::atomic<uint64_t> gen{0};
    // Atomic: written by the owning walker only, scanned by fences.
    std::vector<Slot> slots;
    bool Drained(uint64_t target) const;
  };

  Tlb(const TlbConfig& config, uint32_t walkers, const LatencyModel& latency, Env& env);
  Fence InvalidateLocked(uint64_t start, uint64_t end) USVM_REQUIRES(lock_);

  // Constant after construction.
  const LatencyModel latency_;
  Env& env_;
  const std::shared_ptr<Shootdown> shootdown_;

  mutable SpinLock lock_;
  SizeClass classes_[3] USVM_GUARDED_BY(lock_);  // indexed by PageSize
  TlbStats stats_ USVM_GUARDED_BY(lock_);
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_TLB_H_
