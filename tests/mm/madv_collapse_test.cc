// MADV_COLLAPSE: the same scenarios on the simulated address space and on
// the real kernel of this machine (its errno is the reference), then the
// sim-only properties (bytes kept, one 2 MiB entry, shared pages copied,
// pins and device pages refused).
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include "test_util.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace usvm::mm {
namespace {

// One side of the comparison: the few calls the scenarios make. Every
// call returns 0 or an errno.
struct Side {
  virtual ~Side() = default;
  // A 4 MiB mapping; returns its 2 MiB-aligned middle.
  virtual uint64_t Region(uint32_t prot, bool shared) = 0;
  virtual void Touch(uint64_t a, bool write) = 0;
  virtual int Mprotect(uint64_t a, uint64_t len, uint32_t prot) = 0;
  virtual int Madvise(uint64_t a, uint64_t len, int advice) = 0;
};

struct RealSide : Side {
  std::vector<std::pair<void*, size_t>> maps;
  ~RealSide() override {
    for (auto [p, n] : maps) munmap(p, n);
  }
  uint64_t Region(uint32_t prot, bool shared) override {
    void* p = mmap(nullptr, 2 * kHugePageSize, static_cast<int>(prot),
                   (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    maps.emplace_back(p, 2 * kHugePageSize);
    return (reinterpret_cast<uint64_t>(p) + kHugePageSize - 1) & kHugeMask;
  }
  void Touch(uint64_t a, bool write) override {
    auto* p = reinterpret_cast<volatile char*>(a);
    if (write)
      *p = 1;
    else
      (void)*p;
  }
  int Mprotect(uint64_t a, uint64_t len, uint32_t prot) override {
    return mprotect(reinterpret_cast<void*>(a), len, static_cast<int>(prot)) == 0 ? 0 : errno;
  }
  int Madvise(uint64_t a, uint64_t len, int advice) override {
    return madvise(reinterpret_cast<void*>(a), len, advice) == 0 ? 0 : errno;
  }
};

struct SimSide : Side {
  std::unique_ptr<FramePool> pool = testing::MakePool(64);
  std::shared_ptr<AddressSpace> as = testing::MakeSpace(*pool);
  ~SimSide() override { as->Exit(); }
  uint64_t Region(uint32_t prot, bool shared) override {
    const uint64_t p = *as->Mmap(0, 2 * kHugePageSize, prot,
                                 (shared ? kMapShared : kMapPrivate) | kMapAnonymous);
    return (p + kHugePageSize - 1) & kHugeMask;
  }
  void Touch(uint64_t a, bool write) override {
    char c = 1;
    EXPECT_TRUE(write ? as->Write(a, &c, 1).has_value() : as->Read(a, &c, 1).has_value());
  }
  int Mprotect(uint64_t a, uint64_t len, uint32_t prot) override {
    auto r = as->Mprotect(a, len, prot);
    return r ? 0 : r.error().errnum();
  }
  int Madvise(uint64_t a, uint64_t len, int advice) override {
    auto r = as->Madvise(a, len, advice == MADV_COLLAPSE ? kMadvCollapse : advice);
    return r ? 0 : r.error().errnum();
  }
};

struct Scenario {
  const char* name;
  std::function<int(Side&)> run;  // the errno of the last madvise
};

const Scenario kScenarios[] = {
    {"empty region", [](Side& s) { return s.Madvise(s.Region(kProtRead | kProtWrite, false), kHugePageSize, MADV_COLLAPSE); }},
    {"zero page only", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a, false);
       return s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
     }},
    {"one written page", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a + kPageSize, true);
       return s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
     }},
    {"one page in a VMA made read-only", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a + kPageSize, true);
       s.Mprotect(a - kHugePageSize / 2, 2 * kHugePageSize, kProtRead);
       return s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
     }},
    {"no whole 2 MiB in the range", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a + kPageSize, true);
       return s.Madvise(a + kPageSize, kPageSize, MADV_COLLAPSE);
     }},
    {"twice", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a, true);
       const int first = s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
       return first != 0 ? first : s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
     }},
    {"MADV_NOHUGEPAGE", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a, true);
       s.Madvise(a, kHugePageSize, MADV_NOHUGEPAGE);
       return s.Madvise(a, kHugePageSize, MADV_COLLAPSE);
     }},
    {"range over a hole", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       return s.Madvise(a - kHugePageSize - kPageSize, 2 * kPageSize, MADV_COLLAPSE);
     }},
    {"range one page past a 2 MiB region", [](Side& s) {
       const uint64_t a = s.Region(kProtRead | kProtWrite, false);
       s.Touch(a, true);
       return s.Madvise(a, kHugePageSize + kPageSize, MADV_COLLAPSE);
     }},
};

// THP state of the real machine: MADV_COLLAPSE follows it only in part, so
// the comparison needs THP on ("always" or "madvise").
bool RealThpOn() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string s;
  std::getline(f, s);
  return s.find("[always]") != std::string::npos || s.find("[madvise]") != std::string::npos;
}

