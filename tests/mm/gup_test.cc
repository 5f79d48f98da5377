// vma_lookup under the caller's mmap lock, and short-term get_user_pages
// (GetUserPages / PutUserPage) against long-term pins (PinUserPages).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "dmirror.h"
#include "coherent_device.h"
#include "test_util.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;

class GupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(64);
    as_ = testing::MakeSpace(*pool_);
  }
  void TearDown() override {
    if (as_) as_->Exit();
  }
  uint64_t MapAnon(uint64_t len, uint32_t prot = kRW) {
    auto r = as_->Mmap(0, len, prot, kMapPrivate | kMapAnonymous);
    EXPECT_TRUE(r.has_value());
    return *r;
  }
  uint64_t Word(uint64_t a) { return *as_->AtomicLoad(a); }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

// ---- vma_lookup ------------------------------------------------------------------

TEST_F(GupTest, VmaLookupLockedFindsOnlyTheContainingVma) {
  const uint64_t a = MapAnon(4 * kPageSize);
  ASSERT_TRUE(as_->Munmap(a + kPageSize, kPageSize).has_value());  // [a,a+4K) hole [a+8K,a+16K)
  ReadLock l(as_->mmap_lock());
  auto in = as_->VmaLookupLocked(a + 100);
  ASSERT_TRUE(in.has_value());
  EXPECT_EQ(in->start, a);
  EXPECT_EQ(in->end, a + kPageSize);
  // In the hole: vma_lookup finds nothing, find_vma the next VMA.
  EXPECT_FALSE(as_->VmaLookupLocked(a + kPageSize).has_value());
  auto next = as_->FindVmaLocked(a + kPageSize);
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->start, a + 2 * kPageSize);
  EXPECT_EQ(as_->VmaLookupLocked(a + 3 * kPageSize + 5)->start, a + 2 * kPageSize);
  // The end is exclusive; beyond every VMA both find nothing.
  EXPECT_FALSE(as_->VmaLookupLocked(a + 4 * kPageSize).has_value());
  EXPECT_FALSE(as_->VmaLookupLocked(uint64_t{1} << 47).has_value());
  EXPECT_FALSE(as_->FindVmaLocked(uint64_t{1} << 47).has_value());
}

TEST_F(GupTest, VmaLookupLockedWorksUnderTheWriteLockAndAfterExit) {
  const uint64_t a = MapAnon(kPageSize);
  {
    WriteLock l(as_->mmap_lock());
    EXPECT_TRUE(as_->VmaLookupLocked(a).has_value());
  }
  as_->Exit();
  ReadLock l(as_->mmap_lock());
  EXPECT_FALSE(as_->VmaLookupLocked(a).has_value());
}

// ---- get_user_pages: faulting and references ----------------------------------------

TEST_F(GupTest, GetUserPagesReadOfUntouchedMemoryReturnsTheZeroPage) {
  const uint64_t a = MapAnon(2 * kPageSize);
  Pfn out[2];
  ASSERT_TRUE(as_->GetUserPages(a, 2, false, out).has_value());
  EXPECT_EQ(out[0], FramePool::kZeroPfn);
  EXPECT_EQ(out[1], FramePool::kZeroPfn);
  EXPECT_TRUE(as_->QueryPte(a).zero_page);
  as_->PutUserPage(out[0]);  // no-ops
  as_->PutUserPage(out[1]);
}

TEST_F(GupTest, GetUserPagesWriteFaultsInAndTakesAReference) {
  const uint64_t a = MapAnon(4 * kPageSize);
  std::vector<Pfn> out(4);
  ASSERT_TRUE(as_->GetUserPages(a, 4, true, out.data()).has_value());
  for (uint64_t i = 0; i < 4; ++i) {
    const PteInfo pte = as_->QueryPte(a + i * kPageSize);
    ASSERT_EQ(pte.kind, PteInfo::Kind::kPresent);
    EXPECT_TRUE(pte.writable);
    EXPECT_EQ(pte.pfn, out[i]);
    EXPECT_EQ(pool_->RefCount(out[i]), 2u);  // the mapping and ours
    EXPECT_EQ(pool_->PinCount(out[i]), 0u);  // a reference, not a pin
  }
  // The caller writes through the page (as a driver's DMA would); the CPU
  // sees it.
  const uint64_t v = 0x1122334455667788;
  std::memcpy(pool_->Data(out[2]) + 8, &v, 8);
  EXPECT_EQ(Word(a + 2 * kPageSize + 8), v);
  for (Pfn p : out) as_->PutUserPage(p);
  for (Pfn p : out) EXPECT_EQ(pool_->RefCount(p), 1u);
}

TEST_F(GupTest, GetUserPagesWriteBreaksCopyOnWrite) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 7).has_value());
  auto child = *as_->Fork();
  const Pfn shared = as_->QueryPte(a).pfn;
  ASSERT_EQ(child->QueryPte(a).pfn, shared);
  Pfn out;
  ASSERT_TRUE(as_->GetUserPages(a, 1, true, &out).has_value());
  EXPECT_NE(out, shared);
  EXPECT_EQ(as_->QueryPte(a).pfn, out);
  uint64_t one = 1;
  std::memcpy(pool_->Data(out), &one, 8);
  EXPECT_EQ(*child->AtomicLoad(a), 7u);  // the child keeps its copy
  as_->PutUserPage(out);
  child->Exit();
}

