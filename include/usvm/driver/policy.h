// Policies as plug-ins: three hook points of the driver, each a small
// class chosen by name (SvmConfig::migration / ::thrashing,
// DeviceConfig::eviction; a scenario's `framework:` section; `usvm run
// --set framework.migration=density`). ../../docs/policies.md compares them.
//
//   - MigrationPolicy (placement / migration): after a GPU fault was served
//     from the faulting GPU's VRAM, which other pages of the fault's 2 MiB
//     block to bring there too. `fault-only` (none: today's behaviour),
//     `density` (NVIDIA UVM's bitmap tree, uvm_perf_prefetch.c), `tree`
//     (UVMSmart's tree-based neighbourhood prefetcher, 64 KiB leaves).
//   - EvictionPolicy: which VRAM allocation leaves when VRAM is full. `lru`
//     (today's), `lfu`, `pseudo-lru` (UVM's root-chunk lists,
//     uvm_pmm_gpu.c).
//   - ThrashingPolicy: what to do with a block that keeps moving back to a
//     GPU: `none` (today's), `uvm` (uvm_perf_thrashing.c: throttle, then
//     pin in system memory and map it remotely).
//   - AccessCounterPolicy: on a GPU's access counter notification (a
//     region it maps remotely became hot, gpu/access_counters.h), whether
//     to migrate the region to that GPU's VRAM: `off` (never: today's),
//     `on` (uvm_gpu_access_counters.c: migrate to the accessing GPU unless
//     the thrashing policy throttles or pins the block).
//
// The defaults (`fault-only`, `lru`, `none`) keep the driver's behaviour
// exactly as without policies.
//
// Calling context and locking:
//   - MigrationPolicy::Expand, AccessCounterPolicy::Migrate and every
//     ThrashingPolicy hook are called by
//     the fault handler with the Svm's driver lock held (docs/driver.md,
//     lock 2), one call at a time per Svm. Expand is a pure function of its
//     argument. ThrashingPolicy state is guarded by the policy's own leaf
//     lock (UvmThrashing::lock_), taken inside the hooks (so its tests and
//     stats readers need no driver lock); nothing is called with it held.
//   - EvictionPolicy::PickVictim is called by a Device's VRAM manager with
//     its leaf lock held (Device::Impl::lock_); it is a pure function of the
//     candidates (the manager keeps the per-allocation counters).
// Hooks must not call back into the driver.
#ifndef USVM_DRIVER_POLICY_H_
#define USVM_DRIVER_POLICY_H_

#include <bitset>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/driver/policy_params.h"

namespace usvm::driver {

// A block: the 2 MiB aligned unit of VA the migration and thrashing
// policies reason about (UVM's va_block).
inline constexpr uint64_t kBlockBytes = uint64_t{1} << 21;
inline constexpr uint32_t kBlockPages = 512;

// ---- migration (placement) -----------------------------------------------------

// What the fault handler knows of the faulting GPU's block after serving a
// fault from that GPU's VRAM.
struct BlockState {
  uint64_t start = 0;           // the block (2 MiB aligned)
  uint64_t fault_va = 0;        // the faulting page
  // The part of the block a range may cover (the fault's VMA, attribute
  // span, SVM window and binds): Expand's answer is clamped to it.
  uint64_t lo = 0, hi = 0;
  // Pages of the block in the faulting GPU's VRAM, mapped on it (the
  // faulting range's pages included).
  std::bitset<kBlockPages> resident;
};

// A span of VA, [start, end); empty when start == end.
struct VaSpan {
  uint64_t start = 0, end = 0;
  bool empty() const { return start >= end; }
};

class MigrationPolicy {
 public:
  virtual ~MigrationPolicy() = default;
  virtual const char* name() const = 0;
  // Whether Expand can return anything (fault-only: no; the driver then
  // skips computing the block's state).
  virtual bool expands() const { return true; }
  // The span of the block to bring to the faulting GPU as well (pages
  // already resident in it are skipped). REQUIRES: the driver lock.
  virtual VaSpan Expand(const BlockState& b) const = 0;
};

// fault-only: migrate the faulting range, nothing around it (xe's flow).
class FaultOnlyMigration final : public MigrationPolicy {
 public:
  const char* name() const override { return "fault-only"; }
  bool expands() const override { return false; }
  VaSpan Expand(const BlockState&) const override { return {}; }
};

// density: UVM's prefetcher. The block's pages are the leaves of a full
// binary tree (512 leaves, 10 levels). From the faulting page upward, the
// largest subtree in which more than `threshold`% of the pages are
// resident (or faulting) is brought whole (uvm_perf_prefetch.c,
// compute_prefetch_region: `counter * 100 > subregion_pages * threshold`).
class DensityMigration final : public MigrationPolicy {
 public:
  explicit DensityMigration(uint32_t threshold) : threshold_(threshold) {}
  const char* name() const override { return "density"; }
  VaSpan Expand(const BlockState& b) const override;

