// AddressSpace::Impl: the state and logic behind AddressSpace (private).
//
// State and its guards:
// - vmas_, free_area_cache_, cached_hole_size_, dead_: mmap_lock_ (write to change; read to use).
// - pt_: see page_table.h (upper levels: mmap lock; entries: slot locks).
// - stats: atomics, updated anywhere.
//
// Every public operation takes the mmap lock itself; ...Locked helpers
// state what they require.
#ifndef USVM_MM_ADDRESS_SPACE_IMPL_H_
#define USVM_MM_ADDRESS_SPACE_IMPL_H_

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <vector>

#include "hugetlb.h"
#include "page_table.h"
#include "usvm/base/wait_queue.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"
#include "usvm/mm/address_space.h"

namespace usvm::mm {

struct Vma {
  uint64_t start = 0;
  uint64_t end = 0;
  uint32_t prot = 0;
  uint32_t flags = 0;              // kVma* flags
  std::shared_ptr<SimFile> file;   // null for private anonymous memory
  uint64_t pgoff = 0;              // file page index of start
  // MAP_HUGETLB: the object behind the mapping (hugetlb.h), else null.
  std::shared_ptr<HugetlbObject> hugetlb;
  // Private hugetlb: this VMA holds the reservations (the mmap caller's,
  // not a fork child's, nor the old range of an mremap move).
  bool hugetlb_resv_owner = false;

  bool shared() const { return flags & kVmaShared; }
  bool is_hugetlb() const { return hugetlb != nullptr; }
  bool private_anon() const { return !file; }
  uint64_t PgoffOf(uint64_t addr) const { return pgoff + ((addr - start) >> kPageShift); }
  VmaInfo Info() const { return {start, end, prot, flags, file.get(), pgoff}; }
};

// One entry for device-frame migration to change (migrate_device.cc): the
// device page dpfn at addr; dst is the system frame to map instead
// (remap), or kInvalidPfn to restore; done is set when the entry changed.
struct DeviceTarget {
  uint64_t addr;
  uint64_t dpfn;
  Pfn dst;
  bool done;
};

// Whether an access needs write permission.
enum class AccessKind { kRead, kWrite };

// The device page whose CPU fault the calling thread is in the middle of
// (DeviceFaultLocked sets it around MigrateToRam), or 0: MigrateVmaSetup
// takes it as fault_page when the driver leaves fault_page 0.
extern thread_local DevicePfn tls_fault_page;

class AddressSpace::Impl {
 public:
  Impl(AddressSpace& as, RwSemaphore& mmap_lock)
      : as_(as), pool_(as.pool_), mmap_lock_(mmap_lock),
        free_area_cache_(as.config_.mmap_base) {}

  // ---- public operations (take the mmap lock) ----
  Result<uint64_t> Mmap(uint64_t addr, uint64_t len, uint32_t prot, uint32_t flags,
                        std::shared_ptr<SimFile> file, uint64_t offset) USVM_EXCLUDES(mmap_lock_);
  Result<void> Munmap(uint64_t addr, uint64_t len) USVM_EXCLUDES(mmap_lock_);
  Result<void> Mprotect(uint64_t addr, uint64_t len, uint32_t prot) USVM_EXCLUDES(mmap_lock_);
  Result<void> Madvise(uint64_t addr, uint64_t len, int advice) USVM_EXCLUDES(mmap_lock_);
  Result<uint64_t> Mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len, uint32_t flags,
                          uint64_t new_addr) USVM_EXCLUDES(mmap_lock_);
  Result<void> ForkInto(Impl& child) USVM_EXCLUDES(mmap_lock_);
  void Exit() USVM_EXCLUDES(mmap_lock_);

  // CPU access: op(ptr, n) runs on host memory under the slot lock (shared).
  // Copies page by page, faulting as needed.
  template <typename Op>
  Result<void> Access(uint64_t addr, uint64_t len, AccessKind kind, Op op)
      USVM_EXCLUDES(mmap_lock_);
  Result<void> Populate(uint64_t addr, uint64_t len, bool write) USVM_EXCLUDES(mmap_lock_);
  Result<uint64_t> ReclaimLazyFree() USVM_EXCLUDES(mmap_lock_);

  Result<void> RangeFaultLocked(HmmRange& range) USVM_REQUIRES_SHARED(mmap_lock_);
  Result<void> MigrateSetupLocked(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_);
  void MigratePagesLocked(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_);
  void MigrateFinalizeLocked(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_);

