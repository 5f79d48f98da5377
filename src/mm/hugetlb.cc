// MAP_HUGETLB mappings (mm/hugetlb.c, fs/hugetlbfs): the HugetlbObject
// behind each mapping, and the AddressSpace paths that treat hugetlb VMAs
// differently: mmap, the 2 MiB alignment rules of munmap / mprotect /
// madvise / mremap, faults (whole 2 MiB pages, whole-page COW), madvise
// DONTNEED and fork of pinned pages.
#include <cassert>
#include <iterator>
#include <cstring>

#include "address_space_impl.h"

namespace usvm::mm {

// ===== HugetlbObject =========================================================

Result<std::shared_ptr<HugetlbObject>> HugetlbObject::TryCreate(FramePool& pool, uint64_t npages,
                                                                uint64_t first, bool shared,
                                                                bool reserve) {
  if (npages == 0 || first >= npages) return Err(Errc::kInval, "hugetlb: empty object");
  if (reserve) USVM_TRY(pool.HugetlbReserve(npages - first));
  return std::shared_ptr<HugetlbObject>(new HugetlbObject(pool, npages, first, shared, reserve));
}

HugetlbObject::HugetlbObject(FramePool& pool, uint64_t npages, uint64_t first, bool shared,
                             bool reserve)
    : pool_(pool), shared_(shared), npages_(npages) {
  MutexLock l(lock_);
  if (reserve)
    for (uint64_t i = first; i < npages; ++i) reserved_.insert(reserved_.end(), i);
}

HugetlbObject::~HugetlbObject() {
  MutexLock l(lock_);
  for (const auto& [idx, base] : cache_)
    for (uint64_t f = 0; f < kPagesPerHuge; ++f) pool_.Put(base + f);
  if (!reserved_.empty()) pool_.HugetlbUnreserve(reserved_.size());
}

Result<Pfn> HugetlbObject::AllocPrivate(uint64_t idx, bool owner) {
  MutexLock l(lock_);
  const bool reserved = owner && reserved_.count(idx) != 0;
  const Pfn base = USVM_TRY(pool_.HugetlbAlloc(reserved));
  if (reserved) {
    reserved_.erase(idx);
    consumed_.insert(idx);
  }
  return base;
}

void HugetlbObject::ReleasePrivate(uint64_t lo, uint64_t hi) {
  MutexLock l(lock_);
  auto first = reserved_.lower_bound(lo), last = reserved_.lower_bound(hi);
  const uint64_t unused = static_cast<uint64_t>(std::distance(first, last));
  reserved_.erase(first, last);
  consumed_.erase(consumed_.lower_bound(lo), consumed_.lower_bound(hi));
  if (unused) pool_.HugetlbUnreserve(unused);
}

void HugetlbObject::RestorePrivate(uint64_t idx) {
  MutexLock l(lock_);
  if (consumed_.count(idx) == 0) return;
  // The zapped page went back to the pool; if it was taken meanwhile the
  // reservation is simply not restored.
  if (pool_.HugetlbReserve(1)) {
    consumed_.erase(idx);
    reserved_.insert(idx);
  }
}

Result<Pfn> HugetlbObject::GetShared(uint64_t idx) {
  MutexLock l(lock_);
  if (idx >= npages_) return Err(Errc::kFault, "hugetlb: beyond the end of the object");
  auto it = cache_.find(idx);
  if (it == cache_.end()) {
    const bool reserved = reserved_.count(idx) != 0;
    const Pfn base = USVM_TRY(pool_.HugetlbAlloc(reserved));  // the cache's references
    if (reserved) reserved_.erase(idx);
    it = cache_.emplace(idx, base).first;
  }
  for (uint64_t f = 0; f < kPagesPerHuge; ++f) pool_.Get(it->second + f);
  return it->second;
}

void HugetlbObject::NoteMapper(const std::shared_ptr<AddressSpace>& as) {
  MutexLock l(lock_);
  std::erase_if(mappers_, [](const std::weak_ptr<AddressSpace>& w) { return w.expired(); });
  for (const auto& w : mappers_)
    if (w.lock() == as) return;
  mappers_.push_back(as);
}

std::vector<std::shared_ptr<AddressSpace>> HugetlbObject::Mappers() {
  MutexLock l(lock_);
  std::vector<std::shared_ptr<AddressSpace>> out;
  for (const auto& w : mappers_)
    if (auto sp = w.lock()) out.push_back(std::move(sp));
  return out;
}

void HugetlbObject::MarkUnmapped(const AddressSpace* as) {
  MutexLock l(lock_);
  unmapped_.insert(as);
}

bool HugetlbObject::IsUnmapped(const AddressSpace* as) {
  MutexLock l(lock_);
  return unmapped_.count(as) != 0;
}

// ===== mmap and the layout rules ================================================

Result<uint64_t> AddressSpace::Impl::MmapHugetlb(uint64_t addr, uint64_t len, uint32_t prot,
                                                 uint32_t flags, bool has_file, uint64_t offset) {
  const auto& c = as_.config_;
  constexpr uint32_t kKnown = kMapShared | kMapPrivate | kMapFixed | kMapAnonymous | kMapPopulate |
                              kMapFixedNoReplace | kMapHugetlb | kMapNoReserve | kMapHugeMask;
  if (len == 0) return Err(Errc::kInval, "mmap: length is zero");
  if (prot & ~kProtAll) return Err(Errc::kInval, "mmap: unknown prot bits");
  if (flags & ~kKnown) return Err(Errc::kInval, "mmap: unknown flags");
  const bool shared = flags & kMapShared;
  if (shared == bool(flags & kMapPrivate))
    return Err(Errc::kInval, "mmap: need exactly one of MAP_SHARED and MAP_PRIVATE");
  // ksys_mmap_pgoff: MAP_HUGETLB on a file that is not hugetlbfs (all of
  // ours) is EINVAL; the size field must name a huge page size we have.
  if (!(flags & kMapAnonymous) || has_file)
    return Err(Errc::kInval, "mmap: MAP_HUGETLB needs anonymous memory");
  const uint32_t size_log = (flags & kMapHugeMask) >> kMapHugeShift;
  if (size_log != 0 && size_log != kHugeShift) return Err(Errc::kInval, "mmap: unsupported huge page size");
  // hugetlbfs_file_mmap: the offset must be huge page aligned.
  if (offset & (kHugePageSize - 1)) return Err(Errc::kInval, "mmap: hugetlb offset not 2 MiB aligned");
  // The length is rounded up to the huge page size.
  const uint64_t alen = HugeAlignUp(len);
  if (alen < len || alen > c.task_size - c.min_addr) return Err(Errc::kNoMem, "mmap: length too large");
  if (offset + alen < offset) return Err(Errc::kInval, "mmap: offset overflow");
  const bool fixed = flags & (kMapFixed | kMapFixedNoReplace);
  if (fixed) {
    if (!IsHugeAligned(addr)) return Err(Errc::kInval, "mmap: hugetlb fixed address not 2 MiB aligned");
    if (addr > c.task_size - alen) return Err(Errc::kNoMem, "mmap: fixed range beyond user space");
    if (addr < c.min_addr) return Err(Errc::kPerm, "mmap: fixed address below mmap_min_addr");
  }
  // hugetlb_reserve_pages: reserve at mmap time (ENOMEM when the pool
  // cannot), unless MAP_NORESERVE.
  auto obj = USVM_TRY(HugetlbObject::TryCreate(pool_, (offset + alen) >> kHugeShift,
                                               offset >> kHugeShift, shared,
                                               !(flags & kMapNoReserve)));
  uint64_t start = 0;
  {
    WriteLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    if (fixed) {
      if (flags & kMapFixedNoReplace) {
        if (!RangeFreeLocked(addr, addr + alen))
          return Err(Errc::kExist, "mmap: MAP_FIXED_NOREPLACE over an existing mapping");
      } else {
        USVM_TRY(CheckHugetlbSplitLocked(addr, addr + alen));
        UnmapLocked(addr, addr + alen);
      }
      start = addr;
    } else {
      if (addr != 0) {
        const uint64_t hint = HugeAlignUp(addr);
        if (hint >= addr && hint >= c.min_addr && hint <= c.task_size - alen &&
            RangeFreeLocked(hint, hint + alen))
          start = hint;
      }
      if (start == 0) start = USVM_TRY(GetUnmappedAreaLocked(alen, kHugePageSize));
    }
    Vma v;
    v.start = start;
    v.end = start + alen;
    v.prot = prot;
    v.flags = (shared ? uint32_t{kVmaShared} : 0u) | kVmaAnonymous | kVmaHugetlb;
    v.pgoff = offset >> kPageShift;
    v.hugetlb = std::move(obj);
    v.hugetlb_resv_owner = !shared;
    vmas_.emplace(start, std::move(v));
  }
  if (flags & kMapPopulate) (void)Populate(start, alen, (prot & kProtWrite) && !shared);
  return start;
}

Result<void> AddressSpace::Impl::CheckHugetlbSplitLocked(uint64_t start, uint64_t end) const {
  for (uint64_t x : {start, end}) {
    const Vma* v = FindVmaLocked(x);
    if (v && v->start < x && x < v->end && v->is_hugetlb() && !IsHugeAligned(x))
      return Err(Errc::kInval, "hugetlb mapping cannot be split off a 2 MiB boundary");
  }
  return {};
}

Result<void> AddressSpace::Impl::AlignHugetlbMremapLocked(uint64_t old_addr, uint64_t new_addr,
                                                          uint32_t flags, uint64_t* olen,
                                                          uint64_t* nlen) const {
  const auto& c = as_.config_;
  *olen = HugeAlignUp(*olen);
  *nlen = HugeAlignUp(*nlen);
  if (!IsHugeAligned(old_addr) || !IsHugeAligned(new_addr))
    return Err(Errc::kInval, "mremap: hugetlb addresses must be 2 MiB aligned");
  if (*nlen > *olen) return Err(Errc::kInval, "mremap: a hugetlb mapping cannot grow");
  if (flags & kMremapDontUnmap) return Err(Errc::kInval, "mremap: MREMAP_DONTUNMAP on hugetlb (VM_DONTEXPAND)");
  if (flags & kMremapFixed) {
    if (*nlen == 0 || new_addr > c.task_size - *nlen)
      return Err(Errc::kInval, "mremap: new range outside user space");
    if (new_addr < old_addr + *olen && old_addr < new_addr + *nlen)
      return Err(Errc::kInval, "mremap: old and new ranges overlap");
    USVM_TRY(CheckHugetlbSplitLocked(new_addr, new_addr + *nlen));
  }
  return {};
}

void AddressSpace::Impl::DisownHugetlbReservationsLocked(uint64_t start) {
  auto it = vmas_.find(start);
  if (it != vmas_.end() && it->second.is_hugetlb()) it->second.hugetlb_resv_owner = false;
}

void AddressSpace::Impl::HugetlbCloseVmaLocked(const Vma& v) {
  if (!v.is_hugetlb() || v.shared() || !v.hugetlb_resv_owner) return;
  v.hugetlb->ReleasePrivate(v.pgoff / kPagesPerHuge, v.PgoffOf(v.end) / kPagesPerHuge);
}

// ===== faults ====================================================================

Result<void> AddressSpace::Impl::HugetlbFaultLocked(const Vma& vma, uint64_t addr, AccessKind kind) {
  const uint64_t hbase = addr & kHugeMask;
  const uint64_t idx = vma.PgoffOf(hbase) / kPagesPerHuge;
  const bool write = kind == AccessKind::kWrite;
  const uint64_t read = ReadBit(vma.prot);
  HugetlbObject& obj = *vma.hugetlb;
  PmdSlot* slot = pt_.Ensure(hbase);
  bool took_back = false;
  // The whole fault runs under the slot lock held exclusively, which also
  // serialises faults on this page (the kernel's hugetlb fault mutex).
  for (int tries = 0; tries < 1000; ++tries) {
    slot->lock.Lock();
    const uint64_t h = slot->huge.load(std::memory_order_relaxed);
    if (h == 0) {
      if (slot->table) {  // cannot happen: the region was wholly unmapped before
        slot->lock.Unlock();
        return Err(Errc::kFault, "SIGBUS: hugetlb region has a page table");
      }
      if (!obj.shared() && !vma.hugetlb_resv_owner && obj.IsUnmapped(&as_)) {
        // The owner took a page back from this process (hugetlb_no_page).
        slot->lock.Unlock();
        return Err(Errc::kFault, "SIGBUS: killed due to inadequate hugepage pool");
      }
      // hugetlb_no_page: a shared mapping finds (or makes) the page in the
      // object's cache and maps it writable if the VMA is; a private one
      // takes a fresh page and maps it writable only for a write.
      Result<Pfn> page = obj.shared() ? obj.GetShared(idx) : obj.AllocPrivate(idx, vma.hugetlb_resv_owner);
      if (!page) {
        slot->lock.Unlock();
        // vmf_error: an empty pool is SIGBUS, other failures are OOM.
        if (page.error() == Errc::kNoSpc) return Err(Errc::kFault, "SIGBUS: no free huge page");
        return Err(page.error());
      }
      uint64_t flags = read | pte::kAccessed | pte::kHugetlb;
      if (obj.shared()) {
        flags |= pte::kFile;
        if (vma.prot & kProtWrite) flags |= pte::kWrite;
        if (write) flags |= pte::kDirty;
      } else if (write) {
        flags |= pte::kWrite | pte::kDirty;
      }
      slot->huge.store(pte::Make(pte::kPresent, *page, flags), std::memory_order_relaxed);
      slot->lock.Unlock();
      counters.huge_faults.fetch_add(1, std::memory_order_relaxed);
      counters.rss_pages.fetch_add(kPagesPerHuge, std::memory_order_relaxed);
      return {};
    }
    if (!write || (h & pte::kWrite)) {
      slot->huge.store(h | read, std::memory_order_relaxed);
      slot->lock.Unlock();
      return {};
    }
    if (vma.shared()) {
      slot->huge.store(h | pte::kWrite | pte::kDirty | pte::kAccessed, std::memory_order_relaxed);
      slot->lock.Unlock();
      return {};
    }
    // hugetlb_wp: a private page this mapping alone uses is reused (pins
    // are not other users: fork copied pinned pages); otherwise the whole
    // 2 MiB page is copied into an unreserved pool page.
    bool exclusive = true;
    for (uint64_t i = 0; i < kPagesPerHuge && exclusive; ++i)
      exclusive = pool_.RefCount(pte::PfnOf(h) + i) - pool_.PinCount(pte::PfnOf(h) + i) == 1;
    if (exclusive) {
      slot->huge.store(h | pte::kWrite | pte::kDirty | pte::kAccessed, std::memory_order_relaxed);
      slot->lock.Unlock();
      counters.cow_reuses.fetch_add(1, std::memory_order_relaxed);
      return {};
    }
    slot->lock.Unlock();
    NotifyStart(hbase, hbase + kHugePageSize, NotifyEvent::kClear);
    slot->lock.Lock();
    const bool same = slot->huge.load(std::memory_order_relaxed) == h;
    Errc failed = Errc::kOk;
    if (same) {
      auto copy = obj.AllocPrivate(idx, /*owner=*/false);
      if (copy) {
        std::memcpy(pool_.Data(*copy), pool_.Data(pte::PfnOf(h)), kHugePageSize);
        slot->huge.store(pte::Make(pte::kPresent, *copy,
                                   read | pte::kWrite | pte::kDirty | pte::kAccessed | pte::kHugetlb),
                         std::memory_order_relaxed);
      } else {
        failed = copy.error().code();
      }
    }
    slot->lock.Unlock();
    NotifyEnd(hbase, hbase + kHugePageSize, NotifyEvent::kClear);
    if (!same) continue;  // changed meanwhile: look again
    if (failed == Errc::kNoSpc && vma.hugetlb_resv_owner && !took_back) {
      // The reservation owner must not fail: take the page back from the
      // children that share it, then reuse it (unmap_ref_private).
      HugetlbUnmapRefPrivateLocked(obj, idx, pte::PfnOf(h));
      took_back = true;
      continue;
    }
    if (failed == Errc::kNoSpc) return Err(Errc::kFault, "SIGBUS: no free huge page for copy-on-write");
    if (failed != Errc::kOk) return Err(failed, "hugetlb copy-on-write: allocation failed");
    for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Put(pte::PfnOf(h) + i);
    counters.cow_breaks.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  return Err(Errc::kIo, "hugetlb fault made no progress");
}

void AddressSpace::Impl::HugetlbUnmapRefPrivateLocked(HugetlbObject& obj, uint64_t idx, Pfn base) {
  // Lock order: our mmap lock, then a descendant's (mappers are fork
  // descendants of the owner, so two processes never wait on each other).
  for (const auto& sp : obj.Mappers()) {
    if (sp.get() == &as_) continue;
    Impl& c = *sp->impl_;
    ReadLock l(sp->mmap_lock());
    c.mmap_lock_.AssertReaderHeld();  // sp->mmap_lock(), seen through Impl
    if (c.dead_) continue;
    bool unmapped = false;
    for (const auto& [start, v] : c.vmas_) {
      if (v.hugetlb.get() != &obj || v.shared() || v.hugetlb_resv_owner) continue;
      if (idx < v.pgoff / kPagesPerHuge || idx >= v.PgoffOf(v.end) / kPagesPerHuge) continue;
      const uint64_t addr = v.start + ((idx * kPagesPerHuge - v.pgoff) << kPageShift);
      PmdSlot* slot = c.pt_.Lookup(addr);
      if (!slot) continue;
      uint64_t h;
      {
        ReadLock sl(slot->lock);
        h = slot->huge.load(std::memory_order_relaxed);
      }
      if (!pte::HoldsFrame(h) || pte::PfnOf(h) != base) continue;
      // The child's VMA stays; only the page goes (a zap: CLEAR).
      c.NotifyStart(addr, addr + kHugePageSize, NotifyEvent::kClear);
      slot->lock.Lock();
      const bool same = slot->huge.load(std::memory_order_relaxed) == h;
      if (same) slot->huge.store(0, std::memory_order_relaxed);
      slot->lock.Unlock();
      c.NotifyEnd(addr, addr + kHugePageSize, NotifyEvent::kClear);
      if (!same) continue;
      for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Put(base + i);
      c.counters.rss_pages.fetch_sub(kPagesPerHuge, std::memory_order_relaxed);
      unmapped = true;
    }
    if (unmapped) obj.MarkUnmapped(sp.get());
  }
}

void AddressSpace::Impl::HugetlbNoteForkLocked(Impl& child) {
  std::shared_ptr<AddressSpace> child_sp;
  for (const auto& [start, v] : child.vmas_) {
    if (!v.is_hugetlb() || v.shared()) continue;
    if (!child_sp) child_sp = child.as_.shared_from_this();
    v.hugetlb->NoteMapper(child_sp);
  }
}

// ===== madvise ===================================================================

Result<void> AddressSpace::Impl::HugetlbMadviseLocked(const Vma& v, uint64_t a, uint64_t e,
                                                      int advice) {
  // Only DONTNEED, from a 2 MiB boundary; the end is rounded down so that
  // a caller unaware of huge pages does not lose data past it.
  if (advice != kMadvDontNeed) return Err(Errc::kInval, "madvise: only MADV_DONTNEED on hugetlb");
  if (!IsHugeAligned(a)) return Err(Errc::kInval, "madvise: hugetlb range not 2 MiB aligned");
  e &= kHugeMask;
  if (e <= a) return {};
  // The owner's pages that the zap frees get their reservations back.
  std::vector<uint64_t> restore;
  if (!v.shared() && v.hugetlb_resv_owner) {
    pt_.ForEachSlot(a, e, [&](uint64_t base, PmdSlot& slot) {
      ReadLock l(slot.lock);
      const uint64_t h = slot.huge.load(std::memory_order_relaxed);
      if (!pte::HoldsFrame(h)) return;
      for (uint64_t i = 0; i < kPagesPerHuge; ++i)
        if (pool_.RefCount(pte::PfnOf(h) + i) != 1) return;
      restore.push_back(v.PgoffOf(base) / kPagesPerHuge);
    });
  }
  NotifyStart(a, e, NotifyEvent::kClear);
  ZapLocked(a, e);
  NotifyEnd(a, e, NotifyEvent::kClear);
  for (uint64_t idx : restore) v.hugetlb->RestorePrivate(idx);
  return {};
}

// ===== fork ======================================================================

bool AddressSpace::Impl::HugetlbEntryPinned(uint64_t h) const {
  if (!(h & pte::kHugetlb) || !pte::HoldsFrame(h)) return false;
  for (uint64_t i = 0; i < kPagesPerHuge; ++i)
    if (pool_.PinCount(pte::PfnOf(h) + i) > 0) return true;
  return false;
}

Result<uint64_t> AddressSpace::Impl::HugetlbCopyForFork(uint64_t h) {
  // copy_hugetlb_page_range: a page that may be pinned is copied for the
  // child into a page of its own (no reservation: the child owns none).
  const Pfn copy = USVM_TRY(pool_.HugetlbAlloc(/*reserved=*/false));
  std::memcpy(pool_.Data(copy), pool_.Data(pte::PfnOf(h)), kHugePageSize);
  return pte::Make(pte::kPresent, copy, (h & pte::kFlagsMask & ~pte::kKindMask) | pte::kDirty);
}

}  // namespace usvm::mm
