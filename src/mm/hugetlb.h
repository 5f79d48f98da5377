// HugetlbObject: the object behind one MAP_HUGETLB mapping (private to mm):
// the kernel's anonymous hugetlbfs inode, its page cache (shared mappings)
// and its reservation map.
//
// Pages are 2 MiB pool pages (FramePool::HugetlbAlloc), named by their huge
// index (the VMA's pgoff / 512; pgoff starts at 0 for each mapping).
//
// Reservations (Documentation/mm/hugetlbfs_reserv.rst): mmap reserves one
// pool page per huge page of the mapping, so faults cannot run out later
// (ENOMEM at mmap otherwise), unless MAP_NORESERVE.
// - Shared: the object (inode) owns the reservations and a page cache;
//   a fault finds the page in the cache, or takes a pool page, consuming
//   that index's reservation, and caches it. Pages and unused reservations
//   are given back when the object dies (the last VMA referring to it is
//   unmapped, in every process).
// - Private: the VMAs of the mmap caller own the reservations
//   (HPAGE_RESV_OWNER); each index is kReserved until its first fault
//   consumes it. Unmapping a range gives its unused reservations back;
//   zapping a page whose frames were freed restores its reservation, as
//   __unmap_hugepage_range does. Fork children own none: their faults and
//   every COW copy take unreserved pool pages (SIGBUS, our EFAULT, when
//   there is none). When the owner itself cannot copy a page it shares
//   with children (empty pool), it takes the page back from them
//   (unmap_ref_private): their later faults on the object are SIGBUS
//   (HPAGE_RESV_UNMAPPED), so the owner's writes always succeed.
//
// Thread-safety: lock_ guards the per-index state and the cache. Lock
// order: mmap lock -> PMD slot lock -> lock_ -> the FramePool lock.
#ifndef USVM_SRC_MM_HUGETLB_H_
#define USVM_SRC_MM_HUGETLB_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::mm {

class AddressSpace;

class HugetlbObject {
 public:
  // npages huge pages, mapped from index `first` on (the mmap offset);
  // reserves [first, npages) unless `reserve` is false (MAP_NORESERVE).
  // ENOMEM: the pool cannot reserve them. EINVAL: nothing to map.
  static Result<std::shared_ptr<HugetlbObject>> TryCreate(FramePool& pool, uint64_t npages,
                                                          uint64_t first, bool shared, bool reserve);
  // Shared: drops the page cache and returns unused reservations.
  ~HugetlbObject();
  HugetlbObject(const HugetlbObject&) = delete;
  HugetlbObject& operator=(const HugetlbObject&) = delete;

  bool shared() const { return shared_; }
  uint64_t npages() const { return npages_; }

  // Private: a fresh zeroed pool page for index idx (512 frames, one
  // reference each for the mapping). The reservation owner consumes idx's
  // reservation if it still holds it. ENOSPC: none free.
  Result<Pfn> AllocPrivate(uint64_t idx, bool owner) USVM_EXCLUDES(lock_);
  // Private owner: [lo, hi) is unmapped; its unused reservations go back.
  void ReleasePrivate(uint64_t lo, uint64_t hi) USVM_EXCLUDES(lock_);
  // Private owner: the page of idx was zapped and freed (MADV_DONTNEED):
  // idx gets a reservation again if the pool still has a free page for it.
  void RestorePrivate(uint64_t idx) USVM_EXCLUDES(lock_);
  // Shared: the cached page of idx, created (zeroed) on first use, with one
  // more reference on each of its 512 frames for the caller's mapping.
  // ENOSPC: not cached and no pool page for it.
  Result<Pfn> GetShared(uint64_t idx) USVM_EXCLUDES(lock_);

  // Private: address spaces that map the object without owning its
  // reservations (fork children, noted at fork), still alive.
  void NoteMapper(const std::shared_ptr<AddressSpace>& as) USVM_EXCLUDES(lock_);
  std::vector<std::shared_ptr<AddressSpace>> Mappers() USVM_EXCLUDES(lock_);
  // HPAGE_RESV_UNMAPPED: the owner took a page back from `as`.
  void MarkUnmapped(const AddressSpace* as) USVM_EXCLUDES(lock_);
  bool IsUnmapped(const AddressSpace* as) USVM_EXCLUDES(lock_);

 private:
  HugetlbObject(FramePool& pool, uint64_t npages, uint64_t first, bool shared, bool reserve);

  FramePool& pool_;
  const bool shared_;
  const uint64_t npages_;
  Mutex lock_;
  // Sparse, so that their size follows the pool pages in use or reserved,
  // never the length of the mapping (a MAP_NORESERVE mapping may be huge).
  std::set<uint64_t> reserved_ USVM_GUARDED_BY(lock_);  // indices holding an unused reservation
  std::set<uint64_t> consumed_ USVM_GUARDED_BY(lock_);  // private: indices whose reservation a fault used
  std::map<uint64_t, Pfn> cache_ USVM_GUARDED_BY(lock_);  // shared: the page cache
  std::vector<std::weak_ptr<AddressSpace>> mappers_ USVM_GUARDED_BY(lock_);
  std::set<const AddressSpace*> unmapped_ USVM_GUARDED_BY(lock_);  // compared, never dereferenced
};

}  // namespace usvm::mm

#endif  // USVM_SRC_MM_HUGETLB_H_
