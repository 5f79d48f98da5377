// Migration by device frame (migrate_device_pfns / _pages / _finalize) and
// the device reverse-map upkeep of AddressSpace::Impl. See
// include/usvm/mm/migrate_device.h for the contract and the lock order.
#include "usvm/mm/migrate_device.h"

#include <algorithm>
#include <cassert>

#include "address_space_impl.h"

namespace usvm::mm {

// The friend of AddressSpace that reaches its Impl.
class DeviceMigration {
 public:
  static AddressSpace::Impl& Of(AddressSpace& as) { return *as.impl_; }
};

// ---- rmap upkeep ---------------------------------------------------------------

void AddressSpace::Impl::RmapAdd(uint64_t e, uint64_t addr) {
  if (!pte::HoldsDevicePage(e)) return;
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(e));
  assert(pm && "device entry of an unregistered pagemap");
  if (pm) pm->RmapAdd(pm->IndexOf(pte::PfnOf(e)), &as_, addr);
}

void AddressSpace::Impl::RmapAddHuge(uint64_t h, uint64_t base) {
  if (!pte::HoldsDevicePage(h)) return;
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(h));
  assert(pm && "device entry of an unregistered pagemap");
  if (!pm) return;
  pm->RmapAdd(pm->IndexOf(pte::PfnOf(h)), &as_, base, kPagesPerHuge);
}

void AddressSpace::Impl::RmapRemoveHuge(uint64_t h, uint64_t base) {
  if (!pte::HoldsDevicePage(h)) return;
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(h));
  if (!pm) return;
  pm->RmapRemove(pm->IndexOf(pte::PfnOf(h)), &as_, base, kPagesPerHuge);
}

void AddressSpace::Impl::RmapRemove(uint64_t e, uint64_t addr) {
  if (!pte::HoldsDevicePage(e)) return;
  DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(e));
  if (pm) pm->RmapRemove(pm->IndexOf(pte::PfnOf(e)), &as_, addr);
}

// ---- per-entry steps (no mmap lock) --------------------------------------------

void AddressSpace::Impl::NotifyMigrateStart(uint64_t start, uint64_t end, const void* owner) {
  NotifierRange r{&as_, start, end, NotifyEvent::kMigrate, owner, true};
  [[maybe_unused]] auto res = as_.notifiers_->InvalidateRangeStart(r);
  assert(res.has_value());
}

void AddressSpace::Impl::NotifyMigrateEnd(uint64_t start, uint64_t end, const void* owner) {
  NotifierRange r{&as_, start, end, NotifyEvent::kMigrate, owner, true};
  as_.notifiers_->InvalidateRangeEnd(r);
}

namespace {
// Calls fn(slot, first, last) for each group of targets in one 2 MiB
// region whose page table exists, with the free lock held shared.
template <typename Fn>
void ForEachRegion(const PageTable& pt, DeviceTarget* t, size_t n, Fn fn) {
  for (size_t j = 0; j < n;) {
    size_t k = j + 1;
    while (k < n && (t[k].addr & kHugeMask) == (t[j].addr & kHugeMask)) ++k;
    ReadLock fl(pt.free_lock());
    if (PmdSlot* slot = pt.Lookup(t[j].addr)) fn(*slot, t + j, t + k);
    j = k;
  }
}
}  // namespace

void AddressSpace::Impl::DeviceUnmap(DeviceTarget* t, size_t n) {
  ForEachRegion(pt_, t, n, [&](PmdSlot& slot, DeviceTarget* first, DeviceTarget* last) {
    WriteLock l(slot.lock);
    const uint64_t h = slot.huge.load(std::memory_order_relaxed);
    if (h != 0 && pte::HoldsDevicePage(h) && pte::KindOf(h) != pte::kMigration) {
      // A 2 MiB device page: pages are migrated one by one, so split the
      // entry (same pages, same records). Its pages that move are inside
      // the MIGRATE bracket around this call; the others keep their
      // mapping, only its granularity changes.
      for (DeviceTarget* x = first; x != last; ++x)
        if (pte::SubEntry(h, x->addr) >> pte::kPfnShift == x->dpfn) {
          pt_.InstallTableLocked(slot);
          counters.thp_splits.fetch_add(1, std::memory_order_relaxed);
          break;
        }
    }
    if (!slot.table) return;
    for (DeviceTarget* x = first; x != last; ++x) {
      auto& ent = slot.table->e[PageTable::PteIndex(x->addr)];
      const uint64_t e = ent.load(std::memory_order_relaxed);
      if (!pte::HoldsDevicePage(e) || pte::KindOf(e) == pte::kMigration || pte::PfnOf(e) != x->dpfn)
        continue;
      // The rmap record stays: it now names the migration entry.
      ent.store(pte::Make(pte::kMigration, x->dpfn,
                          (e & (pte::kRead | pte::kWrite | pte::kDirty)) | pte::kDevice),
                std::memory_order_relaxed);
      x->done = true;
    }
  });
}