  // ---- device-frame migration (migrate_device.cc), without the mmap lock ----
  // (DeviceTarget: see above the class.)
  // Both take the page table's free lock (shared) and the page table locks
  // themselves, one 2 MiB region at a time; targets are in address order.
  // REQUIRES: the caller holds every dpfn's page lock, so every migration
  // entry naming one of them is its own.
  // try_to_migrate_one: each entry that still maps its device page (and
  // is not a migration entry already) becomes a migration entry.
  void DeviceUnmap(DeviceTarget* t, size_t n) USVM_EXCLUDES(mmap_lock_);
  // remove_migration_pte: each migration entry of its page becomes a
  // present entry of dst (taking a reference on it, forgetting the rmap
  // record), or, with dst == kInvalidPfn, the device entry it replaced.
  // Wakes migration waiters.
  void DeviceRemap(DevicePagemap& pm, DeviceTarget* t, size_t n) USVM_EXCLUDES(mmap_lock_);
  // MIGRATE notification bracket over [start, end) with `owner`.
  void NotifyMigrateStart(uint64_t start, uint64_t end, const void* owner);
  void NotifyMigrateEnd(uint64_t start, uint64_t end, const void* owner);

  // ---- queries ----
  std::optional<VmaInfo> FindVmaInfo(uint64_t addr) const USVM_EXCLUDES(mmap_lock_);
  std::vector<VmaInfo> AllVmas() const USVM_EXCLUDES(mmap_lock_);
  size_t VmaCount() const USVM_EXCLUDES(mmap_lock_);
  PteInfo QueryPte(uint64_t addr) const USVM_EXCLUDES(mmap_lock_);
  bool dead() const USVM_EXCLUDES(mmap_lock_);
  // Exit has begun (lock-free).
  bool exiting() const { return exiting_.load(std::memory_order_acquire); }

  // ---- helpers ----
  // find_vma: first VMA with end > addr.
  const Vma* FindVmaLocked(uint64_t addr) const USVM_REQUIRES_SHARED(mmap_lock_);
  // Resolves a fault at addr. REQUIRES: mmap lock held (read or write).
  Result<void> HandleFaultLocked(uint64_t addr, AccessKind kind) USVM_REQUIRES_SHARED(mmap_lock_);

  struct Counters {
    std::atomic<uint64_t> faults{0}, zero_maps{0}, anon_allocs{0}, huge_faults{0},
        cow_breaks{0}, cow_reuses{0}, cow_unshares{0}, thp_splits{0}, thp_collapses{0}, rss_pages{0};
  };
  Counters counters;

 private:
  friend class AddressSpace;
  using VmaMap = std::map<uint64_t, Vma>;  // keyed by start

