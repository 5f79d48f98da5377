// Functional tests of AddressSpace: each operation's Linux semantics and
// the invalidation it sends (checked with a recording notifier).
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"

namespace usvm::mm {
namespace {

using testing::Bytes;
using testing::RecordingNotifier;
using Call = RecordingNotifier::Call;

class AddressSpaceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
    ASSERT_TRUE(as_->notifiers().Register(&rec_).has_value());
  }
  void TearDown() override {
    (void)as_->notifiers().Unregister(&rec_);
    as_.reset();
  }
  uint64_t MapAnon(uint64_t len, uint32_t prot = kProtRead | kProtWrite, uint32_t extra = 0,
                   uint64_t addr = 0) {
    auto r = as_->Mmap(addr, len, prot, kMapPrivate | kMapAnonymous | extra);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return r.value_or(0);
  }
  uint8_t ReadByte(AddressSpace& as, uint64_t a) {
    uint8_t b = 0xEE;
    EXPECT_TRUE(as.Read(a, &b, 1).has_value());
    return b;
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  RecordingNotifier rec_;
};

TEST_F(AddressSpaceTest, UntouchedAnonymousReadsZeroThroughTheZeroPage) {
  uint64_t a = MapAnon(4 * kPageSize);
  EXPECT_EQ(ReadByte(*as_, a + 5), 0);
  PteInfo p = as_->QueryPte(a);
  EXPECT_EQ(p.kind, PteInfo::Kind::kPresent);
  EXPECT_TRUE(p.zero_page);
  EXPECT_FALSE(p.writable);
  EXPECT_EQ(as_->GetStats().zero_maps, 1u);
}

TEST_F(AddressSpaceTest, WriteAllocatesAndReadsBack) {
  uint64_t a = MapAnon(3 * kPageSize);
  std::vector<uint8_t> in(3 * kPageSize - 100);
  for (size_t i = 0; i < in.size(); ++i) in[i] = uint8_t(i * 7);
  ASSERT_TRUE(as_->Write(a + 50, in.data(), in.size()).has_value());
  std::vector<uint8_t> out(in.size());
  ASSERT_TRUE(as_->Read(a + 50, out.data(), out.size()).has_value());
  EXPECT_EQ(in, out);
  PteInfo p = as_->QueryPte(a + kPageSize);
  EXPECT_TRUE(p.writable && p.dirty && !p.zero_page);
  EXPECT_EQ(as_->GetStats().rss_pages, 3u);
}

TEST_F(AddressSpaceTest, WriteAfterZeroPageReadBreaksCowWithClear) {
  uint64_t a = MapAnon(kPageSize);
  EXPECT_EQ(ReadByte(*as_, a), 0);
  rec_.Take();
  uint8_t v = 9;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  EXPECT_EQ(rec_.Starts(), (std::vector<Call>{{true, a, a + kPageSize, NotifyEvent::kClear}}));
  EXPECT_EQ(ReadByte(*as_, a), 9);
  EXPECT_EQ(as_->GetStats().cow_breaks, 1u);
}

TEST_F(AddressSpaceTest, NoVmaOrMissingPermissionIsEfault) {
  uint8_t b = 0;
  EXPECT_EQ(as_->Read(0x100000, &b, 1).error(), Errc::kFault);
  uint64_t a = MapAnon(kPageSize, kProtRead);
  EXPECT_EQ(as_->Write(a, &b, 1).error(), Errc::kFault);
  uint64_t n = MapAnon(kPageSize, kProtNone);
  EXPECT_EQ(as_->Read(n, &b, 1).error(), Errc::kFault);
}

TEST_F(AddressSpaceTest, MunmapSendsUnmapAndRemovesPages) {
  uint64_t a = MapAnon(4 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(4 * kPageSize, 1).data(), 4 * kPageSize).has_value());
  const uint64_t free_before = pool_->GetStats().free_frames;
  rec_.Take();
  ASSERT_TRUE(as_->Munmap(a + kPageSize, 2 * kPageSize).has_value());
  EXPECT_EQ(rec_.Take(), (std::vector<Call>{{true, a + kPageSize, a + 3 * kPageSize, NotifyEvent::kUnmap},
                                            {false, a + kPageSize, a + 3 * kPageSize, NotifyEvent::kUnmap}}));
  EXPECT_EQ(pool_->GetStats().free_frames, free_before + 2);
  EXPECT_EQ(as_->VmaCount(), 2u);
  uint8_t b;
  EXPECT_EQ(as_->Read(a + kPageSize, &b, 1).error(), Errc::kFault);
  EXPECT_EQ(ReadByte(*as_, a + 3 * kPageSize), 1);
}

