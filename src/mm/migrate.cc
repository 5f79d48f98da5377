// migrate_vma_setup / _pages / _finalize (mm/migrate_device.c). Migration
// by device frame is in migrate_device.cc.
#include <cassert>

#include "address_space_impl.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm {

namespace {

// What Setup did to each page, for Pages and Finalize. A 2 MiB unit
// collected whole keeps its 2 MiB entries at its first index (compound
// set there) until it is either finalized whole or expanded into 4 KiB
// form (ExpandUnit).
struct MigrateState {
  std::vector<uint64_t> installed;  // our migration entry, or 0 (hole / skipped)
  std::vector<uint64_t> orig;       // the entry it replaced
  std::vector<bool> compound;       // first index of a 2 MiB unit
  // Device source pages: the pagemap of each (null for other pages; set
  // at a 2 MiB unit's first index for the unit), and the (pagemap, index)
  // pairs Setup locked (never the fault page).
  std::vector<DevicePagemap*> src_pm;
  std::vector<std::pair<DevicePagemap*, uint64_t>> locked;
};

constexpr uint64_t kUnitPages = kPagesPerHuge;

uint64_t AddrOf(const MigrateVma& m, uint64_t i) { return m.start + (i << kPageShift); }

// The word for page k of a 2 MiB src/dst word (compound flag dropped).
uint64_t SubWord(uint64_t w, uint64_t k) {
  w &= ~kMigratePfnCompound;
  return (w & kMigratePfnValid) ? w + (k << kMigratePfnShift) : w;
}

// Turns the 2 MiB unit at index i into 512 4 KiB pages: entries, src words
// and (if still compound) dst words.
void ExpandUnit(const MigrateVma& m, MigrateState& st, uint64_t* src, uint64_t* dst, uint64_t i) {
  const uint64_t inst = st.installed[i], orig = st.orig[i];
  const uint64_t sw = src[i], dw = dst[i];
  for (uint64_t k = 0; k < kUnitPages; ++k) {
    const uint64_t a = AddrOf(m, i + k);
    st.installed[i + k] = inst ? pte::SubEntry(inst, a) : 0;
    st.orig[i + k] = orig ? pte::SubEntry(orig, a) : 0;
    src[i + k] = SubWord(sw, k);
    if (dw & kMigratePfnCompound) dst[i + k] = SubWord(dw, k);
    st.src_pm[i + k] = st.src_pm[i];
  }
  st.compound[i] = false;
}

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
  constexpr uint32_t kSelectPages =
      kMigrateSelectSystem | kMigrateSelectDevicePrivate | kMigrateSelectDeviceCoherent;
  if (!(m.flags & kSelectPages) || (m.flags & ~(kSelectPages | kMigrateSelectCompound)))
    return Err(Errc::kInval, "migrate: bad select flags");
  if (!IsPageAligned(m.start) || !IsPageAligned(m.end) || m.start >= m.end)
    return Err(Errc::kInval, "migrate: bad range");
  if (m.internal) return Err(Errc::kInval, "migrate: already set up");
  const Vma* vma = FindVmaLocked(m.start);
  if (!vma || vma->start > m.start || m.end > vma->end)
    return Err(Errc::kInval, "migrate: range not inside one VMA");
  if (vma->is_hugetlb()) return Err(Errc::kInval, "migrate: hugetlb mapping");
  if (m.vma && (m.vma->start != vma->start || m.vma->end != vma->end))
    return Err(Errc::kInval, "migrate: vma is not the VMA holding the range");
  if (m.fault_page == 0) m.fault_page = tls_fault_page;  // called from MigrateToRam
  if (m.fault_page != 0) {
    DevicePagemap* fpm = DevicePagemap::Lookup(m.fault_page);
    if (!fpm) return Err(Errc::kInval, "migrate: fault_page is not a device page");
    if (!fpm->PageLocked(fpm->IndexOf(m.fault_page)))
      return Err(Errc::kInval, "migrate: fault_page is not locked");
  }
  const uint64_t n = (m.end - m.start) >> kPageShift;
  const bool anon = vma->private_anon();
  const bool compound = m.flags & kMigrateSelectCompound;
  auto* st = new MigrateState{std::vector<uint64_t>(n, 0), std::vector<uint64_t>(n, 0),
                              std::vector<bool>(n, false), std::vector<DevicePagemap*>(n, nullptr),
                              {}};
  for (uint64_t i = 0; i < n; ++i) m.src[i] = m.dst[i] = 0;
  m.cpages = 0;
  // A 2 MiB unit that may be collected whole: aligned and inside the range.
  auto whole_unit = [&](uint64_t b) { return compound && b >= m.start && b + kHugePageSize <= m.end; };

