#include "usvm/mm/device_pagemap.h"

#include <sys/mman.h>

#include <cassert>
#include <cstring>
#include <chrono>
#include <map>
#include <thread>

#include "usvm/mm/address_space.h"
#include "usvm/mm/migrate_device.h"

namespace usvm::mm {

namespace {

// The device frame space: pagemaps take consecutive, never reused ranges
// (like iomem resources), starting far above any system frame number.
constexpr DevicePfn kDeviceSpaceStart = uint64_t{1} << 40;
constexpr DevicePfn kDeviceSpaceEnd = uint64_t{1} << 54;

struct Registry {
  Mutex lock;
  std::map<DevicePfn, DevicePagemap*> by_base USVM_GUARDED_BY(lock);
  DevicePfn next USVM_GUARDED_BY(lock) = kDeviceSpaceStart;
};

Registry& GetRegistry() {
  static Registry* r = new Registry();
  return *r;
}

}  // namespace

Result<std::unique_ptr<DevicePagemap>> DevicePagemap::TryCreate(uint64_t npages, const void* owner,
                                                                DevicePagemapOps* ops,
                                                                DeviceMemoryKind kind) {
  if (npages == 0) return Err(Errc::kInval, "device pagemap: zero pages");
  if (!ops) return Err(Errc::kInval, "device pagemap: null ops");
  // memremap_pages refuses device-private and device-coherent memory
  // without an owner: range fault and migration tell "mine" by it.
  if (!owner) return Err(Errc::kInval, "device pagemap: null owner");
  if (npages > kDeviceSpaceEnd - kDeviceSpaceStart) return Err(Errc::kNoMem, "device pagemap too large");
  std::byte* arena = nullptr;
  if (kind == DeviceMemoryKind::kCoherent) {
    void* p = mmap(nullptr, npages << kPageShift, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return Err(Errc::kNoMem, "cannot reserve coherent device memory");
    arena = static_cast<std::byte*>(p);
  }
  Registry& reg = GetRegistry();
  MutexLock l(reg.lock);
  if (npages > kDeviceSpaceEnd - reg.next) {
    if (arena) munmap(arena, npages << kPageShift);
    return Err(Errc::kNoMem, "device frame space exhausted");
  }
  const DevicePfn base = reg.next;
  reg.next += npages;
  std::unique_ptr<DevicePagemap> pm(new DevicePagemap(npages, owner, ops, base, kind, arena));
  reg.by_base.emplace(base, pm.get());
  return pm;
}

DevicePagemap::DevicePagemap(uint64_t npages, const void* owner, DevicePagemapOps* ops,
                             DevicePfn base, DeviceMemoryKind kind, std::byte* arena)
    : kind_(kind),
      arena_(arena),
      npages_(npages), owner_(owner), ops_(ops), base_(base), pages_(new Page[npages]),
      rmap_(npages) {}

DevicePagemap::~DevicePagemap() {
  // memunmap_pages. Drivers evict before they unregister (the kernel's
  // drivers call migrate_device_range first); we do it here so that no
  // CPU entry can outlive the pagemap: every mapped page goes to system
  // memory in every address space that maps it. Pages the eviction skips
  // (locked by a concurrent fault or migration, or with an extra
  // reference) are tried again; then wait for the last references (the
  // driver's own, a migrator's) to go.
  std::vector<DevicePfn> busy;
  for (int pass = 0;; ++pass) {
    busy.clear();
    bool mapped = false;
    for (uint64_t i = 0; i < npages_; ++i) {
      if (RefCount(i) == 0) continue;
      busy.push_back(PfnOf(i));
      mapped = mapped || DebugRmapCount(i) != 0;
    }
    if (busy.empty()) break;
    if (mapped) {
      auto r = EvictDevicePages(*this, busy.data(), busy.size());
      assert(r.has_value() && "device-frame eviction failed during pagemap teardown");
      if (r && *r == 0) FaultHomeMappedPages(busy);
    }
    if (pass > 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  Registry& reg = GetRegistry();
  {
    MutexLock l(reg.lock);
    reg.by_base.erase(base_);
  }
  if (arena_) munmap(arena_, npages_ << kPageShift);
}

void DevicePagemap::FaultHomeMappedPages(const std::vector<DevicePfn>& pfns) {
  // Eviction by frame moved nothing (a driver without CopyToRam, or pages
  // that stay busy): touch each mapping as the CPU would, so the fault path
  // calls the driver's MigrateToRam under that space's mmap lock.
  std::vector<std::pair<AddressSpace*, uint64_t>> maps;
  std::vector<std::shared_ptr<AddressSpace>> keep;
  for (DevicePfn dpfn : pfns) {
    maps.clear();
    RmapSnapshot(IndexOf(dpfn), maps, keep);
    for (auto [as, addr] : maps) (void)as->Populate(addr, kPageSize, /*write=*/false);
  }
}

Result<void> DevicePagemapOps::CopyToRam(DevicePagemap& pgmap, uint64_t index, std::byte* to) {
  if (!pgmap.coherent())
    return Err(Errc::kNoSys, "device pagemap: the driver has no CopyToRam for device-private pages");
  std::memcpy(to, pgmap.CoherentData(index), kPageSize);
  return {};
}

DevicePagemap* DevicePagemap::Lookup(DevicePfn dpfn) {
  Registry& reg = GetRegistry();
  MutexLock l(reg.lock);
  auto it = reg.by_base.upper_bound(dpfn);
  if (it == reg.by_base.begin()) return nullptr;
  --it;
  DevicePagemap* pm = it->second;
  return dpfn < pm->base_ + pm->npages_ ? pm : nullptr;
}

Result<void> DevicePagemap::InitPage(uint64_t index, void* zone_data) {
  if (index >= npages_) return Err(Errc::kInval, "device page index out of range");
  uint32_t expected = 0;
  if (!pages_[index].refcount.compare_exchange_strong(expected, 1, std::memory_order_acq_rel))
    return Err(Errc::kBusy, "device page in use");
  pages_[index].zone_data = zone_data;
  return {};
}

void DevicePagemap::Get(uint64_t index) {
  [[maybe_unused]] uint32_t old = pages_[index].refcount.fetch_add(1, std::memory_order_relaxed);
  assert(old > 0);
}

bool DevicePagemap::TryGet(uint64_t index) {
  uint32_t c = pages_[index].refcount.load(std::memory_order_relaxed);
  while (c != 0)
    if (pages_[index].refcount.compare_exchange_weak(c, c + 1, std::memory_order_acquire)) return true;
  return false;
}

void DevicePagemap::Put(uint64_t index) {
  const uint32_t old = pages_[index].refcount.fetch_sub(1, std::memory_order_acq_rel);
  assert(old > 0);
  if (old == 1) ops_->PageFree(*this, index);
}

uint32_t DevicePagemap::RefCount(uint64_t index) const {
  return pages_[index].refcount.load(std::memory_order_acquire);
}

bool DevicePagemap::TryLockPage(uint64_t index) {
  return !(pages_[index].flags.fetch_or(kPageLockedBit, std::memory_order_acquire) & kPageLockedBit);
}

void DevicePagemap::UnlockPage(uint64_t index) {
  [[maybe_unused]] const uint32_t old =
      pages_[index].flags.fetch_and(~kPageLockedBit, std::memory_order_release);
  assert(old & kPageLockedBit);
}

bool DevicePagemap::PageLocked(uint64_t index) const {
  return pages_[index].flags.load(std::memory_order_acquire) & kPageLockedBit;
}

void DevicePagemap::RmapAdd(uint64_t index, AddressSpace* as, uint64_t addr, uint64_t n) {
  MutexLock l(rmap_lock_);
  for (uint64_t p = 0; p < n; ++p) rmap_[index + p].push_back({as, addr + (p << kPageShift)});
}

void DevicePagemap::RmapRemove(uint64_t index, AddressSpace* as, uint64_t addr, uint64_t n) {
  MutexLock l(rmap_lock_);
  for (uint64_t p = 0; p < n; ++p) {
    auto& v = rmap_[index + p];
    const uint64_t a = addr + (p << kPageShift);
    for (size_t k = 0; k < v.size(); ++k)
      if (v[k].as == as && v[k].addr == a) {
        v[k] = v.back();
        v.pop_back();
        break;
      }
  }
}

void DevicePagemap::RmapMove(uint64_t index, AddressSpace* as, uint64_t from, uint64_t to) {
  MutexLock l(rmap_lock_);
  for (auto& r : rmap_[index])
    if (r.as == as && r.addr == from) {
      r.addr = to;
      return;
    }
}

void DevicePagemap::RmapSnapshot(uint64_t index, std::vector<std::pair<AddressSpace*, uint64_t>>& out,
                                 std::vector<std::shared_ptr<AddressSpace>>& keep) const {
  MutexLock l(rmap_lock_);
  for (const auto& r : rmap_[index]) {
    bool kept = false;
    for (const auto& k : keep) kept = kept || k.get() == r.as;
    if (!kept) {
      // The record keeps the space's memory alive (its zap needs
      // rmap_lock_ to remove it); lock() fails once its destructor began.
      auto sp = r.as->weak_from_this().lock();
      if (!sp) continue;
      keep.push_back(std::move(sp));
    }
    out.emplace_back(r.as, r.addr);
  }
}

size_t DevicePagemap::DebugRmapCount(uint64_t index) const {
  MutexLock l(rmap_lock_);
  return rmap_[index].size();
}

uint64_t DevicePagemap::DebugPagesInUse() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < npages_; ++i) n += pages_[i].refcount.load(std::memory_order_relaxed) > 0;
  return n;
}

}  // namespace usvm::mm
