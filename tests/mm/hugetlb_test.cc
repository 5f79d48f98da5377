// MAP_HUGETLB mappings: the hugetlb pool and its reservations, the 2 MiB
// alignment rules of mmap/munmap/mprotect/madvise/mremap, faults of whole
// 2 MiB pages, copy-on-write of the whole page after fork, shared hugetlb
// memory, and what HMM sees (order 9, no migration).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint32_t kHugePriv = kMapPrivate | kMapAnonymous | kMapHugetlb;
constexpr uint32_t kHugeShared = kMapShared | kMapAnonymous | kMapHugetlb;

class HugetlbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(128);
    as_ = testing::MakeSpace(*pool_);
  }
  void TearDown() override {
    if (as_) as_->Exit();
  }
  FramePool::HugetlbStats Pool() const { return pool_->GetHugetlbStats(); }
  uint64_t Map(uint64_t len, uint32_t flags = kHugePriv, uint32_t prot = kRW) {
    auto r = as_->Mmap(0, len, prot, flags);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return r.value_or(0);
  }
  uint64_t Load(AddressSpace& as, uint64_t a) {
    auto r = as.AtomicLoad(a);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return r.value_or(~uint64_t{0});
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

// ---- the pool and reservations ---------------------------------------------------

// nr_hugepages is 0 on a fresh machine: the reservation at mmap time fails.
TEST_F(HugetlbTest, MmapFailsWithEnomemWhenThePoolCannotReserve) {
  EXPECT_EQ(Pool().total, 0u);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kHugePriv).error(), Errc::kNoMem);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kHugeShared).error(), Errc::kNoMem);
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  EXPECT_EQ(as_->Mmap(0, 3 * kHugePageSize, kRW, kHugePriv).error(), Errc::kNoMem);
  EXPECT_EQ(as_->VmaCount(), 0u);
  EXPECT_EQ(Pool().reserved, 0u);
}

// MAP_NORESERVE maps without a reservation; the fault then finds no page
// (SIGBUS, our EFAULT).
TEST_F(HugetlbTest, NoReserveMappingFaultsFailWhenThePoolIsEmpty) {
  const uint64_t a = Map(kHugePageSize, kHugePriv | kMapNoReserve);
  EXPECT_EQ(as_->AtomicStore(a, 1).error(), Errc::kFault);
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  EXPECT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(Pool().free, 0u);
  EXPECT_EQ(Pool().reserved, 0u);
}

// The bookkeeping follows the pages in use, not the mapping's length: a
// 16 TiB MAP_NORESERVE mapping costs nothing until touched.
TEST_F(HugetlbTest, HugeNoReserveMappingsCostNothingUntilTouched) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  const uint64_t len = uint64_t{1} << 44;
  const uint64_t a = Map(len, kHugePriv | kMapNoReserve);
  const uint64_t s = Map(len, kHugeShared | kMapNoReserve);
  ASSERT_TRUE(as_->AtomicStore(a + len - kHugePageSize, 1).has_value());
  EXPECT_EQ(as_->AtomicStore(s + len / 2, 1).error(), Errc::kFault);  // pool empty: SIGBUS
  ASSERT_TRUE(as_->Munmap(a, len).has_value());
  EXPECT_TRUE(as_->AtomicStore(s + len / 2, 1).has_value());
  ASSERT_TRUE(as_->Munmap(s, len).has_value());
  EXPECT_EQ(Pool().free, 1u);
}

TEST_F(HugetlbTest, MmapReservesAndFaultsConsumeWholePages) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  // 3 MiB rounds up to two huge pages.
  const uint64_t a = Map(3 << 20);
  EXPECT_TRUE(IsHugeAligned(a));
  auto vma = *as_->FindVma(a);
  EXPECT_EQ(vma.end - vma.start, 2 * kHugePageSize);
  EXPECT_TRUE(vma.flags & kVmaHugetlb);
  EXPECT_EQ(Pool().free, 4u);
  EXPECT_EQ(Pool().reserved, 2u);
  // One byte faults in the whole 2 MiB page, mapped by one entry.
  ASSERT_TRUE(as_->AtomicStore(a + kHugePageSize - 8, 5).has_value());
  PteInfo pte = as_->QueryPte(a + 17 * kPageSize);
  EXPECT_EQ(pte.kind, PteInfo::Kind::kPresent);
  EXPECT_TRUE(pte.huge);
  EXPECT_TRUE(pte.hugetlb);
  EXPECT_TRUE(pool_->IsHugetlbFrame(pte.pfn));
  EXPECT_EQ(as_->GetStats().rss_pages, kPagesPerHuge);
  EXPECT_EQ(Pool().free, 3u);
  EXPECT_EQ(Pool().reserved, 1u);
  EXPECT_EQ(Load(*as_, a + 4096), 0u);  // zeroed
  // munmap gives the page and the unused reservation back.
  ASSERT_TRUE(as_->Munmap(a, 2 * kHugePageSize).has_value());
  EXPECT_EQ(Pool().free, 4u);
  EXPECT_EQ(Pool().reserved, 0u);
}

