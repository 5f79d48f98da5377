// AddressSpace layout operations: mmap, munmap, mprotect, madvise, mremap,
// fork, exit. Faults and CPU accesses are in fault.cc.
#include <algorithm>
#include <cassert>
#include <cstring>

#include "address_space_impl.h"
#include "usvm/mm/migrate_device.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm {

// ===== AddressSpace: thin forwarding to Impl ===============================

Result<std::shared_ptr<AddressSpace>> AddressSpace::TryCreate(FramePool& pool,
                                                             AddressSpaceConfig c, Env& env) {
  if (!IsPageAligned(c.min_addr) || !IsPageAligned(c.task_size) || !IsPageAligned(c.mmap_base))
    return Err(Errc::kInval, "address space bounds must be page aligned");
  if (c.min_addr == 0 || c.task_size > (uint64_t{1} << 47) || c.min_addr >= c.task_size)
    return Err(Errc::kInval, "need 0 < min_addr < task_size <= 2^47");
  if (c.mmap_base <= c.min_addr || c.mmap_base > c.task_size)
    return Err(Errc::kInval, "mmap_base must lie in (min_addr, task_size]");
  return std::shared_ptr<AddressSpace>(new AddressSpace(pool, c, env));
}

AddressSpace::AddressSpace(FramePool& pool, AddressSpaceConfig config, Env& env)
    : pool_(pool),
      env_(env),
      config_(config),
      notifiers_(std::make_unique<MmuNotifierSubscriptions>(this)),
      impl_(std::make_unique<Impl>(*this, mmap_lock_)) {}

AddressSpace::~AddressSpace() { Exit(); }

Result<uint64_t> AddressSpace::Mmap(uint64_t addr, uint64_t len, uint32_t prot, uint32_t flags,
                                    std::shared_ptr<SimFile> file, uint64_t offset) {
  return impl_->Mmap(addr, len, prot, flags, std::move(file), offset);
}
Result<void> AddressSpace::Munmap(uint64_t addr, uint64_t len) { return impl_->Munmap(addr, len); }
Result<void> AddressSpace::Mprotect(uint64_t addr, uint64_t len, uint32_t prot) {
  return impl_->Mprotect(addr, len, prot);
}
Result<void> AddressSpace::Madvise(uint64_t addr, uint64_t len, int advice) {
  return impl_->Madvise(addr, len, advice);
}
Result<uint64_t> AddressSpace::Mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len,
                                      uint32_t flags, uint64_t new_addr) {
  return impl_->Mremap(old_addr, old_len, new_len, flags, new_addr);
}
Result<std::shared_ptr<AddressSpace>> AddressSpace::Fork() {
  auto child = std::shared_ptr<AddressSpace>(new AddressSpace(pool_, config_, env_));
  USVM_TRY(impl_->ForkInto(*child->impl_));
  return child;
}
void AddressSpace::Exit() { impl_->Exit(); }
bool AddressSpace::exited() const { return impl_->dead(); }
bool AddressSpace::Alive() const { return !impl_->exiting(); }
Result<void> AddressSpace::Populate(uint64_t addr, uint64_t len, bool write) {
  return impl_->Populate(addr, len, write);
}
Result<uint64_t> AddressSpace::ReclaimLazyFree() { return impl_->ReclaimLazyFree(); }
std::optional<VmaInfo> AddressSpace::FindVma(uint64_t addr) const { return impl_->FindVmaInfo(addr); }
std::vector<VmaInfo> AddressSpace::Vmas() const { return impl_->AllVmas(); }
size_t AddressSpace::VmaCount() const { return impl_->VmaCount(); }
PteInfo AddressSpace::QueryPte(uint64_t addr) const { return impl_->QueryPte(addr); }

AddressSpace::Stats AddressSpace::GetStats() const {
  const auto& c = impl_->counters;
  Stats s;
  s.faults = c.faults.load(std::memory_order_relaxed);
  s.zero_maps = c.zero_maps.load(std::memory_order_relaxed);
  s.anon_allocs = c.anon_allocs.load(std::memory_order_relaxed);
  s.huge_faults = c.huge_faults.load(std::memory_order_relaxed);
  s.cow_breaks = c.cow_breaks.load(std::memory_order_relaxed);
  s.cow_reuses = c.cow_reuses.load(std::memory_order_relaxed);
  s.cow_unshares = c.cow_unshares.load(std::memory_order_relaxed);
  s.thp_splits = c.thp_splits.load(std::memory_order_relaxed);
  s.thp_collapses = c.thp_collapses.load(std::memory_order_relaxed);
  s.rss_pages = c.rss_pages.load(std::memory_order_relaxed);
  s.page_table_pages = impl_->pt_.table_pages();
  return s;
}

// ===== Impl: helpers ========================================================

Result<void> AddressSpace::Impl::CheckAliveLocked() const {
  if (dead_) return Err(Errc::kFault, "address space has exited");
  return {};
}

bool AddressSpace::Impl::dead() const {
  ReadLock l(mmap_lock_);
  return dead_;
}

const Vma* AddressSpace::Impl::FindVmaLocked(uint64_t addr) const {
  auto it = vmas_.upper_bound(addr);
  if (it != vmas_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > addr) return &prev->second;
  }
  return it == vmas_.end() ? nullptr : &it->second;
}

bool AddressSpace::Impl::RangeFreeLocked(uint64_t start, uint64_t end) const {
  const Vma* v = FindVmaLocked(start);
  return !v || v->start >= end;
}

std::optional<uint64_t> AddressSpace::Impl::TopDownGapLocked(uint64_t limit, uint64_t len,
                                                             uint64_t align,
                                                             uint64_t* skipped) const {
  const uint64_t lowest = as_.config_.min_addr;
  uint64_t hi = limit;
  while (hi >= lowest + len) {
    auto it = vmas_.lower_bound(hi);
    const uint64_t cand = (hi - len) & ~(align - 1);  // the highest aligned start
    if (it == vmas_.begin()) return cand >= lowest ? std::optional<uint64_t>(cand) : std::nullopt;
    const Vma& prev = std::prev(it)->second;
    if (prev.end > hi) {  // hi lies inside prev
      hi = prev.start;
      continue;
    }
    const uint64_t lo = std::max(lowest, prev.end);
    if (cand >= lo && hi - lo >= len) return cand;
    if (skipped) *skipped = std::max(*skipped, hi - lo);
    hi = prev.start;
  }
  return std::nullopt;
}

Result<uint64_t> AddressSpace::Impl::GetUnmappedAreaLocked(uint64_t len, uint64_t align) {
  const auto& c = as_.config_;
  if (len > c.task_size - c.min_addr) return Err(Errc::kNoMem, "no free address range large enough");
  // vm_unmapped_area top-down: the top of the highest gap below mmap_base
  // that fits (at `align`: 2 MiB for hugetlb). The search starts at
  // free_area_cache_ (a VMA start, or mmap_base) and finds the same gap,
  // because every gap above the cache is at most cached_hole_size_ long; a
  // request that could fit in one of them starts again from mmap_base (the
  // pre-maple-tree scheme).
  if (len <= cached_hole_size_ || free_area_cache_ > c.mmap_base) {
    free_area_cache_ = c.mmap_base;
    cached_hole_size_ = 0;
  }
  if (auto a = TopDownGapLocked(free_area_cache_, len, align, &cached_hole_size_)) {
    free_area_cache_ = *a;
    return *a;
  }
  // Nothing below mmap_base: any gap up to the top of user space.
  if (c.mmap_base < c.task_size)
    if (auto a = TopDownGapLocked(c.task_size, len, align, nullptr)) return *a;
  return Err(Errc::kNoMem, "no free address range large enough");
}