TEST_F(GupTest, PageStaysAliveAfterMunmapUntilPutUserPage) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 42).has_value());
  Pfn out;
  ASSERT_TRUE(as_->GetUserPages(a, 1, false, &out).has_value());
  const uint64_t free_before = pool_->GetStats().free_frames;
  ASSERT_TRUE(as_->Munmap(a, kPageSize).has_value());
  EXPECT_EQ(pool_->RefCount(out), 1u);
  EXPECT_EQ(pool_->GetStats().free_frames, free_before);
  uint64_t v;
  std::memcpy(&v, pool_->Data(out), 8);
  EXPECT_EQ(v, 42u);
  as_->PutUserPage(out);
  EXPECT_EQ(pool_->GetStats().free_frames, free_before + 1);
}

TEST_F(GupTest, GetUserPagesKeepsHugeEntriesHuge) {
  auto r = *as_->Mmap(0, 2 * kHugePageSize, kRW, kMapPrivate | kMapAnonymous);
  const uint64_t base = (r + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as_->Madvise(base, kHugePageSize, kMadvHugePage).has_value());
  ASSERT_TRUE(as_->AtomicStore(base, 1).has_value());
  ASSERT_TRUE(as_->QueryPte(base).huge);
  Pfn out[3];
  ASSERT_TRUE(as_->GetUserPages(base + 5 * kPageSize, 3, true, out).has_value());
  EXPECT_TRUE(as_->QueryPte(base).huge);
  EXPECT_EQ(as_->GetStats().thp_splits, 0u);
  EXPECT_EQ(out[0], as_->QueryPte(base).pfn + 5);
  EXPECT_EQ(out[2], out[0] + 2);
  for (Pfn p : out) as_->PutUserPage(p);
  // Neither does a long-term pin (the kernel pins the subpage; fork copies
  // pinned pages of a huge entry, see ExclusivePinTest).
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(base, 1, true, &pin).has_value());
  EXPECT_TRUE(as_->QueryPte(base).huge);
  EXPECT_EQ(pin, as_->QueryPte(base).pfn);
  as_->UnpinUserPage(pin);
}

// ---- errors: all or nothing ---------------------------------------------------------

TEST_F(GupTest, GetUserPagesRejectsBadArgumentsAndBadMemory) {
  const uint64_t a = MapAnon(2 * kPageSize);
  Pfn out[4] = {};
  EXPECT_EQ(as_->GetUserPages(a + 1, 1, false, out).error(), Errc::kInval);
  EXPECT_EQ(as_->GetUserPages(a, 0, false, out).error(), Errc::kInval);
  EXPECT_EQ(as_->GetUserPages(a, 1, false, nullptr).error(), Errc::kInval);
  EXPECT_EQ(as_->GetUserPages(~uint64_t{0} & kPageMask, 2, false, out).error(), Errc::kInval);
  // The third page is a hole: EFAULT, and the references taken on the
  // first two are dropped again.
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  const Pfn first = as_->QueryPte(a).pfn;
  EXPECT_EQ(as_->GetUserPages(a, 3, true, out).error(), Errc::kFault);
  EXPECT_EQ(pool_->RefCount(first), 1u);
  // Write to a read-only mapping, and PROT_NONE: EFAULT.
  const uint64_t ro = MapAnon(kPageSize, kProtRead);
  EXPECT_EQ(as_->GetUserPages(ro, 1, true, out).error(), Errc::kFault);
  const uint64_t none = MapAnon(kPageSize, kProtNone);
  EXPECT_EQ(as_->GetUserPages(none, 1, false, out).error(), Errc::kFault);
  as_->Exit();
  EXPECT_EQ(as_->GetUserPages(a, 1, false, out).error(), Errc::kFault);
  as_->PutUserPage(kInvalidPfn);  // ignored
}

TEST_F(GupTest, PutUserPageOfAFrameNobodyHoldsIsIgnored) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  const Pfn pfn = as_->QueryPte(a).pfn;
  ASSERT_TRUE(as_->Munmap(a, kPageSize).has_value());
  ASSERT_EQ(pool_->RefCount(pfn), 0u);
  const auto before = pool_->GetStats();
  as_->PutUserPage(pfn);
  EXPECT_EQ(pool_->GetStats().free_frames, before.free_frames);
  EXPECT_EQ(pool_->GetStats().frees, before.frees);
}

// ---- references vs pins: fork and migration -------------------------------------------

