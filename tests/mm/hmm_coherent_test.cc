// Device-coherent memory: CPU-accessible device pages.
#include <gtest/gtest.h>

#include <cstring>

#include "coherent_device.h"
#include "test_util.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/migrate.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm {
namespace {

using testing::CoherentDevice;

class CoherentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(128);
    as_ = testing::MakeSpace(*pool_);
    dev_ = std::make_unique<CoherentDevice>(64);
  }
  void TearDown() override {
    dev_.reset();
    as_->Exit();
  }
  Result<uint64_t> ToDevice(uint64_t a, uint64_t len) {
    ReadLock l(as_->mmap_lock());
    return dev_->Move(*as_, a, a + len, true);
  }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<CoherentDevice> dev_;
};

TEST_F(CoherentTest, CpuAccessesCoherentPagesInPlace) {
  uint64_t a = *as_->Mmap(0, 4 * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  std::vector<uint8_t> data(4 * kPageSize, 0x42);
  ASSERT_TRUE(as_->Write(a, data.data(), data.size()).has_value());
  ASSERT_EQ(*ToDevice(a, 4 * kPageSize), 4u);
  PteInfo p = as_->QueryPte(a);
  EXPECT_EQ(p.kind, PteInfo::Kind::kPresent);
  EXPECT_TRUE(p.device_memory);
  // CPU reads and writes go to the device's bytes, without migrating.
  uint8_t b = 0;
  ASSERT_TRUE(as_->Read(a + 3, &b, 1).has_value());
  EXPECT_EQ(b, 0x42);
  b = 0x99;
  ASSERT_TRUE(as_->Write(a + kPageSize, &b, 1).has_value());
  EXPECT_EQ(uint8_t(dev_->pgmap->CoherentData(dev_->pgmap->IndexOf(as_->QueryPte(a + kPageSize).pfn))[0]),
            0x99);
  EXPECT_EQ(dev_->to_ram, 0);
  EXPECT_EQ(*as_->AtomicFetchAdd(a + 2 * kPageSize, 1), 0x4242424242424242ull);
}

TEST_F(CoherentTest, RangeFaultReportsCoherentPagesAsDeviceFrames) {
  uint64_t a = *as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_EQ(*ToDevice(a, kPageSize), 1u);
  struct Ops : MmuIntervalNotifierOps {
    bool Invalidate(MmuIntervalNotifier* s, const NotifierRange&, uint64_t seq) override {
      s->SetSeq(seq);
      return true;
    }
  } ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, a, kPageSize, &ops).has_value());
  uint64_t w = 0;
  HmmRange r;
  r.notifier = &sub;
  r.notifier_seq = sub.ReadBegin();
  r.start = a;
  r.end = a + kPageSize;
  r.hmm_pfns = &w;
  r.default_flags = kPfnReqFault;
  {
    ReadLock l(as_->mmap_lock());
    ASSERT_TRUE(as_->RangeFault(r).has_value());
  }
  EXPECT_EQ(w & kPfnFlags, kPfnValid | kPfnWrite | kPfnDevice);
  EXPECT_EQ(HmmPfn(w), as_->QueryPte(a).pfn);
  ASSERT_TRUE(sub.Remove().has_value());
}

TEST_F(CoherentTest, LongTermPinMigratesCoherentPagesHome) {
  uint64_t a = *as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  uint64_t v = 31;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  ASSERT_EQ(*ToDevice(a, kPageSize), 1u);
  Pfn pfn;
  ASSERT_TRUE(as_->PinUserPages(a, 1, true, &pfn).has_value());
  EXPECT_FALSE(as_->QueryPte(a).device_memory);
  EXPECT_EQ(dev_->to_ram, 1);
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(pool_->Data(pfn)), 31u);
  as_->UnpinUserPage(pfn);
}

TEST_F(CoherentTest, ForkSharesCoherentPagesCopyOnWriteAndTeardownBringsThemHome) {
  uint64_t a = *as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  uint64_t v = 5;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  ASSERT_EQ(*ToDevice(a, kPageSize), 1u);
  auto child = *as_->Fork();
  uint64_t w = 6;
  ASSERT_TRUE(child->Write(a, &w, 8).has_value());
  EXPECT_FALSE(child->QueryPte(a).device_memory);  // the copy is system memory
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  EXPECT_EQ(v, 5u);
  child->Exit();
  dev_.reset();  // unregistering migrates the parent's page home
  EXPECT_FALSE(as_->QueryPte(a).device_memory);
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  EXPECT_EQ(v, 5u);
}

}  // namespace
}  // namespace usvm::mm
