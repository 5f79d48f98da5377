// What a minimal device-private driver may leave out: MigrateToRam that
// does not pass MigrateVma::fault_page (Setup takes the page this thread's
// fault holds), and no CopyToRam (eviction by frame cannot copy its pages,
// so pagemap teardown brings them home through MigrateToRam).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "test_util.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"
#include "usvm/mm/migrate_device.h"

namespace usvm::mm {
namespace {

class MinimalDriver final : public DevicePagemapOps {
 public:
  explicit MinimalDriver(uint64_t npages) : vram(npages * kPageSize) {
    pgmap = std::move(*DevicePagemap::TryCreate(npages, this, this));
    for (uint64_t i = 0; i < npages; ++i) free.push_back(npages - 1 - i);
  }
  void PageFree(DevicePagemap&, uint64_t index) override {
    ++frees;
    free.push_back(index);
  }
  Result<void> MigrateToRam(Mm& port, uint64_t addr, DevicePagemap&, uint64_t) override {
    AddressSpace& as = static_cast<AddressSpace&>(port);
    ++to_ram;
    USVM_TRY(Move(as, addr, addr + kPageSize, false));  // no fault_page
    return {};
  }
  // REQUIRES: the mmap read lock.
  Result<uint64_t> Move(AddressSpace& as, uint64_t start, uint64_t end, bool to_device) {
    const uint64_t n = (end - start) / kPageSize;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = start;
    m.end = end;
    m.src = src.data();
    m.dst = dst.data();
    m.pgmap_owner = this;
    m.flags = to_device ? kMigrateSelectSystem : kMigrateSelectDevicePrivate;
    USVM_TRY(as.MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate) || !(src[i] & kMigratePfnValid)) continue;
      if (to_device) {
        const uint64_t idx = free.back();
        free.pop_back();
        if (!pgmap->InitPage(idx)) continue;
        std::memcpy(&vram[idx * kPageSize], as.pool().Data(MigratePfnOf(src[i])), kPageSize);
        dst[i] = MigratePfn(pgmap->PfnOf(idx), true);
      } else {
        auto p = as.pool().AllocPage(FramePool::Zero::kNo);
        if (!p) continue;
        std::memcpy(as.pool().Data(*p), &vram[pgmap->IndexOf(MigratePfnOf(src[i])) * kPageSize], kPageSize);
        dst[i] = MigratePfn(*p, false);
      }
      ++moved;
    }
    as.MigrateVmaPages(m);
    as.MigrateVmaFinalize(m);
    return moved;
  }
  std::vector<std::byte> vram;
  std::unique_ptr<DevicePagemap> pgmap;
  std::vector<uint64_t> free;
  int to_ram = 0, frees = 0;
};

class DriverContractTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(64);
    as_ = testing::MakeSpace(*pool_);
    dev_ = std::make_unique<MinimalDriver>(16);
    a_ = *as_->Mmap(0, 4 * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
    for (uint64_t p = 0; p < 4; ++p) {
      const uint64_t v = 100 + p;
      ASSERT_TRUE(as_->Write(a_ + p * kPageSize, &v, 8).has_value());
    }
    ReadLock l(as_->mmap_lock());
    ASSERT_EQ(*dev_->Move(*as_, a_, a_ + 4 * kPageSize, true), 4u);
  }
  void TearDown() override {
    if (dev_ && dev_->pgmap) DestroyPagemap();
    dev_.reset();
    as_->Exit();
  }
  // Teardown calls back into the driver, which uses pgmap: keep it set
  // while the pagemap is destroyed.
  void DestroyPagemap() {
    delete dev_->pgmap.get();
    (void)dev_->pgmap.release();
  }
  uint64_t Word(uint64_t a) {
    uint64_t v = 0;
    EXPECT_TRUE(as_->Read(a, &v, 8).has_value());
    return v;
  }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<MinimalDriver> dev_;
  uint64_t a_ = 0;
};

TEST_F(DriverContractTest, MigrateToRamWithoutFaultPageStillBringsThePageHome) {
  EXPECT_EQ(Word(a_ + kPageSize), 101u);
  EXPECT_EQ(dev_->to_ram, 1);
  EXPECT_EQ(as_->QueryPte(a_ + kPageSize).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(as_->QueryPte(a_).kind, PteInfo::Kind::kDevicePrivate);
}

TEST_F(DriverContractTest, EvictionWithoutCopyToRamLeavesPagesWhereTheyAre) {
  const DevicePfn p0 = as_->QueryPte(a_).pfn;
  auto r = EvictDevicePages(*dev_->pgmap, &p0, 1);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, 0u);
  EXPECT_EQ(as_->QueryPte(a_).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(Word(a_), 100u);  // and a CPU touch still works
}

TEST_F(DriverContractTest, TeardownWithoutCopyToRamFaultsEveryPageHome) {
  DestroyPagemap();  // memunmap_pages
  EXPECT_EQ(dev_->to_ram, 4);
  EXPECT_EQ(dev_->frees, 4);
  for (uint64_t p = 0; p < 4; ++p) {
    EXPECT_EQ(as_->QueryPte(a_ + p * kPageSize).kind, PteInfo::Kind::kPresent);
    EXPECT_EQ(Word(a_ + p * kPageSize), 100 + p);
  }
}

}  // namespace
}  // namespace usvm::mm