void AddressSpace::Impl::NotifyStart(uint64_t start, uint64_t end, NotifyEvent ev) {
  NotifierRange r{&as_, start, end, ev, nullptr, true};
  // Blockable ranges cannot fail.
  [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(r);
  assert(res.has_value());
}

void AddressSpace::Impl::NotifyEnd(uint64_t start, uint64_t end, NotifyEvent ev) {
  NotifierRange r{&as_, start, end, ev, nullptr, true};
  as_.notifiers_->InvalidateRangeEnd(r);
}

void AddressSpace::Impl::Drop(const std::vector<Pfn>& frames) {
  for (Pfn p : frames) pool_.Put(p);
}

void AddressSpace::Impl::SplitHugeAtLocked(uint64_t addr) {
  if (IsHugeAligned(addr)) return;
  PmdSlot* slot = pt_.Lookup(addr);
  if (!slot) return;
  {
    ReadLock l(slot->lock);
    if (slot->huge.load(std::memory_order_relaxed) == 0) return;
  }
  SplitHugeLocked(addr & kHugeMask);
}

void AddressSpace::Impl::SplitHugeLocked(uint64_t base) {
  PmdSlot* slot = pt_.Lookup(base);
  if (!slot) return;
  {
    ReadLock l(slot->lock);
    if (slot->huge.load(std::memory_order_relaxed) & pte::kHugetlb) return;  // never split
  }
  NotifyStart(base, base + kHugePageSize, NotifyEvent::kClear);
  slot->lock.Lock();
  if (slot->huge.load(std::memory_order_relaxed) != 0) {
    pt_.InstallTableLocked(*slot);
    counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
  }
  slot->lock.Unlock();
  NotifyEnd(base, base + kHugePageSize, NotifyEvent::kClear);
}

void AddressSpace::Impl::SplitVmaLocked(uint64_t addr) {
  auto it = vmas_.upper_bound(addr);
  if (it == vmas_.begin()) return;
  --it;
  Vma& a = it->second;
  if (!(a.start < addr && addr < a.end)) return;
  SplitHugeAtLocked(addr);
  Vma b = a;
  b.start = addr;
  b.pgoff = a.PgoffOf(addr);
  a.end = addr;
  vmas_.emplace(addr, std::move(b));
}

namespace {
bool Mergeable(const Vma& a, const Vma& b) {
  if (a.end != b.start || a.prot != b.prot || a.flags != b.flags || a.file != b.file) return false;
  if (a.hugetlb != b.hugetlb || a.hugetlb_resv_owner != b.hugetlb_resv_owner) return false;
  // File-backed (and hugetlb): the offsets must continue. Anonymous: always.
  return (!a.file && !a.hugetlb) || a.PgoffOf(a.end) == b.pgoff;
}
}  // namespace

void AddressSpace::Impl::MergeAroundLocked(uint64_t start) {
  auto it = vmas_.find(start);
  if (it == vmas_.end()) return;
  for (auto next = std::next(it); next != vmas_.end() && Mergeable(it->second, next->second);
       next = std::next(it)) {
    it->second.end = next->second.end;
    vmas_.erase(next);
  }
  if (it != vmas_.begin()) {
    auto prev = std::prev(it);
    if (Mergeable(prev->second, it->second)) {
      prev->second.end = it->second.end;
      vmas_.erase(it);
    }
  }
}

void AddressSpace::Impl::ZapLocked(uint64_t start, uint64_t end) {
  Dropped dropped;
  uint64_t unmapped = 0;
  pt_.ForEachSlot(start, end, [&](uint64_t base, PmdSlot& slot) {
    const uint64_t s = std::max(start, base), e = std::min(end, base + kHugePageSize);
    slot.lock.Lock();
    const uint64_t h = slot.huge.load(std::memory_order_relaxed);
    if (h != 0) {
      if (s == base && e == base + kHugePageSize) {
        slot.huge.store(0, std::memory_order_relaxed);
        RmapRemoveHuge(h, base);
        unmapped += dropped.AddHuge(h);
      } else {
        // Callers split the edges first; a racing THP fault (madvise runs
        // under the read lock) may have mapped one since. Split it here:
        // the range being zapped is already inside an invalidation.
        pt_.InstallTableLocked(slot);
        counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (slot.table) {
      for (uint64_t a = s; a < e; a += kPageSize) {
        const uint64_t old = slot.table->e[PageTable::PteIndex(a)].exchange(0, std::memory_order_relaxed);
        RmapRemove(old, a);
        if (dropped.Add(old)) ++unmapped;
      }
    }
    slot.lock.Unlock();
  });
  counters.rss_pages.fetch_sub(unmapped, std::memory_order_relaxed);
  Drop(dropped);
}

void AddressSpace::Impl::Drop(const Dropped& d) {
  Drop(d.frames);
  DevicePagemap* pm = nullptr;  // runs of pages of one pagemap look it up once
  for (uint64_t dpfn : d.device) {
    if (!pm || dpfn < pm->base() || dpfn - pm->base() >= pm->npages()) pm = DevicePagemap::Lookup(dpfn);
    assert(pm && "device entry of an unregistered pagemap");
    if (pm) pm->Put(pm->IndexOf(dpfn));
  }
}

void AddressSpace::Impl::UnmapLocked(uint64_t start, uint64_t end) {
  const Vma* first = FindVmaLocked(start);
  if (!first || first->start >= end) return;
  const uint64_t ns = std::max(start, first->start);
  const uint64_t ne = std::min(end, std::prev(vmas_.lower_bound(end))->second.end);
  SplitVmaLocked(start);
  SplitVmaLocked(end);
  NotifyStart(ns, ne, NotifyEvent::kUnmap);
  ZapLocked(ns, ne);
  for (auto it = vmas_.lower_bound(ns); it != vmas_.end() && it->first < ne;) {
    HugetlbCloseVmaLocked(it->second);
    it = vmas_.erase(it);
  }
  NotifyEnd(ns, ne, NotifyEvent::kUnmap);
  pt_.FreeEmpty(ns, ne);
  // The next top-down search starts at the top of the gap this hole is now
  // part of, if that is above the cache (see GetUnmappedAreaLocked).
  if (ne > free_area_cache_) {
    auto next = vmas_.lower_bound(ne);
    const uint64_t top = next == vmas_.end() ? as_.config_.mmap_base : next->first;
    free_area_cache_ = std::min(top, as_.config_.mmap_base);
  }
}

// ===== mmap / munmap ========================================================

Result<uint64_t> AddressSpace::Impl::Mmap(uint64_t addr, uint64_t len, uint32_t prot,
                                          uint32_t flags, std::shared_ptr<SimFile> file,
                                          uint64_t offset) {
  if (flags & kMapHugetlb) return MmapHugetlb(addr, len, prot, flags, file != nullptr, offset);
  const auto& c = as_.config_;
  constexpr uint32_t kKnown =
      kMapShared | kMapPrivate | kMapFixed | kMapAnonymous | kMapPopulate | kMapFixedNoReplace;
  if (len == 0) return Err(Errc::kInval, "mmap: length is zero");
  if (prot & ~kProtAll) return Err(Errc::kInval, "mmap: unknown prot bits");
  if (flags & ~kKnown) return Err(Errc::kInval, "mmap: unknown flags");
  const bool shared = flags & kMapShared;
  const bool anon = flags & kMapAnonymous;
  if (anon && file) return Err(Errc::kInval, "mmap: MAP_ANONYMOUS with a file");
  if (!anon && !file) return Err(Errc::kInval, "mmap: file mapping without a file");
  if (!IsPageAligned(offset)) return Err(Errc::kInval, "mmap: offset not page aligned");
  // From here Linux's do_mmap order: length, then the address
  // (get_unmapped_area), MAP_FIXED_NOREPLACE, the file offset, the type.
  const uint64_t alen = PageAlignUp(len);
  if (alen < len || alen == 0 || alen > c.task_size - c.min_addr)
    return Err(Errc::kNoMem, "mmap: length too large");
  const bool fixed = flags & (kMapFixed | kMapFixedNoReplace);
  if (fixed) {
    if (addr > c.task_size - alen) return Err(Errc::kNoMem, "mmap: fixed range beyond user space");
    if (!IsPageAligned(addr)) return Err(Errc::kInval, "mmap: fixed address not page aligned");
    if (addr < c.min_addr) return Err(Errc::kPerm, "mmap: fixed address below mmap_min_addr");
  }
  // file_mmap_ok: the last page's offset must fit in MAX_LFS_FILESIZE.
  constexpr uint64_t kMaxLfsFileSize = ~uint64_t{0} >> 1;
  const bool offset_overflow = file && (offset >> kPageShift) > ((kMaxLfsFileSize - alen) >> kPageShift);
  const bool bad_type = shared == bool(flags & kMapPrivate);
  uint64_t start = 0;
  {
    WriteLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    // A failure after the search must not leave the search's cache
    // pointing at a mapping that was never made.
    const uint64_t cache = free_area_cache_, hole = cached_hole_size_;
    auto fail = [&](Error e) USVM_REQUIRES(mmap_lock_) {
      free_area_cache_ = cache;
      cached_hole_size_ = hole;
      return Err(e);
    };
    if (fixed) {
      start = addr;
    } else {
      // round_hint_to_min, then the hint is used if the range is free
      // (an unaligned hint is rounded down).
      uint64_t hint = PageAlignDown(addr);
      if (hint != 0 && hint < c.min_addr) hint = c.min_addr;
      if (hint != 0 && hint <= c.task_size - alen && RangeFreeLocked(hint, hint + alen)) start = hint;
      if (start == 0) start = USVM_TRY(GetUnmappedAreaLocked(alen));
    }
    if ((flags & kMapFixedNoReplace) && !RangeFreeLocked(addr, addr + alen))
      return Err(Errc::kExist, "mmap: MAP_FIXED_NOREPLACE over an existing mapping");
    if (offset_overflow) return fail(Error(Errc::kOverflow, "mmap: file offset overflow"));
    if (bad_type) return fail(Error(Errc::kInval, "mmap: need exactly one of MAP_SHARED and MAP_PRIVATE"));
    if (anon && shared) {
      // Shared anonymous memory is a shmem object of the mapping's size.
      auto shm = SimFile::TryCreate(pool_, alen, "shmem", /*shmem=*/true);
      if (!shm) return fail(shm.error());
      file = std::move(*shm);
      offset = 0;
    }
    if (fixed && !(flags & kMapFixedNoReplace)) {
      USVM_TRY(CheckHugetlbSplitLocked(addr, addr + alen));  // EINVAL: would split a hugetlb page
      UnmapLocked(addr, addr + alen);
    }
    Vma v;
    v.start = start;
    v.end = start + alen;
    v.prot = prot;
    v.flags = (shared ? uint32_t{kVmaShared} : 0u) | (anon ? uint32_t{kVmaAnonymous} : 0u);
    v.pgoff = file ? offset >> kPageShift : start >> kPageShift;
    v.file = std::move(file);
    vmas_.emplace(start, std::move(v));
    MergeAroundLocked(start);
  }
  if (flags & kMapPopulate) {
    // Errors are ignored, as mm_populate's are. Private writable memory is
    // written so that copy-on-write is broken up front.
    (void)Populate(start, alen, (prot & kProtWrite) && !shared);
  }
  return start;
}

Result<void> AddressSpace::Impl::Munmap(uint64_t addr, uint64_t len) {
  const auto& c = as_.config_;
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "munmap: address not page aligned");
  if (len == 0) return Err(Errc::kInval, "munmap: length is zero");
  const uint64_t alen = PageAlignUp(len);
  if (alen < len || addr > c.task_size || alen > c.task_size - addr)
    return Err(Errc::kInval, "munmap: range outside user space");
  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  USVM_TRY(CheckHugetlbSplitLocked(addr, addr + alen));
  UnmapLocked(addr, addr + alen);
  return {};
}

// ===== mprotect ==============================================================

void AddressSpace::Impl::ChangeProtectionLocked(uint64_t start, uint64_t end, uint32_t prot) {
  const uint64_t read = ReadBit(prot);
  const bool keep_write = prot & kProtWrite;
  auto fix = [&](uint64_t e) -> uint64_t {
    if (pte::KindOf(e) == pte::kNone) return e;
    if (!pte::IsPresent(e)) {
      // Device entries keep the read bit of the VMA too: device-frame
      // migration remaps them without the mmap lock, from the entry alone.
      if (pte::HoldsDevicePage(e)) e = (e & ~pte::kRead) | read;
      return keep_write ? e : e & ~pte::kWrite;
    }
    e = (e & ~pte::kRead) | read;
    if (!keep_write) e &= ~pte::kWrite;
    return e;
  };
  pt_.ForEachSlot(start, end, [&](uint64_t base, PmdSlot& slot) {
    const uint64_t s = std::max(start, base), e = std::min(end, base + kHugePageSize);
    slot.lock.Lock();
    const uint64_t h = slot.huge.load(std::memory_order_relaxed);
    if (h != 0) {
      if (s != base || e != base + kHugePageSize) {
        pt_.InstallTableLocked(slot);
        counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
      } else {
        slot.huge.store(fix(h), std::memory_order_relaxed);
      }
    }
    if (slot.table)
      for (uint64_t a = s; a < e; a += kPageSize) {
        auto& ent = slot.table->e[PageTable::PteIndex(a)];
        ent.store(fix(ent.load(std::memory_order_relaxed)), std::memory_order_relaxed);
      }
    slot.lock.Unlock();
  });
}

Result<void> AddressSpace::Impl::Mprotect(uint64_t addr, uint64_t len, uint32_t prot) {
  // do_mprotect_pkey's order: both GROWS bits, alignment, zero length
  // (success), overflow, prot bits, then the VMAs.
  const uint32_t grows = prot & (kProtGrowsDown | kProtGrowsUp);
  prot &= ~grows;
  if (grows == (kProtGrowsDown | kProtGrowsUp))
    return Err(Errc::kInval, "mprotect: PROT_GROWSDOWN and PROT_GROWSUP together");
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "mprotect: address not page aligned");
  if (len == 0) return {};
  const uint64_t alen = PageAlignUp(len);
  const uint64_t end = addr + alen;
  if (alen < len || end <= addr) return Err(Errc::kNoMem, "mprotect: range overflows");
  if (prot & ~(kProtAll | kProtSem)) return Err(Errc::kInval, "mprotect: unknown prot bits");
  prot &= ~kProtSem;  // accepted and ignored, as on x86
  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  if (grows) {
    // PROT_GROWSDOWN extends the range down to the start of a VM_GROWSDOWN
    // VMA (GROWSUP: up to the end of a VM_GROWSUP one). No VMA of ours can
    // grow (there is no MAP_GROWSDOWN), so a VMA found is EINVAL; nothing
    // found is ENOMEM as in Linux.
    const Vma* v = FindVmaLocked(addr);
    if (!v || v->start >= end) return Err(Errc::kNoMem, "mprotect: range not mapped");
    if ((grows & kProtGrowsUp) && v->start > addr) return Err(Errc::kNoMem, "mprotect: range not fully mapped");
    return Err(Errc::kInval, "mprotect: PROT_GROWSDOWN/GROWSUP on a VMA that cannot grow");
  }
  // Like Linux: VMAs are changed in order until a hole is met (ENOMEM).
  uint64_t a = addr;
  while (a < end) {
    const Vma* v = FindVmaLocked(a);
    if (!v || v->start > a) return Err(Errc::kNoMem, "mprotect: range not fully mapped");
    const uint64_t e = std::min(end, v->end);
    if (v->prot != prot) {
      // A hugetlb VMA cannot be split off a 2 MiB boundary (EINVAL, the
      // VMAs before it already changed); one whose protection stays needs
      // no split.
      USVM_TRY(CheckHugetlbSplitLocked(a, e));
      SplitVmaLocked(a);
      SplitVmaLocked(e);
      vmas_.at(a).prot = prot;
      NotifyStart(a, e, NotifyEvent::kProtectionVma);
      ChangeProtectionLocked(a, e, prot);
      NotifyEnd(a, e, NotifyEvent::kProtectionVma);
      MergeAroundLocked(a);
    }
    a = e;
  }
  return {};
}

// ===== madvise ===============================================================

void AddressSpace::Impl::MarkLazyFreeLocked(uint64_t start, uint64_t end) {
  pt_.ForEachSlot(start, end, [&](uint64_t base, PmdSlot& slot) {
    const uint64_t s = std::max(start, base), e = std::min(end, base + kHugePageSize);
    slot.lock.Lock();
    const uint64_t h = slot.huge.load(std::memory_order_relaxed);
    if (h != 0 && pte::HoldsFrame(h)) {
      bool exclusive = true;
      for (uint64_t i = 0; i < kPagesPerHuge && exclusive; ++i)
        exclusive = pool_.RefCount(pte::PfnOf(h) + i) == 1;
      if (s != base || e != base + kHugePageSize) {
        pt_.InstallTableLocked(slot);
        counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
      } else if (exclusive) {
        slot.huge.store((h & ~(pte::kDirty | pte::kAccessed)) | pte::kLazyFree,
                        std::memory_order_relaxed);
      }
    }
    if (slot.table)
      for (uint64_t a = s; a < e; a += kPageSize) {
        auto& ent = slot.table->e[PageTable::PteIndex(a)];
        const uint64_t old = ent.load(std::memory_order_relaxed);
        // Only pages this mapping owns alone (madvise_free skips shared).
        if (pte::HoldsFrame(old) && !(old & pte::kFile) && pool_.RefCount(pte::PfnOf(old)) == 1)
          ent.store((old & ~(pte::kDirty | pte::kAccessed)) | pte::kLazyFree,
                    std::memory_order_relaxed);
      }
    slot.lock.Unlock();
  });
}

Result<void> AddressSpace::Impl::Madvise(uint64_t addr, uint64_t len, int advice) {
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "madvise: address not page aligned");
  switch (advice) {
    case kMadvNormal:
    case kMadvDontNeed:
    case kMadvFree:
    case kMadvHugePage:
    case kMadvNoHugePage:
    case kMadvCollapse:
      break;
    default:
      return Err(Errc::kInval, "madvise: unknown advice");
  }
  const uint64_t alen = PageAlignUp(len);
  const uint64_t end = addr + alen;
  if (alen < len || end < addr) return Err(Errc::kInval, "madvise: range overflows");
  if (alen == 0) return {};

  bool hole = false;
  if (advice == kMadvCollapse) {
    // The kernel scans under the read lock and takes the write lock to
    // swap the PTE table for the 2 MiB entry; here the whole call holds it.
    WriteLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    Errc last_fail = Errc::kInval;
    uint64_t regions = 0, collapsed = 0;
    USVM_TRY(ForEachVmaPartLocked(addr, end, &hole, [&](const Vma& v, uint64_t a, uint64_t e) -> Result<void> {
      mmap_lock_.AssertHeld();
      const uint64_t hs = (a + kHugePageSize - 1) & kHugeMask, he = e & kHugeMask;
      const bool eligible =
          as_.config_.thp && v.private_anon() && !v.is_hugetlb() && !(v.flags & kVmaNoHugePage);
      for (uint64_t b = hs; b + kHugePageSize <= he; b += kHugePageSize) {
        ++regions;
        const Errc r = eligible ? CollapseHugeLocked(v, b) : Errc::kInval;
        if (r == Errc::kOk) {
          ++collapsed;
          continue;
        }
        last_fail = r;
        if (r == Errc::kNoMem) return Err(r, "madvise: MADV_COLLAPSE could not allocate 2 MiB");
      }
      return {};
    }));
    if (hole) return Err(Errc::kNoMem, "madvise: range not fully mapped");
    if (regions == 0 || collapsed != regions) return Err(last_fail, "madvise: MADV_COLLAPSE failed");
    return {};
  }
  if (advice == kMadvHugePage || advice == kMadvNoHugePage || advice == kMadvNormal) {
    // VMA flag changes: the write lock.
    WriteLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    USVM_TRY(ForEachVmaPartLocked(addr, end, &hole, [&](const Vma& v, uint64_t a, uint64_t e) -> Result<void> {
      if (advice == kMadvNormal) return {};
      mmap_lock_.AssertHeld();
      const uint32_t set = advice == kMadvHugePage ? kVmaHugePage : kVmaNoHugePage;
      const uint32_t clear = advice == kMadvHugePage ? kVmaNoHugePage : kVmaHugePage;
      if ((v.flags & (set | clear)) != set) {
        if (v.is_hugetlb()) USVM_TRY(CheckHugetlbSplitLocked(a, e));
        SplitVmaLocked(a);
        SplitVmaLocked(e);
        Vma& w = vmas_.at(a);
        w.flags = (w.flags & ~clear) | set;
        MergeAroundLocked(a);
      }
      return {};
    }));
  } else {
    // Page table changes only: the read lock, as in Linux.
    ReadLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    USVM_TRY(ForEachVmaPartLocked(addr, end, &hole, [&](const Vma& v, uint64_t a, uint64_t e) -> Result<void> {
      mmap_lock_.AssertReaderHeld();
      if (v.is_hugetlb()) return HugetlbMadviseLocked(v, a, e, advice);
      if (advice == kMadvFree && !v.private_anon())
        return Err(Errc::kInval, "madvise: MADV_FREE on a shared or file mapping");
      NotifyStart(a, e, NotifyEvent::kClear);
      SplitHugeRangeEdgesLocked(a, e);
      if (advice == kMadvDontNeed)
        ZapLocked(a, e);
      else
        MarkLazyFreeLocked(a, e);
      NotifyEnd(a, e, NotifyEvent::kClear);
      return {};
    }));
  }
  if (hole) return Err(Errc::kNoMem, "madvise: range not fully mapped");
  return {};
}