// A private read fault maps the page read-only (hugetlb_no_page); the
// first write reuses it (no copy).
TEST_F(HugetlbTest, PrivateReadFaultMapsReadOnlyThenWriteReusesThePage) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(kHugePageSize);
  EXPECT_EQ(Load(*as_, a), 0u);
  PteInfo pte = as_->QueryPte(a);
  EXPECT_TRUE(pte.hugetlb);
  EXPECT_FALSE(pte.writable);
  ASSERT_TRUE(as_->AtomicStore(a, 9).has_value());
  EXPECT_TRUE(as_->QueryPte(a).writable);
  EXPECT_EQ(as_->QueryPte(a).pfn, pte.pfn);
  EXPECT_EQ(as_->GetStats().cow_breaks, 0u);
  EXPECT_EQ(Pool().free, 1u);
}

TEST_F(HugetlbTest, ShrinkingThePoolKeepsPagesInUseUntilTheyAreFreed) {
  ASSERT_EQ(pool_->SetHugetlbPages(3), 3u);
  const uint64_t free_frames = pool_->GetStats().free_frames;
  const uint64_t a = Map(kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(pool_->SetHugetlbPages(0), 1u);  // the page in use stays
  EXPECT_EQ(Pool().free, 0u);
  ASSERT_TRUE(as_->Munmap(a, kHugePageSize).has_value());
  EXPECT_EQ(Pool().total, 0u);
  EXPECT_EQ(pool_->GetStats().free_frames, free_frames + 3 * kPagesPerHuge);
  // Reserved pages are not given back either.
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t b = Map(kHugePageSize);
  EXPECT_EQ(pool_->SetHugetlbPages(0), 1u);
  EXPECT_TRUE(as_->AtomicStore(b, 1).has_value());
  ASSERT_TRUE(as_->Munmap(b, kHugePageSize).has_value());
  EXPECT_EQ(Pool().total, 0u);
}

TEST_F(HugetlbTest, ExitGivesEverythingBack) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  const uint64_t a = Map(2 * kHugePageSize);
  const uint64_t s = Map(kHugePageSize, kHugeShared);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  ASSERT_TRUE(as_->AtomicStore(s, 1).has_value());
  EXPECT_EQ(Pool().free, 2u);
  as_->Exit();
  EXPECT_EQ(Pool().free, 4u);
  EXPECT_EQ(Pool().reserved, 0u);
}

// ---- mmap arguments ------------------------------------------------------------------

TEST_F(HugetlbTest, MmapAlignsAddressesAndRejectsWhatTheKernelRejects) {
  ASSERT_EQ(pool_->SetHugetlbPages(8), 8u);
  // Fixed: the address must be 2 MiB aligned.
  const uint64_t base = Map(4 * kHugePageSize);
  ASSERT_TRUE(as_->Munmap(base, 4 * kHugePageSize).has_value());
  EXPECT_EQ(as_->Mmap(base + kPageSize, kHugePageSize, kRW, kHugePriv | kMapFixed).error(), Errc::kInval);
  EXPECT_EQ(*as_->Mmap(base, kPageSize, kRW, kHugePriv | kMapFixed), base);
  EXPECT_EQ(as_->FindVma(base)->end, base + kHugePageSize);  // the length rounds up
  // A hint is rounded up to 2 MiB.
  EXPECT_EQ(*as_->Mmap(base + kHugePageSize + 5 * kPageSize, kHugePageSize, kRW, kHugePriv),
            base + 2 * kHugePageSize);
  // Not with a (non-hugetlbfs) file, only 2 MiB pages, a 2 MiB aligned offset.
  auto f = *SimFile::TryCreate(*pool_, kHugePageSize);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kMapPrivate | kMapHugetlb, f).error(), Errc::kInval);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kHugePriv | (30u << kMapHugeShift)).error(), Errc::kInval);
  EXPECT_TRUE(as_->Mmap(0, kHugePageSize, kRW, kHugePriv | kMapHuge2MB).has_value());
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kHugePriv, nullptr, kPageSize).error(), Errc::kInval);
  EXPECT_EQ(as_->Mmap(0, 0, kRW, kHugePriv).error(), Errc::kInval);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kMapAnonymous | kMapHugetlb).error(), Errc::kInval);
  // Every failed call left the reservations alone.
  EXPECT_EQ(Pool().reserved, 3u);
}