// The kernel copies a private page at fork only when it may be pinned
// (page_maybe_dma_pinned): a plain reference does not count, so the page is
// shared copy-on-write; a pinned page is copied for the child.
TEST_F(GupTest, ForkSharesPagesWithAReferenceButCopiesPinnedOnes) {
  const uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kPageSize, 2).has_value());
  Pfn ref, pin;
  ASSERT_TRUE(as_->GetUserPages(a, 1, true, &ref).has_value());
  ASSERT_TRUE(as_->PinUserPages(a + kPageSize, 1, true, &pin).has_value());
  auto child = *as_->Fork();
  EXPECT_EQ(child->QueryPte(a).pfn, ref);
  EXPECT_NE(child->QueryPte(a + kPageSize).pfn, pin);
  EXPECT_EQ(*child->AtomicLoad(a + kPageSize), 2u);
  // A CPU write in the parent copies the shared page (it has other users:
  // the child and our reference); what we hold is the child's page now.
  ASSERT_TRUE(as_->AtomicStore(a, 10).has_value());
  EXPECT_NE(as_->QueryPte(a).pfn, ref);
  EXPECT_EQ(*child->AtomicLoad(a), 1u);
  as_->PutUserPage(ref);
  as_->UnpinUserPage(pin);
  child->Exit();
}

TEST_F(GupTest, MigrationSkipsWritablePagesWithAReference) {
  const uint64_t a = MapAnon(4 * kPageSize);
  for (uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(as_->AtomicStore(a + i * kPageSize, i + 1).has_value());
  auto dev = DMirror::Create(as_, 16);
  ASSERT_TRUE(dev);
  ASSERT_TRUE(dev->Watch(a, 4 * kPageSize).has_value());
  Pfn ref;
  ASSERT_TRUE(as_->GetUserPages(a + kPageSize, 1, true, &ref).has_value());
  EXPECT_EQ(*dev->MigrateToDevice(a, a + 4 * kPageSize), 3u);
  EXPECT_EQ(as_->QueryPte(a + kPageSize).pfn, ref);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  as_->PutUserPage(ref);
  dev.reset();
}

// ---- device memory ------------------------------------------------------------------------

// hmm-tests hmm_gup_test (GUP_BASIC_TEST on a device-private page): a
// short-term get_user_pages faults the page home like a CPU access does.
TEST_F(GupTest, GetUserPagesMigratesDevicePrivatePagesHome) {
  const uint64_t n = 4, a = MapAnon(n * kPageSize);
  for (uint64_t i = 0; i < n; ++i) ASSERT_TRUE(as_->AtomicStore(a + i * kPageSize, 100 + i).has_value());
  auto dev = DMirror::Create(as_, 16);
  ASSERT_TRUE(dev);
  ASSERT_TRUE(dev->Watch(a, n * kPageSize).has_value());
  ASSERT_EQ(*dev->MigrateToDevice(a, a + n * kPageSize), n);
  Pfn out[2];
  ASSERT_TRUE(as_->GetUserPages(a, 2, false, out).has_value());
  for (uint64_t i = 0; i < 2; ++i) {
    const PteInfo pte = as_->QueryPte(a + i * kPageSize);
    EXPECT_EQ(pte.kind, PteInfo::Kind::kPresent);
    EXPECT_FALSE(pte.device_memory);
    EXPECT_EQ(pte.pfn, out[i]);
    uint64_t v;
    std::memcpy(&v, pool_->Data(out[i]), 8);
    EXPECT_EQ(v, 100 + i);
  }
  EXPECT_EQ(dev->cpu_faults(), 2u);
  EXPECT_EQ(as_->QueryPte(a + 2 * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
  for (Pfn p : out) as_->PutUserPage(p);
  for (uint64_t i = 0; i < n; ++i) EXPECT_EQ(Word(a + i * kPageSize), 100 + i);
  dev.reset();
}

// hmm_gup_test on device-coherent memory: the short-term reference leaves
// the page where it is; only the long-term pin moves it home.
TEST_F(GupTest, GetUserPagesReturnsCoherentPagesInPlaceButPinsMoveThemHome) {
  const uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 5).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kPageSize, 6).has_value());
  testing::CoherentDevice dev(8);
  {
    ReadLock l(as_->mmap_lock());
    ASSERT_TRUE(dev.Move(*as_, a, a + 2 * kPageSize, true).has_value());
  }
  ASSERT_TRUE(as_->QueryPte(a).device_memory);
  Pfn ref;
  ASSERT_TRUE(as_->GetUserPages(a, 1, true, &ref).has_value());
  EXPECT_EQ(ref, as_->QueryPte(a).pfn);
  ASSERT_EQ(DevicePagemap::Lookup(ref), dev.pgmap.get());
  EXPECT_EQ(dev.pgmap->RefCount(dev.pgmap->IndexOf(ref)), 2u);
  uint64_t v;
  std::memcpy(&v, dev.pgmap->CoherentData(dev.pgmap->IndexOf(ref)), 8);
  EXPECT_EQ(v, 5u);
  EXPECT_EQ(dev.to_ram, 0);
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a + kPageSize, 1, true, &pin).has_value());
  EXPECT_FALSE(as_->QueryPte(a + kPageSize).device_memory);
  EXPECT_EQ(dev.to_ram, 1);
  as_->UnpinUserPage(pin);
  as_->PutUserPage(ref);
  EXPECT_EQ(dev.pgmap->RefCount(dev.pgmap->IndexOf(ref)), 1u);
  as_->Exit();
}

}  // namespace
}  // namespace usvm::mm