  // 2 MiB entries are migrated as 4 KiB pages, except whole units with
  // kMigrateSelectCompound. Another migrator's 2 MiB migration entry is
  // never split (its Finalize restores or replaces it whole).
  for (uint64_t b = m.start & kHugeMask; b < m.end; b += kHugePageSize) {
    if (whole_unit(b)) continue;
    PmdSlot* slot = pt_.Lookup(b);
    if (!slot) continue;
    uint64_t h;
    {
      ReadLock l(slot->lock);
      h = slot->huge.load(std::memory_order_relaxed);
    }
    if (h != 0 && pte::KindOf(h) != pte::kMigration) SplitHugeLocked(b);
  }

  NotifierRange range{&as_, m.start, m.end, NotifyEvent::kMigrate, m.pgmap_owner, true};
  [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(range);
  assert(res.has_value());

  // Collects the 2 MiB entry h of the unit at index i if it can move
  // whole (the caller then installs st->installed[i]); false leaves it to
  // the 4 KiB pass. REQUIRES: its slot lock, held by the caller.
  auto collect_unit = [&](uint64_t i, uint64_t h) -> bool {
    const uint64_t keep = h & (pte::kRead | pte::kWrite | pte::kDirty);
    const bool writable = h & pte::kWrite;
    uint64_t word;
    if (pte::HoldsFrame(h)) {
      if (!(m.flags & kMigrateSelectSystem) || !anon || (h & pte::kFile)) return false;
      for (uint64_t k = 0; k < kUnitPages; ++k) {
        const Pfn f = pte::PfnOf(h) + k;
        if (pool_.PinCount(f) > 0 || (writable && pool_.RefCount(f) != 1)) return false;
      }
      for (uint64_t k = 0; k < kUnitPages; ++k) pool_.Get(pte::PfnOf(h) + k);  // the migrator's
      word = MigratePfn(pte::PfnOf(h), false);
      st->installed[i] = pte::Make(pte::kMigration, pte::PfnOf(h), keep);
    } else if (pte::HoldsDevicePage(h) && pte::KindOf(h) != pte::kMigration) {
      const uint64_t dpfn = pte::PfnOf(h);
      DevicePagemap* pm = DevicePagemap::Lookup(dpfn);
      const uint32_t select =
          pte::IsPresent(h) ? kMigrateSelectDeviceCoherent : kMigrateSelectDevicePrivate;
      if (!(m.flags & select) || !pm || pm->owner() != m.pgmap_owner) return false;
      const uint64_t idx = pm->IndexOf(dpfn);
      for (uint64_t k = 0; k < kUnitPages; ++k) {
        // The fault path holds one extra reference on its page.
        const uint32_t users = pm->RefCount(idx + k) - (dpfn + k == m.fault_page ? 1 : 0);
        if (writable && users != 1) return false;
      }
      // Every page of the unit locked (the fault page is already), or the
      // unit is left to the 4 KiB pass, which skips the busy pages.
      const size_t first_locked = st->locked.size();
      for (uint64_t k = 0; k < kUnitPages; ++k) {
        if (dpfn + k == m.fault_page) continue;
        if (!pm->TryLockPage(idx + k)) {
          for (size_t q = first_locked; q < st->locked.size(); ++q) pm->UnlockPage(st->locked[q].second);
          st->locked.resize(first_locked);
          return false;
        }
        st->locked.emplace_back(pm, idx + k);
      }
      for (uint64_t k = 0; k < kUnitPages; ++k) pm->Get(idx + k);
      st->src_pm[i] = pm;
      word = MigratePfn(dpfn, true);
      st->installed[i] = pte::Make(pte::kMigration, dpfn, keep | pte::kDevice);
    } else {
      return false;
    }
    m.src[i] = word | kMigratePfnMigrate | kMigratePfnCompound | (writable ? kMigratePfnWrite : 0);
    st->orig[i] = h;
    st->compound[i] = true;
    m.cpages += kUnitPages;
    return true;
  };

  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t a = AddrOf(m, i);
    PmdSlot* slot = pt_.Ensure(a);
    WriteLock l(slot->lock);
    if (IsHugeAligned(a) && whole_unit(a)) {
      const uint64_t h = slot->huge.load(std::memory_order_relaxed);
      if (h == 0 && !slot->table) {
        // An empty PMD of anonymous memory: one 2 MiB destination fills it.
        if (anon) {
          m.src[i] = kMigratePfnMigrate | kMigratePfnCompound;
          st->compound[i] = true;
          m.cpages += kUnitPages;
        }
        i += kUnitPages - 1;
        continue;
      }
      if (h != 0) {
        if (pte::KindOf(h) == pte::kMigration) {
          i += kUnitPages - 1;  // someone else migrates it
          continue;
        }
        if (collect_unit(i, h)) {
          slot->huge.store(st->installed[i], std::memory_order_relaxed);  // one 2 MiB migration entry
          i += kUnitPages - 1;
          continue;
        }
        // Cannot move whole: its pages are collected one by one. The
        // MIGRATE bracket already covers the split.
        pt_.InstallTableLocked(*slot);
        counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
      }
    }
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
      // System memory: anonymous pages that this mapping alone uses, or
      // shares read-only (copy-on-write after fork). A private file
      // mapping's own copies are anonymous pages too and are collected;
      // page-cache pages (kFile, every page of a shared mapping) are not.
      const Pfn pfn = pte::PfnOf(e);
      if (!(m.flags & kMigrateSelectSystem) || vma->shared() || (e & pte::kFile)) continue;
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
  auto* st = static_cast<MigrateState*>(m.internal);
  assert(st && "migrate_vma_pages without setup");
  if (!st) return;
  const uint64_t n = (m.end - m.start) >> kPageShift;
  for (uint64_t i = 0; i < n; ++i) {
    if (st->compound[i]) {
      if (!(m.src[i] & kMigratePfnMigrate)) continue;
      if (!(m.dst[i] & kMigratePfnValid)) {
        m.src[i] &= ~kMigratePfnMigrate;  // stays where it is
      } else if (!(m.dst[i] & kMigratePfnCompound)) {
        // The caller could not get 2 MiB and gave 4 KiB pages: split the
        // source (its 2 MiB migration entry becomes 512) and move each page.
        const uint64_t inst = st->installed[i];
        if (inst != 0) {
          PmdSlot* slot = pt_.Lookup(AddrOf(m, i));
          WriteLock l(slot->lock);
          if (slot->huge.load(std::memory_order_relaxed) == inst) {
            pt_.InstallTableLocked(*slot);
            counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
          }
        }
        ExpandUnit(m, *st, m.src, m.dst, i);
        for (uint64_t k = 0; k < kUnitPages; ++k)
          if (!(m.dst[i + k] & kMigratePfnValid)) m.src[i + k] &= ~kMigratePfnMigrate;
      }
      i += kUnitPages - 1;
      continue;
    }
    if (!(m.src[i] & kMigratePfnMigrate)) continue;
    // A 4 KiB source needs a 4 KiB destination.
    if (!(m.dst[i] & kMigratePfnValid) || (m.dst[i] & kMigratePfnCompound))
      m.src[i] &= ~kMigratePfnMigrate;
  }
}

void AddressSpace::Impl::MigrateFinalizeLocked(MigrateVma& m) {
  auto* st = static_cast<MigrateState*>(m.internal);
  assert(st && "migrate_vma_finalize without setup");
  if (!st) return;
  const Vma* vma = FindVmaLocked(m.start);
  const uint64_t n = (m.end - m.start) >> kPageShift;
  // Work on copies: the caller's words stay as Pages left them.
  std::vector<uint64_t> src(m.src, m.src + n), dst(m.dst, m.dst + n);
  Dropped dropped;
  uint64_t added = 0;
  auto drop_word = [&](uint64_t w) {  // the reference(s) a src/dst word names
    if (!(w & kMigratePfnValid)) return;
    const uint64_t count = (w & kMigratePfnCompound) ? kUnitPages : 1;
    for (uint64_t k = 0; k < count; ++k) {
      const uint64_t pfn = MigratePfnOf(w) + k;
      if (w & kMigratePfnDevice)
        dropped.device.push_back(pfn);
      else
        dropped.frames.push_back(pfn);
    }
  };
  // The entry that maps destination word d (4 KiB or 2 MiB) in this VMA.
  auto new_entry = [&](uint64_t d, bool writable) -> uint64_t {
    const uint64_t w = writable ? pte::kWrite : 0;
    if (!(d & kMigratePfnDevice))
      return pte::Make(pte::kPresent, MigratePfnOf(d),
                       ReadBit(vma->prot) | pte::kAccessed | pte::kDirty | w);
    DevicePagemap* pm = DevicePagemap::Lookup(MigratePfnOf(d));
    if (pm && pm->coherent())
      return pte::Make(pte::kPresent, MigratePfnOf(d),
                       ReadBit(vma->prot) | pte::kDevice | pte::kAccessed | pte::kDirty | w);
    // Device entries carry the VMA's read bit too: device-frame migration
    // remaps them from the entry alone.
    return pte::Make(pte::kDevicePrivate, MigratePfnOf(d), ReadBit(vma->prot) | w);
  };

  // 2 MiB units first: finalized whole if their 2 MiB entry (or empty
  // PMD) is still there; otherwise someone split or zapped it meanwhile,
  // and the unit is finalized page by page below.
  for (uint64_t i = 0; i < n; ++i) {
    if (!st->compound[i]) continue;
    const uint64_t a = AddrOf(m, i);
    const uint64_t installed = st->installed[i];
    PmdSlot* slot = pt_.Ensure(a);
    slot->lock.Lock();
    const uint64_t cur = slot->huge.load(std::memory_order_relaxed);
    const bool whole = installed != 0 ? cur == installed : (cur == 0 && !slot->table);
    if (!whole) {
      slot->lock.Unlock();
      ExpandUnit(m, *st, src.data(), dst.data(), i);
      continue;
    }
    const bool migrated = (src[i] & kMigratePfnMigrate) && (dst[i] & kMigratePfnValid) &&
                          (dst[i] & kMigratePfnCompound);
    if (migrated) {
      const bool writable = installed != 0 ? (installed & pte::kWrite) : (vma->prot & kProtWrite);
      if (st->src_pm[i]) RmapRemoveHuge(installed, a);  // the device source's records
      slot->huge.store(new_entry(dst[i], writable), std::memory_order_relaxed);
      RmapAddHuge(slot->huge.load(std::memory_order_relaxed), a);
      if (installed == 0) added += kUnitPages;
    } else if (installed != 0) {
      slot->huge.store(st->orig[i], std::memory_order_relaxed);  // restore
    }
    slot->lock.Unlock();
    if (installed != 0) {
      drop_word(src[i] | kMigratePfnValid);  // the migrator's references
      if (migrated) drop_word(src[i]);       // the old mapping's
    }
    if (!migrated) drop_word(dst[i]);
    st->compound[i] = false;
    st->installed[i] = 0;
    src[i] &= ~kMigratePfnMigrate;
    dst[i] = 0;  // done: the 4 KiB pass below skips this unit
    i += kUnitPages - 1;
  }

  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t installed = st->installed[i];
    const bool collected = installed != 0 || (src[i] & kMigratePfnMigrate);
    if (!collected) {
      drop_word(dst[i]);  // a destination the caller filled in vain
      continue;
    }
    const uint64_t a = AddrOf(m, i);
    bool migrated = (src[i] & kMigratePfnMigrate) && (dst[i] & kMigratePfnValid);
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
        if (DevicePagemap* spm = st->src_pm[i])  // a device source page's record
          spm->RmapRemove(spm->IndexOf(pte::PfnOf(installed)), &as_, a);
        ent->store(new_entry(dst[i], writable), std::memory_order_relaxed);
        RmapAdd(ent->load(std::memory_order_relaxed), a);
        if (installed == 0) ++added;
      } else if (ours && installed != 0) {
        ent->store(st->orig[i], std::memory_order_relaxed);  // restore
      }
      if (ours && migrated) drop_word(src[i]);  // the old mapping's reference
    }
    if (installed != 0 && !(installed & pte::kZero)) drop_word(src[i] | kMigratePfnValid);  // the migrator's
    if (!migrated) drop_word(dst[i]);
  }
  counters.rss_pages.fetch_add(added, std::memory_order_relaxed);
  for (auto [pm, idx] : st->locked) pm->UnlockPage(idx);
  delete st;
  m.internal = nullptr;
  migration_wq_.WakeAll();
  Drop(dropped);
}

}  // namespace usvm::mm