 private:
  const uint32_t threshold_;
};

// tree: UVMSmart's tree-based neighbourhood prefetcher (Ganguly et al.,
// ISCA 2019 "Interplay between hardware prefetcher and page eviction
// policy in CPU-GPU unified virtual memory"): the faulting page's 64 KiB
// basic block is always brought whole; above it, the 32 basic blocks of
// the 2 MiB block form a binary tree, and the largest node in which more
// than `threshold`% of the pages are resident is brought whole.
class TreeMigration final : public MigrationPolicy {
 public:
  static constexpr uint32_t kLeafPages = 16;  // 64 KiB basic blocks
  explicit TreeMigration(uint32_t threshold) : threshold_(threshold) {}
  const char* name() const override { return "tree"; }
  VaSpan Expand(const BlockState& b) const override;

 private:
  const uint32_t threshold_;
};

// ---- eviction ---------------------------------------------------------------

// One evictable VRAM allocation, as the VRAM manager sees it.
struct EvictCandidate {
  uint64_t vram_offset = 0;  // of its buddy block
  uint64_t size = 0;
  uint64_t populated = 0;    // when it joined (a sequence number of the manager)
  uint64_t last_use = 0;     // last GPU commit that mapped it (same sequence)
  uint64_t uses = 0;         // commits that mapped it (the migration's own included)
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // The index of the allocation to evict among `c` (non-empty), which is
  // in the manager's list order: least recently used first (busy ones that
  // failed to evict moved to the end). REQUIRES: the VRAM manager's lock.
  virtual size_t PickVictim(std::span<const EvictCandidate> c) const = 0;
  // False when PickVictim always answers 0 (the manager then lists only
  // the first candidate).
  virtual bool looks_past_first() const { return true; }
};

// lru: the least recently used allocation (the list's front).
class LruEviction final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }
  size_t PickVictim(std::span<const EvictCandidate>) const override { return 0; }
  bool looks_past_first() const override { return false; }
};

// lfu: the least frequently used allocation (fewest commits that mapped
// it); ties go to the least recently used.
class LfuEviction final : public EvictionPolicy {
 public:
  const char* name() const override { return "lfu"; }
  size_t PickVictim(std::span<const EvictCandidate> c) const override;
};

// pseudo-lru: UVM's eviction of 2 MiB root chunks (uvm_pmm_gpu.c,
// pick_root_chunk_to_evict). Root chunks are ordered by when an allocation
// was last populated in them -- GPU accesses do not reorder them, which is
// what makes it pseudo-LRU -- and chunks not fully in use (UVM's
// va_block_unused list: here, root chunks with free space) go before the
// used ones. The victim is the oldest allocation of the chosen root chunk.
class PseudoLruEviction final : public EvictionPolicy {
 public:
  static constexpr uint64_t kRootChunk = uint64_t{1} << 21;
  const char* name() const override { return "pseudo-lru"; }
  size_t PickVictim(std::span<const EvictCandidate> c) const override;
};

// ---- thrashing ----------------------------------------------------------------

enum class ThrashAction : uint8_t {
  kNone,      // migrate as planned
  kThrottle,  // migrate, after the faulting GPU naps for nap_ns
  kPin,       // do not migrate: the block stays where it is (system
              // memory) and the GPU maps it remotely, until pinned_until
};

struct ThrashDecision {
  ThrashAction action = ThrashAction::kNone;
  uint64_t nap_ns = 0;        // kThrottle
  bool pin_started = false;   // kPin: this call pinned it (else it was)
};

// Counters of a thrashing policy (a snapshot).
struct ThrashStats {
  uint64_t events = 0;     // thrashing events (a block came back)
  uint64_t throttles = 0;
  uint64_t pins = 0;       // pins started
  uint64_t pinned_faults = 0;  // faults served remotely because pinned
};

class ThrashingPolicy {
 public:
  virtual ~ThrashingPolicy() = default;
  virtual const char* name() const = 0;
  // A fault of GPU `gpu` is about to migrate pages [first_page, first_page
  // + npages) of `block` to its VRAM, at `now_ns` (the Svm's Env clock).
  // What to do. REQUIRES: the driver lock.
  virtual ThrashDecision OnMigrate(uint64_t block, uint32_t first_page, uint32_t npages, uint32_t gpu,
                                   uint64_t now_ns) = 0;
  // Those pages were migrated without a fault's decision (a prefetch, the
  // migration policy's expansion): remembered, never throttled.
  virtual void NoteMigrated(uint64_t block, uint32_t first_page, uint32_t npages, uint64_t now_ns) {}
  // The hint for `block` at now_ns without counting anything (UVM's
  // uvm_perf_thrashing_get_hint, as the access counter service asks it):
  // kPin while pinned, kThrottle while a throttled fault's nap lasts,
  // else kNone.
  virtual ThrashAction Hint(uint64_t block, uint64_t now_ns) const { return ThrashAction::kNone; }
  virtual ThrashStats stats() const = 0;
};

// none: never interferes.
class NoThrashing final : public ThrashingPolicy {
 public:
  const char* name() const override { return "none"; }
  ThrashDecision OnMigrate(uint64_t, uint32_t, uint32_t, uint32_t, uint64_t) override { return {}; }
  ThrashStats stats() const override { return {}; }
};