// ---- layout rules --------------------------------------------------------------------

TEST_F(HugetlbTest, MunmapAndMprotectOfUnalignedPartsAreEinval) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  const uint64_t a = Map(2 * kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(as_->Munmap(a + kPageSize, kPageSize).error(), Errc::kInval);
  EXPECT_EQ(as_->Munmap(a, kPageSize).error(), Errc::kInval);
  EXPECT_EQ(as_->Munmap(a, kHugePageSize + kPageSize).error(), Errc::kInval);
  EXPECT_EQ(as_->Mprotect(a, kPageSize, kProtRead).error(), Errc::kInval);
  EXPECT_EQ(as_->Mprotect(a + kHugePageSize, kPageSize, kProtRead).error(), Errc::kInval);
  // No split is needed when the protection does not change.
  EXPECT_TRUE(as_->Mprotect(a + kPageSize, kPageSize, kRW).has_value());
  // MAP_FIXED of another mapping over part of a huge page: EINVAL too.
  EXPECT_EQ(as_->Mmap(a + kPageSize, kPageSize, kRW, kMapPrivate | kMapAnonymous | kMapFixed).error(),
            Errc::kInval);
  EXPECT_EQ(as_->VmaCount(), 1u);
  EXPECT_EQ(Load(*as_, a), 1u);
  // Whole huge pages are fine; a range running past the end of the VMA
  // needs no split at its end.
  ASSERT_TRUE(as_->Mprotect(a + kHugePageSize, kHugePageSize, kProtRead).has_value());
  EXPECT_EQ(as_->VmaCount(), 2u);
  ASSERT_TRUE(as_->Munmap(a + kHugePageSize, kHugePageSize + kPageSize).has_value());
  EXPECT_EQ(as_->VmaCount(), 1u);
  EXPECT_EQ(Pool().reserved, 0u);  // the unmapped half's reservation went back
  EXPECT_EQ(Pool().free, 3u);
}