Errc AddressSpace::Impl::CollapseHugeLocked(const Vma& vma, uint64_t base) {
  PmdSlot* slot = pt_.Lookup(base);
  if (!slot) return Errc::kInval;  // no page table: nothing to collapse (SCAN_PMD_NULL)
  uint64_t old[kPagesPerHuge];
  {
    ReadLock l(slot->lock);
    const uint64_t h = slot->huge.load(std::memory_order_relaxed);
    if (h != 0) return pte::HoldsFrame(h) ? Errc::kOk : Errc::kInval;  // already a THP, or not a page
    if (!slot->table) return Errc::kInval;
    uint64_t pages = 0;
    for (unsigned i = 0; i < kPagesPerHuge; ++i) {
      const uint64_t e = slot->table->e[i].load(std::memory_order_relaxed);
      old[i] = e;
      if (e == 0 || (pte::IsPresent(e) && (e & pte::kZero))) continue;
      // Device, migration or exclusive entries, and device-coherent pages
      // (SCAN_PTE_NON_PRESENT / SCAN_PAGE_NULL).
      if (!pte::HoldsFrame(e) || (e & pte::kFile)) return Errc::kInval;
      // A page with users beyond its mappings (SCAN_PAGE_COUNT).
      if (pool_.PinCount(pte::PfnOf(e)) > 0) return Errc::kAgain;
      ++pages;
    }
    if (pages == 0) return Errc::kInval;  // only holes and the zero page: nothing to gain
  }
  auto huge = pool_.AllocHuge(FramePool::Zero::kNo);
  if (!huge) return Errc::kNoMem;
  const Pfn hp = *huge;
  NotifyStart(base, base + kHugePageSize, NotifyEvent::kClear);
  Dropped dropped;
  uint64_t mapped = 0;
  bool same;
  {
    // The PTE table is freed: the free lock keeps device-frame migration
    // (which walks without the mmap lock) off it, as FreeEmpty does.
    WriteLock fl(pt_.free_lock());
    WriteLock l(slot->lock);
    // The mmap write lock keeps faults out; device-frame migration (no
    // mmap lock) only touches device entries, which the scan refused. Check
    // anyway: a changed entry makes this region EAGAIN.
    same = slot->table != nullptr;
    for (unsigned i = 0; i < kPagesPerHuge && same; ++i)
      same = slot->table->e[i].load(std::memory_order_relaxed) == old[i];
    for (unsigned i = 0; i < kPagesPerHuge && same; ++i) {
      const uint64_t e = old[i];
      std::byte* to = pool_.Data(hp + i);
      if (pte::HoldsFrame(e))
        std::memcpy(to, pool_.Data(pte::PfnOf(e)), kPageSize);
      else
        std::memset(to, 0, kPageSize);
      if (dropped.Add(e)) ++mapped;
    }
    uint64_t flags = ReadBit(vma.prot) | pte::kAccessed | pte::kDirty;
    if (vma.prot & kProtWrite) flags |= pte::kWrite;
    if (same) pt_.ReplaceTableLocked(*slot, pte::Make(pte::kPresent, hp, flags));
  }
  NotifyEnd(base, base + kHugePageSize, NotifyEvent::kClear);
  if (!same) {
    for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Put(hp + i);
    return Errc::kAgain;
  }
  counters.rss_pages.fetch_add(kPagesPerHuge - mapped, std::memory_order_relaxed);
  counters.thp_collapses.fetch_add(1, std::memory_order_relaxed);
  Drop(dropped);
  return Errc::kOk;
}