TEST_F(AddressSpaceTest, MunmapOfNothingSucceedsSilently) {
  rec_.Take();
  EXPECT_TRUE(as_->Munmap(0x200000, kPageSize).has_value());
  EXPECT_TRUE(rec_.Take().empty());
}

TEST_F(AddressSpaceTest, AdjacentCompatibleMappingsMerge) {
  uint64_t a = MapAnon(kPageSize, kProtRead | kProtWrite, kMapFixed, 0x10000000);
  MapAnon(kPageSize, kProtRead | kProtWrite, kMapFixed, a + kPageSize);
  EXPECT_EQ(as_->VmaCount(), 1u);
  MapAnon(kPageSize, kProtRead, kMapFixed, a + 2 * kPageSize);
  EXPECT_EQ(as_->VmaCount(), 2u);
}

TEST_F(AddressSpaceTest, MprotectDowngradesWithProtectionVma) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(2 * kPageSize, 3).data(), 2 * kPageSize).has_value());
  rec_.Take();
  ASSERT_TRUE(as_->Mprotect(a, kPageSize, kProtRead).has_value());
  EXPECT_EQ(rec_.Starts(), (std::vector<Call>{{true, a, a + kPageSize, NotifyEvent::kProtectionVma}}));
  EXPECT_FALSE(as_->QueryPte(a).writable);
  EXPECT_TRUE(as_->QueryPte(a + kPageSize).writable);
  uint8_t b = 1;
  EXPECT_EQ(as_->Write(a, &b, 1).error(), Errc::kFault);
  EXPECT_EQ(ReadByte(*as_, a), 3);
  ASSERT_TRUE(as_->Mprotect(a, kPageSize, kProtNone).has_value());
  EXPECT_EQ(as_->Read(a, &b, 1).error(), Errc::kFault);
  ASSERT_TRUE(as_->Mprotect(a, 2 * kPageSize, kProtRead | kProtWrite).has_value());
  EXPECT_TRUE(as_->Write(a, &b, 1).has_value());
  EXPECT_EQ(ReadByte(*as_, a), 1);
  EXPECT_EQ(as_->VmaCount(), 1u);
}

TEST_F(AddressSpaceTest, MprotectOverAHoleIsEnomemAfterChangingTheFirstPart) {
  uint64_t a = MapAnon(3 * kPageSize);
  ASSERT_TRUE(as_->Munmap(a + kPageSize, kPageSize).has_value());
  EXPECT_EQ(as_->Mprotect(a, 3 * kPageSize, kProtRead).error(), Errc::kNoMem);
  EXPECT_EQ(as_->FindVma(a)->prot, kProtRead);
  EXPECT_EQ(as_->FindVma(a + 2 * kPageSize)->prot, kProtRead | kProtWrite);
}

TEST_F(AddressSpaceTest, MadviseDontNeedZeroesPrivateAnonymousWithClear) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(2 * kPageSize, 7).data(), 2 * kPageSize).has_value());
  rec_.Take();
  ASSERT_TRUE(as_->Madvise(a, kPageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(rec_.Starts(), (std::vector<Call>{{true, a, a + kPageSize, NotifyEvent::kClear}}));
  EXPECT_EQ(ReadByte(*as_, a), 0);
  EXPECT_EQ(ReadByte(*as_, a + kPageSize), 7);
}

TEST_F(AddressSpaceTest, MadviseDontNeedKeepsSharedContents) {
  auto r = as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);
  ASSERT_TRUE(r.has_value());
  uint8_t v = 5;
  ASSERT_TRUE(as_->Write(*r, &v, 1).has_value());
  ASSERT_TRUE(as_->Madvise(*r, kPageSize, kMadvDontNeed).has_value());
  EXPECT_EQ(as_->QueryPte(*r).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(ReadByte(*as_, *r), 5);
}

TEST_F(AddressSpaceTest, MadviseFreeThenReclaimDiscardsOnlyCleanPages) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(2 * kPageSize, 4).data(), 2 * kPageSize).has_value());
  ASSERT_TRUE(as_->Madvise(a, 2 * kPageSize, kMadvFree).has_value());
  EXPECT_TRUE(as_->QueryPte(a).lazy_free);
  EXPECT_FALSE(as_->QueryPte(a).dirty);
  EXPECT_EQ(ReadByte(*as_, a), 4);  // not reclaimed yet: data stays
  uint8_t v = 6;
  ASSERT_TRUE(as_->Write(a + kPageSize, &v, 1).has_value());  // redirtied
  rec_.Take();
  EXPECT_EQ(*as_->ReclaimLazyFree(), 1u);
  EXPECT_EQ(rec_.Starts(), (std::vector<Call>{{true, a, a + kPageSize, NotifyEvent::kClear}}));
  EXPECT_EQ(ReadByte(*as_, a), 0);
  EXPECT_EQ(ReadByte(*as_, a + kPageSize), 6);
  EXPECT_EQ(ReadByte(*as_, a + kPageSize + 1), 4);
}

