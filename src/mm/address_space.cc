// AddressSpace layout operations: mmap, munmap, mprotect, madvise, mremap,
// fork, exit. Faults and CPU accesses are in fault.cc.
#include <algorithm>
#include <cassert>
#include <cstring>

#include "address_space_impl.h"

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
  s.thp_splits = c.thp_splits.load(std::memory_order_relaxed);
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

Result<uint64_t> AddressSpace::Impl::GetUnmappedAreaLocked(uint64_t len) {
  const auto& c = as_.config_;
  if (len > c.task_size - c.min_addr) return Err(Errc::kNoMem, "no free address range large enough");
  // Top-down from the cached hole (the pre-maple-tree free_area_cache), then
  // once more from the top of user space.
  for (uint64_t limit : {std::min(free_area_cache_, c.task_size), c.task_size}) {
    uint64_t hi = limit;
    while (hi >= c.min_addr + len) {
      auto it = vmas_.lower_bound(hi);
      if (it == vmas_.begin()) {
        free_area_cache_ = hi - len;
        return hi - len;
      }
      const Vma& prev = std::prev(it)->second;
      if (prev.end > hi) {  // hi lies inside prev
        hi = prev.start;
        continue;
      }
      const uint64_t lo = std::max(c.min_addr, prev.end);
      if (hi - lo >= len) {
        free_area_cache_ = hi - len;
        return hi - len;
      }
      hi = prev.start;
    }
  }
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
  // File-backed: the file offsets must continue. Anonymous: always.
  return !a.file || a.PgoffOf(a.end) == b.pgoff;
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
        if (pte::HoldsFrame(h))
          for (uint64_t i = 0; i < kPagesPerHuge; ++i) dropped.frames.push_back(pte::PfnOf(h) + i);
        if (pte::IsPresent(h)) unmapped += kPagesPerHuge;
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
  for (uint64_t dpfn : d.device) {
    DevicePagemap* pm = DevicePagemap::Lookup(dpfn);
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
  for (auto it = vmas_.lower_bound(ns); it != vmas_.end() && it->first < ne;) it = vmas_.erase(it);
  NotifyEnd(ns, ne, NotifyEvent::kUnmap);
  pt_.FreeEmpty(ns, ne);
  // Let the next top-down search find this hole first.
  if (ne > free_area_cache_) free_area_cache_ = std::min(ne, as_.config_.mmap_base);
}

// ===== mmap / munmap ========================================================

Result<uint64_t> AddressSpace::Impl::Mmap(uint64_t addr, uint64_t len, uint32_t prot,
                                          uint32_t flags, std::shared_ptr<SimFile> file,
                                          uint64_t offset) {
  const auto& c = as_.config_;
  constexpr uint32_t kKnown =
      kMapShared | kMapPrivate | kMapFixed | kMapAnonymous | kMapPopulate | kMapFixedNoReplace;
  if (len == 0) return Err(Errc::kInval, "mmap: length is zero");
  if (prot & ~kProtAll) return Err(Errc::kInval, "mmap: unknown prot bits");
  if (flags & ~kKnown) return Err(Errc::kInval, "mmap: unknown flags");
  const bool shared = flags & kMapShared;
  if (shared == bool(flags & kMapPrivate))
    return Err(Errc::kInval, "mmap: need exactly one of MAP_SHARED and MAP_PRIVATE");
  const bool anon = flags & kMapAnonymous;
  if (anon && file) return Err(Errc::kInval, "mmap: MAP_ANONYMOUS with a file");
  if (!anon && !file) return Err(Errc::kInval, "mmap: file mapping without a file");
  if (!IsPageAligned(offset)) return Err(Errc::kInval, "mmap: offset not page aligned");
  const uint64_t alen = PageAlignUp(len);
  if (alen < len || alen == 0 || alen > c.task_size - c.min_addr)
    return Err(Errc::kNoMem, "mmap: length too large");
  if (!anon && offset + alen < offset) return Err(Errc::kInval, "mmap: file offset overflow");
  const bool fixed = flags & (kMapFixed | kMapFixedNoReplace);
  if (fixed) {
    if (!IsPageAligned(addr)) return Err(Errc::kInval, "mmap: fixed address not page aligned");
    if (addr > c.task_size - alen) return Err(Errc::kNoMem, "mmap: fixed range beyond user space");
    if (addr < c.min_addr) return Err(Errc::kPerm, "mmap: fixed address below mmap_min_addr");
  }
  if (anon && shared) {
    // Shared anonymous memory is a shmem object of the mapping's size.
    file = USVM_TRY(SimFile::TryCreate(pool_, alen, "shmem", /*shmem=*/true));
    offset = 0;
  }
  uint64_t start = 0;
  {
    WriteLock l(mmap_lock_);
    USVM_TRY(CheckAliveLocked());
    if (fixed) {
      if (flags & kMapFixedNoReplace) {
        if (!RangeFreeLocked(addr, addr + alen))
          return Err(Errc::kExist, "mmap: MAP_FIXED_NOREPLACE over an existing mapping");
      } else {
        UnmapLocked(addr, addr + alen);
      }
      start = addr;
    } else {
      if (addr != 0) {
        const uint64_t hint = PageAlignUp(addr);
        if (hint >= addr && hint >= c.min_addr && hint <= c.task_size - alen &&
            RangeFreeLocked(hint, hint + alen))
          start = hint;
      }
      if (start == 0) start = USVM_TRY(GetUnmappedAreaLocked(alen));
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
  // Linux's order: alignment, zero length (success), overflow, then prot.
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "mprotect: address not page aligned");
  if (len == 0) return {};
  const uint64_t alen = PageAlignUp(len);
  const uint64_t end = addr + alen;
  if (alen < len || end < addr) return Err(Errc::kNoMem, "mprotect: range overflows");
  if (prot & ~kProtAll) return Err(Errc::kInval, "mprotect: unknown prot bits");
  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  // Like Linux: VMAs are changed in order until a hole is met (ENOMEM).
  uint64_t a = addr;
  while (a < end) {
    const Vma* v = FindVmaLocked(a);
    if (!v || v->start > a) return Err(Errc::kNoMem, "mprotect: range not fully mapped");
    const uint64_t e = std::min(end, v->end);
    if (v->prot != prot) {
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
      break;
    default:
      return Err(Errc::kInval, "madvise: unknown advice");
  }
  const uint64_t alen = PageAlignUp(len);
  const uint64_t end = addr + alen;
  if (alen < len || end < addr) return Err(Errc::kInval, "madvise: range overflows");
  if (alen == 0) return {};

  bool hole = false;
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

Result<uint64_t> AddressSpace::Impl::Mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len,
                                            uint32_t flags, uint64_t new_addr) {
  const auto& c = as_.config_;
  if (flags & ~(kMremapMayMove | kMremapFixed | kMremapDontUnmap))
    return Err(Errc::kInval, "mremap: unknown flags");
  const bool may_move = flags & kMremapMayMove;
  const bool fixed = flags & kMremapFixed;
  const bool dontunmap = flags & kMremapDontUnmap;
  if (fixed && !may_move) return Err(Errc::kInval, "mremap: MREMAP_FIXED without MREMAP_MAYMOVE");
  if (dontunmap && (!may_move || old_len != new_len))
    return Err(Errc::kInval, "mremap: MREMAP_DONTUNMAP needs MAYMOVE and equal lengths");
  if (!IsPageAligned(old_addr)) return Err(Errc::kInval, "mremap: old address not page aligned");
  const uint64_t olen = PageAlignUp(old_len);
  const uint64_t nlen = PageAlignUp(new_len);
  if (olen < old_len || nlen < new_len || nlen == 0 || old_addr + olen < old_addr)
    return Err(Errc::kInval, "mremap: bad length");
  if (fixed) {
    if (nlen > c.task_size - c.min_addr) return Err(Errc::kInval, "mremap: new length too large");
    if (!IsPageAligned(new_addr)) return Err(Errc::kInval, "mremap: new address not page aligned");
    if (new_addr > c.task_size - nlen) return Err(Errc::kInval, "mremap: new range outside user space");
    if (new_addr < c.min_addr) return Err(Errc::kPerm, "mremap: new address below mmap_min_addr");
    if (new_addr < old_addr + olen && old_addr < new_addr + nlen)
      return Err(Errc::kInval, "mremap: old and new ranges overlap");
  }

  WriteLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  if (!fixed && !dontunmap && olen >= nlen && olen != 0) {
    // Shrinking is a munmap of the tail, whatever is mapped (as in Linux,
    // which does not look the VMA up for it).
    if (olen > nlen) UnmapLocked(old_addr + nlen, std::min(old_addr + olen, c.task_size));
    return old_addr;
  }
  // Validate the source before changing anything (Linux unmaps a fixed
  // target first; we report the error with nothing changed).
  {
    const Vma* v = FindVmaLocked(old_addr);
    if (!v || v->start > old_addr) return Err(Errc::kFault, "mremap: nothing mapped at old address");
    if (olen == 0 && !v->shared())
      return Err(Errc::kInval, "mremap: zero old length on a private mapping");
    if (olen > v->end - old_addr) return Err(Errc::kFault, "mremap: old range spans several mappings");
  }

  if (!fixed && !dontunmap) {
    // Grow in place if the VMA ends with the range and the room is free.
    const Vma* v = FindVmaLocked(old_addr);
    if (olen != 0 && v->end == old_addr + olen && nlen <= c.task_size - old_addr &&
        RangeFreeLocked(old_addr + olen, old_addr + nlen)) {
      vmas_.at(v->start).end = old_addr + nlen;
      MergeAroundLocked(v->start);
      return old_addr;
    }
    if (!may_move) return Err(Errc::kNoMem, "mremap: cannot grow in place and may not move");
  }

  uint64_t target;
  uint64_t move_len = olen;
  if (fixed) {
    UnmapLocked(new_addr, new_addr + nlen);
    if (olen > nlen) {
      UnmapLocked(old_addr + nlen, old_addr + olen);
      move_len = nlen;
    }
    target = new_addr;
  } else {
    target = USVM_TRY(GetUnmappedAreaLocked(nlen));
  }
  move_len = std::min(move_len, nlen);

  SplitVmaLocked(old_addr);
  if (olen != 0) SplitVmaLocked(old_addr + move_len);
  Vma dst = vmas_.at(FindVmaLocked(old_addr)->start);
  const uint64_t src_pgoff = dst.PgoffOf(old_addr);
  dst.start = target;
  dst.end = target + nlen;
  dst.pgoff = src_pgoff;
  vmas_.emplace(target, std::move(dst));
  if (move_len != 0) {
    NotifyStart(old_addr, old_addr + move_len, NotifyEvent::kUnmap);
    MovePageTablesLocked(old_addr, target, move_len);
    NotifyEnd(old_addr, old_addr + move_len, NotifyEvent::kUnmap);
    if (!dontunmap) {
      UnmapLocked(old_addr, old_addr + move_len);
    } else {
      pt_.FreeEmpty(old_addr, old_addr + move_len);
      // The emptied source stays mapped; undo the splits made above.
      MergeAroundLocked(FindVmaLocked(old_addr)->start);
    }
  }
  MergeAroundLocked(target);
  return target;
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
    child.vmas_.emplace(kv.first, v);
    // Shared mappings refault from the page cache in the child.
    if (v.shared()) continue;
    NotifyStart(v.start, v.end, NotifyEvent::kProtectionPage);
    pt_.ForEachSlot(v.start, v.end, [&](uint64_t base, PmdSlot& slot) {
      const uint64_t s = std::max(v.start, base), e = std::min(v.end, base + kHugePageSize);
      PmdSlot* cs = child.pt_.Ensure(base);
      slot.lock.Lock();
      cs->lock.Lock();
      const uint64_t h = slot.huge.load(std::memory_order_relaxed);
      if (h != 0 && pte::IsPresent(h)) {
        const uint64_t wp = h & ~pte::kWrite;
        if (pte::HoldsFrame(h))
          for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Get(pte::PfnOf(h) + i);
        slot.huge.store(wp, std::memory_order_relaxed);
        cs->huge.store(wp, std::memory_order_relaxed);
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
  if (oom) return Err(Errc::kNoMem, "fork: cannot copy a pinned page");  // the caller drops the child
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
    pfn = pte::PfnOf(e) + (pte::HoldsFrame(e) ? ((addr >> kPageShift) & 511) : 0);
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
  info.device_memory = pte::HoldsDevicePage(e);
  return info;
}

}  // namespace usvm::mm
