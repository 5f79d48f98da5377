// migrate_vma_setup / _pages / _finalize (mm/migrate_device.c). Migration
// by device frame is in migrate_device.cc.
#include <cassert>

#include "address_space_impl.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm {

namespace {

// What Setup did to each page, for Finalize.
struct MigrateState {
  std::vector<uint64_t> installed;  // our migration entry, or 0 (hole / skipped)
  std::vector<uint64_t> orig;       // the entry it replaced
  // Device source pages: their pagemap (null for other pages), and the
  // (pagemap, index) pairs Setup locked (never the fault page).
  std::vector<DevicePagemap*> src_pm;
  std::vector<std::pair<DevicePagemap*, uint64_t>> locked;
};

}  // namespace

// The caller holds mmap_lock_, which is the lock Impl names mmap_lock_ too
// (the analysis cannot see through the reference).
Result<void> AddressSpace::MigrateVmaSetup(MigrateVma& m) {
  impl_->mmap_lock_.AssertReaderHeld();
  return impl_->MigrateSetupLocked(m);
}
void AddressSpace::MigrateVmaPages(MigrateVma& m) {
  impl_->mmap_lock_.AssertReaderHeld();
  impl_->MigratePagesLocked(m);
}
void AddressSpace::MigrateVmaFinalize(MigrateVma& m) {
  impl_->mmap_lock_.AssertReaderHeld();
  impl_->MigrateFinalizeLocked(m);
}