TEST_F(AddressSpaceTest, MadviseFreeOnSharedIsEinval) {
  auto r = as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);
  EXPECT_EQ(as_->Madvise(*r, kPageSize, kMadvFree).error(), Errc::kInval);
}

TEST_F(AddressSpaceTest, MadviseOverHoleAdvisesMappedPartsAndReturnsEnomem) {
  uint64_t a = MapAnon(3 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(3 * kPageSize, 2).data(), 3 * kPageSize).has_value());
  ASSERT_TRUE(as_->Munmap(a + kPageSize, kPageSize).has_value());
  EXPECT_EQ(as_->Madvise(a, 3 * kPageSize, kMadvDontNeed).error(), Errc::kNoMem);
  EXPECT_EQ(ReadByte(*as_, a), 0);
  EXPECT_EQ(ReadByte(*as_, a + 2 * kPageSize), 0);
}

TEST_F(AddressSpaceTest, ForkMakesPrivateMemoryCopyOnWrite) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(2 * kPageSize, 1).data(), 2 * kPageSize).has_value());
  rec_.Take();
  auto child = as_->Fork();
  ASSERT_TRUE(child.has_value());
  EXPECT_EQ(rec_.Starts(), (std::vector<Call>{{true, a, a + 2 * kPageSize, NotifyEvent::kProtectionPage}}));
  EXPECT_FALSE(as_->QueryPte(a).writable);
  EXPECT_EQ(as_->QueryPte(a).pfn, (*child)->QueryPte(a).pfn);
  uint8_t v = 2;
  ASSERT_TRUE((*child)->Write(a, &v, 1).has_value());
  EXPECT_EQ(ReadByte(**child, a), 2);
  EXPECT_EQ(ReadByte(*as_, a), 1);
  EXPECT_NE(as_->QueryPte(a).pfn, (*child)->QueryPte(a).pfn);
  // The parent is now the only user of its page: the write reuses it.
  const Pfn before = as_->QueryPte(a).pfn;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, before);
  EXPECT_EQ(as_->GetStats().cow_reuses, 1u);
}

TEST_F(AddressSpaceTest, ForkKeepsSharedMemoryShared) {
  auto r = as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);
  auto child = *as_->Fork();
  uint8_t v = 8;
  ASSERT_TRUE(child->Write(*r, &v, 1).has_value());
  EXPECT_EQ(ReadByte(*as_, *r), 8);
}