TEST_F(HugetlbTest, MadviseRules) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  const uint64_t a = Map(2 * kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kHugePageSize, 2).has_value());
  EXPECT_EQ(as_->Madvise(a, kHugePageSize, kMadvFree).error(), Errc::kInval);
  EXPECT_EQ(as_->Madvise(a + kPageSize, kHugePageSize, kMadvDontNeed).error(), Errc::kInval);
  EXPECT_EQ(as_->Madvise(a, kPageSize, kMadvHugePage).error(), Errc::kInval);
  EXPECT_EQ(as_->VmaCount(), 1u);
  // DONTNEED rounds its end down: only the first page goes.
  ASSERT_TRUE(as_->Madvise(a, kHugePageSize + kPageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(Load(*as_, a + kHugePageSize), 2u);
  EXPECT_EQ(Load(*as_, a), 0u);  // refaults a zeroed page
  // A range shorter than a huge page does nothing.
  ASSERT_TRUE(as_->Madvise(a, kPageSize, kMadvDontNeed).has_value());
  EXPECT_TRUE(as_->QueryPte(a).hugetlb);
  // MADV_HUGEPAGE only sets the flag.
  ASSERT_TRUE(as_->Madvise(a, 2 * kHugePageSize, kMadvHugePage).has_value());
  EXPECT_TRUE(as_->FindVma(a)->flags & kVmaHugePage);
  EXPECT_EQ(as_->VmaCount(), 1u);
}

// Zapping a private owner's page restores its reservation (as
// __unmap_hugepage_range does), so the page can be faulted in again even
// when the pool is otherwise empty.
TEST_F(HugetlbTest, DontNeedRestoresTheOwnersReservation) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  const uint64_t a = Map(kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(Pool().reserved, 0u);
  ASSERT_TRUE(as_->Madvise(a, kHugePageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(Pool().free, 1u);
  EXPECT_EQ(Pool().reserved, 1u);
  EXPECT_EQ(as_->Mmap(0, kHugePageSize, kRW, kHugePriv).error(), Errc::kNoMem);
  EXPECT_TRUE(as_->AtomicStore(a, 2).has_value());
  EXPECT_EQ(Pool().reserved, 0u);
}

TEST_F(HugetlbTest, SharedMappingKeepsItsPagesAcrossDontNeed) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(kHugePageSize, kHugeShared);
  ASSERT_TRUE(as_->AtomicStore(a + 64, 77).has_value());
  EXPECT_TRUE(as_->QueryPte(a).file);
  ASSERT_TRUE(as_->Madvise(a, kHugePageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(Load(*as_, a + 64), 77u);  // the page cache kept it
  EXPECT_EQ(Pool().free, 1u);
}

TEST_F(HugetlbTest, MremapMovesWholePagesButNeverGrows) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  const uint64_t a = Map(2 * kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a + 8, 11).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kHugePageSize + 8, 22).has_value());
  EXPECT_EQ(as_->Mremap(a, 2 * kHugePageSize, 3 * kHugePageSize, kMremapMayMove).error(), Errc::kInval);
  EXPECT_EQ(as_->Mremap(a + kPageSize, kPageSize, kPageSize, kMremapMayMove).error(), Errc::kInval);
  EXPECT_EQ(as_->Mremap(a, kHugePageSize, kHugePageSize, kMremapMayMove | kMremapDontUnmap).error(),
            Errc::kInval);
  // A free, aligned target far away.
  const uint64_t t = Map(4 * kHugePageSize, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(as_->Munmap(t, 4 * kHugePageSize).has_value());
  const uint64_t tgt = HugeAlignUp(t);
  EXPECT_EQ(as_->Mremap(a, 2 * kHugePageSize, 2 * kHugePageSize, kMremapMayMove | kMremapFixed,
                        tgt + kPageSize).error(),
            Errc::kInval);
  auto moved = as_->Mremap(a, 2 * kHugePageSize, 2 * kHugePageSize, kMremapMayMove | kMremapFixed, tgt);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  EXPECT_EQ(Load(*as_, tgt + 8), 11u);
  EXPECT_EQ(Load(*as_, tgt + kHugePageSize + 8), 22u);
  EXPECT_TRUE(as_->QueryPte(tgt).hugetlb);
  EXPECT_FALSE(as_->FindVma(a).has_value() && as_->FindVma(a)->start <= a);
  EXPECT_EQ(Pool().free, 2u);
  EXPECT_EQ(Pool().reserved, 0u);
  // Shrinking rounds to 2 MiB: 3 MiB keeps both pages, 2 MiB drops one.
  EXPECT_EQ(*as_->Mremap(tgt, 2 * kHugePageSize, 3 << 20, 0), tgt);
  EXPECT_EQ(as_->FindVma(tgt)->end, tgt + 2 * kHugePageSize);
  EXPECT_EQ(*as_->Mremap(tgt, 2 * kHugePageSize, kHugePageSize, 0), tgt);
  EXPECT_EQ(as_->FindVma(tgt)->end, tgt + kHugePageSize);
  EXPECT_EQ(Pool().free, 3u);
  // MAYMOVE without growth (the only kind allowed) stays in place.
  EXPECT_EQ(*as_->Mremap(tgt, kHugePageSize, kHugePageSize, kMremapMayMove), tgt);
}

// Reservations move with an mremap: the old range gives nothing back, the
// new one still owns the unused ones.
TEST_F(HugetlbTest, MremapMovesTheReservations) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(2 * kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());  // one consumed, one reserved
  auto moved = as_->Mremap(a, 2 * kHugePageSize, 2 * kHugePageSize, kMremapMayMove);
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(Pool().reserved, 1u);
  EXPECT_TRUE(as_->AtomicStore(*moved + kHugePageSize, 2).has_value());
  EXPECT_EQ(Pool().reserved, 0u);
  EXPECT_EQ(Pool().free, 0u);
}

// A shrinking mremap of another mapping whose old range runs into a
// hugetlb VMA cannot unmap part of a huge page either.
TEST_F(HugetlbTest, MremapShrinkThatWouldSplitAHugetlbVmaIsEinval) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t r = Map(8 * kHugePageSize, kMapPrivate | kMapAnonymous);
  const uint64_t base = HugeAlignUp(r);
  ASSERT_TRUE(as_->Mmap(base, kHugePageSize, kRW, kMapPrivate | kMapAnonymous | kMapFixed).has_value());
  ASSERT_TRUE(as_->Mmap(base + kHugePageSize, 2 * kHugePageSize, kRW, kHugePriv | kMapFixed).has_value());
  ASSERT_TRUE(as_->AtomicStore(base + kHugePageSize, 3).has_value());
  EXPECT_EQ(as_->Mremap(base, 5 << 20, 1 << 20, 0).error(), Errc::kInval);
  EXPECT_EQ(Load(*as_, base + kHugePageSize), 3u);
  EXPECT_EQ(as_->FindVma(base + kHugePageSize)->end, base + 3 * kHugePageSize);
  // Ending on a boundary is fine.
  EXPECT_EQ(*as_->Mremap(base, 2 * kHugePageSize, 1 << 20, 0), base);
  EXPECT_FALSE(as_->FindVma(base + kHugePageSize)->start == base + kHugePageSize);
}