Result<void> AddressSpace::Impl::MigrateSetupLocked(MigrateVma& m) {
  USVM_TRY(CheckAliveLocked());
  if (!m.src || !m.dst) return Err(Errc::kInval, "migrate: null src or dst");
  if (m.flags == 0 ||
      (m.flags & ~(kMigrateSelectSystem | kMigrateSelectDevicePrivate | kMigrateSelectDeviceCoherent)))
    return Err(Errc::kInval, "migrate: bad select flags");
  if (!IsPageAligned(m.start) || !IsPageAligned(m.end) || m.start >= m.end)
    return Err(Errc::kInval, "migrate: bad range");
  if (m.internal) return Err(Errc::kInval, "migrate: already set up");
  const Vma* vma = FindVmaLocked(m.start);
  if (!vma || vma->start > m.start || m.end > vma->end)
    return Err(Errc::kInval, "migrate: range not inside one VMA");
  if (m.vma && (m.vma->start != vma->start || m.vma->end != vma->end))
    return Err(Errc::kInval, "migrate: vma is not the VMA holding the range");
  if (m.fault_page != 0) {
    DevicePagemap* fpm = DevicePagemap::Lookup(m.fault_page);
    if (!fpm) return Err(Errc::kInval, "migrate: fault_page is not a device page");
    if (!fpm->PageLocked(fpm->IndexOf(m.fault_page)))
      return Err(Errc::kInval, "migrate: fault_page is not locked");
  }
  const uint64_t n = (m.end - m.start) >> kPageShift;
  const bool anon = vma->private_anon();
  auto* st = new MigrateState{std::vector<uint64_t>(n, 0), std::vector<uint64_t>(n, 0),
                              std::vector<DevicePagemap*>(n, nullptr), {}};
  for (uint64_t i = 0; i < n; ++i) m.src[i] = m.dst[i] = 0;
  m.cpages = 0;

  // Huge entries are migrated as 4 KiB pages.
  for (uint64_t b = m.start & kHugeMask; b < m.end; b += kHugePageSize) {
    PmdSlot* slot = pt_.Lookup(b);
    if (!slot) continue;
    bool huge;
    {
      ReadLock l(slot->lock);
      huge = slot->huge.load(std::memory_order_relaxed) != 0;
    }
    if (huge) SplitHugeLocked(b);
  }

  NotifierRange range{&as_, m.start, m.end, NotifyEvent::kMigrate, m.pgmap_owner, true};
  [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(range);
  assert(res.has_value());
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t a = m.start + (i << kPageShift);
    PmdSlot* slot = pt_.Ensure(a);
    WriteLock l(slot->lock);
    if (!slot->table) {
      if (slot->huge.load(std::memory_order_relaxed) != 0) continue;  // a racing THP fault
      pt_.InstallTableLocked(*slot);
    }
    auto& ent = slot->table->e[PageTable::PteIndex(a)];
    const uint64_t e = ent.load(std::memory_order_relaxed);
    const uint64_t keep = e & (pte::kRead | pte::kWrite | pte::kDirty);
    uint64_t mig = 0;
    if (e == 0 || (pte::IsPresent(e) && (e & pte::kZero))) {
      // A hole (or the zero page) of anonymous memory: a destination page
      // can fill it (migrate_vma_collect_hole). As in the kernel, holes
      // are collected whatever the select flags; the zero page is a
      // system page and needs kMigrateSelectSystem.
      if (!anon) continue;
      if (e != 0 && !(m.flags & kMigrateSelectSystem)) continue;
      m.src[i] = kMigratePfnMigrate;
      if (e != 0) mig = pte::Make(pte::kMigration, 0, keep | pte::kZero);
    } else if (pte::HoldsFrame(e)) {
      // System memory: private anonymous pages that this mapping alone
      // uses, or shares read-only (copy-on-write after fork).
      const Pfn pfn = pte::PfnOf(e);
      if (!(m.flags & kMigrateSelectSystem) || !anon || (e & pte::kFile)) continue;
      if (pool_.PinCount(pfn) > 0) continue;  // pinned: stays where the pin expects it
      if ((e & pte::kWrite) && pool_.RefCount(pfn) != 1) continue;
      pool_.Get(pfn);  // the migrator's reference
      m.src[i] = MigratePfn(pfn, false) | kMigratePfnMigrate | ((e & pte::kWrite) ? kMigratePfnWrite : 0);
      mig = pte::Make(pte::kMigration, pfn, keep);
    } else if (pte::HoldsDevicePage(e)) {
      // Device-private entries, or present entries of coherent memory.
      const uint64_t dpfn = pte::PfnOf(e);
      DevicePagemap* pm = DevicePagemap::Lookup(dpfn);
      const uint32_t select =
          pte::IsPresent(e) ? kMigrateSelectDeviceCoherent : kMigrateSelectDevicePrivate;
      if (!(m.flags & select) || !pm || pm->owner() != m.pgmap_owner) continue;
      const uint64_t idx = pm->IndexOf(dpfn);
      // The fault path holds one extra reference on its page
      // (migrate_vma_check_page's extra for fault_page).
      const uint32_t users = pm->RefCount(idx) - (dpfn == m.fault_page ? 1 : 0);
      if ((e & pte::kWrite) && users != 1) continue;
      // Another thread (a CPU fault, a migrator) holds this page: skip it.
      if (dpfn != m.fault_page) {
        if (!pm->TryLockPage(idx)) continue;
        st->locked.emplace_back(pm, idx);
      }
      st->src_pm[i] = pm;
      pm->Get(idx);
      m.src[i] = MigratePfn(dpfn, true) | kMigratePfnMigrate | ((e & pte::kWrite) ? kMigratePfnWrite : 0);
      mig = pte::Make(pte::kMigration, dpfn, keep | pte::kDevice);
    } else {
      continue;  // already migrating, or a kind that cannot move
    }
    if (mig != 0) {
      ent.store(mig, std::memory_order_relaxed);
      st->installed[i] = mig;
      st->orig[i] = e;
    }
    ++m.cpages;
  }
  as_.notifiers_->InvalidateRangeEnd(range);
  m.internal = st;
  return {};
}

void AddressSpace::Impl::MigratePagesLocked(MigrateVma& m) {
  assert(m.internal && "migrate_vma_pages without setup");
  const uint64_t n = (m.end - m.start) >> kPageShift;
  for (uint64_t i = 0; i < n; ++i)
    if ((m.src[i] & kMigratePfnMigrate) && !(m.dst[i] & kMigratePfnValid))
      m.src[i] &= ~kMigratePfnMigrate;
}

