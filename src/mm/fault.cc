// The CPU side of AddressSpace: the page fault handler and the access
// paths (Read, Write, atomics, Populate), plus lazy-free reclaim.
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstring>
#include <thread>

#include "address_space_impl.h"

namespace usvm::mm {

// The device page whose CPU fault this thread is handling (locked and
// referenced by DeviceFaultLocked around MigrateToRam), or 0.
thread_local DevicePfn tls_fault_page = 0;

namespace {
// A fault that keeps failing to make progress (a bug, or a livelock with a
// concurrent zap) reports EIO rather than hanging the caller.
constexpr int kMaxFaultRetries = 1000;
constexpr std::chrono::seconds kFaultGiveUp{10};

// After kMaxFaultRetries fruitless attempts at one page (it keeps changing
// under us: a device migrating it back and forth), wait a little before each
// new one. The kernel retries for ever; we give up (false) only after
// kFaultGiveUp of wall time, so load alone never fails an access.
bool BackOff(int tries, std::chrono::steady_clock::time_point& give_up_at) {
  const auto now = std::chrono::steady_clock::now();
  if (tries == kMaxFaultRetries) give_up_at = now + kFaultGiveUp;
  else if (now > give_up_at) return false;
  std::this_thread::sleep_for(std::chrono::microseconds(20));
  return true;
}
}  // namespace

// ---- fault handler -----------------------------------------------------------

Result<void> AddressSpace::Impl::FaultHugeLocked(const Vma& vma, uint64_t addr, AccessKind kind,
                                                 PmdSlot& slot, bool* handled) {
  *handled = false;
  {
    ReadLock l(slot.lock);
    if (slot.huge.load(std::memory_order_relaxed) != 0 || slot.table) return {};
  }
  auto huge = pool_.AllocHuge(FramePool::Zero::kYes);
  if (!huge) return {};  // fall back to 4 KiB pages, as the kernel does
  const Pfn base = *huge;
  slot.lock.Lock();
  if (slot.huge.load(std::memory_order_relaxed) != 0 || slot.table) {
    slot.lock.Unlock();
    for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool_.Put(base + i);
    return {};
  }
  uint64_t flags = ReadBit(vma.prot) | pte::kAccessed;
  if (vma.prot & kProtWrite) flags |= pte::kWrite;
  if (kind == AccessKind::kWrite) flags |= pte::kDirty;
  slot.huge.store(pte::Make(pte::kPresent, base, flags), std::memory_order_relaxed);
  slot.lock.Unlock();
  counters.huge_faults.fetch_add(1, std::memory_order_relaxed);
  counters.rss_pages.fetch_add(kPagesPerHuge, std::memory_order_relaxed);
  *handled = true;
  return {};
}

// A write to a present read-only entry of a writable private mapping whose
// frame is shared (fork, zero page, page cache): copy it (wp_page_copy).
// With `unshare` (a read-only long-term pin, FAULT_FLAG_UNSHARE) the copy
// is the process's own anonymous page but keeps the entry read-only, as
// the kernel maps an unshared copy with the VMA's page protection; a later
// write reuses it (the process is its only user). Returns with the entry
// replaced, or unchanged if it changed under us (the caller retries).
Result<void> AddressSpace::Impl::WriteProtectFaultLocked(const Vma& vma, uint64_t addr,
                                                         PmdSlot& slot, bool unshare) {
  const uint64_t page = PageAlignDown(addr);
  uint64_t old;
  {
    ReadLock l(slot.lock);
    old = slot.table->e[PageTable::PteIndex(page)].load(std::memory_order_relaxed);
  }
  // The entry was looked at with the lock dropped since: if it is no longer
  // a read-only present page (migrated, zapped, made writable), let the
  // caller look again rather than copy from whatever it names now.
  if (!pte::IsPresent(old) || (old & pte::kWrite)) return {};
  const Pfn copy = USVM_TRY(pool_.AllocPage(FramePool::Zero::kNo));
  NotifyStart(page, page + kPageSize, NotifyEvent::kClear);
  slot.lock.Lock();
  auto& ent = slot.table->e[PageTable::PteIndex(page)];
  const bool same = ent.load(std::memory_order_relaxed) == old;
  if (same) {
    if (old & pte::kZero)
      std::memset(pool_.Data(copy), 0, kPageSize);
    else
      std::memcpy(pool_.Data(copy), EntryData(old), kPageSize);
    // The copy is dirty either way: it is a new anonymous page, not a clean
    // lazy-free one reclaim could drop.
    ent.store(pte::Make(pte::kPresent, copy,
                        ReadBit(vma.prot) | (unshare ? 0 : pte::kWrite) | pte::kDirty |
                            pte::kAccessed),
              std::memory_order_relaxed);
    RmapRemove(old, page);  // a coherent device page's mapping goes
  }
  slot.lock.Unlock();
  NotifyEnd(page, page + kPageSize, NotifyEvent::kClear);
  if (!same) {
    pool_.Put(copy);
    return {};
  }
  Dropped dropped;
  dropped.Add(old);
  Drop(dropped);
  (unshare ? counters.cow_unshares : counters.cow_breaks).fetch_add(1, std::memory_order_relaxed);
  return {};
}

Result<void> AddressSpace::Impl::HandleFaultLocked(uint64_t addr, AccessKind kind) {
  const Vma* vma = FindVmaLocked(addr);
  if (!vma || vma->start > addr) return Err(Errc::kFault, "SIGSEGV: no mapping at address");
  if (vma->prot == kProtNone) return Err(Errc::kFault, "SIGSEGV: PROT_NONE mapping");
  const bool write = kind == AccessKind::kWrite;
  if (write && !(vma->prot & kProtWrite))
    return Err(Errc::kFault, "SIGSEGV: write to a read-only mapping");
  counters.faults.fetch_add(1, std::memory_order_relaxed);
  if (vma->is_hugetlb()) return HugetlbFaultLocked(*vma, addr, kind);

  PmdSlot* slot = pt_.Ensure(addr);
  const uint64_t hbase = addr & kHugeMask;
  if (as_.config_.thp && vma->private_anon() && (vma->flags & kVmaHugePage) &&
      !(vma->flags & kVmaNoHugePage) && hbase >= vma->start && hbase + kHugePageSize <= vma->end) {
    bool handled;
    USVM_TRY(FaultHugeLocked(*vma, addr, kind, *slot, &handled));
    if (handled) return {};
  }

  const uint64_t read = ReadBit(vma->prot);
  const unsigned idx = PageTable::PteIndex(addr);
  std::chrono::steady_clock::time_point give_up_at{};
  for (int tries = 0;; ++tries) {
    if (tries >= kMaxFaultRetries && !BackOff(tries, give_up_at)) break;
    slot->lock.Lock();
    const uint64_t h = slot->huge.load(std::memory_order_relaxed);
    if (h != 0 && pte::KindOf(h) == pte::kMigration) {
      // A 2 MiB page under migration: wait for it, as for 4 KiB.
      slot->lock.Unlock();
      WaitMigrationLocked(addr, pte::SubEntry(h, addr));
      continue;
    }
    if (h != 0 && pte::KindOf(h) == pte::kDevicePrivate) {
      // A 2 MiB device-private page: its owner brings it home (all of it,
      // or the faulting part after splitting the entry).
      slot->lock.Unlock();
      USVM_TRY(DeviceFaultLocked(addr, pte::SubEntry(h, addr)));
      continue;
    }
    if (h != 0 && (h & pte::kDevice) && write && !(h & pte::kWrite)) {
      // A write to a shared read-only 2 MiB coherent device page: handle it
      // per 4 KiB page (the copy-on-write path below).
      slot->lock.Unlock();
      SplitHugeLocked(hbase);
      continue;
    }
    if (h != 0) {
      if (!write || (h & pte::kWrite)) {
        // Resolved by someone else, or only the read bit was stale.
        slot->huge.store(h | read, std::memory_order_relaxed);
        slot->lock.Unlock();
        return {};
      }
      // Write to a read-only huge entry: reuse it if we own every frame,
      // else split and copy 4 KiB (do_huge_pmd_wp_page's fallback).
      bool exclusive = pte::HoldsFrame(h);
      for (uint64_t i = 0; i < kPagesPerHuge && exclusive; ++i)
        exclusive = pool_.RefCount(pte::PfnOf(h) + i) == 1;
      if (exclusive) {
        slot->huge.store(h | pte::kWrite | pte::kDirty | pte::kAccessed, std::memory_order_relaxed);
        slot->lock.Unlock();
        counters.cow_reuses.fetch_add(1, std::memory_order_relaxed);
        return {};
      }
      slot->lock.Unlock();
      SplitHugeLocked(hbase);
      continue;
    }
    if (!slot->table) pt_.InstallTableLocked(*slot);
    auto& ent = slot->table->e[idx];
    const uint64_t e = ent.load(std::memory_order_relaxed);

    if (e == 0) {
      if (vma->private_anon() && !write) {
        ent.store(pte::Make(pte::kPresent, FramePool::kZeroPfn, read | pte::kZero | pte::kAccessed),
                  std::memory_order_relaxed);
        slot->lock.Unlock();
        counters.zero_maps.fetch_add(1, std::memory_order_relaxed);
        counters.rss_pages.fetch_add(1, std::memory_order_relaxed);
        return {};
      }
      slot->lock.Unlock();
      // Allocate without the page table lock, then install if still empty.
      Pfn pfn;
      uint64_t flags = read | pte::kAccessed;
      if (vma->private_anon()) {
        pfn = USVM_TRY(pool_.AllocPage(FramePool::Zero::kYes));
        flags |= pte::kWrite | pte::kDirty;
        counters.anon_allocs.fetch_add(1, std::memory_order_relaxed);
      } else {
        const Pfn cached = USVM_TRY(vma->file->GetPage(vma->PgoffOf(addr)));
        if (vma->shared()) {
          pfn = cached;
          flags |= pte::kFile;
          if (vma->prot & kProtWrite) flags |= pte::kWrite;
          if (write) flags |= pte::kDirty;
        } else if (write) {
          // Private file mapping written first: copy now (do_cow_fault).
          auto copy = pool_.AllocPage(FramePool::Zero::kNo);
          if (!copy) {
            pool_.Put(cached);
            return Err(copy.error());
          }
          pfn = *copy;
          std::memcpy(pool_.Data(pfn), pool_.Data(cached), kPageSize);
          pool_.Put(cached);
          flags |= pte::kWrite | pte::kDirty;
        } else {
          pfn = cached;
          flags |= pte::kFile;
        }
      }
      slot->lock.Lock();
      if (ent.load(std::memory_order_relaxed) != 0) {
        slot->lock.Unlock();
        pool_.Put(pfn);
        continue;
      }
      ent.store(pte::Make(pte::kPresent, pfn, flags), std::memory_order_relaxed);
      slot->lock.Unlock();
      counters.rss_pages.fetch_add(1, std::memory_order_relaxed);
      return {};
    }

    if (pte::KindOf(e) == pte::kMigration) {
      slot->lock.Unlock();
      WaitMigrationLocked(addr, e);
      continue;
    }
    if (pte::KindOf(e) == pte::kDevicePrivate) {
      slot->lock.Unlock();
      USVM_TRY(DeviceFaultLocked(addr, e));
      continue;
    }
    if (pte::IsExclusive(e)) {
      slot->lock.Unlock();
      RestoreExclusiveLocked(addr, e);
      continue;
    }
    if (!pte::IsPresent(e)) {
      slot->lock.Unlock();
      return Err(Errc::kFault, "fault on an unknown entry kind");
    }
    if (!write || (e & pte::kWrite)) {
      ent.store(e | read, std::memory_order_relaxed);
      slot->lock.Unlock();
      return {};
    }
    // Write to a present read-only entry of a writable mapping.
    if (vma->shared()) {
      ent.store(e | pte::kWrite | pte::kDirty | pte::kAccessed, std::memory_order_relaxed);
      slot->lock.Unlock();
      return {};
    }
    const bool sole_user =
        (e & pte::kDevice) ? DeviceRefCount(pte::PfnOf(e)) == 1
                           : pool_.RefCount(pte::PfnOf(e)) - pool_.PinCount(pte::PfnOf(e)) == 1;
    if (!(e & (pte::kZero | pte::kFile)) && sole_user) {
      // The last user of an anonymous page keeps it (wp_page_reuse).
      ent.store(e | pte::kWrite | pte::kDirty | pte::kAccessed, std::memory_order_relaxed);
      slot->lock.Unlock();
      counters.cow_reuses.fetch_add(1, std::memory_order_relaxed);
      return {};
    }
    slot->lock.Unlock();
    USVM_TRY(WriteProtectFaultLocked(*vma, addr, *slot));
    // Loop: the entry is now writable, or changed and is looked at again.
  }
  return Err(Errc::kIo, "page fault made no progress");
}

bool AddressSpace::Impl::HugeMappedLocked(uint64_t addr) const {
  PmdSlot* slot = pt_.Lookup(addr);
  if (!slot) return false;
  ReadLock l(slot->lock);
  return slot->huge.load(std::memory_order_relaxed) != 0;
}

uint64_t AddressSpace::Impl::ReadEntryLocked(uint64_t addr) const {
  PmdSlot* slot = pt_.Lookup(addr);
  if (!slot) return 0;
  ReadLock l(slot->lock);
  const uint64_t h = slot->huge.load(std::memory_order_relaxed);
  if (h != 0) return pte::SubEntry(h, addr);
  return slot->table ? slot->table->e[PageTable::PteIndex(addr)].load(std::memory_order_relaxed) : 0;
}

void AddressSpace::Impl::WaitMigrationLocked(uint64_t addr, uint64_t e) {
  // The migrator holds the mmap lock for read too and finishes without
  // needing anything we hold.
  migration_wq_.Wait([&] {
    mmap_lock_.AssertReaderHeld();
    return ReadEntryLocked(addr) != e;
  });
}

Result<void> AddressSpace::Impl::DeviceFaultLocked(uint64_t addr, uint64_t e) {
  const uint64_t page = PageAlignDown(addr);
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(e));
  if (!pm) return Err(Errc::kFault, "SIGBUS: device page of an unregistered pagemap");
  const uint64_t index = pm->IndexOf(pte::PfnOf(e));
  // do_swap_page's device-private branch: `e` was read with the page table
  // lock dropped since, so the page may already be migrated, freed and
  // reused. Recheck the entry under the lock; while it still maps the page
  // the page is alive: take a reference and the page lock there. A thread
  // that finds the page locked (another fault, a migrator) does not call
  // the driver: it waits for the entry to change or the lock to go, and
  // the caller looks at the entry again.
  for (int spins = 0;; ++spins) {
    bool locked = false;
    {
      PmdSlot* slot = pt_.Lookup(page);
      if (!slot) return {};
      ReadLock l(slot->lock);
      // A 2 MiB device entry is compared as this page's 4 KiB view.
      const uint64_t h = slot->huge.load(std::memory_order_relaxed);
      const uint64_t cur = h != 0 ? pte::SubEntry(h, page)
                                  : (slot->table ? slot->table->e[PageTable::PteIndex(page)].load(
                                                       std::memory_order_relaxed)
                                                 : 0);
      if (cur != e) return {};  // changed: the caller looks again
      if (pm->TryLockPage(index)) {
        pm->Get(index);
        locked = true;
      }
    }
    if (locked) break;
    // The holder changes the entry soon (a migrator installs migration
    // entries right after locking; a fault's migration replaces it).
    if (spins < 64)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  // A driver that does not pass fault_page still gets it (Setup reads it
  // from here): this thread holds that page locked.
  const DevicePfn outer = tls_fault_page;
  tls_fault_page = pte::PfnOf(e);
  auto r = pm->ops().MigrateToRam(as_, page, *pm, index);
  tls_fault_page = outer;
  pm->UnlockPage(index);
  pm->Put(index);
  return r;
}

void AddressSpace::Impl::RestoreExclusiveLocked(uint64_t addr, uint64_t e) {
  const uint64_t page = PageAlignDown(addr);
  NotifierRange range{&as_, page, page + kPageSize, NotifyEvent::kExclusive, nullptr, true};
  [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(range);
  assert(res.has_value());
  if (PmdSlot* slot = pt_.Lookup(page)) {
    WriteLock l(slot->lock);
    if (slot->table) {
      auto& ent = slot->table->e[PageTable::PteIndex(page)];
      if (ent.load(std::memory_order_relaxed) == e)
        ent.store(pte::Make(pte::kPresent, pte::PfnOf(e), e & pte::kFlagsMask & ~pte::kKindMask),
                  std::memory_order_relaxed);
    }
  }
  as_.notifiers_->InvalidateRangeEnd(range);
}

Result<Pfn> AddressSpace::MakeDeviceExclusive(uint64_t addr, const void* owner) {
  impl_->mmap_lock_.AssertReaderHeld();  // the caller's mmap_lock_, seen through Impl
  return impl_->MakeExclusiveLocked(addr, owner);
}

Result<Pfn> AddressSpace::Impl::MakeExclusiveLocked(uint64_t addr, const void* owner) {
  USVM_TRY(CheckAliveLocked());
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "make exclusive: address not page aligned");
  const Vma* vma = FindVmaLocked(addr);
  if (!vma || vma->start > addr) return Err(Errc::kFault, "make exclusive: no mapping");
  if (!vma->private_anon() || vma->is_hugetlb())
    return Err(Errc::kInval, "make exclusive: not private anonymous memory");
  for (int tries = 0; tries < kMaxFaultRetries; ++tries) {
    uint64_t e = ReadEntryLocked(addr);
    if (pte::IsExclusive(e)) return pte::PfnOf(e);  // already exclusive
    if (pte::HoldsDevicePage(e)) return Err(Errc::kInval, "make exclusive: page is in device memory");
    if (!pte::HoldsFrame(e) || !(e & pte::kWrite) || (e & pte::kFile)) {
      USVM_TRY(HandleFaultLocked(addr, AccessKind::kWrite));
      continue;
    }
    if (HugeMappedLocked(addr)) {
      // Fault first, then split the mapping (FOLL_SPLIT_PMD): the fault of
      // an unpopulated MADV_HUGEPAGE region maps 2 MiB, and exclusive
      // entries are 4 KiB entries.
      SplitHugeLocked(addr & kHugeMask);
      continue;
    }
    NotifierRange range{&as_, addr, addr + kPageSize, NotifyEvent::kExclusive, owner, true};
    [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(range);
    assert(res.has_value());
    bool done = false;
    if (PmdSlot* slot = pt_.Lookup(addr)) {
      WriteLock l(slot->lock);
      if (slot->table) {
        auto& ent = slot->table->e[PageTable::PteIndex(addr)];
        if (ent.load(std::memory_order_relaxed) == e) {
          ent.store(pte::Make(pte::kDeviceExclusive, pte::PfnOf(e),
                              e & pte::kFlagsMask & ~pte::kKindMask),
                    std::memory_order_relaxed);
          done = true;
        }
      }
    }
    as_.notifiers_->InvalidateRangeEnd(range);
    if (done) return pte::PfnOf(e);
  }
  return Err(Errc::kIo, "make exclusive made no progress");
}

Result<void> AddressSpace::PinUserPages(uint64_t addr, uint64_t npages, bool write, Pfn* out) {
  if (!IsPageAligned(addr) || npages == 0 || !out)
    return Err(Errc::kInval, "pin: unaligned address, zero pages or null output");
  if (npages > (~uint64_t{0} - addr) >> kPageShift) return Err(Errc::kInval, "pin: range overflows");
  ReadLock l(mmap_lock_);
  impl_->mmap_lock_.AssertReaderHeld();
  return impl_->PinLocked(addr, npages, write, out);
}

Result<void> AddressSpace::Impl::PinLocked(uint64_t addr, uint64_t npages, bool write, Pfn* out) {
  USVM_TRY(CheckAliveLocked());
  // Pages under a 2 MiB entry are pinned as they are (the kernel pins the
  // subpage of the folio); fork copies pinned pages, huge or not.
  uint64_t pinned = 0;
  auto unwind = [&] {
    for (uint64_t i = 0; i < pinned; ++i) pool_.Unpin(out[i]);
  };
  for (; pinned < npages;) {
    const uint64_t a = addr + (pinned << kPageShift);
    int tries = 0;
    for (;; ++tries) {
      if (tries == kMaxFaultRetries) {
        unwind();
        return Err(Errc::kIo, "pin: fault made no progress");
      }
      const uint64_t e = ReadEntryLocked(a);
      // Pins never name the shared zero page (FOLL_LONGTERM unshares it)
      // nor device memory (migrated home first, by the fault path).
      const bool ok = pte::HoldsFrame(e) && (e & pte::kRead) && (!write || (e & pte::kWrite));
      if (pte::IsPresent(e) && (e & pte::kDevice)) {
        // Device-coherent memory is not pinned long-term: move it home.
        auto r = DeviceFaultLocked(a, e);
        if (!r) {
          unwind();
          return Err(r.error());
        }
        continue;
      }
      // A read-only pin must not pin a page the process may share with
      // another (gup_must_unshare, Linux 5.19+): the shared zero page, a
      // page-cache page of a private file mapping, or an anonymous page
      // still shared copy-on-write after fork. Otherwise a later write by
      // the process copies the page and the pin keeps the old bytes. The
      // page is unshared first (FAULT_FLAG_UNSHARE): the process gets its
      // own copy, still mapped read-only, and that is what is pinned. A
      // writable entry is the process's own already. Shared mappings and
      // hugetlb pages are pinned as they are.
      if (!write && pte::IsPresent(e) && (e & pte::kRead) && !(e & pte::kWrite) &&
          !(e & pte::kDevice)) {
        const Vma* vma = FindVmaLocked(a);
        const bool must_unshare =
            vma && vma->start <= a && !vma->shared() && !vma->is_hugetlb() &&
            ((e & (pte::kZero | pte::kFile)) ||
             pool_.RefCount(pte::PfnOf(e)) - pool_.PinCount(pte::PfnOf(e)) != 1);
        if (must_unshare) {
          if (HugeMappedLocked(a)) {
            SplitHugeLocked(a & kHugeMask);  // copy 4 KiB, as the kernel falls back
            continue;
          }
          auto r = WriteProtectFaultLocked(*vma, a, *pt_.Lookup(a), /*unshare=*/true);
          if (!r) {
            unwind();
            return Err(r.error());
          }
          continue;  // look at the new entry
        }
      }
      if (!ok) {
        auto r = HandleFaultLocked(a, write ? AccessKind::kWrite : AccessKind::kRead);
        if (!r) {
          unwind();
          return Err(r.error());
        }
        continue;
      }
      PmdSlot* slot = pt_.Lookup(a);
      ReadLock sl(slot->lock);
      const uint64_t h = slot->huge.load(std::memory_order_relaxed);
      const uint64_t cur = h != 0 ? pte::SubEntry(h, a)
                                  : (slot->table ? slot->table->e[PageTable::PteIndex(a)].load(
                                                       std::memory_order_relaxed)
                                                 : 0);
      if (cur != e) continue;  // changed: look again
      const Pfn pfn = pte::PfnOf(e);
      pool_.Pin(pfn);
      out[pinned++] = pfn;
      break;
    }
  }
  return {};
}

std::byte* AddressSpace::Impl::EntryData(uint64_t e) const {
  if (!(e & pte::kDevice)) return pool_.Data(pte::PfnOf(e));
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(e));
  return pm->CoherentData(pm->IndexOf(pte::PfnOf(e)));
}

uint32_t AddressSpace::Impl::DeviceRefCount(uint64_t dpfn) const {
  DevicePagemap* pm = DevicePagemap::Lookup(dpfn);
  return pm ? pm->RefCount(pm->IndexOf(dpfn)) : 0;
}

// ---- access ------------------------------------------------------------------

template <typename Op>
Result<void> AddressSpace::Impl::Access(uint64_t addr, uint64_t len, AccessKind kind, Op op) {
  if (len == 0) return {};
  if (addr + len < addr) return Err(Errc::kFault, "SIGSEGV: range wraps around");
  const bool write = kind == AccessKind::kWrite;
  const uint64_t need = pte::kRead | (write ? pte::kWrite : 0);
  const uint64_t mark = pte::kAccessed | (write ? pte::kDirty : 0);
  ReadLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  uint64_t done = 0;
  int faults_here = 0;
  std::chrono::steady_clock::time_point give_up_at{};
  while (done < len) {
    const uint64_t a = addr + done;
    if (PmdSlot* slot = pt_.Lookup(a)) {
      slot->lock.LockShared();
      std::atomic<uint64_t>* ent = &slot->huge;
      uint64_t e = ent->load(std::memory_order_relaxed);
      std::byte* p = nullptr;
      uint64_t unit_end = 0;
      if (e != 0) {
        if (pte::IsPresent(e))
          p = ((e & pte::kDevice) ? EntryData(e) : pool_.Data(pte::PfnOf(e))) +
              (a & (kHugePageSize - 1));
        unit_end = (a & kHugeMask) + kHugePageSize;
      } else if (slot->table) {
        ent = &slot->table->e[PageTable::PteIndex(a)];
        e = ent->load(std::memory_order_relaxed);
        if (pte::IsPresent(e))
          p = ((e & pte::kDevice) ? EntryData(e) : pool_.Data(pte::PfnOf(e))) + (a & (kPageSize - 1));
        unit_end = PageAlignDown(a) + kPageSize;
      }
      if (pte::IsPresent(e) && (e & need) == need) {
        const uint64_t n = std::min(len - done, unit_end - a);
        op(p, done, n);
        if ((e & mark) != mark) ent->fetch_or(mark, std::memory_order_relaxed);
        slot->lock.UnlockShared();
        done += n;
        faults_here = 0;
        continue;
      }
      slot->lock.UnlockShared();
    }
    if (++faults_here > kMaxFaultRetries) {
      // The page keeps changing under us (a device migrating it back and
      // forth). The kernel retries for ever; we back off and give up only
      // after kFaultGiveUp of wall time, so load alone never fails an access.
      if (!BackOff(faults_here - 1, give_up_at))
        return Err(Errc::kIo, "page fault made no progress");
    }
    USVM_TRY(HandleFaultLocked(a, kind));
  }
  return {};
}

Result<void> AddressSpace::Read(uint64_t addr, void* dst, uint64_t len) {
  auto* d = static_cast<std::byte*>(dst);
  return impl_->Access(addr, len, AccessKind::kRead,
                       [d](std::byte* p, uint64_t off, uint64_t n) { std::memcpy(d + off, p, n); });
}

Result<void> AddressSpace::Write(uint64_t addr, const void* src, uint64_t len) {
  const auto* s = static_cast<const std::byte*>(src);
  return impl_->Access(addr, len, AccessKind::kWrite,
                       [s](std::byte* p, uint64_t off, uint64_t n) { std::memcpy(p, s + off, n); });
}

namespace {
std::atomic_ref<uint64_t> Word(std::byte* p) { return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)); }
}  // namespace

