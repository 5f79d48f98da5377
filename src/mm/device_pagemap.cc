#include "usvm/mm/device_pagemap.h"

#include <sys/mman.h>

#include <cassert>
#include <map>

#include "usvm/mm/address_space.h"

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
      npages_(npages), owner_(owner), ops_(ops), base_(base), pages_(new Page[npages]) {}

DevicePagemap::~DevicePagemap() {
  // memunmap_pages: nothing may stay mapped. Ask the driver to bring every
  // mapped page home, address space by address space.
  std::vector<std::weak_ptr<AddressSpace>> mappers;
  {
    MutexLock l(lock_);
    mappers.swap(mappers_);
  }
  for (auto& w : mappers) {
    std::shared_ptr<AddressSpace> as = w.lock();
    if (!as) continue;
    std::vector<std::pair<uint64_t, uint64_t>> entries;
    {
      ReadLock l(as->mmap_lock());
      entries = as->FindDeviceEntriesLocked(base_, base_ + npages_);
    }
    // A CPU read fault brings each page home through the fault path, which
    // rechecks the entry and locks the page around MigrateToRam.
    // (Coherent pages are readable in place: a pin moves them home.)
    for (auto [addr, dpfn] : entries) {
      Pfn pinned;
      [[maybe_unused]] auto r = coherent() ? as->PinUserPages(addr, 1, false, &pinned)
                                           : as->Populate(addr, kPageSize, /*write=*/false);
      assert(r.has_value() && "migrate_to_ram failed during pagemap teardown");
      if (r && coherent()) as->UnpinUserPage(pinned);
    }
  }
  Registry& reg = GetRegistry();
  {
    MutexLock l(reg.lock);
    reg.by_base.erase(base_);
  }
  if (arena_) munmap(arena_, npages_ << kPageShift);
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

void DevicePagemap::NoteMapper(const std::shared_ptr<AddressSpace>& as) {
  MutexLock l(lock_);
  for (auto it = mappers_.begin(); it != mappers_.end();) {
    auto p = it->lock();
    if (p == as) return;
    it = p ? std::next(it) : mappers_.erase(it);
  }
  mappers_.push_back(as);
}

uint64_t DevicePagemap::DebugPagesInUse() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < npages_; ++i) n += pages_[i].refcount.load(std::memory_order_relaxed) > 0;
  return n;
}

}  // namespace usvm::mm