void AddressSpace::Impl::MigrateFinalizeLocked(MigrateVma& m) {
  auto* st = static_cast<MigrateState*>(m.internal);
  assert(st && "migrate_vma_finalize without setup");
  if (!st) return;
  const Vma* vma = FindVmaLocked(m.start);
  const uint64_t n = (m.end - m.start) >> kPageShift;
  Dropped dropped;
  uint64_t added = 0;
  auto drop_word = [&](uint64_t w) {  // a reference named by a src/dst word
    if (!(w & kMigratePfnValid)) return;
    if (w & kMigratePfnDevice)
      dropped.device.push_back(MigratePfnOf(w));
    else
      dropped.frames.push_back(MigratePfnOf(w));
  };
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t installed = st->installed[i];
    const bool collected = installed != 0 || (m.src[i] & kMigratePfnMigrate);
    if (!collected) {
      drop_word(m.dst[i]);  // a destination the caller filled in vain
      continue;
    }
    const uint64_t a = m.start + (i << kPageShift);
    bool migrated = (m.src[i] & kMigratePfnMigrate) && (m.dst[i] & kMigratePfnValid);
    PmdSlot* slot = pt_.Ensure(a);
    {
      WriteLock l(slot->lock);
      if (!slot->table && slot->huge.load(std::memory_order_relaxed) == 0) pt_.InstallTableLocked(*slot);
      std::atomic<uint64_t>* ent = slot->table ? &slot->table->e[PageTable::PteIndex(a)] : nullptr;
      const uint64_t cur = ent ? ent->load(std::memory_order_relaxed) : ~uint64_t{0};
      const bool ours = installed != 0 ? cur == installed : cur == 0;
      if (!ours) migrated = false;  // zapped (or refaulted) meanwhile
      if (ours && migrated) {
        const bool writable = installed != 0 ? (installed & pte::kWrite) : (vma->prot & kProtWrite);
        const uint64_t d = m.dst[i];
        if (DevicePagemap* spm = st->src_pm[i])  // a device source page's record
          spm->RmapRemove(spm->IndexOf(pte::PfnOf(installed)), &as_, a);
        if (d & kMigratePfnDevice) {
          DevicePagemap* pm = DevicePagemap::Lookup(MigratePfnOf(d));
          if (pm && pm->coherent())
            ent->store(pte::Make(pte::kPresent, MigratePfnOf(d),
                                 ReadBit(vma->prot) | pte::kDevice | pte::kAccessed | pte::kDirty |
                                     (writable ? pte::kWrite : 0)),
                       std::memory_order_relaxed);
          else
            ent->store(pte::Make(pte::kDevicePrivate, MigratePfnOf(d),
                                 ReadBit(vma->prot) | (writable ? pte::kWrite : 0)),
                       std::memory_order_relaxed);
          if (pm) pm->RmapAdd(pm->IndexOf(MigratePfnOf(d)), &as_, a);
        } else {
          ent->store(pte::Make(pte::kPresent, MigratePfnOf(d),
                               ReadBit(vma->prot) | pte::kAccessed | pte::kDirty |
                                   (writable ? pte::kWrite : 0)),
                     std::memory_order_relaxed);
        }
        if (installed == 0) ++added;
      } else if (ours && installed != 0) {
        ent->store(st->orig[i], std::memory_order_relaxed);  // restore
      }
      if (ours && migrated) drop_word(m.src[i]);  // the old mapping's reference
    }
    if (installed != 0 && !(installed & pte::kZero)) drop_word(m.src[i] | kMigratePfnValid);  // the migrator's
    if (!migrated) drop_word(m.dst[i]);
  }
  counters.rss_pages.fetch_add(added, std::memory_order_relaxed);
  for (auto [pm, idx] : st->locked) pm->UnlockPage(idx);
  delete st;
  m.internal = nullptr;
  migration_wq_.WakeAll();
  Drop(dropped);
}

}  // namespace usvm::mm
