// More scenarios of the kernel's HMM selftests (tools/testing/selftests/mm/
// hmm-tests.c), through our mirror device (dmirror.h): migration of private
// file mappings, short-term get_user_pages on device memory, hugetlb
// mappings (`compound`, `anon_write_hugetlbfs`) and the THP migration cases
// that work with 4 KiB device pages (`migrate_anon_huge_*`).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;

std::vector<uint8_t> Pattern(uint64_t len, uint8_t seed) {
  std::vector<uint8_t> v(len);
  for (uint64_t i = 0; i < len; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 12));
  return v;
}

class HmmSelftest2 : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
    dev_ = DMirror::Create(as_, 2048);
    ASSERT_TRUE(dev_);
  }
  void TearDown() override {
    dev_.reset();
    if (as_) as_->Exit();
  }
  uint64_t MapAnon(uint64_t len, uint32_t prot = kRW) {
    auto r = as_->Mmap(0, len, prot, kMapPrivate | kMapAnonymous);
    EXPECT_TRUE(r.has_value());
    return *r;
  }
  // A MADV_HUGEPAGE region of n huge pages inside a 2n+1 MiB mapping;
  // returns its 2 MiB-aligned start.
  uint64_t MapThp(uint64_t n, uint32_t prot = kRW) {
    auto r = as_->Mmap(0, (n + 1) * kHugePageSize, prot, kMapPrivate | kMapAnonymous);
    EXPECT_TRUE(r.has_value());
    const uint64_t base = (*r + kHugePageSize - 1) & kHugeMask;
    EXPECT_TRUE(as_->Madvise(base, n * kHugePageSize, kMadvHugePage).has_value());
    return base;
  }
  std::vector<uint8_t> CpuRead(uint64_t a, uint64_t len) {
    std::vector<uint8_t> v(len);
    auto r = as_->Read(a, v.data(), len);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return v;
  }
  std::vector<uint8_t> DevRead(uint64_t a, uint64_t len) {
    std::vector<uint8_t> v(len);
    auto r = dev_->Read(a, v.data(), len);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return v;
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<DMirror> dev_;
};

// ---- migration of private file mappings (bug 6) -----------------------------

// Bug 6: MigrateVmaSetup refused every page of a private file mapping. The
// pages the process has written are its own anonymous copies, and the
// kernel migrates those; only page-cache pages stay. hmm-tests
// migrate_file_private: write every page, migrate, all of them move.
TEST_F(HmmSelftest2, MigrateCollectsPrivateCopiesOfFilePages) {
  const uint64_t n = 16, len = n * kPageSize;
  auto f = *SimFile::TryCreate(*pool_, len);
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapPrivate, f, 0);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 3);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());

  auto moved = dev_->MigrateToDevice(a, a + len);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  EXPECT_EQ(*moved, n);
  for (uint64_t p = a; p < a + len; p += kPageSize)
    EXPECT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kDevicePrivate);
  // The device reads its own pages; the CPU faults them back intact; the
  // file never saw the private bytes.
  EXPECT_EQ(DevRead(a, len), data);
  EXPECT_EQ(CpuRead(a, len), data);
  std::vector<uint8_t> file(len, 0xff);
  ASSERT_EQ(*f->Pread(0, file.data(), len), len);
  EXPECT_EQ(file, std::vector<uint8_t>(len, 0));
}

// The other half of the rule: page-cache pages of a private file mapping
// (read, never written) and holes are not collected; written copies are.
TEST_F(HmmSelftest2, MigrateOfPrivateFileMappingSkipsPageCachePagesAndHoles) {
  const uint64_t n = 6, len = n * kPageSize;
  auto f = *SimFile::TryCreate(*pool_, len);
  auto file_data = Pattern(len, 9);
  ASSERT_TRUE(f->Pwrite(0, file_data.data(), len).has_value());
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapPrivate, f, 0);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  // Pages 0-1: read (page cache); 2-3: written (private copies); 4-5: untouched.
  (void)CpuRead(a, 2 * kPageSize);
  auto mine = Pattern(2 * kPageSize, 77);
  ASSERT_TRUE(as_->Write(a + 2 * kPageSize, mine.data(), mine.size()).has_value());
  ASSERT_TRUE(as_->QueryPte(a).file);

  auto moved = dev_->MigrateToDevice(a, a + len);
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(*moved, 2u);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
  EXPECT_TRUE(as_->QueryPte(a + kPageSize).file);
  EXPECT_EQ(as_->QueryPte(a + 2 * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(as_->QueryPte(a + 3 * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(as_->QueryPte(a + 4 * kPageSize).kind, PteInfo::Kind::kNone);
  auto expect = file_data;
  std::memcpy(expect.data() + 2 * kPageSize, mine.data(), mine.size());
  EXPECT_EQ(CpuRead(a, len), expect);
}

}  // namespace
}  // namespace usvm::mm