#define USVM_CHECK_ALIGNED(addr) \
  if ((addr) % 8 != 0) return Err(Errc::kInval, "atomic: address not 8-byte aligned")

Result<uint64_t> AddressSpace::AtomicLoad(uint64_t addr) {
  USVM_CHECK_ALIGNED(addr);
  uint64_t v = 0;
  USVM_TRY(impl_->Access(addr, 8, AccessKind::kRead,
                         [&](std::byte* p, uint64_t, uint64_t) { v = Word(p).load(); }));
  return v;
}

Result<void> AddressSpace::AtomicStore(uint64_t addr, uint64_t v) {
  USVM_CHECK_ALIGNED(addr);
  return impl_->Access(addr, 8, AccessKind::kWrite,
                       [&](std::byte* p, uint64_t, uint64_t) { Word(p).store(v); });
}

Result<uint64_t> AddressSpace::AtomicFetchAdd(uint64_t addr, uint64_t v) {
  USVM_CHECK_ALIGNED(addr);
  uint64_t old = 0;
  USVM_TRY(impl_->Access(addr, 8, AccessKind::kWrite,
                         [&](std::byte* p, uint64_t, uint64_t) { old = Word(p).fetch_add(v); }));
  return old;
}

Result<uint64_t> AddressSpace::AtomicExchange(uint64_t addr, uint64_t v) {
  USVM_CHECK_ALIGNED(addr);
  uint64_t old = 0;
  USVM_TRY(impl_->Access(addr, 8, AccessKind::kWrite,
                         [&](std::byte* p, uint64_t, uint64_t) { old = Word(p).exchange(v); }));
  return old;
}