void AddressSpace::Impl::DeviceRemap(DevicePagemap& pm, DeviceTarget* t, size_t n) {
  ForEachRegion(pt_, t, n, [&](PmdSlot& slot, DeviceTarget* first, DeviceTarget* last) {
    WriteLock l(slot.lock);
    if (!slot.table) return;
    for (DeviceTarget* x = first; x != last; ++x) {
      auto& ent = slot.table->e[PageTable::PteIndex(x->addr)];
      const uint64_t e = ent.load(std::memory_order_relaxed);
      if (pte::KindOf(e) != pte::kMigration || !(e & pte::kDevice) || pte::PfnOf(e) != x->dpfn) continue;
      // The entry's own bits, not the VMA's: mprotect keeps them current
      // on device entries, and we may not look at the VMAs here.
      const uint64_t bits = e & (pte::kRead | pte::kWrite);
      if (x->dst != kInvalidPfn) {
        pool_.Get(x->dst);
        ent.store(pte::Make(pte::kPresent, x->dst, bits | pte::kAccessed | pte::kDirty),
                  std::memory_order_relaxed);
        pm.RmapRemove(pm.IndexOf(x->dpfn), &as_, x->addr);
      } else if (pm.coherent()) {
        ent.store(pte::Make(pte::kPresent, x->dpfn,
                            bits | (e & pte::kDirty) | pte::kDevice | pte::kAccessed),
                  std::memory_order_relaxed);
      } else {
        ent.store(pte::Make(pte::kDevicePrivate, x->dpfn, bits), std::memory_order_relaxed);
      }
      x->done = true;
    }
  });
  migration_wq_.WakeAll();
}

// ---- the public calls -------------------------------------------------------------

namespace {

using Mapping = std::pair<AddressSpace*, uint64_t>;
using Target = DeviceTarget;

bool InPagemap(const DevicePagemap& pgmap, DevicePfn dpfn) {
  return dpfn >= pgmap.base() && dpfn - pgmap.base() < pgmap.npages();
}

// The current mappers of a set of locked device pages, grouped by address
// space, each group in address order; `page` says which input each
// target came from. `keep` holds the spaces alive.
struct Groups {
  struct Group {
    AddressSpace* as;
    std::vector<Target> t;
    std::vector<uint64_t> page;
  };
  std::vector<Group> groups;
  std::vector<std::shared_ptr<AddressSpace>> keep;

  // Adds the mappers of device page dpfn (input i), to be changed to dst.
  void Add(DevicePagemap& pgmap, DevicePfn dpfn, uint64_t i, Pfn dst, std::vector<Mapping>& scratch) {
    scratch.clear();
    pgmap.RmapSnapshot(pgmap.IndexOf(dpfn), scratch, keep);
    for (auto [as, addr] : scratch) {
      Group* g = nullptr;
      for (auto& x : groups)
        if (x.as == as) g = &x;
      if (!g) g = &groups.emplace_back(Group{as, {}, {}});
      g->t.push_back({addr, dpfn, dst, false});
      g->page.push_back(i);
    }
  }
  // Pages usually come in address order already; sort the groups that do not.
  void Sort() {
    for (auto& g : groups) {
      bool sorted = true;
      for (size_t k = 1; k < g.t.size() && sorted; ++k) sorted = g.t[k - 1].addr < g.t[k].addr;
      if (sorted) continue;
      std::vector<size_t> order(g.t.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = k;
      std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return g.t[x].addr < g.t[y].addr; });
      std::vector<Target> t;
      std::vector<uint64_t> page;
      for (size_t k : order) {
        t.push_back(g.t[k]);
        page.push_back(g.page[k]);
      }
      g.t.swap(t);
      g.page.swap(page);
    }
  }
};