// ===== mremap ================================================================

void AddressSpace::Impl::MovePageTablesLocked(uint64_t old_start, uint64_t new_start,
                                              uint64_t len) {
  const uint64_t old_end = old_start + len;
  pt_.ForEachSlot(old_start, old_end, [&](uint64_t base, PmdSlot& src) {
    const uint64_t s = std::max(old_start, base), e = std::min(old_end, base + kHugePageSize);
    src.lock.Lock();
    const uint64_t h = src.huge.load(std::memory_order_relaxed);
    if (h != 0) {
      const uint64_t dst_addr = new_start + (base - old_start);
      if (s == base && e == base + kHugePageSize && IsHugeAligned(dst_addr)) {
        // Move the whole 2 MiB entry. The destination slot is empty: the
        // target range was free. Only this thread takes two slot locks (it
        // holds the mmap write lock), so the nesting cannot deadlock.
        PmdSlot* dst = pt_.Ensure(dst_addr);
        dst->lock.Lock();
        if (dst->table) {
          dst->lock.Unlock();
          pt_.InstallTableLocked(src);  // fall through to 4 KiB moves
          counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
        } else {
          dst->huge.store(h, std::memory_order_relaxed);
          src.huge.store(0, std::memory_order_relaxed);
          RmapRemoveHuge(h, base);  // both locks held, as for 4 KiB moves
          RmapAddHuge(h, dst_addr);
          dst->lock.Unlock();
          src.lock.Unlock();
          return;
        }
      } else {
        pt_.InstallTableLocked(src);
        counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (src.table) {
      for (uint64_t a = s; a < e; a += kPageSize) {
        const uint64_t ent = src.table->e[PageTable::PteIndex(a)].exchange(0, std::memory_order_relaxed);
        if (ent == 0) continue;
        const uint64_t na = new_start + (a - old_start);
        PmdSlot* d = pt_.Ensure(na);
        if (d == &src) {
          // Source and target share this 2 MiB region: its lock is held.
          src.table->e[PageTable::PteIndex(na)].store(ent, std::memory_order_relaxed);
          RmapRemove(ent, a);
          RmapAdd(ent, na);
          continue;
        }
        WriteLock dl(d->lock);
        if (!d->table) pt_.InstallTableLocked(*d);
        d->table->e[PageTable::PteIndex(na)].store(ent, std::memory_order_relaxed);
        // Both page table locks are held: device-frame migration sees the
        // entry at one address or the other, and its record with it.
        RmapRemove(ent, a);
        RmapAdd(ent, na);
      }
    }
    src.lock.Unlock();
  });
}

const Vma* AddressSpace::Impl::VmaLookupLocked(uint64_t addr) const {
  const Vma* v = FindVmaLocked(addr);
  return v && v->start <= addr ? v : nullptr;
}

Result<void> AddressSpace::Impl::CheckMunmapRange(uint64_t start, uint64_t len) const {
  // do_vmi_munmap's range check.
  const uint64_t top = as_.config_.task_size;
  if (!IsPageAligned(start) || start > top || len > top - start)
    return Err(Errc::kInval, "munmap: range outside user space");
  return {};
}

Result<void> AddressSpace::Impl::CheckRemapLocked(const Vma& v, uint64_t addr, uint64_t olen,
                                                 uint64_t nlen, uint32_t flags) const {
  // check_prep_vma: only an operation that maps new address space (grow,
  // or a move to a new address) is checked against the VMA.
  const bool new_addr = flags & (kMremapFixed | kMremapDontUnmap);
  if (nlen <= olen && !new_addr) return {};
  if (olen == 0 && !v.shared())
    return Err(Errc::kInval, "mremap: zero old length duplicates only shared mappings");
  // The part that moves must lie in this VMA; a shrink's tail may cross
  // VMA ends (it is unmapped first).
  const uint64_t moved = std::min(olen, nlen);
  if (moved > v.end - addr) return Err(Errc::kFault, "mremap: old range spans several mappings");
  if (nlen == moved) return {};
  const uint64_t pgoff = v.PgoffOf(addr);
  if (pgoff + (nlen >> kPageShift) < pgoff) return Err(Errc::kInval, "mremap: file offset overflow");
  return {};
}

uint64_t AddressSpace::Impl::MoveVmaLocked(uint64_t addr, uint64_t olen, uint64_t target,
                                           uint64_t nlen, bool dontunmap) {
  // copy_vma + move_page_tables + unmap of the source. The source VMA is
  // not split here: do_munmap splits what it unmaps, and with DONTUNMAP (or
  // old_len 0) the source stays as it was.
  const Vma* found = VmaLookupLocked(addr);
  assert(found && "MoveVmaLocked without a VMA at addr");
  const bool hugetlb = olen != 0 && found->is_hugetlb();
  if (hugetlb) {
    // The private reservations move with the pages to the copy: the part
    // left behind (unmapped below) must not give them back.
    SplitVmaLocked(addr);
    SplitVmaLocked(addr + olen);
  }
  const Vma& src = *VmaLookupLocked(addr);
  Vma dst = src;
  dst.start = target;
  dst.end = target + nlen;
  dst.pgoff = src.PgoffOf(addr);
  vmas_.emplace(target, std::move(dst));
  if (hugetlb) DisownHugetlbReservationsLocked(addr);
  if (olen != 0) {
    // Huge entries cut by the range are split first (CLEAR over their
    // 2 MiB), as split_huge_pmd does in move_page_tables.
    SplitHugeRangeEdgesLocked(addr, addr + olen);
    NotifyStart(addr, addr + olen, NotifyEvent::kUnmap);
    MovePageTablesLocked(addr, target, olen);
    NotifyEnd(addr, addr + olen, NotifyEvent::kUnmap);
    if (!dontunmap)
      UnmapLocked(addr, addr + olen);
    else
      pt_.FreeEmpty(addr, addr + olen);
  }
  MergeAroundLocked(target);
  return target;
}

Result<uint64_t> AddressSpace::Impl::RemapToLocked(uint64_t addr, uint64_t olen, uint64_t nlen,
                                                   uint32_t flags, uint64_t new_addr,
                                                   uint64_t align) {
  const auto& c = as_.config_;
  const bool fixed = flags & kMremapFixed;
  // mremap_to. Linux unmaps a FIXED target before the shrink's tail, whose
  // range check can still fail; we check it first so that a failing call
  // changes nothing (documented in docs/mm.md).
  if (olen > nlen) USVM_TRY(CheckMunmapRange(addr + nlen, olen - nlen));
  // Linux fails this in get_unmapped_area (security_mmap_addr), after the
  // target and the tail were unmapped; we fail before changing anything.
  if (fixed && new_addr < c.min_addr) return Err(Errc::kPerm, "mremap: new address below mmap_min_addr");
  // With old_len 0 the target may start at old_addr (the empty old range
  // does not overlap it): Linux unmaps it, finds no VMA at old_addr any
  // more and fails with EFAULT; we fail first.
  if (fixed && new_addr == addr) return Err(Errc::kFault, "mremap: the new range starts at old_addr");
  // Neither unmap may split a hugetlb page (EINVAL, nothing changed).
  if (fixed) USVM_TRY(CheckHugetlbSplitLocked(new_addr, new_addr + nlen));
  if (olen > nlen) USVM_TRY(CheckHugetlbSplitLocked(addr + nlen, addr + olen));
  if (fixed) UnmapLocked(new_addr, new_addr + nlen);
  if (olen > nlen) {
    UnmapLocked(addr + nlen, addr + olen);
    olen = nlen;
  }
  uint64_t target = new_addr;
  if (!fixed) {
    // MREMAP_DONTUNMAP alone: new_addr is a hint (get_unmapped_area).
    if (!(new_addr >= c.min_addr && new_addr <= c.task_size - nlen &&
          RangeFreeLocked(new_addr, new_addr + nlen)))
      target = USVM_TRY(GetUnmappedAreaLocked(nlen, align));
  }
  return MoveVmaLocked(addr, olen, target, nlen, flags & kMremapDontUnmap);
}

Result<uint64_t> AddressSpace::Impl::RemapOneLocked(uint64_t addr, uint64_t olen, uint64_t nlen,
                                                    uint32_t flags, uint64_t new_addr) {
  const auto& c = as_.config_;
  // do_mremap looks the VMA up first (since 5.16): no VMA at addr is EFAULT
  // whatever the lengths, before anything is unmapped.
  const Vma* v = VmaLookupLocked(addr);
  if (!v) return Err(Errc::kFault, "mremap: nothing mapped at old address");
  uint64_t align = kPageSize;
  if (v->is_hugetlb()) {
    // Lengths in whole 2 MiB pages; no growth, no DONTUNMAP (hugetlb.cc).
    USVM_TRY(AlignHugetlbMremapLocked(addr, new_addr, flags, &olen, &nlen));
    align = kHugePageSize;
  }
  USVM_TRY(CheckRemapLocked(*v, addr, olen, nlen, flags));
  if (flags & (kMremapFixed | kMremapDontUnmap))
    return RemapToLocked(addr, olen, nlen, flags, new_addr, align);
  // mremap_at.
  if (olen == nlen) return addr;
  if (olen > nlen) {
    // Shrink: a munmap of the tail, which may cross VMA ends.
    USVM_TRY(CheckMunmapRange(addr + nlen, olen - nlen));
    USVM_TRY(CheckHugetlbSplitLocked(addr + nlen, addr + olen));
    UnmapLocked(addr + nlen, addr + olen);
    return addr;
  }
  // Grow in place if the range ends the VMA and the room after it is free.
  if (v->end - addr == olen && nlen <= c.task_size - addr &&
      RangeFreeLocked(addr + olen, addr + nlen)) {
    vmas_.at(v->start).end = addr + nlen;
    MergeAroundLocked(v->start);
    return addr;
  }
  if (!(flags & kMremapMayMove)) return Err(Errc::kNoMem, "mremap: cannot grow in place and may not move");
  const uint64_t target = USVM_TRY(GetUnmappedAreaLocked(nlen, align));
  return MoveVmaLocked(addr, olen, target, nlen, /*dontunmap=*/false);
}

Result<uint64_t> AddressSpace::Impl::RemapMoveLocked(uint64_t start, uint64_t len, uint32_t flags,
                                                     uint64_t new_addr) {
  // remap_move (Linux 6.17+): a FIXED move with old_len == new_len moves
  // every VMA in [start, start + len) to the same offset from new_addr.
  // Gaps between VMAs stay gaps (the target's mappings there survive), a
  // hole at the end is ignored, a hole at the start (or no VMA) is EFAULT.
  const uint64_t end = start + len;
  if (end < start) return Err(Errc::kFault, "mremap: old range wraps");
  uint64_t cursor = start;
  uint64_t first = 0;
  bool seen = false;
  while (cursor < end) {
    const Vma* v = FindVmaLocked(cursor);
    if (!v || v->start >= end) break;
    if (!seen && v->start > start) return Err(Errc::kFault, "mremap: nothing mapped at old address");
    const uint64_t a = std::max(v->start, cursor);
    const uint64_t n = std::min(end, v->end) - a;
    const uint64_t res = USVM_TRY(RemapOneLocked(a, n, n, flags, new_addr + (a - start)));
    if (!seen) first = res;
    seen = true;
    cursor = a + n;
  }
  if (!seen) return Err(Errc::kFault, "mremap: nothing mapped at old address");
  return first;
}

Result<uint64_t> AddressSpace::Impl::Mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len,
                                            uint32_t flags, uint64_t new_addr) {
  const auto& c = as_.config_;
  // do_mremap / check_mremap_params (Linux 6.18), in its order. Lengths are
  // page aligned first; one within a page of 2^64 wraps to 0.
  const uint64_t olen = PageAlignUp(old_len);
  const uint64_t nlen = PageAlignUp(new_len);
  if (flags & ~(kMremapMayMove | kMremapFixed | kMremapDontUnmap))
    return Err(Errc::kInval, "mremap: unknown flags");
  if (!IsPageAligned(old_addr)) return Err(Errc::kInval, "mremap: old address not page aligned");
  if (nlen == 0) return Err(Errc::kInval, "mremap: zero new length");
  if (nlen > c.task_size) return Err(Errc::kInval, "mremap: new length beyond user space");
  const bool may_move = flags & kMremapMayMove;
  const bool fixed = flags & kMremapFixed;
  const bool dontunmap = flags & kMremapDontUnmap;
  if (fixed || dontunmap) {
    if (new_addr > c.task_size - nlen) return Err(Errc::kInval, "mremap: new range outside user space");
    if (!IsPageAligned(new_addr)) return Err(Errc::kInval, "mremap: new address not page aligned");
    if (!may_move) return Err(Errc::kInval, "mremap: FIXED/DONTUNMAP without MREMAP_MAYMOVE");
    if (dontunmap && olen != nlen)
      return Err(Errc::kInval, "mremap: MREMAP_DONTUNMAP cannot resize");
    if (old_addr + olen > new_addr && new_addr + nlen > old_addr)
      return Err(Errc::kInval, "mremap: old and new ranges overlap");
  }

  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  if (fixed && olen == nlen) return RemapMoveLocked(old_addr, olen, flags, new_addr);
  return RemapOneLocked(old_addr, olen, nlen, flags, new_addr);
}

// ===== fork ==================================================================

Result<void> AddressSpace::Impl::ForkInto(Impl& child) {
  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  WriteLock lc(child.mmap_lock_);  // nobody can see the child yet
  uint64_t copied = 0;
  bool oom = false;
  for (const auto& kv : vmas_) {
    const Vma& v = kv.second;
    child.vmas_.emplace(kv.first, v).first->second.hugetlb_resv_owner = false;  // a child owns none
    // Shared mappings refault from the page cache in the child.
    if (v.shared()) continue;
    NotifyStart(v.start, v.end, NotifyEvent::kProtectionPage);
    pt_.ForEachSlot(v.start, v.end, [&](uint64_t base, PmdSlot& slot) {
      const uint64_t s = std::max(v.start, base), e = std::min(v.end, base + kHugePageSize);
      PmdSlot* cs = child.pt_.Ensure(base);
      slot.lock.Lock();
      cs->lock.Lock();
      uint64_t h = slot.huge.load(std::memory_order_relaxed);
      if (HugetlbEntryPinned(h)) {
        // A pinned hugetlb page is copied whole for the child.
        auto copy = HugetlbCopyForFork(h);
        if (copy) {
          cs->huge.store(*copy, std::memory_order_relaxed);
          copied += kPagesPerHuge;
        } else {
          oom = true;
        }
        h = 0;  // done
      } else if (h != 0 && pte::HoldsFrame(h) && !(h & pte::kHugetlb)) {
        // A pinned page under a THP entry must be copied, not shared
        // (copy_huge_pmd gives up on a maybe-pinned folio, splits the PMD
        // and copies at the PTE level): split it here and let the 4 KiB
        // pass below copy exactly the pinned pages. The PROTECTION_PAGE
        // bracket around this VMA covers the split.
        bool pinned = false;
        for (uint64_t i = 0; i < kPagesPerHuge && !pinned; ++i)
          pinned = pool_.PinCount(pte::PfnOf(h) + i) > 0;
        if (pinned) {
          pt_.InstallTableLocked(slot);
          counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
          h = 0;
        }
      }
      if (h != 0) {
        // Shared read-only by both: a THP or hugetlb page, or a 2 MiB
        // device page (private or coherent), each of its 512 pages
        // referenced once more.
        const uint64_t wp = h & ~pte::kWrite;
        if (pte::HoldsFrame(h))
          for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Get(pte::PfnOf(h) + i);
        if (pte::HoldsDevicePage(h)) {
          DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(h));
          for (uint64_t i = 0; i < kPagesPerHuge; ++i) pm->Get(pm->IndexOf(pte::PfnOf(h)) + i);
        }
        slot.huge.store(wp, std::memory_order_relaxed);
        cs->huge.store(wp, std::memory_order_relaxed);
        child.RmapAddHuge(wp, base);
        copied += kPagesPerHuge;
      }
      if (slot.table) {
        if (!cs->table) child.pt_.InstallTableLocked(*cs);
        for (uint64_t a = s; a < e; a += kPageSize) {
          auto& ent = slot.table->e[PageTable::PteIndex(a)];
          uint64_t old = ent.load(std::memory_order_relaxed);
          if (pte::IsExclusive(old)) {
            // Fork revokes device exclusivity: the entry is made present
            // again (the PROTECTION_PAGE bracket covers it), then copied.
            old = pte::Make(pte::kPresent, pte::PfnOf(old), old & pte::kFlagsMask & ~pte::kKindMask);
            ent.store(old, std::memory_order_relaxed);
          }
          if (pte::HoldsFrame(old) && !(old & pte::kFile) && pool_.PinCount(pte::PfnOf(old)) > 0) {
            // A pinned page is copied for the child now, never shared, so
            // the pin keeps seeing the parent's writes (page_needs_cow_for_dma).
            auto copy = pool_.AllocPage(FramePool::Zero::kNo);
            if (!copy) {
              oom = true;
              continue;
            }
            std::memcpy(pool_.Data(*copy), pool_.Data(pte::PfnOf(old)), kPageSize);
            cs->table->e[PageTable::PteIndex(a)].store(
                pte::Make(pte::kPresent, *copy, (old & pte::kFlagsMask & ~pte::kKindMask) | pte::kDirty),
                std::memory_order_relaxed);
            ++copied;
            continue;
          }
          if (pte::HoldsDevicePage(old)) {
            // Shared read-only by both, like a COW page (copy_nonpresent_pte
            // for device-private entries; coherent pages are plain pages).
            // A migration entry of a device page (device-frame migration
            // runs without the mmap lock) is copied the same way: its
            // migrator remaps the child's copy too, found by the rmap.
            DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(old));
            pm->Get(pm->IndexOf(pte::PfnOf(old)));
          } else if (!pte::IsPresent(old)) {
            continue;  // system-page migration entries cannot exist: fork holds the write lock
          }
          if (pte::HoldsFrame(old)) pool_.Get(pte::PfnOf(old));
          const uint64_t wp = old & ~pte::kWrite;
          ent.store(wp, std::memory_order_relaxed);
          cs->table->e[PageTable::PteIndex(a)].store(wp, std::memory_order_relaxed);
          child.RmapAdd(wp, a);
          ++copied;
        }
      }
      cs->lock.Unlock();
      slot.lock.Unlock();
    });
    NotifyEnd(v.start, v.end, NotifyEvent::kProtectionPage);
  }
  child.counters.rss_pages.store(copied, std::memory_order_relaxed);
  child.free_area_cache_ = free_area_cache_;
  child.cached_hole_size_ = cached_hole_size_;
  if (oom) return Err(Errc::kNoMem, "fork: cannot copy a pinned page");  // the caller drops the child
  HugetlbNoteForkLocked(child);
  return {};
}