TEST_F(AddressSpaceTest, HugePageFaultMapsTwoMegabytesAtOnce) {
  auto r = as_->Mmap(0, 3 * kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  uint64_t base = (*r + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as_->Madvise(base, kHugePageSize, kMadvHugePage).has_value());
  uint8_t v = 3;
  ASSERT_TRUE(as_->Write(base + 12345, &v, 1).has_value());
  EXPECT_TRUE(as_->QueryPte(base).huge);
  EXPECT_EQ(as_->GetStats().huge_faults, 1u);
  EXPECT_EQ(as_->GetStats().rss_pages, kPagesPerHuge);
  EXPECT_EQ(ReadByte(*as_, base + 12345), 3);
  // A partial munmap splits the entry (CLEAR over the 2 MiB first).
  rec_.Take();
  ASSERT_TRUE(as_->Munmap(base + kHugePageSize - kPageSize, kPageSize).has_value());
  auto starts = rec_.Starts();
  ASSERT_EQ(starts.size(), 2u);
  EXPECT_EQ(starts[0], (Call{true, base, base + kHugePageSize, NotifyEvent::kClear}));
  EXPECT_EQ(starts[1].ev, NotifyEvent::kUnmap);
  EXPECT_FALSE(as_->QueryPte(base).huge);
  EXPECT_EQ(ReadByte(*as_, base + 12345), 3);
  EXPECT_EQ(as_->GetStats().rss_pages, kPagesPerHuge - 1);
}

TEST_F(AddressSpaceTest, HugePageCowAfterForkSplitsAndCopiesOnePage) {
  auto r = as_->Mmap(0, 2 * kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  uint64_t base = (*r + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as_->Madvise(*r, 2 * kHugePageSize, kMadvHugePage).has_value());
  ASSERT_TRUE(as_->Write(base, Bytes(kPageSize, 1).data(), kPageSize).has_value());
  ASSERT_TRUE(as_->QueryPte(base).huge);
  auto child = *as_->Fork();
  EXPECT_TRUE(child->QueryPte(base).huge);
  uint8_t v = 2;
  ASSERT_TRUE(child->Write(base + kPageSize, &v, 1).has_value());
  EXPECT_FALSE(child->QueryPte(base).huge);
  EXPECT_EQ(ReadByte(*child, base + kPageSize), 2);
  EXPECT_EQ(ReadByte(*as_, base + kPageSize), 0);
  EXPECT_EQ(ReadByte(*child, base), 1);
  EXPECT_EQ(child->QueryPte(base).pfn, as_->QueryPte(base).pfn);
}

TEST_F(AddressSpaceTest, MremapMovesPagesAndSendsUnmapForTheOldRange) {
  uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->Write(a, Bytes(2 * kPageSize, 9).data(), 2 * kPageSize).has_value());
  const Pfn pfn = as_->QueryPte(a).pfn;
  rec_.Take();
  auto n = as_->Mremap(a, 2 * kPageSize, 8 * kPageSize, kMremapMayMove | kMremapFixed, 0x40000000);
  ASSERT_TRUE(n.has_value()) << n.error().ToString();
  EXPECT_EQ(*n, 0x40000000u);
  auto starts = rec_.Starts();
  ASSERT_FALSE(starts.empty());
  EXPECT_EQ(starts[0], (Call{true, a, a + 2 * kPageSize, NotifyEvent::kUnmap}));
  EXPECT_EQ(as_->QueryPte(*n).pfn, pfn);
  EXPECT_EQ(ReadByte(*as_, *n + kPageSize), 9);
  EXPECT_EQ(ReadByte(*as_, *n + 5 * kPageSize), 0);
  uint8_t b;
  EXPECT_EQ(as_->Read(a, &b, 1).error(), Errc::kFault);
}

TEST_F(AddressSpaceTest, MremapGrowsInPlaceWhenThereIsRoom) {
  uint64_t a = MapAnon(kPageSize, kProtRead | kProtWrite, kMapFixed, 0x50000000);
  auto n = as_->Mremap(a, kPageSize, 4 * kPageSize, 0);
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(*n, a);
  EXPECT_EQ(as_->FindVma(a)->end, a + 4 * kPageSize);
  MapAnon(kPageSize, kProtRead, kMapFixed, a + 4 * kPageSize);
  EXPECT_EQ(as_->Mremap(a, 4 * kPageSize, 8 * kPageSize, 0).error(), Errc::kNoMem);
}

TEST_F(AddressSpaceTest, MremapDontUnmapLeavesAnEmptyOldMapping) {
  uint64_t a = MapAnon(kPageSize);
  uint8_t v = 4;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  auto n = as_->Mremap(a, kPageSize, kPageSize, kMremapMayMove | kMremapDontUnmap);
  ASSERT_TRUE(n.has_value());
  EXPECT_NE(*n, a);
  EXPECT_EQ(ReadByte(*as_, *n), 4);
  EXPECT_EQ(ReadByte(*as_, a), 0);
}

// Bug: mremap of an old range that starts in a hole (no VMA at old_addr)
// returned success, and when shrinking unmapped whatever lay in the tail,
// destroying the mapping after the hole. Linux (since 5.16) looks the VMA
// up first and fails with EFAULT, changing nothing.
TEST_F(AddressSpaceTest, MremapOfHoleFailsWithEfaultAndKeepsTail) {
  const uint64_t a = MapAnon(4 * kPageSize, kProtRead | kProtWrite, kMapFixed, 0x50000000);
  ASSERT_TRUE(as_->Write(a, Bytes(4 * kPageSize, 3).data(), 4 * kPageSize).has_value());
  rec_.Take();
  // Old range [a - 2P, a + 2P) starts in the hole; shrinking to one page
  // would unmap [a - P, a + 2P).
  auto r = as_->Mremap(a - 2 * kPageSize, 4 * kPageSize, kPageSize, 0);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kFault);
  // Same length (the "no resize" shortcut) and growing: EFAULT as well.
  EXPECT_EQ(as_->Mremap(a - 2 * kPageSize, 2 * kPageSize, 2 * kPageSize, 0).error(), Errc::kFault);
  EXPECT_EQ(as_->Mremap(a - 2 * kPageSize, 4 * kPageSize, kPageSize, kMremapMayMove).error(), Errc::kFault);
  auto v = as_->FindVma(a);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->start, a);
  EXPECT_EQ(v->end, a + 4 * kPageSize);
  EXPECT_EQ(ReadByte(*as_, a + kPageSize), 3);
  EXPECT_TRUE(rec_.Take().empty());
}

