// PageTable: the CPU page table of one AddressSpace (private to mm).
//
// Four levels over a 47-bit user address space, like x86-64:
//   PGD (256 used entries) -> PUD (512) -> PMD table (512 PmdSlots) -> PTE table (512)
// A PmdSlot covers 2 MiB and holds either a huge leaf entry or a pointer to
// a PTE table (never both), plus that region's page table lock (split PTL).
// A huge leaf may be a present THP (system or device-coherent frames), a
// device-private entry of a 2 MiB device page, or a migration entry of one
// of those; it maps 512 consecutive frames, each with its own reference.
//
// Entry words (PTE and huge PMD alike) pack a kind, permission/state bits
// and a frame number; see namespace pte.
//
// Locking:
// - Upper-level tables (PUD, PMD) are installed with compare-and-swap by
//   faults running under the mmap read lock, and freed only under the mmap
//   write lock, so a walker holding the mmap lock may follow them freely.
// - PmdSlot::lock guards the slot's huge entry, its table pointer and every
//   entry in that table: exclusive to change, shared to use an entry for a
//   CPU access (so a frame is not freed or replaced mid-copy). A CPU access
//   may set the accessed/dirty bits with an atomic or under the shared lock.
#ifndef USVM_MM_PAGE_TABLE_H_
#define USVM_MM_PAGE_TABLE_H_

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "usvm/base/mutex.h"
#include "usvm/base/thread_annotations.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

namespace pte {
enum Kind : uint64_t {
  kNone = 0,
  kPresent = 1,
  kMigration = 2,
  kDevicePrivate = 3,
  kDeviceExclusive = 4,
};
inline constexpr uint64_t kKindMask = 0x7;
inline constexpr uint64_t kRead = 1u << 3;      // readable (clear under PROT_NONE)
inline constexpr uint64_t kWrite = 1u << 4;     // writable
inline constexpr uint64_t kDirty = 1u << 5;
inline constexpr uint64_t kAccessed = 1u << 6;
inline constexpr uint64_t kFile = 1u << 7;      // a page-cache page
inline constexpr uint64_t kZero = 1u << 8;      // the shared zero page
inline constexpr uint64_t kLazyFree = 1u << 9;  // MADV_FREE'd, discardable while clean
// The frame is a DevicePfn: set on present entries of device-coherent
// memory and on migration entries whose source is device memory.
inline constexpr uint64_t kDevice = 1u << 10;
// A huge entry of a MAP_HUGETLB mapping: never split (only whole-entry
// operations reach it), copied whole on COW.
inline constexpr uint64_t kHugetlb = 1u << 11;
inline constexpr unsigned kPfnShift = 12;
inline constexpr uint64_t kFlagsMask = (uint64_t{1} << kPfnShift) - 1;

inline constexpr uint64_t Make(Kind k, Pfn pfn, uint64_t flags) {
  return static_cast<uint64_t>(k) | flags | (pfn << kPfnShift);
}
inline constexpr Kind KindOf(uint64_t e) { return static_cast<Kind>(e & kKindMask); }
inline constexpr Pfn PfnOf(uint64_t e) { return e >> kPfnShift; }
inline constexpr bool IsPresent(uint64_t e) { return KindOf(e) == kPresent; }
// A present entry that maps a real, refcounted frame (not the zero page).
inline constexpr bool HoldsFrame(uint64_t e) { return IsPresent(e) && !(e & (kZero | kDevice)); }
// An entry that holds a reference on a device page.
inline constexpr bool HoldsDevicePage(uint64_t e) {
  return KindOf(e) == kDevicePrivate || ((KindOf(e) == kMigration || KindOf(e) == kPresent) && (e & kDevice));
}
// A device-exclusive entry (holds a reference on its system frame).
inline constexpr bool IsExclusive(uint64_t e) { return KindOf(e) == kDeviceExclusive; }
// A migration entry that holds a reference on a system frame.
inline constexpr bool HoldsMigratingFrame(uint64_t e) {
  return KindOf(e) == kMigration && !(e & (kDevice | kZero));
}
// Whether the entry holds one reference per 4 KiB page it maps (system
// frames, migrating frames, device pages), so that a 2 MiB entry of that
// kind maps 512 consecutive frames that each carry their own count.
inline constexpr bool HoldsPages(uint64_t e) {
  return HoldsFrame(e) || HoldsMigratingFrame(e) || HoldsDevicePage(e);
}
// The 4 KiB view of a 2 MiB entry `h` at addr: same kind and bits, the
// frame of that page. Splitting a huge entry stores exactly these.
inline constexpr uint64_t SubEntry(uint64_t h, uint64_t addr) {
  return HoldsPages(h) ? h + ((((addr) >> 12) & 511) << kPfnShift) : h;
}
}  // namespace pte