// ===== exit ==================================================================

void AddressSpace::Impl::Exit() {
  if (exiting_.exchange(true)) return;
  // exit_mmap: release first (mirrors stop using the space), then unmap.
  as_.notifiers_->Release();
  WriteLock l(mmap_lock_);
  if (!vmas_.empty()) UnmapLocked(vmas_.begin()->second.start, std::prev(vmas_.end())->second.end);
  dead_ = true;
}

// ===== queries ===============================================================

std::optional<VmaInfo> AddressSpace::Impl::FindVmaInfo(uint64_t addr) const {
  ReadLock l(mmap_lock_);
  const Vma* v = FindVmaLocked(addr);
  if (!v) return std::nullopt;
  return v->Info();
}

std::vector<VmaInfo> AddressSpace::Impl::AllVmas() const {
  ReadLock l(mmap_lock_);
  std::vector<VmaInfo> out;
  out.reserve(vmas_.size());
  for (const auto& [s, v] : vmas_) out.push_back(v.Info());
  return out;
}

size_t AddressSpace::Impl::VmaCount() const {
  ReadLock l(mmap_lock_);
  return vmas_.size();
}

PteInfo AddressSpace::Impl::QueryPte(uint64_t addr) const {
  PteInfo info;
  ReadLock l(mmap_lock_);
  PmdSlot* slot = pt_.Lookup(addr);
  if (!slot) return info;
  ReadLock sl(slot->lock);
  uint64_t e = slot->huge.load(std::memory_order_relaxed);
  Pfn pfn = kInvalidPfn;
  if (e != 0) {
    info.huge = true;
    e = pte::SubEntry(e, addr);
    pfn = pte::PfnOf(e);
  } else if (slot->table) {
    e = slot->table->e[PageTable::PteIndex(addr)].load(std::memory_order_relaxed);
    pfn = pte::PfnOf(e);
  }
  switch (pte::KindOf(e)) {
    case pte::kNone: return info;
    case pte::kPresent: info.kind = PteInfo::Kind::kPresent; break;
    case pte::kMigration: info.kind = PteInfo::Kind::kMigration; break;
    case pte::kDevicePrivate: info.kind = PteInfo::Kind::kDevicePrivate; break;
    case pte::kDeviceExclusive: info.kind = PteInfo::Kind::kDeviceExclusive; break;
  }
  info.pfn = pfn;
  info.readable = e & pte::kRead;
  info.writable = e & pte::kWrite;
  info.dirty = e & pte::kDirty;
  info.accessed = e & pte::kAccessed;
  info.zero_page = e & pte::kZero;
  info.file = e & pte::kFile;
  info.lazy_free = e & pte::kLazyFree;
  info.hugetlb = e & pte::kHugetlb;
  info.device_memory = pte::HoldsDevicePage(e);
  return info;
}

}  // namespace usvm::mm