// mprotect changes VMAs in order: those before the one that cannot be
// split keep their new protection (as Linux, which fails in the split).
TEST_F(HugetlbTest, MprotectChangesTheVmasBeforeAHugetlbSplitThatFails) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t r = Map(8 * kHugePageSize, kMapPrivate | kMapAnonymous);
  const uint64_t base = HugeAlignUp(r);
  ASSERT_TRUE(as_->Mmap(base, kHugePageSize, kRW, kMapPrivate | kMapAnonymous | kMapFixed).has_value());
  ASSERT_TRUE(as_->Mmap(base + kHugePageSize, 2 * kHugePageSize, kRW, kHugePriv | kMapFixed).has_value());
  EXPECT_EQ(as_->Mprotect(base, kHugePageSize + kPageSize, kProtRead).error(), Errc::kInval);
  EXPECT_EQ(as_->FindVma(base)->prot, kProtRead);
  EXPECT_EQ(as_->FindVma(base + kHugePageSize)->prot, kRW);
  EXPECT_EQ(as_->FindVma(base + kHugePageSize)->end, base + 3 * kHugePageSize);
}

// ---- fork ----------------------------------------------------------------------------

// hugetlb_wp: after fork a write copies the whole 2 MiB page.
TEST_F(HugetlbTest, ForkThenWriteCopiesTheWholeHugePage) {
  ASSERT_EQ(pool_->SetHugetlbPages(4), 4u);
  const uint64_t a = Map(kHugePageSize);
  std::vector<uint8_t> data(kHugePageSize);
  for (uint64_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 13 + (i >> 12));
  ASSERT_TRUE(as_->Write(a, data.data(), data.size()).has_value());
  auto child = *as_->Fork();
  const Pfn shared = as_->QueryPte(a).pfn;
  EXPECT_EQ(child->QueryPte(a).pfn, shared);
  EXPECT_FALSE(child->QueryPte(a).writable);
  EXPECT_EQ(Pool().free, 3u);
  ASSERT_TRUE(child->AtomicStore(a + 100 * kPageSize, 0xabc).has_value());
  PteInfo cp = child->QueryPte(a);
  EXPECT_TRUE(cp.huge);
  EXPECT_TRUE(cp.hugetlb);
  EXPECT_NE(cp.pfn, shared);
  EXPECT_EQ(child->GetStats().cow_breaks, 1u);
  EXPECT_EQ(Pool().free, 2u);
  std::vector<uint8_t> got(kHugePageSize);
  ASSERT_TRUE(child->Read(a, got.data(), got.size()).has_value());
  auto expect = data;
  const uint64_t v = 0xabc;
  std::memcpy(expect.data() + 100 * kPageSize, &v, 8);
  EXPECT_EQ(got, expect);
  ASSERT_TRUE(as_->Read(a, got.data(), got.size()).has_value());
  EXPECT_EQ(got, data);
  // The parent is the only user now: its write reuses the page.
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, shared);
  child->Exit();
  EXPECT_EQ(Pool().free, 3u);
}