// A shrink with MREMAP_FIXED unmaps [old_addr + new_len, old_addr +
// old_len) first, and that range may cross VMA ends (Linux checks only the
// part that moves against the VMA).
TEST_F(AddressSpaceTest, MremapFixedShrinkMayUnmapAcrossVmaEnds) {
  const uint64_t a = MapAnon(2 * kPageSize, kProtRead | kProtWrite, kMapFixed, 0x50000000);
  MapAnon(2 * kPageSize, kProtRead, kMapFixed, a + 2 * kPageSize);  // a second VMA
  uint8_t v = 7;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  auto r = as_->Mremap(a, 4 * kPageSize, kPageSize, kMremapMayMove | kMremapFixed, 0x60000000);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(*r, 0x60000000u);
  EXPECT_EQ(ReadByte(*as_, *r), 7);
  EXPECT_FALSE(as_->FindVma(a).has_value() && as_->FindVma(a)->start < a + 4 * kPageSize);
  // Without FIXED a shrink across VMA ends is a plain munmap of the tail.
  const uint64_t b = MapAnon(2 * kPageSize, kProtRead | kProtWrite, kMapFixed, 0x70000000);
  MapAnon(2 * kPageSize, kProtRead, kMapFixed, b + 2 * kPageSize);
  ASSERT_EQ(as_->Mremap(b, 4 * kPageSize, kPageSize, 0).value_or(0), b);
  EXPECT_EQ(as_->FindVma(b)->end, b + kPageSize);
  EXPECT_FALSE(as_->FindVma(b + kPageSize).has_value() &&
               as_->FindVma(b + kPageSize)->start < b + 4 * kPageSize);
}

// Bug: mremap with old_len 0 (duplicating a shared mapping) split the
// source VMA at old_addr and left it split. Linux copies the VMA without
// touching the source.
TEST_F(AddressSpaceTest, MremapZeroOldLengthLeavesTheSourceVmaWhole) {
  auto s = as_->Mmap(0x50000000, 4 * kPageSize, kProtRead | kProtWrite,
                     kMapShared | kMapAnonymous | kMapFixed);
  ASSERT_TRUE(s.has_value());
  uint8_t v = 5;
  ASSERT_TRUE(as_->Write(*s + kPageSize, &v, 1).has_value());
  const size_t before = as_->VmaCount();
  auto r = as_->Mremap(*s + kPageSize, 0, kPageSize, kMremapMayMove);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(as_->VmaCount(), before + 1);
  auto src = as_->FindVma(*s);
  ASSERT_TRUE(src.has_value());
  EXPECT_EQ(src->start, *s);
  EXPECT_EQ(src->end, *s + 4 * kPageSize);
  EXPECT_EQ(ReadByte(*as_, *r), 5);  // the same shmem page
  EXPECT_EQ(ReadByte(*as_, *s + kPageSize), 5);
}

