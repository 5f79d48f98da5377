// PageTable: the GPU's multi-level page table over a 48-bit virtual space.
//
// Four levels of 512 entries (9 bits each; level 3 is the root, level 0
// holds 4 KiB leaves), like x86-64 and most GPUs:
//
//   level 3: VA[47:39]   level 2: VA[38:30]
//   level 1: VA[29:21] -> a 2 MiB leaf, or a level-0 table
//   level 0: VA[20:12] -> a 4 KiB leaf, or one of 16 entries of a 64 KiB
//                         leaf (contiguous, 64 KiB aligned in VA and PA,
//                         the 16 entries identical but for the address)
//
// A leaf Pte carries valid, writable, atomic-allowed, the memory kind
// (system, local VRAM, peer VRAM and which peer) and the physical address.
//
// Operations are batched and all-or-nothing: every op of a batch is
// validated (alignment, bounds, physical address, conflicts) and every
// table page it needs is allocated before any entry changes, so an error
// leaves the mappings exactly as they were.
//   - Bind: install leaves. kNoReplace fails with EEXIST on any existing
//     leaf in the range; kReplace overwrites smaller-or-equal leaves
//     (rebind, e.g. after migration). A bind never splits a larger leaf
//     (EINVAL).
//   - Zap: clear leaves in place, never allocating or freeing table pages
//     (xe_pt_zap_ptes: safe in an invalidation callback).
//   - Unbind: clear leaves and free table pages that became empty.
// Neither Zap nor Unbind may split a large leaf (EINVAL). None of them
// touches the TLB: the caller invalidates it afterwards (Tlb::Invalidate)
// and waits for the fence before reusing the old physical pages.
//
// Table pages come from a page allocator with an optional limit
// (`max_table_pages`) and fault point "gpu.pt_alloc" (ENOMEM).
//
// Locking: one RwSemaphore. Bind/Zap/Unbind take it for write; Walk (the
// GPU's page walker, on a TLB miss) and the Debug queries for read.
#ifndef USVM_GPU_PAGE_TABLE_H_
#define USVM_GPU_PAGE_TABLE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpu/phys_addr.h"

namespace usvm::gpu {

// Memory kind of a PTE, relative to the GPU that owns the table.
enum class PteKind : uint8_t { kSystem = 0, kLocalVram = 1, kPeerVram = 2 };

// Permission bits of a bind.
enum PteProt : uint32_t {
  kProtRead = 0,
  kProtWrite = 1u << 1,
  kProtAtomic = 1u << 2,
};

// A leaf page-table entry:
//   bit 0 valid, 1 writable, 2 atomic, 3-4 kind, 5-6 page size,
//   8-11 peer GPU id, 12-63 physical address (4 KiB aligned).
class Pte {
 public:
  static constexpr uint64_t kValid = 1;
  static constexpr uint64_t kWritable = 1u << 1;
  static constexpr uint64_t kAtomic = 1u << 2;

  constexpr Pte() = default;
  constexpr explicit Pte(uint64_t raw) : raw_(raw) {}
  static constexpr Pte Make(PteKind kind, uint32_t peer, uint64_t phys, PageSize size,
                            uint32_t prot) {
    return Pte((phys & ~uint64_t{0xfff}) | kValid | (prot & (kWritable | kAtomic)) |
               (uint64_t(kind) << 3) | (uint64_t(size) << 5) | (uint64_t(peer & 0xf) << 8));
  }

  constexpr uint64_t raw() const { return raw_; }
  constexpr bool valid() const { return raw_ & kValid; }
  constexpr bool writable() const { return raw_ & kWritable; }
  constexpr bool atomic() const { return raw_ & kAtomic; }
  constexpr PteKind kind() const { return PteKind((raw_ >> 3) & 3); }
  constexpr PageSize size() const { return PageSize((raw_ >> 5) & 3); }
  constexpr uint32_t peer() const { return (raw_ >> 8) & 0xf; }
  constexpr uint64_t phys() const { return raw_ & ~uint64_t{0xfff}; }
  // Access bits this PTE allows (kAccessRead | kAccessWrite | kAccessAtomic).
  constexpr uint8_t perms() const {
    return uint8_t(kAccessRead | (writable() ? kAccessWrite : 0) |
                   (atomic() && writable() ? kAccessAtomic : 0));
  }
  friend constexpr bool operator==(Pte, Pte) = default;