// ===== the Mm port (mm.h) ===================================================

namespace usvm::mm {

Result<void> AddressSpace::InsertIntervalNotifier(MmuIntervalNotifier* sub, uint64_t start,
                                                  uint64_t length, MmuIntervalNotifierOps* ops) {
  return notifiers_->Insert(sub, start, length, ops);
}

Result<void> AddressSpace::MigrateDevicePfns(DevicePagemap& pgmap, const DevicePfn* pfns,
                                             uint64_t n, uint64_t* src, uint64_t* dst) {
  return mm::MigrateDevicePfns(pgmap, pfns, n, src, dst);
}

void AddressSpace::MigrateDevicePages(DevicePagemap& pgmap, uint64_t* src, const uint64_t* dst,
                                      uint64_t n) {
  mm::MigrateDevicePages(pgmap, src, dst, n);
}

void AddressSpace::MigrateDeviceFinalize(DevicePagemap& pgmap, const uint64_t* src,
                                         const uint64_t* dst, uint64_t n) {
  mm::MigrateDeviceFinalize(pgmap, &pool_, src, dst, n);
}

Result<Pfn> AddressSpace::AllocSystemPage() { return pool_.AllocPage(FramePool::Zero::kNo); }

Result<Pfn> AddressSpace::AllocSystemHugePage() { return pool_.AllocHuge(FramePool::Zero::kNo); }

void AddressSpace::PutSystemPage(Pfn pfn) { pool_.Put(pfn); }

std::byte* AddressSpace::SystemPageData(Pfn pfn) const { return pool_.Data(pfn); }

}  // namespace usvm::mm