// uvm: uvm_perf_thrashing.c's detection and hints, per 2 MiB block. A
// thrashing event is a fault migrating pages to a GPU that were already
// brought to one in the same epoch (they left in between: a CPU touch or
// an eviction took them). From `thrashing_threshold` events in an epoch each
// further return is throttled (the fault naps `nap_lapses` lapses before
// migrating); the `pin_threshold`-th throttle pins the block for
// `pin_lapses` lapses instead: faults in it are served from system memory,
// mapped remotely, with no migration. An epoch (`epoch_lapses` lapses
// after the block's first migration) ends its counts. Differences from
// UVM: the counts and the hint are per block (UVM: per page, with a
// per-block summary); every return counts, where UVM also requires it
// within a lapse of the page's last revocation; no max_resets; a pin is
// always to system memory (the block leaves the GPU on the CPU's touch or
// an eviction, so "where it is" is system memory whenever the hook runs).
class UvmThrashing final : public ThrashingPolicy {
 public:
  explicit UvmThrashing(const PolicyParams& p) : p_(p) {}
  const char* name() const override { return "uvm"; }
  ThrashDecision OnMigrate(uint64_t block, uint32_t first_page, uint32_t npages, uint32_t gpu,
                           uint64_t now_ns) override;
  void NoteMigrated(uint64_t block, uint32_t first_page, uint32_t npages, uint64_t now_ns) override;
  ThrashAction Hint(uint64_t block, uint64_t now_ns) const override;
  ThrashStats stats() const override;
  // Whether `block` is pinned at now_ns (tests).
  bool Pinned(uint64_t block, uint64_t now_ns) const;

 private:
  struct Block {
    uint64_t epoch_start = 0;
    uint64_t pinned_until = 0;
    uint64_t throttled_until = 0;  // the last throttled fault's nap ends
    std::bitset<kBlockPages> in;  // pages brought to a GPU in this epoch
    uint32_t events = 0;      // in this epoch
    uint32_t throttles = 0;   // in this epoch
  };
  const PolicyParams p_;
  mutable Mutex lock_;
  std::unordered_map<uint64_t, Block> blocks_ USVM_GUARDED_BY(lock_);
  ThrashStats stats_ USVM_GUARDED_BY(lock_);
};

// ---- access counters ------------------------------------------------------------

// What the driver knows of a notified region when it asks the policy.
struct RegionState {
  uint64_t start = 0, end = 0;  // the region (the counters' granularity)
  uint32_t gpu = 0;             // the GPU whose counters notified
  // Bytes of the region mapped on that GPU from system memory or a peer's
  // VRAM (migratable: anonymous, no preferred location set), and bytes
  // already in its own VRAM.
  uint64_t remote_bytes = 0, local_bytes = 0;
  // The thrashing policy's hint for the region's 2 MiB block.
  ThrashAction thrashing = ThrashAction::kNone;
};

class AccessCounterPolicy {
 public:
  virtual ~AccessCounterPolicy() = default;
  virtual const char* name() const = 0;
  // Whether to migrate the region's remotely mapped ranges to the GPU's
  // VRAM. REQUIRES: the driver lock.
  virtual bool Migrate(const RegionState& r) const = 0;
};

// off: notifications are serviced (cleared) and counted, nothing moves
// (UVM's default on systems without ATS: uvm_perf_access_counter_
// migration_enable = -1 resolves to off).
class NoAccessCounterMigration final : public AccessCounterPolicy {
 public:
  const char* name() const override { return "off"; }
  bool Migrate(const RegionState&) const override { return false; }
};

// on: UVM's access counter servicing (uvm_gpu_access_counters.c,
// service_va_block_locked): the accessed pages move to the accessing GPU;
// a page whose block is throttling is skipped (the notification is
// ignored), a pinned one stays where the pin keeps it (UVM passes the pin
// hint to residency selection); stale notifications (nothing mapped
// remotely any more) do nothing. The trace names it "access_counters".
class UvmAccessCounterMigration final : public AccessCounterPolicy {
 public:
  const char* name() const override { return "access_counters"; }
  bool Migrate(const RegionState& r) const override {
    return r.remote_bytes > 0 && r.thrashing == ThrashAction::kNone;
  }
};

// ---- by name -------------------------------------------------------------------

// The names each hook accepts, in the order the docs list them.
std::vector<std::string> MigrationPolicyNames();
std::vector<std::string> EvictionPolicyNames();
std::vector<std::string> ThrashingPolicyNames();
std::vector<std::string> AccessCounterPolicyNames();  // off, on

// The policy called `name`; EINVAL naming the known ones when unknown, or
// when a parameter is out of range (thresholds 1..100, counts and times
// non-zero).
Result<std::unique_ptr<MigrationPolicy>> MakeMigrationPolicy(std::string_view name, const PolicyParams& p);
Result<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name);
Result<std::unique_ptr<ThrashingPolicy>> MakeThrashingPolicy(std::string_view name, const PolicyParams& p);
Result<std::unique_ptr<AccessCounterPolicy>> MakeAccessCounterPolicy(std::string_view name);

}  // namespace usvm::driver

#endif  // USVM_DRIVER_POLICY_H_