// The child owns no reservation: its copy needs a free unreserved page.
TEST_F(HugetlbTest, ForkChildCopyOnWriteWithoutAFreePageIsSigbus) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  const uint64_t a = Map(kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 5).has_value());
  auto child = *as_->Fork();
  EXPECT_EQ(child->AtomicStore(a, 6).error(), Errc::kFault);
  EXPECT_EQ(Load(*child, a), 5u);
  child->Exit();
}

// The reservation owner's write never fails: with the pool empty it takes
// the page back from the child that shares it (unmap_ref_private) and
// reuses it; the child's later faults on the mapping are SIGBUS.
TEST_F(HugetlbTest, OwnerCopyOnWriteWithAnEmptyPoolTakesThePageBackFromTheChild) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(2 * kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 5).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kHugePageSize, 6).has_value());
  auto child = *as_->Fork();
  testing::RecordingNotifier rec;
  ASSERT_TRUE(child->notifiers().Register(&rec).has_value());
  const Pfn page = as_->QueryPte(a).pfn;
  ASSERT_EQ(Load(*child, a), 5u);
  ASSERT_EQ(Pool().free, 0u);
  ASSERT_TRUE(as_->AtomicStore(a, 50).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, page);  // reused, not copied
  EXPECT_EQ(child->QueryPte(a).kind, PteInfo::Kind::kNone);
  auto starts = rec.Starts();
  ASSERT_EQ(starts.size(), 1u);
  EXPECT_EQ(starts[0].s, a);
  EXPECT_EQ(starts[0].e, a + kHugePageSize);
  EXPECT_EQ(child->AtomicLoad(a).error(), Errc::kFault);
  // The page the child still maps stays readable; refaulting a page it
  // lost is not.
  EXPECT_EQ(Load(*child, a + kHugePageSize), 6u);
  ASSERT_TRUE(child->Madvise(a + kHugePageSize, kHugePageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(child->AtomicLoad(a + kHugePageSize).error(), Errc::kFault);
  EXPECT_EQ(Load(*as_, a + kHugePageSize), 6u);
  ASSERT_TRUE(child->notifiers().Unregister(&rec).has_value());
  child->Exit();
  EXPECT_EQ(Pool().free, 0u);
  ASSERT_TRUE(as_->Munmap(a, 2 * kHugePageSize).has_value());
  EXPECT_EQ(Pool().free, 2u);
}

TEST_F(HugetlbTest, ForkSharesSharedHugetlbMemoryUntilTheLastUserGoes) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(kHugePageSize, kHugeShared);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  auto child = *as_->Fork();
  ASSERT_TRUE(child->AtomicStore(a + 8, 2).has_value());
  EXPECT_EQ(Load(*as_, a + 8), 2u);
  EXPECT_EQ(child->QueryPte(a).pfn, as_->QueryPte(a).pfn);
  ASSERT_TRUE(as_->Munmap(a, kHugePageSize).has_value());
  EXPECT_EQ(Pool().free, 1u);  // the child still maps it
  EXPECT_EQ(Load(*child, a), 1u);
  child->Exit();
  EXPECT_EQ(Pool().free, 2u);
  EXPECT_EQ(Pool().reserved, 0u);
}

// copy_hugetlb_page_range: a page that may be pinned is copied for the
// child at fork, so the pin keeps seeing the parent's writes.
TEST_F(HugetlbTest, ForkCopiesPinnedHugetlbPages) {
  ASSERT_EQ(pool_->SetHugetlbPages(3), 3u);
  const uint64_t a = Map(kHugePageSize);
  ASSERT_TRUE(as_->AtomicStore(a + 3 * kPageSize, 7).has_value());
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a + 3 * kPageSize, 1, true, &pin).has_value());
  EXPECT_TRUE(as_->QueryPte(a).huge);  // pins do not split hugetlb pages
  EXPECT_EQ(pin, as_->QueryPte(a).pfn + 3);
  auto child = *as_->Fork();
  EXPECT_NE(child->QueryPte(a).pfn, as_->QueryPte(a).pfn);
  EXPECT_TRUE(as_->QueryPte(a).writable);
  EXPECT_EQ(Load(*child, a + 3 * kPageSize), 7u);
  ASSERT_TRUE(as_->AtomicStore(a + 3 * kPageSize, 8).has_value());
  uint64_t v;
  std::memcpy(&v, pool_->Data(pin), 8);
  EXPECT_EQ(v, 8u);
  EXPECT_EQ(Load(*child, a + 3 * kPageSize), 7u);
  as_->UnpinUserPage(pin);
  child->Exit();
}