  // Range checks shared by the layout calls.
  Result<void> CheckAliveLocked() const USVM_REQUIRES_SHARED(mmap_lock_);
  bool RangeFreeLocked(uint64_t start, uint64_t end) const USVM_REQUIRES_SHARED(mmap_lock_);
  // Top-down search for a free range of len bytes starting at a multiple
  // of `align` (a power of two, at least a page).
  Result<uint64_t> GetUnmappedAreaLocked(uint64_t len, uint64_t align = kPageSize)
      USVM_REQUIRES(mmap_lock_);
  // The highest start (a multiple of align) of len bytes in the highest gap
  // in [min_addr, limit) that fits; *skipped (if given) grows to the
  // largest gap passed over.
  std::optional<uint64_t> TopDownGapLocked(uint64_t limit, uint64_t len, uint64_t align,
                                           uint64_t* skipped) const USVM_REQUIRES_SHARED(mmap_lock_);
  // Splits the VMA containing addr (start < addr < end) in two.
  void SplitVmaLocked(uint64_t addr) USVM_REQUIRES(mmap_lock_);
  // Merges the VMA starting at `start` with compatible neighbours.
  void MergeAroundLocked(uint64_t start) USVM_REQUIRES(mmap_lock_);
  // Unmaps [start, end) (do_munmap): UNMAP notification, zap, VMA removal.
  void UnmapLocked(uint64_t start, uint64_t end) USVM_REQUIRES(mmap_lock_);
  // Zaps entries in [start, end) and drops their frames. Huge entries that
  // straddle the edges must have been split (SplitHugeAtLocked).
  void ZapLocked(uint64_t start, uint64_t end) USVM_REQUIRES_SHARED(mmap_lock_);
  // If a huge entry covers addr and addr is not 2 MiB aligned, splits it
  // into 4 KiB entries (CLEAR notification over the 2 MiB).
  void SplitHugeAtLocked(uint64_t addr) USVM_REQUIRES_SHARED(mmap_lock_);
  void SplitHugeRangeEdgesLocked(uint64_t start, uint64_t end) USVM_REQUIRES_SHARED(mmap_lock_) {
    SplitHugeAtLocked(start);
    SplitHugeAtLocked(end);
  }
  // Splits the huge entry of the 2 MiB region at base (CLEAR notification).
  void SplitHugeLocked(uint64_t base) USVM_REQUIRES_SHARED(mmap_lock_);
  // mprotect's page table pass: read bit from prot, write bit kept only if
  // prot still allows writes. Splits huge entries cut by the range.
  void ChangeProtectionLocked(uint64_t start, uint64_t end, uint32_t prot)
      USVM_REQUIRES(mmap_lock_);
  // MADV_COLLAPSE of the 2 MiB at base, inside private anonymous `vma`:
  // 0 on success (or already one THP), else the errno the region fails
  // with. REQUIRES: the mmap write lock (the PTE table is freed).
  Errc CollapseHugeLocked(const Vma& vma, uint64_t base) USVM_REQUIRES(mmap_lock_);
  // MADV_FREE's pass: exclusive anonymous pages become clean and lazy-free.
  void MarkLazyFreeLocked(uint64_t start, uint64_t end) USVM_REQUIRES_SHARED(mmap_lock_);
  // Calls fn(vma, a, e) for each VMA part of [start, end) in order; sets
  // *hole if part of the range is unmapped. Stops at fn's first error.
  template <typename Fn>
  Result<void> ForEachVmaPartLocked(uint64_t start, uint64_t end, bool* hole, Fn fn)
      USVM_REQUIRES_SHARED(mmap_lock_) {
    uint64_t a = start;
    while (a < end) {
      const Vma* v = FindVmaLocked(a);
      if (!v || v->start >= end) {
        *hole = true;
        break;
      }
      if (v->start > a) *hole = true;
      a = std::max(a, v->start);
      const uint64_t e = std::min(end, v->end);
      USVM_TRY(fn(*v, a, e));  // fn may split/merge VMAs; v is not used after
      a = e;
    }
    return {};
  }
  // Notifier brackets. Start's EAGAIN cannot happen for blockable ranges.
  void NotifyStart(uint64_t start, uint64_t end, NotifyEvent ev);
  void NotifyEnd(uint64_t start, uint64_t end, NotifyEvent ev);
  // vma_lookup: the VMA containing addr, or null.
  const Vma* VmaLookupLocked(uint64_t addr) const USVM_REQUIRES_SHARED(mmap_lock_);
  // munmap's range check (EINVAL outside user space).
  Result<void> CheckMunmapRange(uint64_t start, uint64_t len) const;
  // ---- mremap steps (mm/mremap.c); lengths are page aligned ----
  // check_prep_vma: EINVAL/EFAULT for a resize or move of [addr, addr+olen)
  // that the VMA v containing addr does not allow.
  Result<void> CheckRemapLocked(const Vma& v, uint64_t addr, uint64_t olen, uint64_t nlen,
                                uint32_t flags) const USVM_REQUIRES(mmap_lock_);
  // One VMA's mremap (lookup, checks, then mremap_to or mremap_at).
  Result<uint64_t> RemapOneLocked(uint64_t addr, uint64_t olen, uint64_t nlen, uint32_t flags,
                                  uint64_t new_addr) USVM_REQUIRES(mmap_lock_);
  // mremap_to: FIXED target or DONTUNMAP hint. REQUIRES: checks done.
  Result<uint64_t> RemapToLocked(uint64_t addr, uint64_t olen, uint64_t nlen, uint32_t flags,
                                 uint64_t new_addr, uint64_t align) USVM_REQUIRES(mmap_lock_);
  // remap_move: a FIXED move of equal lengths over any number of VMAs.
  Result<uint64_t> RemapMoveLocked(uint64_t start, uint64_t len, uint32_t flags, uint64_t new_addr)
      USVM_REQUIRES(mmap_lock_);
  // move_vma: a copy of the VMA at addr becomes [target, target+nlen), the
  // entries of [addr, addr+olen) move there, and the source is unmapped
  // unless `dontunmap`. REQUIRES: a VMA contains addr, the target is free.
  uint64_t MoveVmaLocked(uint64_t addr, uint64_t olen, uint64_t target, uint64_t nlen,
                         bool dontunmap) USVM_REQUIRES(mmap_lock_);
  // Moves entries of [old_start, old_start+len) to new_start (mremap).
  void MovePageTablesLocked(uint64_t old_start, uint64_t new_start, uint64_t len)
      USVM_REQUIRES(mmap_lock_);
  // Fault helpers.
  Result<void> FaultHugeLocked(const Vma& vma, uint64_t addr, AccessKind kind, PmdSlot& slot,
                               bool* handled) USVM_REQUIRES_SHARED(mmap_lock_);
  // `unshare`: FAULT_FLAG_UNSHARE (a read-only long-term pin of a page the
  // process may share): the copy is mapped without write permission.
  Result<void> WriteProtectFaultLocked(const Vma& vma, uint64_t addr, PmdSlot& slot,
                                       bool unshare = false)
      USVM_REQUIRES_SHARED(mmap_lock_);
  // Entry flags for a fresh mapping of a frame in vma.
  static uint64_t ReadBit(uint32_t prot) { return prot != kProtNone ? pte::kRead : 0; }
  void Drop(const std::vector<Pfn>& frames);
  // References that removed entries held, dropped after the page table
  // lock is released (a device page's last Put calls into the driver).
  struct Dropped {
    std::vector<Pfn> frames;
    std::vector<uint64_t> device;  // DevicePfns
    // Records what entry e held; returns true if it counted as mapped.
    bool Add(uint64_t e) {
      if (pte::HoldsFrame(e) || pte::HoldsMigratingFrame(e) || pte::IsExclusive(e))
        frames.push_back(pte::PfnOf(e));
      if (pte::HoldsDevicePage(e)) device.push_back(pte::PfnOf(e));
      return pte::KindOf(e) != pte::kNone;
    }
    // Records what the 2 MiB entry h held (512 references of its kind);
    // returns the number of 4 KiB pages it mapped.
    uint64_t AddHuge(uint64_t h) {
      if (pte::KindOf(h) == pte::kNone) return 0;
      if (pte::HoldsPages(h))
        for (uint64_t i = 0; i < kPagesPerHuge; ++i) Add(h + (i << pte::kPfnShift));
      return kPagesPerHuge;
    }
  };
  void Drop(const Dropped& d);
  // Device rmap upkeep (device_pagemap.h): entry `e` at addr starts /
  // stops naming a device page (no-op for other entries).
  // REQUIRES: addr's page table lock, held exclusively.
  void RmapAdd(uint64_t e, uint64_t addr);
  void RmapRemove(uint64_t e, uint64_t addr);
  // The same for a 2 MiB entry h at base: one record per 4 KiB page.
  void RmapAddHuge(uint64_t h, uint64_t base);
  void RmapRemoveHuge(uint64_t h, uint64_t base);
  // Waits until the migration entry `e` at addr is gone (migration_entry_wait).
  void WaitMigrationLocked(uint64_t addr, uint64_t e) USVM_REQUIRES_SHARED(mmap_lock_);
  // Runs the owner's migrate_to_ram for the device-private entry e at addr.
  Result<void> DeviceFaultLocked(uint64_t addr, uint64_t e) USVM_REQUIRES_SHARED(mmap_lock_);
  // Turns the device-exclusive entry e at addr back into a present entry
  // (EXCLUSIVE notification, no owner), if it is still there.
  void RestoreExclusiveLocked(uint64_t addr, uint64_t e) USVM_REQUIRES_SHARED(mmap_lock_);
  Result<Pfn> MakeExclusiveLocked(uint64_t addr, const void* owner) USVM_REQUIRES_SHARED(mmap_lock_);
  Result<void> PinLocked(uint64_t addr, uint64_t npages, bool write, Pfn* out)
      USVM_REQUIRES_SHARED(mmap_lock_);
  // ---- hugetlb (hugetlb.cc) ----
  // mmap with kMapHugetlb (Mmap dispatches here first).
  Result<uint64_t> MmapHugetlb(uint64_t addr, uint64_t len, uint32_t prot, uint32_t flags,
                               bool has_file, uint64_t offset) USVM_EXCLUDES(mmap_lock_);
  // EINVAL if start or end would split a hugetlb VMA off a 2 MiB boundary
  // (hugetlb_vm_op_split): munmap, mprotect, madvise flag changes, the
  // target of MAP_FIXED / MREMAP_FIXED.
  Result<void> CheckHugetlbSplitLocked(uint64_t start, uint64_t end) const
      USVM_REQUIRES_SHARED(mmap_lock_);
  // mremap of a hugetlb VMA (align_hugetlb): rounds the lengths up to
  // 2 MiB; EINVAL for unaligned addresses, growth, DONTUNMAP
  // (VM_DONTEXPAND) or a fixed target that overlaps or splits a hugetlb VMA.
  Result<void> AlignHugetlbMremapLocked(uint64_t old_addr, uint64_t new_addr, uint32_t flags,
                                        uint64_t* olen, uint64_t* nlen) const
      USVM_REQUIRES_SHARED(mmap_lock_);
  // The VMA starting at start stops owning reservations (they moved with
  // an mremap); a no-op for other VMAs.
  void DisownHugetlbReservationsLocked(uint64_t start) USVM_REQUIRES(mmap_lock_);
  // The VMA v is being removed: a private owner's unused reservations of
  // its range go back to the pool (hugetlb_vm_op_close).
  void HugetlbCloseVmaLocked(const Vma& v) USVM_REQUIRES(mmap_lock_);
  // Page fault on a hugetlb VMA: maps, reuses or copies the whole 2 MiB page.
  Result<void> HugetlbFaultLocked(const Vma& vma, uint64_t addr, AccessKind kind)
      USVM_REQUIRES_SHARED(mmap_lock_);
  // madvise on part [a, e) of hugetlb VMA v (madvise_dontneed_free_valid_vma).
  Result<void> HugetlbMadviseLocked(const Vma& v, uint64_t a, uint64_t e, int advice)
      USVM_REQUIRES_SHARED(mmap_lock_);
  // Fork: whether the hugetlb entry h must be copied for the child (some
  // frame is pinned), and the copy (an unreserved pool page).
  bool HugetlbEntryPinned(uint64_t h) const;
  Result<uint64_t> HugetlbCopyForFork(uint64_t h);
  // Fork: the child maps our private hugetlb objects without owning their
  // reservations; note it, so an owner can take pages back from it.
  void HugetlbNoteForkLocked(Impl& child) USVM_REQUIRES(child.mmap_lock_);
  // unmap_ref_private: unmaps the page `base` of index idx of obj from
  // every other address space mapping obj as a non-owner, and marks them
  // (their later faults on obj are SIGBUS). Takes their mmap locks.
  // REQUIRES: our mmap lock; no page table lock.
  void HugetlbUnmapRefPrivateLocked(HugetlbObject& obj, uint64_t idx, Pfn base)
      USVM_REQUIRES_SHARED(mmap_lock_);