inline constexpr unsigned kEntriesPerTable = 512;

struct PteTable {
  std::atomic<uint64_t> e[kEntriesPerTable] = {};
};

struct PmdSlot {
  RwSemaphore lock;
  // A huge leaf entry (pte:: encoding), or 0.
  std::atomic<uint64_t> huge USVM_GUARDED_BY(lock){0};
  PteTable* table USVM_GUARDED_BY(lock) USVM_PT_GUARDED_BY(lock) = nullptr;
};

struct PmdTable {
  PmdSlot slot[kEntriesPerTable];
};

struct PudTable {
  std::atomic<PmdTable*> e[kEntriesPerTable] = {};
};

class PageTable {
 public:
  static constexpr unsigned kPgdEntries = 256;  // 47-bit user space
  static constexpr uint64_t kUserLimit = uint64_t{kPgdEntries} << 39;

  PageTable() = default;
  // Frees every table. The owner must have dropped every frame first.
  ~PageTable();
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  static unsigned PteIndex(uint64_t addr) { return (addr >> kPageShift) & 511; }

  // The slot for addr, or nullptr if its PMD table does not exist.
  PmdSlot* Lookup(uint64_t addr) const {
    if (addr >= kUserLimit) return nullptr;  // beyond the 47-bit user space
    PudTable* pud = pgd_[addr >> 39].load(std::memory_order_acquire);
    if (!pud) return nullptr;
    PmdTable* pmd = pud->e[(addr >> 30) & 511].load(std::memory_order_acquire);
    if (!pmd) return nullptr;
    return &pmd->slot[(addr >> kHugeShift) & 511];
  }
  // The slot for addr, creating the upper levels as needed.
  // REQUIRES: the mmap lock (read or write); addr < 2^47.
  PmdSlot* Ensure(uint64_t addr);

  // Calls f(region_start, slot) for every existing slot whose 2 MiB region
  // overlaps [start, end), in address order.
  // REQUIRES: the mmap lock.
  template <typename F>
  void ForEachSlot(uint64_t start, uint64_t end, F f) const {
    end = std::min(end, kUserLimit);
    for (uint64_t a = start & kHugeMask; a < end;) {
      PudTable* pud = pgd_[a >> 39].load(std::memory_order_acquire);
      if (!pud) {
        a = ((a >> 39) + 1) << 39;
        continue;
      }
      PmdTable* pmd = pud->e[(a >> 30) & 511].load(std::memory_order_acquire);
      if (!pmd) {
        a = ((a >> 30) + 1) << 30;
        continue;
      }
      f(a, pmd->slot[(a >> kHugeShift) & 511]);
      a += kHugePageSize;
    }
  }

  // Frees PTE tables whose entries are all none, then empty PMD and PUD
  // tables, for regions overlapping [start, end). Takes free_lock()
  // exclusively.
  // REQUIRES: the mmap write lock (no walker under the mmap lock can hold
  // a slot pointer).
  void FreeEmpty(uint64_t start, uint64_t end) USVM_EXCLUDES(free_lock_);

  // Walkers that hold no mmap lock (device-frame migration, which finds
  // entries through the device rmap) hold this shared while they use slot
  // pointers, so FreeEmpty cannot free tables under them.
  // Order: mmap lock -> free lock -> slot locks.
  RwSemaphore& free_lock() const USVM_RETURN_CAPABILITY(free_lock_) { return free_lock_; }

  // Page-table pages currently allocated (PUD + PMD + PTE tables).
  uint64_t table_pages() const { return tables_.load(std::memory_order_relaxed); }

  // Installs a fresh PTE table in slot (from a huge entry or empty).
  // REQUIRES: slot.lock held exclusively; slot has no table.
  void InstallTableLocked(PmdSlot& slot) USVM_REQUIRES(slot.lock);
  // Frees the slot's PTE table and installs the huge entry `huge` (THP
  // collapse). REQUIRES: slot.lock held exclusively and the mmap write
  // lock (nothing can hold a pointer into the table).
  void ReplaceTableLocked(PmdSlot& slot, uint64_t huge) USVM_REQUIRES(slot.lock);

 private:
  std::atomic<PudTable*> pgd_[kPgdEntries] = {};
  std::atomic<uint64_t> tables_{0};
  mutable RwSemaphore free_lock_;
};

}  // namespace usvm::mm

#endif  // USVM_MM_PAGE_TABLE_H_