// Puts every migration entry of the (locked) pages back as it was.
void RestoreEntries(DevicePagemap& pgmap, const std::vector<DevicePfn>& dpfns) {
  Groups gs;
  std::vector<Mapping> scratch;
  for (uint64_t k = 0; k < dpfns.size(); ++k) gs.Add(pgmap, dpfns[k], k, kInvalidPfn, scratch);
  gs.Sort();
  for (auto& g : gs.groups) DeviceMigration::Of(*g.as).DeviceRemap(pgmap, g.t.data(), g.t.size());
}

}  // namespace

Result<void> MigrateDevicePfns(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n, uint64_t* src,
                               uint64_t* dst) {
  if (!pfns || !src || !dst || n == 0) return Err(Errc::kInval, "migrate device: null arrays or no pages");
  for (uint64_t i = 0; i < n; ++i)
    if (!InPagemap(pgmap, pfns[i])) return Err(Errc::kInval, "migrate device: pfn outside the pagemap");

  // 1. migrate_device_pfn_lock: a reference unless free, then the lock.
  for (uint64_t i = 0; i < n; ++i) {
    src[i] = dst[i] = 0;
    const uint64_t idx = pgmap.IndexOf(pfns[i]);
    if (!pgmap.TryGet(idx)) continue;
    if (!pgmap.TryLockPage(idx)) {
      pgmap.Put(idx);
      continue;
    }
    src[i] = MigratePfn(pfns[i], true) | kMigratePfnMigrate;
  }

  // 2. try_to_migrate: every mapping becomes a migration entry, address
  // space by address space, one MIGRATE bracket per run of consecutive
  // addresses.
  Groups gs;
  {
    std::vector<Mapping> scratch;
    for (uint64_t i = 0; i < n; ++i)
      if (src[i] & kMigratePfnMigrate) gs.Add(pgmap, pfns[i], i, kInvalidPfn, scratch);
  }
  gs.Sort();
  std::vector<uint32_t> unmapped(n, 0);
  for (auto& g : gs.groups) {
    auto& impl = DeviceMigration::Of(*g.as);
    for (size_t b = 0; b < g.t.size();) {
      size_t e = b + 1;
      while (e < g.t.size() && g.t[e].addr == g.t[e - 1].addr + kPageSize) ++e;
      const uint64_t start = g.t[b].addr, end = g.t[e - 1].addr + kPageSize;
      impl.NotifyMigrateStart(start, end, pgmap.owner());
      impl.DeviceUnmap(g.t.data() + b, e - b);
      impl.NotifyMigrateEnd(start, end, pgmap.owner());
      b = e;
    }
    for (size_t k = 0; k < g.t.size(); ++k)
      if (g.t[k].done) ++unmapped[g.page[k]];
  }

  // 3. migrate_vma_check_page: every reference but ours must be one of the
  // migration entries just installed; otherwise (a CPU fault holding the
  // page, a mapping made meanwhile, a driver's own reference) restore.
  std::vector<DevicePfn> busy;
  for (uint64_t i = 0; i < n; ++i)
    if ((src[i] & kMigratePfnMigrate) && pgmap.RefCount(pgmap.IndexOf(pfns[i])) > 1 + unmapped[i])
      busy.push_back(pfns[i]);
  if (!busy.empty()) {
    RestoreEntries(pgmap, busy);
    std::sort(busy.begin(), busy.end());
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate) || !std::binary_search(busy.begin(), busy.end(), pfns[i]))
        continue;
      src[i] = 0;
      const uint64_t idx = pgmap.IndexOf(pfns[i]);
      pgmap.UnlockPage(idx);
      pgmap.Put(idx);
    }
  }
  return {};
}