 private:
  uint64_t raw_ = 0;
};

struct BindOp {
  uint64_t va = 0;
  PageSize size = PageSize::k4K;
  PhysAddr pa;
  uint32_t prot = kProtRead;  // PteProt bits
};

struct VaRange {
  uint64_t start = 0;
  uint64_t size = 0;
};

enum class BindMode { kNoReplace, kReplace };

// A leaf found by Walk or listed by DebugMappings.
struct Mapping {
  uint64_t va = 0;    // leaf base
  uint64_t size = 0;  // leaf bytes
  Pte pte;            // the leaf's entry (for 64 KiB: the first of 16)
};

class PageTable {
 public:
  // Checks that [pa, pa + bytes) names real memory the GPU may map (frame
  // range, VRAM size, peer access enabled). Installed by Gpu.
  using PhysCheck = std::function<Result<void>(const PhysAddr&, uint64_t bytes)>;

  // gpu_id: owner (to tell local from peer VRAM). max_table_pages: 0 for
  // no limit. check may be empty (no physical address is rejected).
  PageTable(uint32_t gpu_id, Env& env, PhysCheck check, uint64_t max_table_pages = 0);
  ~PageTable();
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  // Errors: EINVAL (misaligned va or pa for the page size, zero/invalid
  // size, beyond 48 bits, ops overlapping each other, a bind that would
  // split a larger leaf, bad prot bits, physical address rejected),
  // EEXIST (kNoReplace over a leaf), ENOMEM (table page allocation).
  Result<void> Bind(std::span<const BindOp> ops, BindMode mode = BindMode::kNoReplace);
  Result<void> Bind(const BindOp& op, BindMode mode = BindMode::kNoReplace) {
    return Bind(std::span<const BindOp>(&op, 1), mode);
  }
  // Errors: EINVAL (unaligned, empty, beyond 48 bits, splits a leaf).
  Result<void> Zap(std::span<const VaRange> ranges);
  Result<void> Zap(uint64_t va, uint64_t size) { VaRange r{va, size}; return Zap({&r, 1}); }
  Result<void> Unbind(std::span<const VaRange> ranges);
  Result<void> Unbind(uint64_t va, uint64_t size) { VaRange r{va, size}; return Unbind({&r, 1}); }

  // The leaf mapping `va`; ENOENT if none, EINVAL beyond 48 bits.
  Result<Mapping> Walk(uint64_t va) const;

  uint32_t gpu_id() const { return gpu_id_; }
  // Table pages currently allocated (the root included).
  uint64_t table_pages() const;
  // Every leaf in VA order. For tests.
  std::vector<Mapping> DebugMappings() const;
  // Checks the per-table counts of used entries; EIO on a mismatch.
  Result<void> DebugCheck() const;

 private:
  struct Table;
  struct NewTable {
    Table* parent;
    uint32_t index;
  };

  Result<Table*> AllocTableLocked() USVM_REQUIRES(lock_);
  void FreeTableLocked(Table* t) USVM_REQUIRES(lock_);
  // The leaf whose range contains va, if any.
  std::optional<Mapping> FindLeafLocked(uint64_t va) const USVM_REQUIRES_SHARED(lock_);
  bool AnyLeafLocked(const Table* t, int level, uint64_t base, uint64_t start, uint64_t end) const
      USVM_REQUIRES_SHARED(lock_);
  Result<void> CheckRangesLocked(std::span<const VaRange> ranges) const USVM_REQUIRES_SHARED(lock_);
  void ClearLocked(Table* t, int level, uint64_t base, uint64_t start, uint64_t end, bool free_tables)
      USVM_REQUIRES(lock_);
  Result<Table*> EnsurePathLocked(uint64_t va, int leaf_level, std::vector<NewTable>* created)
      USVM_REQUIRES(lock_);
  void CollectLocked(const Table* t, int level, uint64_t base, std::vector<Mapping>* out) const
      USVM_REQUIRES_SHARED(lock_);
  Result<void> CheckTableLocked(const Table* t, int level) const USVM_REQUIRES_SHARED(lock_);

  // Constant after construction.
  const uint32_t gpu_id_;
  Env& env_;
  const PhysCheck check_;
  const uint64_t max_table_pages_;

  mutable RwSemaphore lock_;
  Table* root_ USVM_GUARDED_BY(lock_) = nullptr;
  uint64_t table_pages_ USVM_GUARDED_BY(lock_) = 0;
  // Freed table pages kept for reuse (the table page allocator's cache).
  std::vector<Table*> free_tables_ USVM_GUARDED_BY(lock_);
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_PAGE_TABLE_H_