Result<uint64_t> AddressSpace::AtomicCompareExchange(uint64_t addr, uint64_t expected,
                                                     uint64_t desired) {
  USVM_CHECK_ALIGNED(addr);
  uint64_t old = expected;
  // A compare-exchange is a write access (it needs a writable mapping even
  // when the comparison fails), as a locked cmpxchg is on x86.
  USVM_TRY(impl_->Access(addr, 8, AccessKind::kWrite, [&](std::byte* p, uint64_t, uint64_t) {
    Word(p).compare_exchange_strong(old, desired);
  }));
  return old;
}

#undef USVM_CHECK_ALIGNED

Result<void> AddressSpace::Impl::Populate(uint64_t addr, uint64_t len, bool write) {
  if (!IsPageAligned(addr)) return Err(Errc::kInval, "populate: address not page aligned");
  const uint64_t alen = PageAlignUp(len);
  if (alen < len || addr + alen < addr) return Err(Errc::kInval, "populate: range overflows");
  // One byte per page is enough to fault each page in.
  for (uint64_t a = addr; a < addr + alen;) {
    const uint64_t step = std::min(addr + alen - a, kHugePageSize - (a & (kHugePageSize - 1)));
    USVM_TRY(Access(a, step, write ? AccessKind::kWrite : AccessKind::kRead,
                    [](std::byte*, uint64_t, uint64_t) {}));
    a += step;
  }
  return {};
}