// ---- HMM and the other users ---------------------------------------------------------

TEST_F(HugetlbTest, RangeFaultReportsOrderNineAndMigrationIsEinval) {
  ASSERT_EQ(pool_->SetHugetlbPages(2), 2u);
  const uint64_t a = Map(kHugePageSize);
  auto dev = DMirror::Create(as_, 64);
  ASSERT_TRUE(dev);
  ASSERT_TRUE(dev->Watch(a, kHugePageSize).has_value());
  std::vector<uint64_t> words;
  ASSERT_TRUE(dev->FaultIn(a, a + kHugePageSize, true, &words).has_value());
  const Pfn base = as_->QueryPte(a).pfn;
  for (uint64_t i = 0; i < kPagesPerHuge; ++i) {
    ASSERT_EQ(HmmOrder(words[i]), 9u) << i;
    ASSERT_TRUE(words[i] & kPfnWrite);
    ASSERT_EQ(HmmPfn(words[i]), base + i);
  }
  EXPECT_EQ(dev->MigrateToDevice(a, a + kHugePageSize).error(), Errc::kInval);
  EXPECT_TRUE(as_->QueryPte(a).hugetlb);
  {
    ReadLock l(as_->mmap_lock());
    EXPECT_EQ(as_->MakeDeviceExclusive(a, dev.get()).error(), Errc::kInval);
  }
  dev.reset();
}

TEST_F(HugetlbTest, GetUserPagesTakesReferencesOnSubpages) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  const uint64_t a = Map(kHugePageSize);
  Pfn out[2];
  ASSERT_TRUE(as_->GetUserPages(a + kPageSize, 2, true, out).has_value());
  EXPECT_EQ(out[0], as_->QueryPte(a).pfn + 1);
  ASSERT_TRUE(as_->Munmap(a, kHugePageSize).has_value());
  EXPECT_EQ(Pool().free, 0u);  // still referenced
  as_->PutUserPage(out[0]);
  as_->PutUserPage(out[1]);
  EXPECT_EQ(Pool().free, 1u);
}