// Bug: mremap(old_addr, 0, n, FIXED, new_addr == old_addr) of a shared
// mapping (the ranges do not overlap: the old one is empty)
// unmapped the target, and with it the VMA at old_addr, then dereferenced
// the missing VMA (segfault). Linux finds no VMA after the unmap: EFAULT.
TEST_F(AddressSpaceTest, MremapDuplicateOntoItsOwnAddressFailsWithEfault) {
  auto s = as_->Mmap(0x50000000, 4 * kPageSize, kProtRead | kProtWrite,
                     kMapShared | kMapAnonymous | kMapFixed);
  ASSERT_TRUE(s.has_value());
  constexpr uint32_t kFlags = kMremapMayMove | kMremapFixed;
  EXPECT_EQ(as_->Mremap(*s + kPageSize, 0, 2 * kPageSize, kFlags, *s + kPageSize).error(), Errc::kFault);
  // Starting below old_addr, the target overlaps the (empty) old range.
  EXPECT_EQ(as_->Mremap(*s + kPageSize, 0, 2 * kPageSize, kFlags, *s).error(), Errc::kInval);
  EXPECT_EQ(as_->FindVma(*s)->end, *s + 4 * kPageSize);  // nothing changed
  // A target after old_addr cuts the source VMA, and the copy follows.
  auto r = as_->Mremap(*s + kPageSize, 0, kPageSize, kFlags, *s + 2 * kPageSize);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(*r, *s + 2 * kPageSize);
  EXPECT_EQ(as_->FindVma(*r)->pgoff, 1u);  // the shmem page of old_addr
}

// MREMAP_DONTUNMAP without MREMAP_FIXED: new_addr is validated (aligned,
// not overlapping the old range: EINVAL) and used as a placement hint.
TEST_F(AddressSpaceTest, MremapDontUnmapValidatesNewAddrAndUsesItAsAHint) {
  const uint64_t a = MapAnon(2 * kPageSize, kProtRead | kProtWrite, kMapFixed, 0x50000000);
  constexpr uint32_t kFlags = kMremapMayMove | kMremapDontUnmap;
  EXPECT_EQ(as_->Mremap(a, 2 * kPageSize, 2 * kPageSize, kFlags, 0x60000000 + 8).error(), Errc::kInval);
  EXPECT_EQ(as_->Mremap(a, 2 * kPageSize, 2 * kPageSize, kFlags, a + kPageSize).error(), Errc::kInval);
  auto r = as_->Mremap(a, 2 * kPageSize, 2 * kPageSize, kFlags, 0x60000000);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(*r, 0x60000000u);
  // A hint that is taken is only a hint: the mapping goes elsewhere.
  auto r2 = as_->Mremap(a, 2 * kPageSize, 2 * kPageSize, kFlags, 0x60000000);
  ASSERT_TRUE(r2.has_value()) << r2.error().ToString();
  EXPECT_NE(*r2, 0x60000000u);
  EXPECT_EQ(as_->FindVma(0x60000000)->start, 0x60000000u);
}

// Since Linux 6.17 an MREMAP_FIXED move with old_len == new_len may span
// several VMAs: each is moved to the same offset in the new range, gaps
// stay gaps (what the target had there survives), and a hole at the end is
// ignored. A hole at the start is EFAULT.
TEST_F(AddressSpaceTest, MremapFixedMovesSeveralVmasAndKeepsTheGaps) {
  constexpr uint64_t P = kPageSize;
  const uint64_t a = 0x50000000, t = 0x60000000;
  MapAnon(2 * P, kProtRead | kProtWrite, kMapFixed, a);
  MapAnon(P, kProtRead, kMapFixed, a + 3 * P);  // gap at a + 2P
  MapAnon(P, kProtRead | kProtWrite, kMapFixed, t + 2 * P);  // in the target's gap
  uint8_t v = 9;
  ASSERT_TRUE(as_->Write(a + P, &v, 1).has_value());
  constexpr uint32_t kFlags = kMremapMayMove | kMremapFixed;
  EXPECT_EQ(as_->Mremap(a - P, 3 * P, 3 * P, kFlags, t).error(), Errc::kFault);  // hole at start
  auto r = as_->Mremap(a, 5 * P, 5 * P, kFlags, t);  // ends in a hole at a + 4P
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(*r, t);
  EXPECT_EQ(ReadByte(*as_, t + P), 9);
  EXPECT_EQ(as_->FindVma(t)->end, t + 3 * P);  // t's VMA merged with the kept gap mapping
  EXPECT_EQ(as_->FindVma(t + 3 * P)->prot, kProtRead);
  EXPECT_EQ(as_->FindVma(t + 3 * P)->start, t + 3 * P);
  EXPECT_FALSE(as_->FindVma(a).has_value() && as_->FindVma(a)->start < a + 5 * P);
}

