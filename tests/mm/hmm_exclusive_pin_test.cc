// Device-exclusive entries and long-term pins.
#include <gtest/gtest.h>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

using testing::RecordingNotifier;

class ExclusivePinTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
    ASSERT_TRUE(as_->notifiers().Register(&rec_).has_value());
  }
  void TearDown() override {
    (void)as_->notifiers().Unregister(&rec_);
    as_->Exit();
  }
  uint64_t MapAnon(uint64_t len) {
    return *as_->Mmap(0, len, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  }
  Result<Pfn> MakeExclusive(uint64_t a, const void* owner) {
    ReadLock l(as_->mmap_lock());
    return as_->MakeDeviceExclusive(a, owner);
  }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  RecordingNotifier rec_;
};

TEST_F(ExclusivePinTest, ExclusiveAccessIsRevokedByACpuWrite) {
  uint64_t a = MapAnon(kPageSize);
  uint64_t v = 5;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  const Pfn pfn = as_->QueryPte(a).pfn;
  int owner;
  rec_.Take();
  auto r = MakeExclusive(a, &owner);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, pfn);
  auto calls = rec_.Starts();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].ev, NotifyEvent::kExclusive);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kDeviceExclusive);
  // The device's atomics work on the frame meanwhile.
  std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(pool_->Data(pfn))).fetch_add(1);
  v = 0;
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());  // CPU touch: restored
  EXPECT_EQ(v, 6u);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(as_->QueryPte(a).pfn, pfn);
  calls = rec_.Starts();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].ev, NotifyEvent::kExclusive);
}

TEST_F(ExclusivePinTest, ExclusiveAccessIsRevokedByFork) {
  uint64_t a = MapAnon(kPageSize);
  uint64_t v = 9;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  int owner;
  ASSERT_TRUE(MakeExclusive(a, &owner).has_value());
  auto child = *as_->Fork();
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(child->QueryPte(a).kind, PteInfo::Kind::kPresent);
  uint64_t w = 1;
  ASSERT_TRUE(child->Write(a, &w, 8).has_value());
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  EXPECT_EQ(v, 9u);
  child->Exit();
}

TEST_F(ExclusivePinTest, ExclusiveNeedsPrivateAnonymousMemory) {
  uint64_t s = *as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);
  int owner;
  EXPECT_EQ(MakeExclusive(s, &owner).error(), Errc::kInval);
  uint64_t ro = *as_->Mmap(0, kPageSize, kProtRead, kMapPrivate | kMapAnonymous);
  EXPECT_EQ(MakeExclusive(ro, &owner).error(), Errc::kFault);
}

TEST_F(ExclusivePinTest, MunmapOfAnExclusivePageFreesIt) {
  uint64_t a = MapAnon(kPageSize);
  int owner;
  ASSERT_TRUE(MakeExclusive(a, &owner).has_value());
  const uint64_t free_before = pool_->GetStats().free_frames;
  ASSERT_TRUE(as_->Munmap(a, kPageSize).has_value());
  EXPECT_EQ(pool_->GetStats().free_frames, free_before + 1);
}

TEST_F(ExclusivePinTest, PinningMigratedPagesBringsThemHome) {
  auto dev = testing::DMirror::Create(as_, 64);
  uint64_t a = MapAnon(4 * kPageSize);
  ASSERT_TRUE(dev->Watch(a, 4 * kPageSize).has_value());
  std::vector<uint8_t> data(4 * kPageSize, 0x5D);
  ASSERT_TRUE(as_->Write(a, data.data(), data.size()).has_value());
  ASSERT_EQ(*dev->MigrateToDevice(a, a + 4 * kPageSize), 4u);
  Pfn pfns[4];
  ASSERT_TRUE(as_->PinUserPages(a, 4, true, pfns).has_value());
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(as_->QueryPte(a + i * kPageSize).kind, PteInfo::Kind::kPresent);
    EXPECT_EQ(pool_->PinCount(pfns[i]), 1u);
    EXPECT_EQ(uint8_t(pool_->Data(pfns[i])[17]), 0x5D);
  }
  // Pinned pages do not migrate.
  EXPECT_EQ(*dev->MigrateToDevice(a, a + 4 * kPageSize), 0u);
  for (Pfn p : pfns) as_->UnpinUserPage(p);
  EXPECT_EQ(*dev->MigrateToDevice(a, a + 4 * kPageSize), 4u);
  dev.reset();
}