Result<void> MigrateDeviceRange(DevicePagemap& pgmap, uint64_t first, uint64_t n, uint64_t* src,
                                uint64_t* dst) {
  if (n == 0 || first >= pgmap.npages() || n > pgmap.npages() - first)
    return Err(Errc::kInval, "migrate device: range outside the pagemap");
  std::vector<DevicePfn> pfns(n);
  for (uint64_t i = 0; i < n; ++i) pfns[i] = pgmap.PfnOf(first + i);
  return MigrateDevicePfns(pgmap, pfns.data(), n, src, dst);
}

void MigrateDevicePages(DevicePagemap&, uint64_t* src, const uint64_t* dst, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i)
    if ((src[i] & kMigratePfnMigrate) && (!(dst[i] & kMigratePfnValid) || (dst[i] & kMigratePfnDevice)))
      src[i] &= ~kMigratePfnMigrate;
}

void MigrateDeviceFinalize(DevicePagemap& pgmap, FramePool* pool, const uint64_t* src,
                           const uint64_t* dst, uint64_t n) {
  auto has_dst = [&](uint64_t i) { return (dst[i] & kMigratePfnValid) && !(dst[i] & kMigratePfnDevice); };
  // remove_migration_ptes for every collected page, space by space.
  Groups gs;
  {
    std::vector<Mapping> scratch;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnValid)) continue;
      const bool migrated = (src[i] & kMigratePfnMigrate) && has_dst(i);
      gs.Add(pgmap, MigratePfnOf(src[i]), i, migrated ? MigratePfnOf(dst[i]) : kInvalidPfn, scratch);
    }
  }
  gs.Sort();
  std::vector<uint32_t> remapped(n, 0);
  for (auto& g : gs.groups) {
    assert((!pool || &g.as->pool() == pool) && "dst frames from another pool");
    DeviceMigration::Of(*g.as).DeviceRemap(pgmap, g.t.data(), g.t.size());
    for (size_t k = 0; k < g.t.size(); ++k)
      if (g.t[k].done && g.t[k].dst != kInvalidPfn) ++remapped[g.page[k]];
  }
  for (uint64_t i = 0; i < n; ++i) {
    assert((!has_dst(i) || pool) && "migrate device finalize: dst frames need their pool");
    if (src[i] & kMigratePfnValid) {
      const uint64_t idx = pgmap.IndexOf(MigratePfnOf(src[i]));
      pgmap.UnlockPage(idx);
      // The references of the entries now mapping the system page, then
      // the migrator's own; the last one calls PageFree.
      for (uint32_t k = 0; k < remapped[i]; ++k) pgmap.Put(idx);
      pgmap.Put(idx);
    }
    if (has_dst(i) && pool) pool->Put(MigratePfnOf(dst[i]));  // the caller's allocation reference
  }
}

Result<uint64_t> EvictDevicePages(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n) {
  std::vector<uint64_t> src(n), dst(n);
  USVM_TRY(MigrateDevicePfns(pgmap, pfns, n, src.data(), dst.data()));
  // The frames come from the mappers' pool (one per simulated machine).
  FramePool* pool = nullptr;
  {
    std::vector<Mapping> maps;
    std::vector<std::shared_ptr<AddressSpace>> keep;
    for (uint64_t i = 0; i < n && !pool; ++i)
      if (src[i] & kMigratePfnMigrate) {
        pgmap.RmapSnapshot(pgmap.IndexOf(pfns[i]), maps, keep);
        if (!keep.empty()) pool = &keep.front()->pool();
      }
  }
  bool oom = false;
  uint64_t moved = 0;
  for (uint64_t i = 0; i < n && pool && !oom; ++i) {
    if (!(src[i] & kMigratePfnMigrate)) continue;
    auto p = pool->AllocPage(FramePool::Zero::kNo);
    if (!p) {
      oom = true;
      break;
    }
    if (!pgmap.ops().CopyToRam(pgmap, pgmap.IndexOf(pfns[i]), pool->Data(*p))) {
      pool->Put(*p);
      continue;
    }
    dst[i] = MigratePfn(*p, false);
    ++moved;
  }
  MigrateDevicePages(pgmap, src.data(), dst.data(), n);
  MigrateDeviceFinalize(pgmap, pool, src.data(), dst.data(), n);
  if (oom) return Err(Errc::kNoMem, "evict: no system frame");
  return moved;
}

}  // namespace usvm::mm