// Bug: the top-down search started at the cached end of the last
// allocation, so a hole above it that an earlier, larger request had
// skipped was never used; Linux (vm_unmapped_area) takes the highest gap
// that fits.
TEST_F(AddressSpaceTest, TopDownPlacementTakesTheHighestGapThatFits) {
  const uint64_t top = as_->config().mmap_base;
  MapAnon(kPageSize, kProtRead, kMapFixed, top - 2 * kPageSize);  // leaves [top - P, top) free
  EXPECT_EQ(MapAnon(2 * kPageSize, kProtRead | kProtWrite), top - 4 * kPageSize);
  EXPECT_EQ(MapAnon(kPageSize, kProtRead | kProtWrite), top - kPageSize);
  EXPECT_EQ(MapAnon(kPageSize, kProtRead | kProtWrite), top - 5 * kPageSize);
  // A hole in the middle of a gap's top half: after munmap the search
  // starts at the top of the whole gap.
  ASSERT_TRUE(as_->Munmap(top - 4 * kPageSize, kPageSize).has_value());
  EXPECT_EQ(MapAnon(kPageSize, kProtRead), top - 4 * kPageSize);
}

// mmap rounds an unaligned hint down (Linux: addr &= PAGE_MASK).
TEST_F(AddressSpaceTest, MmapRoundsAnUnalignedHintDown) {
  auto r = as_->Mmap(0x50000000 + 100, kPageSize, kProtRead, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, 0x50000000u);
}

TEST_F(AddressSpaceTest, SharedFileMappingIsCoherentWithPreadPwrite) {
  auto f = *SimFile::TryCreate(*pool_, 2 * kPageSize, "f");
  ASSERT_TRUE(f->Pwrite(10, "hello", 5).has_value());
  auto r = as_->Mmap(0, 2 * kPageSize, kProtRead | kProtWrite, kMapShared, f, 0);
  ASSERT_TRUE(r.has_value());
  char buf[6] = {};
  ASSERT_TRUE(as_->Read(*r + 10, buf, 5).has_value());
  EXPECT_STREQ(buf, "hello");
  ASSERT_TRUE(as_->Write(*r + kPageSize, "world", 5).has_value());
  ASSERT_EQ(*f->Pread(kPageSize, buf, 5), 5u);
  EXPECT_STREQ(buf, "world");
}

TEST_F(AddressSpaceTest, PrivateFileMappingCopiesOnWrite) {
  auto f = *SimFile::TryCreate(*pool_, kPageSize, "f");
  ASSERT_TRUE(f->Pwrite(0, "abc", 3).has_value());
  auto r = as_->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate, f, 0);
  EXPECT_EQ(ReadByte(*as_, *r), 'a');
  EXPECT_TRUE(as_->QueryPte(*r).file);
  ASSERT_TRUE(as_->Write(*r, "X", 1).has_value());
  EXPECT_EQ(ReadByte(*as_, *r), 'X');
  EXPECT_FALSE(as_->QueryPte(*r).file);
  char c;
  ASSERT_TRUE(f->Pread(0, &c, 1).has_value());
  EXPECT_EQ(c, 'a');
}

TEST_F(AddressSpaceTest, AccessBeyondEndOfFileIsSigbus) {
  auto f = *SimFile::TryCreate(*pool_, kPageSize, "f");
  auto r = as_->Mmap(0, 2 * kPageSize, kProtRead, kMapShared, f, 0);
  uint8_t b;
  EXPECT_TRUE(as_->Read(*r, &b, 1).has_value());
  EXPECT_EQ(as_->Read(*r + kPageSize, &b, 1).error(), Errc::kFault);
}

TEST_F(AddressSpaceTest, AtomicsWorkAndNeedAlignment) {
  uint64_t a = MapAnon(kPageSize);
  EXPECT_EQ(*as_->AtomicFetchAdd(a + 8, 5), 0u);
  EXPECT_EQ(*as_->AtomicFetchAdd(a + 8, 5), 5u);
  EXPECT_EQ(*as_->AtomicCompareExchange(a + 8, 10, 42), 10u);
  EXPECT_EQ(*as_->AtomicCompareExchange(a + 8, 10, 43), 42u);
  EXPECT_EQ(*as_->AtomicExchange(a + 8, 1), 42u);
  EXPECT_EQ(*as_->AtomicLoad(a + 8), 1u);
  EXPECT_EQ(as_->AtomicLoad(a + 4).error(), Errc::kInval);
}

