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

bool AddressSpace::Impl::DeviceUnmapOne(uint64_t addr, uint64_t dpfn) {
  ReadLock fl(pt_.free_lock());
  PmdSlot* slot = pt_.Lookup(addr);
  if (!slot) return false;
  WriteLock l(slot->lock);
  if (!slot->table) return false;
  auto& ent = slot->table->e[PageTable::PteIndex(addr)];
  const uint64_t e = ent.load(std::memory_order_relaxed);
  if (!pte::HoldsDevicePage(e) || pte::KindOf(e) == pte::kMigration || pte::PfnOf(e) != dpfn)
    return false;
  // The record stays: it now names the migration entry.
  ent.store(pte::Make(pte::kMigration, dpfn,
                      (e & (pte::kRead | pte::kWrite | pte::kDirty)) | pte::kDevice),
            std::memory_order_relaxed);
  return true;
}

bool AddressSpace::Impl::DeviceRemapOne(uint64_t addr, DevicePagemap& pm, uint64_t dpfn, Pfn dst) {
  {
    ReadLock fl(pt_.free_lock());
    PmdSlot* slot = pt_.Lookup(addr);
    if (!slot) return false;
    WriteLock l(slot->lock);
    if (!slot->table) return false;
    auto& ent = slot->table->e[PageTable::PteIndex(addr)];
    const uint64_t e = ent.load(std::memory_order_relaxed);
    if (pte::KindOf(e) != pte::kMigration || !(e & pte::kDevice) || pte::PfnOf(e) != dpfn)
      return false;
    // The entry's own bits, not the VMA's: mprotect keeps them current
    // (read and write) and we may not look at the VMAs here.
    const uint64_t bits = e & (pte::kRead | pte::kWrite);
    if (dst != kInvalidPfn) {
      pool_.Get(dst);
      ent.store(pte::Make(pte::kPresent, dst, bits | pte::kAccessed | pte::kDirty),
                std::memory_order_relaxed);
      pm.RmapRemove(pm.IndexOf(dpfn), &as_, addr);
    } else if (pm.coherent()) {
      ent.store(pte::Make(pte::kPresent, dpfn, bits | (e & pte::kDirty) | pte::kDevice | pte::kAccessed),
                std::memory_order_relaxed);
    } else {
      ent.store(pte::Make(pte::kDevicePrivate, dpfn, bits), std::memory_order_relaxed);
    }
  }
  migration_wq_.WakeAll();
  return true;
}

// ---- the public calls -------------------------------------------------------------

namespace {

using Mapping = std::pair<AddressSpace*, uint64_t>;

bool InPagemap(const DevicePagemap& pgmap, DevicePfn dpfn) {
  return dpfn >= pgmap.base() && dpfn - pgmap.base() < pgmap.npages();
}

// Puts every migration entry of the (locked) page back as it was.
void RestoreEntries(DevicePagemap& pgmap, DevicePfn dpfn) {
  std::vector<Mapping> maps;
  std::vector<std::shared_ptr<AddressSpace>> keep;
  pgmap.RmapSnapshot(pgmap.IndexOf(dpfn), maps, keep);
  for (auto [as, addr] : maps) DeviceMigration::Of(*as).DeviceRemapOne(addr, pgmap, dpfn, kInvalidPfn);
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

  // 2. try_to_migrate: every mapping becomes a migration entry. Batched by
  // address space and run of consecutive addresses, one MIGRATE bracket
  // per run.
  struct Target {
    AddressSpace* as;
    uint64_t addr;
    uint64_t i;
  };
  std::vector<Target> targets;
  std::vector<std::shared_ptr<AddressSpace>> keep;
  {
    std::vector<Mapping> maps;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate)) continue;
      maps.clear();
      pgmap.RmapSnapshot(pgmap.IndexOf(pfns[i]), maps, keep);
      for (auto [as, addr] : maps) targets.push_back({as, addr, i});
    }
  }
  std::sort(targets.begin(), targets.end(), [](const Target& x, const Target& y) {
    return x.as != y.as ? std::less<AddressSpace*>()(x.as, y.as) : x.addr < y.addr;
  });
  std::vector<uint32_t> unmapped(n, 0);
  for (size_t b = 0; b < targets.size();) {
    size_t e = b + 1;
    while (e < targets.size() && targets[e].as == targets[b].as &&
           targets[e].addr <= targets[e - 1].addr + kPageSize)
      ++e;
    auto& impl = DeviceMigration::Of(*targets[b].as);
    const uint64_t start = targets[b].addr, end = targets[e - 1].addr + kPageSize;
    impl.NotifyMigrateStart(start, end, pgmap.owner());
    for (size_t k = b; k < e; ++k)
      if (impl.DeviceUnmapOne(targets[k].addr, pfns[targets[k].i])) ++unmapped[targets[k].i];
    impl.NotifyMigrateEnd(start, end, pgmap.owner());
    b = e;
  }

  // 3. migrate_vma_check_page: every reference but ours must be one of the
  // migration entries just installed; otherwise (a CPU fault holding the
  // page, a mapping made meanwhile, a driver's own reference) restore.
  for (uint64_t i = 0; i < n; ++i) {
    if (!(src[i] & kMigratePfnMigrate)) continue;
    const uint64_t idx = pgmap.IndexOf(pfns[i]);
    if (pgmap.RefCount(idx) <= 1 + unmapped[i]) continue;
    RestoreEntries(pgmap, pfns[i]);
    src[i] = 0;
    pgmap.UnlockPage(idx);
    pgmap.Put(idx);
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
  std::vector<Mapping> maps;
  std::vector<std::shared_ptr<AddressSpace>> keep;
  for (uint64_t i = 0; i < n; ++i) {
    const bool have_dst = (dst[i] & kMigratePfnValid) && !(dst[i] & kMigratePfnDevice);
    assert((!have_dst || pool) && "migrate device finalize: dst frames need their pool");
    if (src[i] & kMigratePfnValid) {
      const DevicePfn dpfn = MigratePfnOf(src[i]);
      const uint64_t idx = pgmap.IndexOf(dpfn);
      const bool migrated = (src[i] & kMigratePfnMigrate) && have_dst;
      const Pfn to = migrated ? MigratePfnOf(dst[i]) : kInvalidPfn;
      maps.clear();
      pgmap.RmapSnapshot(idx, maps, keep);
      uint32_t remapped = 0;
      for (auto [as, addr] : maps) {
        assert((!migrated || &as->pool() == pool) && "dst frame from another pool");
        if (DeviceMigration::Of(*as).DeviceRemapOne(addr, pgmap, dpfn, to)) ++remapped;
      }
      pgmap.UnlockPage(idx);
      // The references of the entries now mapping the system page, then
      // the migrator's own; the last one calls PageFree.
      if (migrated)
        for (uint32_t k = 0; k < remapped; ++k) pgmap.Put(idx);
      pgmap.Put(idx);
    }
    if (have_dst && pool) pool->Put(MigratePfnOf(dst[i]));  // the caller's allocation reference
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
