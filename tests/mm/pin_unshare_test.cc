// A read-only long-term pin unshares the page it pins (Linux 5.19+,
// mm/gup.c gup_must_unshare and the FAULT_FLAG_UNSHARE path of
// do_wp_page): a pinned page must be the process's own, or a later write
// by the process copies it and the pin keeps stale bytes. The cases follow
// tools/testing/selftests/mm/cow.c ("R/O longterm GUP pin ... after
// fork", "R/O longterm GUP of the shared zeropage", private file pages).
// FOLL_LONGTERM pins cannot be taken from user space without io_uring or
// the gup_test debugfs file, so these are not asked of the machine's
// kernel; the rules are read from its source.
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::mm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;

class PinUnshareTest : public ::testing::Test {
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
  uint64_t FrameWord(Pfn p) const {
    uint64_t v;
    std::memcpy(&v, pool_->Data(p), 8);
    return v;
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

// The case the fuzzer found (usvm fuzz --seed 5): fork, a read pin in the
// parent, a write by the parent. The pin must see the write.
TEST_F(PinUnshareTest, ReadPinAfterForkSeesTheParentsLaterWrites) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  auto child = *as_->Fork();
  const Pfn shared = as_->QueryPte(a).pfn;
  ASSERT_EQ(child->QueryPte(a).pfn, shared);

  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  // The parent got its own copy, mapped read-only; the child keeps the old.
  EXPECT_NE(pin, shared);
  EXPECT_EQ(as_->QueryPte(a).pfn, pin);
  EXPECT_FALSE(as_->QueryPte(a).writable);
  EXPECT_EQ(child->QueryPte(a).pfn, shared);
  EXPECT_EQ(as_->GetStats().cow_unshares, 1u);
  EXPECT_EQ(FrameWord(pin), 1u);

  // The write reuses the pinned page (it is the parent's alone).
  ASSERT_TRUE(as_->AtomicStore(a, 2).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, pin);
  EXPECT_EQ(FrameWord(pin), 2u);
  EXPECT_EQ(*child->AtomicLoad(a), 1u);
  as_->UnpinUserPage(pin);
  child->Exit();
}

TEST_F(PinUnshareTest, ReadPinInTheChildSeesTheChildsWritesAndNotTheParents) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 5).has_value());
  auto child = *as_->Fork();
  Pfn pin;
  ASSERT_TRUE(child->PinUserPages(a, 1, false, &pin).has_value());
  EXPECT_NE(pin, as_->QueryPte(a).pfn);
  ASSERT_TRUE(as_->AtomicStore(a, 6).has_value());  // the parent's page
  ASSERT_TRUE(child->AtomicStore(a, 7).has_value());
  EXPECT_EQ(FrameWord(pin), 7u);
  EXPECT_EQ(*as_->AtomicLoad(a), 6u);
  child->UnpinUserPage(pin);
  child->Exit();
}