TEST_F(ExclusivePinTest, PinnedPagesAreCopiedNotSharedAtFork) {
  uint64_t a = MapAnon(kPageSize);
  Pfn pfn;
  ASSERT_TRUE(as_->PinUserPages(a, 1, true, &pfn).has_value());
  auto child = *as_->Fork();
  EXPECT_TRUE(as_->QueryPte(a).writable);  // the parent keeps its page writable
  EXPECT_NE(child->QueryPte(a).pfn, pfn);
  uint64_t v = 77;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, pfn);  // no COW: the pin sees the write
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(pool_->Data(pfn)), 77u);
  ASSERT_TRUE(child->Read(a, &v, 8).has_value());
  EXPECT_EQ(v, 0u);
  child->Exit();
  as_->UnpinUserPage(pfn);
}

TEST_F(ExclusivePinTest, PinErrorsUnwindEverything) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Munmap(a + kPageSize, kPageSize).has_value());
  Pfn pfns[2];
  EXPECT_EQ(as_->PinUserPages(a, 2, true, pfns).error(), Errc::kFault);
  const Pfn first = as_->QueryPte(a).pfn;
  EXPECT_EQ(pool_->PinCount(first), 0u);
  EXPECT_EQ(as_->PinUserPages(a + 1, 1, false, pfns).error(), Errc::kInval);
  EXPECT_EQ(as_->PinUserPages(a, 0, false, pfns).error(), Errc::kInval);
}


// A 2 MiB-aligned MADV_HUGEPAGE region with nothing faulted in yet.
uint64_t MapUnpopulatedHugeRegion(AddressSpace& as) {
  const uint64_t raw = *as.Mmap(0, 2 * kHugePageSize, kProtRead | kProtWrite,
                                kMapPrivate | kMapAnonymous);
  const uint64_t a = (raw + kHugePageSize - 1) & kHugeMask;
  EXPECT_TRUE(as.Madvise(a, kHugePageSize, kMadvHugePage).has_value());
  return a;
}

// Regression (issue 8, bug 3a): make_device_exclusive in an unpopulated
// MADV_HUGEPAGE region split first, then faulted a 2 MiB entry in, and
// looped until it gave up with EIO. The kernel faults, then splits the
// PMD mapping (FOLL_SPLIT_PMD).
TEST_F(ExclusivePinTest, MakeExclusiveOfAnUnpopulatedHugeRegionFaultsThenSplits) {
  const uint64_t a = MapUnpopulatedHugeRegion(*as_) + 5 * kPageSize;
  int owner;
  auto r = MakeExclusive(a, &owner);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kDeviceExclusive);
  EXPECT_FALSE(as_->QueryPte(a).huge);
  EXPECT_EQ(as_->QueryPte(a + kPageSize).kind, PteInfo::Kind::kPresent);  // its neighbours stay
  uint64_t v = 9;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());  // CPU touch revokes it
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
}

// Regression (issue 8, bug 3b): a page pinned under a freshly faulted
// 2 MiB entry was shared copy-on-write at fork, so the parent's next write
// copied away from the pinned frame and the pin stopped seeing the
// parent's data. The kernel's copy_huge_pmd does not share a maybe-pinned
// huge page: it splits and copies the pinned pages for the child.
TEST_F(ExclusivePinTest, PinUnderAFreshHugeEntryKeepsSeeingTheParentAfterFork) {
  const uint64_t a = MapUnpopulatedHugeRegion(*as_) + 7 * kPageSize;
  Pfn pfn;
  ASSERT_TRUE(as_->PinUserPages(a, 1, true, &pfn).has_value());
  ASSERT_TRUE(as_->QueryPte(a).huge);  // the pin faulted a 2 MiB page in
  auto child = *as_->Fork();
  uint64_t v = 0x5151;
  ASSERT_TRUE(as_->Write(a, &v, 8).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, pfn);  // no copy away from the pin
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(pool_->Data(pfn)), 0x5151u);
  ASSERT_TRUE(child->Read(a, &v, 8).has_value());
  EXPECT_EQ(v, 0u);  // the child got its own copy of the old bytes
  EXPECT_NE(child->QueryPte(a).pfn, pfn);
  // The unpinned rest of the huge page is still shared copy-on-write.
  EXPECT_EQ(child->QueryPte(a + kPageSize).pfn, as_->QueryPte(a + kPageSize).pfn);
  EXPECT_FALSE(as_->QueryPte(a + kPageSize).writable);
  child->Exit();
  as_->UnpinUserPage(pfn);
}

}  // namespace
}  // namespace usvm::mm
