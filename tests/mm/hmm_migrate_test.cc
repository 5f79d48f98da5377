// Device-private memory and migration through the test mirror device.
#include <gtest/gtest.h>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

class HmmMigrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
    dev_ = testing::DMirror::Create(as_, 1024);
    ASSERT_TRUE(dev_);
  }
  void TearDown() override {
    dev_.reset();
    as_->Exit();
  }
  uint64_t MapAnon(uint64_t len) {
    return *as_->Mmap(0, len, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<testing::DMirror> dev_;
};

TEST_F(HmmMigrateTest, MigrateThenCpuFaultBringsDataBack) {
  const uint64_t len = 16 * kPageSize;
  uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  std::vector<uint8_t> data(len);
  for (size_t i = 0; i < len; ++i) data[i] = uint8_t(i * 13);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 16u);
  for (uint64_t p = 0; p < 16; ++p)
    ASSERT_EQ(as_->QueryPte(a + p * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(dev_->device_pages_in_use(), 16u);
  // The device reads its own memory without faulting.
  std::vector<uint8_t> got(len);
  ASSERT_TRUE(dev_->Read(a, got.data(), len).has_value());
  EXPECT_EQ(got, data);
  EXPECT_EQ(dev_->cpu_faults(), 0u);
  // The CPU touches one page: that page comes home.
  uint8_t b = 0;
  ASSERT_TRUE(as_->Read(a + 5 * kPageSize + 7, &b, 1).has_value());
  EXPECT_EQ(b, data[5 * kPageSize + 7]);
  EXPECT_EQ(dev_->cpu_faults(), 1u);
  EXPECT_EQ(as_->QueryPte(a + 5 * kPageSize).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(dev_->device_pages_in_use(), 15u);
  // All of it back, bytes intact.
  ASSERT_TRUE(as_->Read(a, got.data(), len).has_value());
  EXPECT_EQ(got, data);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

TEST_F(HmmMigrateTest, MigrateUntouchedMemoryFillsHolesWithZeroDevicePages) {
  uint64_t a = MapAnon(4 * kPageSize);
  ASSERT_TRUE(dev_->Watch(a, 4 * kPageSize).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + 4 * kPageSize), 4u);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  uint64_t v = 1;
  ASSERT_TRUE(as_->Read(a + 8, &v, 8).has_value());
  EXPECT_EQ(v, 0u);
}

TEST_F(HmmMigrateTest, MigrateMultipleTimesKeepsData) {
  const uint64_t len = 8 * kPageSize;
  uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  std::vector<uint8_t> data(len, 0x3C);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  for (int round = 0; round < 5; ++round) {
    ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 8u);
    ASSERT_EQ(*dev_->MigrateToSystem(a, a + len), 8u);
  }
  std::vector<uint8_t> got(len);
  ASSERT_TRUE(as_->Read(a, got.data(), len).has_value());
  EXPECT_EQ(got, data);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

TEST_F(HmmMigrateTest, SharedAnonymousMemoryRefusesToMigrate) {
  uint64_t a = *as_->Mmap(0, 2 * kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);
  ASSERT_TRUE(dev_->Watch(a, 2 * kPageSize).has_value());
  uint8_t v = 1;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + 2 * kPageSize), 0u);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
}

TEST_F(HmmMigrateTest, MunmapOfDevicePagesFreesThem) {
  uint64_t a = MapAnon(4 * kPageSize);
  ASSERT_TRUE(dev_->Watch(a, 4 * kPageSize).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + 4 * kPageSize), 4u);
  const uint64_t free_before = dev_->free_pages();
  ASSERT_TRUE(as_->Munmap(a, 4 * kPageSize).has_value());
  EXPECT_EQ(dev_->free_pages(), free_before + 4);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

TEST_F(HmmMigrateTest, ForkSharesDevicePagesCopyOnWrite) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(dev_->Watch(a, 2 * kPageSize).has_value());
  uint64_t v = 42;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + 2 * kPageSize), 2u);
  auto child = *as_->Fork();
  EXPECT_EQ(child->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  uint64_t w = 7;
  ASSERT_TRUE(child->Write(a, &w, 8).has_value());  // migrates the child's view home, then COW
  uint64_t got = 0;
  ASSERT_TRUE(as_->Read(a, &got, 8).has_value());
  EXPECT_EQ(got, 42u);
  ASSERT_TRUE(child->Read(a, &got, 8).has_value());
  EXPECT_EQ(got, 7u);
  child->Exit();
}

TEST_F(HmmMigrateTest, DestroyingThePagemapMigratesEverythingHome) {
  const uint64_t len = 8 * kPageSize;
  uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  std::vector<uint8_t> data(len, 0x77);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 8u);
  dev_.reset();
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
  std::vector<uint8_t> got(len);
  ASSERT_TRUE(as_->Read(a, got.data(), len).has_value());
  EXPECT_EQ(got, data);
}

}  // namespace
}  // namespace usvm::mm