// A page the process owns alone is pinned where it is, writable or not.
TEST_F(PinUnshareTest, ExclusivePagesArePinnedInPlace) {
  const uint64_t a = MapAnon(2 * kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  ASSERT_TRUE(as_->AtomicStore(a + kPageSize, 2).has_value());
  // The child exits: the page is the parent's alone again, though still
  // mapped read-only.
  auto child = *as_->Fork();
  child->Exit();
  ASSERT_TRUE(as_->Mprotect(a + kPageSize, kPageSize, kProtRead).has_value());
  const Pfn p0 = as_->QueryPte(a).pfn, p1 = as_->QueryPte(a + kPageSize).pfn;
  Pfn pins[2];
  ASSERT_TRUE(as_->PinUserPages(a, 2, false, pins).has_value());
  EXPECT_EQ(pins[0], p0);
  EXPECT_EQ(pins[1], p1);
  EXPECT_EQ(as_->GetStats().cow_unshares, 0u);
  as_->UnpinUserPage(pins[0]);
  as_->UnpinUserPage(pins[1]);
}

// The shared zero page is never pinned: a read pin of untouched memory
// gets a zeroed page of its own, even in a read-only private mapping (a
// COW mapping: the kernel unshares there too), and the entry stays
// read-only.
TEST_F(PinUnshareTest, ReadPinOfTheZeroPageInAReadOnlyMappingGetsAPageOfItsOwn) {
  const uint64_t a = MapAnon(kPageSize, kProtRead);
  uint64_t v = 1;
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  ASSERT_TRUE(as_->QueryPte(a).zero_page);
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  EXPECT_NE(pin, FramePool::kZeroPfn);
  EXPECT_FALSE(as_->QueryPte(a).zero_page);
  EXPECT_FALSE(as_->QueryPte(a).writable);
  EXPECT_EQ(as_->QueryPte(a).pfn, pin);
  EXPECT_EQ(FrameWord(pin), 0u);
  // Made writable and written, the process writes the pinned page.
  ASSERT_TRUE(as_->Mprotect(a, kPageSize, kRW).has_value());
  ASSERT_TRUE(as_->AtomicStore(a, 9).has_value());
  EXPECT_EQ(as_->QueryPte(a).pfn, pin);
  EXPECT_EQ(FrameWord(pin), 9u);
  as_->UnpinUserPage(pin);
}

TEST_F(PinUnshareTest, ReadPinOfTheZeroPageInAWritableMappingSeesLaterWrites) {
  const uint64_t a = MapAnon(kPageSize);
  uint64_t v = 1;
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  ASSERT_TRUE(as_->AtomicStore(a, 3).has_value());
  EXPECT_EQ(FrameWord(pin), 3u);
  as_->UnpinUserPage(pin);
}

// A page-cache page of a private file mapping is copied: the pin names
// the process's copy, which later writes to the file do not reach and
// later writes by the process do.
TEST_F(PinUnshareTest, ReadPinOfAPrivateFilePageGetsAnAnonymousCopy) {
  auto f = *SimFile::TryCreate(*pool_, kPageSize, "f");
  const uint64_t one = 1;
  ASSERT_TRUE(f->Pwrite(0, &one, 8).has_value());
  const uint64_t a = *as_->Mmap(0, kPageSize, kRW, kMapPrivate, f, 0);
  uint64_t v;
  ASSERT_TRUE(as_->Read(a, &v, 8).has_value());
  ASSERT_TRUE(as_->QueryPte(a).file);
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  EXPECT_FALSE(as_->QueryPte(a).file);
  EXPECT_EQ(FrameWord(pin), 1u);
  const uint64_t two = 2;
  ASSERT_TRUE(f->Pwrite(0, &two, 8).has_value());
  EXPECT_EQ(FrameWord(pin), 1u);
  ASSERT_TRUE(as_->AtomicStore(a, 4).has_value());
  EXPECT_EQ(FrameWord(pin), 4u);
  as_->UnpinUserPage(pin);
}

// Shared mappings are the same page for everyone: pinned as they are.
TEST_F(PinUnshareTest, SharedMappingsArePinnedInPlace) {
  const uint64_t a = *as_->Mmap(0, kPageSize, kRW, kMapShared | kMapAnonymous);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  auto child = *as_->Fork();
  const Pfn p = as_->QueryPte(a).pfn;
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  EXPECT_EQ(pin, p);
  ASSERT_TRUE(child->AtomicStore(a, 8).has_value());
  EXPECT_EQ(FrameWord(pin), 8u);
  as_->UnpinUserPage(pin);
  child->Exit();
}

// A 2 MiB page shared after fork: the pinned 4 KiB page is copied out of
// it (the kernel splits and copies the subpage).
TEST_F(PinUnshareTest, ReadPinOfASharedHugePageCopiesOneSubpage) {
  auto r = *as_->Mmap(0, 2 * kHugePageSize, kRW, kMapPrivate | kMapAnonymous);
  const uint64_t base = (r + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as_->Madvise(base, kHugePageSize, kMadvHugePage).has_value());
  ASSERT_TRUE(as_->AtomicStore(base + 3 * kPageSize, 11).has_value());
  if (!as_->QueryPte(base).huge) GTEST_SKIP() << "no 2 MiB frame";
  auto child = *as_->Fork();
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(base + 3 * kPageSize, 1, false, &pin).has_value());
  EXPECT_NE(pin, child->QueryPte(base + 3 * kPageSize).pfn);
  EXPECT_EQ(FrameWord(pin), 11u);
  ASSERT_TRUE(as_->AtomicStore(base + 3 * kPageSize, 12).has_value());
  EXPECT_EQ(FrameWord(pin), 12u);
  EXPECT_EQ(*child->AtomicLoad(base + 3 * kPageSize), 11u);
  as_->UnpinUserPage(pin);
  child->Exit();
}

// A fork after the pin copies the pinned page for the child (the pin
// stays the parent's), so the pin keeps seeing the parent's writes.
TEST_F(PinUnshareTest, ForkAfterAReadPinKeepsThePinTheParents) {
  const uint64_t a = MapAnon(kPageSize);
  ASSERT_TRUE(as_->AtomicStore(a, 1).has_value());
  auto c1 = *as_->Fork();
  Pfn pin;
  ASSERT_TRUE(as_->PinUserPages(a, 1, false, &pin).has_value());
  auto c2 = *as_->Fork();
  EXPECT_NE(c2->QueryPte(a).pfn, pin);
  ASSERT_TRUE(as_->AtomicStore(a, 2).has_value());
  EXPECT_EQ(FrameWord(pin), 2u);
  EXPECT_EQ(*c1->AtomicLoad(a), 1u);
  EXPECT_EQ(*c2->AtomicLoad(a), 1u);
  as_->UnpinUserPage(pin);
  c1->Exit();
  c2->Exit();
}

}  // namespace
}  // namespace usvm::mm