// Random hugetlb operations, most with bad (unaligned, overlapping)
// arguments, in a parent and its fork children: no call crashes, hugetlb
// VMAs stay 2 MiB aligned and mapped by huge entries only, the pool's
// counters stay consistent (reserved <= free <= total), and every page and
// reservation comes back once all the processes are gone.
TEST_F(HugetlbTest, RandomOperationsKeepThePoolConsistent) {
  ASSERT_EQ(pool_->SetHugetlbPages(12), 12u);
  std::mt19937_64 rng(12345);
  std::vector<std::shared_ptr<AddressSpace>> spaces{as_};
  const uint64_t base = HugeAlignUp(Map(64 * kHugePageSize, kMapPrivate | kMapAnonymous));
  ASSERT_TRUE(as_->Munmap(base - kHugePageSize, 66 * kHugePageSize).has_value());
  auto pick_addr = [&] {
    return base + (rng() % 48) * kHugePageSize + ((rng() % 4 == 0) ? (rng() % 512) * kPageSize : 0);
  };
  auto pick_len = [&] {
    return (rng() % 3 == 0) ? (1 + rng() % 1024) * kPageSize : (1 + rng() % 4) * kHugePageSize;
  };
  int ok[11] = {}, einval = 0;
  auto count = [&](int op, bool success, bool inval) {
    ok[op] += success;
    einval += inval;
  };
  for (int step = 0; step < 3000; ++step) {
    AddressSpace& as = *spaces[rng() % spaces.size()];
    const uint64_t a = pick_addr(), len = pick_len();
    switch (rng() % 11) {
      case 0: {
        uint32_t fl = (rng() % 2 ? kHugePriv : kHugeShared) | (rng() % 2 ? uint32_t{kMapFixed} : 0u);
        if (rng() % 4 == 0) fl |= kMapNoReserve;
        auto r = as.Mmap(a, len, kRW, fl);
        count(0, r.has_value(), !r && r.error() == Errc::kInval);
        break;
      }
      case 1: {
        auto r = as.Munmap(a, len);
        count(1, r.has_value(), !r && r.error() == Errc::kInval);
        break;
      }
      case 2: {
        auto r = as.Mprotect(a, len, rng() % 2 ? kProtRead : kRW);
        count(2, r.has_value(), !r && r.error() == Errc::kInval);
        break;
      }
      case 3: {
        auto r = as.Madvise(a, len, rng() % 2 ? kMadvDontNeed : kMadvHugePage);
        count(3, r.has_value(), !r && r.error() == Errc::kInval);
        break;
      }
      case 4: {
        auto r = as.Mremap(a, len, pick_len(), rng() % 2 ? kMremapMayMove : kMremapMayMove | kMremapFixed,
                           pick_addr());
        count(4, r.has_value(), !r && r.error() == Errc::kInval);
        break;
      }
      case 5: case 6: case 7: count(5, as.AtomicStore(a & ~uint64_t{7}, step).has_value(), false); break;
      case 8: count(8, as.AtomicLoad(a & ~uint64_t{7}).has_value(), false); break;
      case 9:
        if (spaces.size() < 4) {
          if (auto c = as.Fork()) spaces.push_back(*c);
        } else {
          const size_t victim = 1 + rng() % (spaces.size() - 1);
          spaces[victim]->Exit();
          spaces.erase(spaces.begin() + static_cast<std::ptrdiff_t>(victim));
        }
        break;
      case 10: {
        Pfn out[2];
        if (as.GetUserPages(a & kPageMask, 2, rng() % 2, out)) {
          as.PutUserPage(out[0]);
          as.PutUserPage(out[1]);
        }
        break;
      }
    }
    const auto st = Pool();
    ASSERT_LE(st.reserved, st.free) << "step " << step;
    ASSERT_LE(st.free, st.total) << "step " << step;
    if (step % 100 == 0) {
      for (auto& sp : spaces)
        for (const VmaInfo& v : sp->Vmas()) {
          if (!(v.flags & kVmaHugetlb)) continue;
          ASSERT_TRUE(IsHugeAligned(v.start) && IsHugeAligned(v.end)) << "step " << step;
          for (uint64_t h = v.start; h < v.end; h += kHugePageSize) {
            const PteInfo pte = sp->QueryPte(h + 5 * kPageSize);
            if (pte.kind != PteInfo::Kind::kNone) {
              ASSERT_TRUE(pte.huge && pte.hugetlb) << "step " << step;
            }
          }
        }
    }
  }
  // Not vacuous: every kind of call succeeded sometimes, and the alignment
  // rules fired.
  for (int op : {0, 1, 2, 3, 4, 5, 8}) EXPECT_GT(ok[op], 10) << "op " << op;
  EXPECT_GT(einval, 100);
  for (size_t i = 1; i < spaces.size(); ++i) spaces[i]->Exit();
  as_->Exit();
  EXPECT_EQ(Pool().free, Pool().total);
  EXPECT_EQ(Pool().reserved, 0u);
}

// An allocation failure that is not an empty pool is ENOMEM (VM_FAULT_OOM),
// and leaves the reservation for the next try.
class HugetlbFaultInjectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(64, env_);
    as_ = testing::MakeSpace(*pool_, env_);
  }
  void TearDown() override {
    as_->Exit();
    as_.reset();
    pool_.reset();  // before env_
  }
  Env env_{std::make_unique<RealClock>(), 3};
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

TEST_F(HugetlbFaultInjectionTest, FailedHugetlbAllocationIsEnomemAndKeepsTheReservation) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  const uint64_t a = *as_->Mmap(0, kHugePageSize, kRW, kHugePriv);
  env_.faults().FailEvery("frame_pool.alloc_hugetlb", 1);
  EXPECT_EQ(as_->AtomicStore(a, 1).error(), Errc::kNoMem);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(pool_->GetHugetlbStats().reserved, 1u);
  env_.faults().ClearAll();
  EXPECT_TRUE(as_->AtomicStore(a, 1).has_value());
  EXPECT_EQ(pool_->GetHugetlbStats().reserved, 0u);
}

}  // namespace
}  // namespace usvm::mm