TEST(MadvCollapse, ErrnoMatchesTheRealKernel) {
  if (!RealThpOn()) GTEST_SKIP() << "transparent huge pages are off on this machine";
  {
    RealSide probe;
    const uint64_t a = probe.Region(kProtRead | kProtWrite, false);
    probe.Touch(a, true);
    if (probe.Madvise(a, kHugePageSize, MADV_COLLAPSE) == EINVAL)
      GTEST_SKIP() << "this kernel does not collapse (MADV_COLLAPSE unsupported)";
  }
  for (const Scenario& sc : kScenarios) {
    RealSide real;
    SimSide sim;
    EXPECT_EQ(sc.run(sim), sc.run(real)) << sc.name << " (sim errno vs kernel errno)";
  }
}

// Shared anonymous memory (shmem) is not collapsed here; the kernel agrees
// when shmem THP is off (this machine's default), so that one is checked
// on the sim alone.
TEST(MadvCollapse, SharedMemoryIsNotCollapsed) {
  SimSide sim;
  const uint64_t a = sim.Region(kProtRead | kProtWrite, true);
  sim.Touch(a, true);
  EXPECT_EQ(sim.Madvise(a, kHugePageSize, MADV_COLLAPSE), EINVAL);
}

class CollapseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(64);
    as_ = testing::MakeSpace(*pool_);
    raw_ = *as_->Mmap(0, 2 * kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
    a_ = (raw_ + kHugePageSize - 1) & kHugeMask;
  }
  void TearDown() override { as_->Exit(); }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  uint64_t raw_ = 0, a_ = 0;
};

TEST_F(CollapseTest, KeepsEveryByteAndMapsOneHugeEntry) {
  for (uint64_t p = 0; p < kPagesPerHuge; p += 3) {
    const uint64_t v = p * 7 + 1;
    ASSERT_TRUE(as_->Write(a_ + p * kPageSize + 16, &v, 8).has_value());
  }
  uint64_t z;
  ASSERT_TRUE(as_->Read(a_ + kPageSize, &z, 8).has_value());  // a zero-page entry
  ASSERT_FALSE(as_->QueryPte(a_).huge);
  const uint64_t tables = as_->GetStats().page_table_pages;
  ASSERT_TRUE(as_->Madvise(a_, kHugePageSize, kMadvCollapse).has_value());
  const PteInfo p0 = as_->QueryPte(a_);
  EXPECT_TRUE(p0.huge);
  EXPECT_TRUE(p0.writable);
  EXPECT_EQ(as_->GetStats().thp_collapses, 1u);
  EXPECT_EQ(as_->GetStats().page_table_pages, tables - 1);  // the PTE table is gone
  EXPECT_EQ(as_->GetStats().rss_pages, kPagesPerHuge);
  for (uint64_t p = 0; p < kPagesPerHuge; ++p) {
    uint64_t v = 1;
    ASSERT_TRUE(as_->Read(a_ + p * kPageSize + 16, &v, 8).has_value());
    ASSERT_EQ(v, p % 3 == 0 ? p * 7 + 1 : 0u) << p;
  }
}

TEST_F(CollapseTest, SharedCopyOnWritePagesAreCopiedForThisSpaceOnly) {
  const uint64_t v = 42;
  ASSERT_TRUE(as_->Write(a_, &v, 8).has_value());
  auto child = *as_->Fork();
  ASSERT_TRUE(as_->Madvise(a_, kHugePageSize, kMadvCollapse).has_value());
  const uint64_t w = 43;
  ASSERT_TRUE(as_->Write(a_, &w, 8).has_value());
  uint64_t c = 0;
  ASSERT_TRUE(child->Read(a_, &c, 8).has_value());
  EXPECT_EQ(c, 42u);
  EXPECT_FALSE(child->QueryPte(a_).huge);
  child->Exit();
}

TEST_F(CollapseTest, PinnedPagesMakeItFailWithEagain) {
  Pfn pfn;
  ASSERT_TRUE(as_->PinUserPages(a_ + 5 * kPageSize, 1, true, &pfn).has_value());
  auto r = as_->Madvise(a_, kHugePageSize, kMadvCollapse);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), Errc::kAgain);
  EXPECT_FALSE(as_->QueryPte(a_).huge);
  as_->UnpinUserPage(pfn);
  EXPECT_TRUE(as_->Madvise(a_, kHugePageSize, kMadvCollapse).has_value());
}

TEST_F(CollapseTest, NoHugeBlockIsEnomem) {
  // A pool with no whole free 2 MiB block left.
  auto pool = testing::MakePool(4);
  auto as = testing::MakeSpace(*pool);
  const uint64_t raw = *as->Mmap(0, 2 * kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t a = (raw + kHugePageSize - 1) & kHugeMask;
  // Touch one page of every 2 MiB block of the pool, so none is wholly free.
  ASSERT_TRUE(as->Populate(a, kPageSize, true).has_value());
  std::vector<Pfn> hold;
  while (pool->GetStats().free_huge_blocks > 0) hold.push_back(*pool->AllocPage());
  auto r = as->Madvise(a, kHugePageSize, kMadvCollapse);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), Errc::kNoMem);
  for (Pfn p : hold) pool->Put(p);
  as->Exit();
}

}  // namespace
}  // namespace usvm::mm