// ---- lazy-free reclaim --------------------------------------------------------

Result<uint64_t> AddressSpace::Impl::ReclaimLazyFree() {
  ReadLock l(mmap_lock_);
  USVM_TRY(CheckAliveLocked());
  auto clean_lazy = [](uint64_t e) {
    return pte::HoldsFrame(e) && (e & pte::kLazyFree) && !(e & pte::kDirty);
  };
  // Collect candidates, then discard each under its own CLEAR bracket
  // (notifiers must not run under a page table lock).
  std::vector<std::pair<uint64_t, bool>> candidates;  // (address, huge)
  for (const auto& kv : vmas_) {
    const Vma& v = kv.second;
    if (!v.private_anon()) continue;
    pt_.ForEachSlot(v.start, v.end, [&](uint64_t base, PmdSlot& slot) {
      ReadLock sl(slot.lock);
      const uint64_t h = slot.huge.load(std::memory_order_relaxed);
      if (h != 0) {
        if (clean_lazy(h)) candidates.emplace_back(base, true);
        return;
      }
      if (!slot.table) return;
      const uint64_t s = std::max(v.start, base), e = std::min(v.end, base + kHugePageSize);
      for (uint64_t a = s; a < e; a += kPageSize)
        if (clean_lazy(slot.table->e[PageTable::PteIndex(a)].load(std::memory_order_relaxed)))
          candidates.emplace_back(a, false);
    });
  }
  uint64_t discarded = 0;
  std::vector<Pfn> frames;
  for (auto [a, huge] : candidates) {
    const uint64_t size = huge ? kHugePageSize : kPageSize;
    PmdSlot* slot = pt_.Lookup(a);
    NotifyStart(a, a + size, NotifyEvent::kClear);
    slot->lock.Lock();
    std::atomic<uint64_t>* ent = &slot->huge;
    if (!huge) ent = slot->table ? &slot->table->e[PageTable::PteIndex(a)] : nullptr;
    const uint64_t e = ent ? ent->load(std::memory_order_relaxed) : 0;
    bool exclusive = clean_lazy(e);
    const uint64_t n = huge ? kPagesPerHuge : 1;
    for (uint64_t i = 0; i < n && exclusive; ++i) exclusive = pool_.RefCount(pte::PfnOf(e) + i) == 1;
    if (exclusive) {
      ent->store(0, std::memory_order_relaxed);
      for (uint64_t i = 0; i < n; ++i) frames.push_back(pte::PfnOf(e) + i);
      discarded += n;
    }
    slot->lock.Unlock();
    NotifyEnd(a, a + size, NotifyEvent::kClear);
  }
  counters.rss_pages.fetch_sub(discarded, std::memory_order_relaxed);
  Drop(frames);
  return discarded;
}

}  // namespace usvm::mm