TEST_F(AddressSpaceTest, ExitSendsReleaseThenUnmapsEverything) {
  uint64_t a = MapAnon(kPageSize);
  uint8_t v = 1;
  ASSERT_TRUE(as_->Write(a, &v, 1).has_value());
  const uint64_t free_before = pool_->GetStats().free_frames;
  as_->Exit();
  EXPECT_EQ(rec_.releases(), 1);
  EXPECT_EQ(pool_->GetStats().free_frames, free_before + 1);
  EXPECT_TRUE(as_->exited());
  EXPECT_EQ(as_->Read(a, &v, 1).error(), Errc::kFault);
  EXPECT_EQ(as_->Mmap(0, kPageSize, kProtRead, kMapPrivate | kMapAnonymous).error(), Errc::kFault);
}

TEST_F(AddressSpaceTest, MapPopulateFaultsEverythingIn) {
  uint64_t a = MapAnon(8 * kPageSize, kProtRead | kProtWrite, kMapPopulate);
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(as_->QueryPte(a + i * kPageSize).writable);
}

TEST_F(AddressSpaceTest, PageTablesAreFreedWhenTheirRangeIsUnmapped) {
  const uint64_t before = as_->GetStats().page_table_pages;
  uint64_t a = MapAnon(uint64_t{1} << 30, kProtRead | kProtWrite, kMapFixed, uint64_t{64} << 30);
  uint8_t v = 1;
  ASSERT_TRUE(as_->Write(a + 12345, &v, 1).has_value());
  EXPECT_GT(as_->GetStats().page_table_pages, before);
  ASSERT_TRUE(as_->Munmap(a, uint64_t{1} << 30).has_value());
  EXPECT_EQ(as_->GetStats().page_table_pages, before);
}

TEST(FramePoolTest, AllocFreeAndHugeCoalescing) {
  auto pool = testing::MakePool(8);  // 4 blocks, block 0 holds the zero page
  auto s0 = pool->GetStats();
  EXPECT_EQ(s0.free_huge_blocks, 3u);
  std::vector<Pfn> pages;
  for (int i = 0; i < 600; ++i) pages.push_back(*pool->AllocPage());
  EXPECT_LT(pool->GetStats().free_huge_blocks, 3u);
  for (Pfn p : pages) pool->Put(p);
  EXPECT_EQ(pool->GetStats().free_huge_blocks, 3u);
  std::vector<Pfn> huge;
  for (int i = 0; i < 3; ++i) {
    auto h = pool->AllocHuge();
    ASSERT_TRUE(h.has_value());
    EXPECT_EQ(*h % kPagesPerHuge, 0u);
    huge.push_back(*h);
  }
  EXPECT_EQ(pool->AllocHuge().error(), Errc::kNoMem);
  for (Pfn h : huge)
    for (uint64_t i = 0; i < kPagesPerHuge; ++i) pool->Put(h + i);
  EXPECT_EQ(pool->GetStats().free_frames, s0.free_frames);
}

TEST(FramePoolTest, ReusedFramesReadAsZero) {
  auto pool = testing::MakePool(4);
  Pfn p = *pool->AllocPage();
  std::memset(pool->Data(p), 0xAB, kPageSize);
  pool->Put(p);
  Pfn q = *pool->AllocPage();
  EXPECT_EQ(q, p);
  for (uint64_t i = 0; i < kPageSize; ++i) ASSERT_EQ(uint8_t(pool->Data(q)[i]), 0);
}

TEST(FramePoolTest, ExhaustionIsEnomemAndFaultInjectionWorks) {
  Env env;
  auto pool = testing::MakePool(4, env);
  std::vector<Pfn> all;
  while (auto p = pool->AllocPage()) all.push_back(*p);
  EXPECT_EQ(all.size(), 2 * kPagesPerHuge - 1);
  pool->Put(all.back());
  env.faults().FailNth("frame_pool.alloc", 1);
  EXPECT_EQ(pool->AllocPage().error(), Errc::kNoMem);
  EXPECT_TRUE(pool->AllocPage().has_value());
}

}  // namespace
}  // namespace usvm::mm
