// A device-coherent test device (MEMORY_DEVICE_COHERENT): CPU-accessible
// device pages in the pagemap's arena, moved with MigrateVma (4 KiB), home
// again on MigrateToRam (long-term pins) or device-frame eviction
// (CopyToRam). Shared by hmm_coherent_test.cc and gup_test.cc.
#ifndef USVM_TESTS_MM_COHERENT_DEVICE_H_
#define USVM_TESTS_MM_COHERENT_DEVICE_H_

#include <cstring>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm::testing {

// A device whose memory the CPU can reach (MEMORY_DEVICE_COHERENT).
class CoherentDevice final : public DevicePagemapOps {
 public:
  explicit CoherentDevice(uint64_t npages) {
    pgmap = std::move(*DevicePagemap::TryCreate(npages, this, this, DeviceMemoryKind::kCoherent));
    MutexLock l(free_mu);
    for (uint64_t i = 0; i < npages; ++i) free.push_back(npages - 1 - i);
  }
  ~CoherentDevice() override {
    delete pgmap.get();  // evicts what is still mapped home, through pgmap
    (void)pgmap.release();
  }
  void PageFree(DevicePagemap&, uint64_t index) override {
    MutexLock l(free_mu);  // the last reference may drop on any thread
    free.push_back(index);
  }
  Result<void> MigrateToRam(Mm& port, uint64_t addr, DevicePagemap& pm, uint64_t index) override {
    AddressSpace& as = static_cast<AddressSpace&>(port);
    ++to_ram;
    return Move(as, addr, addr + kPageSize, false, pm.PfnOf(index)).has_value() ? Result<void>()
                                                                                : Err(Errc::kFault);
  }
  Result<void> CopyToRam(DevicePagemap& pm, uint64_t index, std::byte* to) override {
    std::memcpy(to, pm.CoherentData(index), kPageSize);
    return {};
  }
  // REQUIRES: the mmap read lock.
  Result<uint64_t> Move(AddressSpace& as, uint64_t start, uint64_t end, bool to_device,
                        DevicePfn fault_page = 0) {
    const uint64_t n = (end - start) / kPageSize;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = start;
    m.end = end;
    m.src = src.data();
    m.dst = dst.data();
    m.pgmap_owner = this;
    m.flags = to_device ? kMigrateSelectSystem : kMigrateSelectDeviceCoherent;
    m.fault_page = fault_page;
    as.mmap_lock().AssertReaderHeld();
    USVM_TRY(as.MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate)) continue;
      std::byte* from = nullptr;
      if (src[i] & kMigratePfnValid)
        from = (src[i] & kMigratePfnDevice)
                   ? pgmap->CoherentData(pgmap->IndexOf(MigratePfnOf(src[i])))
                   : as.pool().Data(MigratePfnOf(src[i]));
      std::byte* to;
      if (to_device) {
        uint64_t idx;
        {
          MutexLock l(free_mu);
          if (free.empty()) continue;
          idx = free.back();
          free.pop_back();
        }
        if (!pgmap->InitPage(idx).has_value()) continue;
        to = pgmap->CoherentData(idx);
        dst[i] = MigratePfn(pgmap->PfnOf(idx), true);
      } else {
        auto pfn = as.pool().AllocPage();
        if (!pfn) continue;
        to = as.pool().Data(*pfn);
        dst[i] = MigratePfn(*pfn, false);
      }
      if (from) std::memcpy(to, from, kPageSize); else std::memset(to, 0, kPageSize);
      ++moved;
    }
    as.MigrateVmaPages(m);
    as.MigrateVmaFinalize(m);
    return moved;
  }
  std::unique_ptr<DevicePagemap> pgmap;
  Mutex free_mu;
  std::vector<uint64_t> free USVM_GUARDED_BY(free_mu);
  int to_ram = 0;
};

}  // namespace usvm::mm::testing

#endif  // USVM_TESTS_MM_COHERENT_DEVICE_H_