  // get_user_pages' loop (gup.cc).
  Result<void> GupLocked(uint64_t addr, uint64_t npages, bool write, Pfn* out)
      USVM_REQUIRES_SHARED(mmap_lock_);
  // Drops a reference GupLocked took (system, zero or coherent page).
  void PutGupPage(Pfn pfn);
  // The bytes of the frame a present entry maps (system or coherent device).
  std::byte* EntryData(uint64_t e) const;
  uint32_t DeviceRefCount(uint64_t dpfn) const;
  // Reads the entry mapping addr (huge or 4 KiB) under the slot lock.
  uint64_t ReadEntryLocked(uint64_t addr) const USVM_REQUIRES_SHARED(mmap_lock_);
  // Whether a 2 MiB entry maps addr.
  bool HugeMappedLocked(uint64_t addr) const USVM_REQUIRES_SHARED(mmap_lock_);

  AddressSpace& as_;  // non-owning back pointer
  FramePool& pool_;
  RwSemaphore& mmap_lock_;
  PageTable pt_;
  VmaMap vmas_ USVM_GUARDED_BY(mmap_lock_);
  // Where the top-down search starts, and the largest gap above it.
  uint64_t free_area_cache_ USVM_GUARDED_BY(mmap_lock_);
  uint64_t cached_hole_size_ USVM_GUARDED_BY(mmap_lock_) = 0;
  bool dead_ USVM_GUARDED_BY(mmap_lock_) = false;
  std::atomic<bool> exiting_{false};
  // Woken whenever migration entries are replaced.
  WaitQueue migration_wq_;
};

}  // namespace usvm::mm

#endif  // USVM_MM_ADDRESS_SPACE_IMPL_H_
