// Mm: the narrow port through which the layers above (gpusvm) use an
// address space -- the part of struct mm_struct and of mm/'s API that
// drm_gpusvm.c and drm_pagemap.c call, and nothing more.
//
// What the port offers:
//   - the mmap lock (a reader-writer lock; the layers above take it for
//     read only) and "is the address space still alive" (mmget_not_zero);
//   - VMA lookup under that lock (vma_lookup, find_vma), as copies;
//   - interval-notifier insert (removal is MmuIntervalNotifier::Remove);
//     ReadBegin / ReadRetry live on the notifier itself;
//   - HMM range fault;
//   - migrate_vma setup / pages / finalize (to and from device memory);
//   - migration of device pages by frame, without the mmap lock
//     (migrate_device_pfns / _pages / _finalize), for eviction;
//   - system pages for the destinations of those migrations and their
//     bytes for the copy engines (alloc_page, put_page, kmap).
//
// AddressSpace (address_space.h) implements it over the simulated memory.
// A backend over a real process's memory (userfaultfd) implements the same
// calls over its own page store; nothing here names a page table, a frame
// arena or a simulated CPU. Code above mm must use only this header (plus
// the vocabulary headers hmm.h, migrate.h, migrate_device.h,
// device_pagemap.h, mmu_interval_notifier.h), never address_space.h.
//
// Thread-safety: every method is safe to call concurrently, with the lock
// requirements stated on each.
#ifndef USVM_MM_MM_H_
#define USVM_MM_MM_H_

#include <cstddef>
#include <cstdint>
#include <optional>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

class MmuIntervalNotifier;
class MmuIntervalNotifierOps;
class SimFile;
struct HmmRange;
struct MigrateVma;

// VMA flags reported by VmaInfo.
enum : uint32_t {
  kVmaShared = 1u << 0,     // MAP_SHARED (file or shmem)
  kVmaAnonymous = 1u << 1,  // anonymous (private anon, or shmem)
  kVmaHugePage = 1u << 2,   // MADV_HUGEPAGE
  kVmaNoHugePage = 1u << 3, // MADV_NOHUGEPAGE
  kVmaHugetlb = 1u << 4,    // MAP_HUGETLB (2 MiB pages from the hugetlb pool)
};

// A copy of one VMA's attributes.
struct VmaInfo {
  uint64_t start = 0;
  uint64_t end = 0;
  uint32_t prot = 0;
  uint32_t flags = 0;
  const SimFile* file = nullptr;  // null for private anonymous memory
  uint64_t pgoff = 0;             // file page index of `start`

  // vma_is_anonymous: private anonymous memory (no file, not shared).
  bool anonymous_private() const {
    return file == nullptr && (flags & kVmaAnonymous) && !(flags & kVmaShared);
  }
};

class Mm {
 public:
  virtual ~Mm() = default;
  Mm(const Mm&) = delete;
  Mm& operator=(const Mm&) = delete;

  // The mmap lock. The layers above take it for read only, around the
  // *Locked lookups, RangeFault and the MigrateVma calls.
  RwSemaphore& mmap_lock() const USVM_RETURN_CAPABILITY(mmap_lock_) { return mmap_lock_; }

  // mmget_not_zero: false once teardown of the address space has begun
  // (later calls fail with EFAULT). Lock-free: it may be asked with or
  // without the mmap lock; a true answer can go stale at once.
  virtual bool Alive() const = 0;

  // vma_lookup: the VMA containing addr. find_vma: the first VMA ending
  // above addr. Copies; nothing stays referenced.
  // REQUIRES: the mmap lock (read or write).
  virtual std::optional<VmaInfo> VmaLookupLocked(uint64_t addr) const
      USVM_REQUIRES_SHARED(mmap_lock_) = 0;
  virtual std::optional<VmaInfo> FindVmaLocked(uint64_t addr) const
      USVM_REQUIRES_SHARED(mmap_lock_) = 0;

  // mmu_interval_notifier_insert on this address space (see
  // mmu_interval_notifier.h for the rules and errors). Must not hold the
  // mmap lock (the first insert takes it for write).
  virtual Result<void> InsertIntervalNotifier(MmuIntervalNotifier* sub, uint64_t start,
                                              uint64_t length, MmuIntervalNotifierOps* ops) = 0;

  // hmm_range_fault (hmm.h). REQUIRES: the mmap lock (read).
  virtual Result<void> RangeFault(HmmRange& range) USVM_REQUIRES_SHARED(mmap_lock_) = 0;

  // migrate_vma_setup / _pages / _finalize (migrate.h). REQUIRES: the mmap
  // lock (read) held across all three.
  virtual Result<void> MigrateVmaSetup(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_) = 0;
  virtual void MigrateVmaPages(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_) = 0;
  virtual void MigrateVmaFinalize(MigrateVma& m) USVM_REQUIRES_SHARED(mmap_lock_) = 0;

  // migrate_device_pfns / _pages / _finalize (migrate_device.h): device
  // pages of `pgmap` back to system pages of this port, wherever they are
  // mapped, without the mmap lock. dst words name system pages from
  // AllocSystemPage.
  virtual Result<void> MigrateDevicePfns(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n,
                                         uint64_t* src, uint64_t* dst) = 0;
  virtual void MigrateDevicePages(DevicePagemap& pgmap, uint64_t* src, const uint64_t* dst,
                                  uint64_t n) = 0;
  virtual void MigrateDeviceFinalize(DevicePagemap& pgmap, const uint64_t* src,
                                     const uint64_t* dst, uint64_t n) = 0;

  // System pages, for migration destinations (alloc_page). The page comes
  // with one reference, which a successful migration consumes; an unused
  // one is dropped with PutSystemPage. ENOMEM when none is free.
  virtual Result<Pfn> AllocSystemPage() = 0;
  // 512 consecutive system pages, 2 MiB aligned, each with one reference:
  // the destination of a 2 MiB page migrated whole (kMigratePfnCompound).
  // ENOMEM when no whole 2 MiB block is free (the caller falls back to
  // 4 KiB pages).
  virtual Result<Pfn> AllocSystemHugePage() = 0;
  virtual void PutSystemPage(Pfn pfn) = 0;
  // The 4 KiB of a system page (kmap), for copy engines. Valid while the
  // caller keeps the page from being freed (a reference, a migration
  // entry, or a mapping it knows valid under the notifier protocol).
  virtual std::byte* SystemPageData(Pfn pfn) const = 0;

 protected:
  Mm() = default;
  // The implementation's layout lock; guards what the implementation says.
  mutable RwSemaphore mmap_lock_;
};

}  // namespace usvm::mm

#endif  // USVM_MM_MM_H_
