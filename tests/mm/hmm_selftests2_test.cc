// More scenarios of the kernel's HMM selftests (tools/testing/selftests/mm/
// hmm-tests.c), through our mirror device (dmirror.h): migration of private
// file mappings, short-term get_user_pages on device memory, hugetlb
// mappings (`compound`, `anon_write_hugetlbfs`) and the THP migration cases
// that work with 4 KiB device pages (`migrate_anon_huge_*`).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "coherent_device.h"
#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;

using testing::Pattern;

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

// ---- hugetlb -----------------------------------------------------------------

// hmm-tests compound: a MAP_HUGETLB region is reported at PMD level (order
// 9) on every page, writable, then read-only after mprotect(PROT_READ).
TEST_F(HmmSelftest2, CompoundHugetlbPagesReportOrderNine) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);  // HUGETLB_SETUP_DEFAULT_PAGES(1)
  const uint64_t npages = kPagesPerHuge;
  auto r = as_->Mmap(0, kHugePageSize, kRW, kMapPrivate | kMapAnonymous | kMapHugetlb);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  const uint64_t a = *r;
  ASSERT_TRUE(dev_->Watch(a, kHugePageSize).has_value());
  std::vector<uint32_t> ints(kHugePageSize / 4);
  for (uint32_t i = 0; i < ints.size(); ++i) ints[i] = i;
  ASSERT_TRUE(as_->Write(a, ints.data(), kHugePageSize).has_value());

  auto words = dev_->Snapshot(a, a + kHugePageSize);
  ASSERT_TRUE(words.has_value());
  ASSERT_EQ(words->size(), npages);
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t w = (*words)[i];
    ASSERT_TRUE(w & kPfnValid) << i;
    ASSERT_TRUE(w & kPfnWrite) << i;
    ASSERT_FALSE(w & (kPfnError | kPfnDevice)) << i;
    ASSERT_EQ(HmmOrder(w), 9u) << i;
  }
  ASSERT_TRUE(as_->Mprotect(a, kHugePageSize, kProtRead).has_value());
  words = dev_->Snapshot(a, a + kHugePageSize);
  ASSERT_TRUE(words.has_value());
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t w = (*words)[i];
    ASSERT_TRUE(w & kPfnValid) << i;
    ASSERT_FALSE(w & kPfnWrite) << i;
    ASSERT_EQ(HmmOrder(w), 9u) << i;
  }
  ASSERT_TRUE(as_->Munmap(a, kHugePageSize).has_value());
  EXPECT_EQ(pool_->GetHugetlbStats().free, 1u);
}

// hmm-tests anon_write_hugetlbfs: the device writes a MAP_HUGETLB page (the
// write fault maps the whole 2 MiB page); the CPU reads what it wrote.
TEST_F(HmmSelftest2, AnonWriteHugetlbfs) {
  ASSERT_EQ(pool_->SetHugetlbPages(1), 1u);
  auto r = as_->Mmap(0, kHugePageSize, kRW, kMapPrivate | kMapAnonymous | kMapHugetlb);
  ASSERT_TRUE(r.has_value());
  const uint64_t a = *r;
  ASSERT_TRUE(dev_->Watch(a, kHugePageSize).has_value());
  auto data = Pattern(kHugePageSize, 21);
  std::vector<uint64_t> words;
  ASSERT_TRUE(dev_->Write(a, data.data(), data.size(), &words).has_value());
  ASSERT_EQ(words.size(), kPagesPerHuge);
  for (uint64_t w : words) ASSERT_EQ(HmmOrder(w), 9u);
  EXPECT_EQ(CpuRead(a, kHugePageSize), data);
  EXPECT_TRUE(as_->QueryPte(a).hugetlb);
  EXPECT_EQ(as_->GetStats().huge_faults, 1u);
}

// ---- THP regions migrated with 4 KiB device pages --------------------------------

// hmm-tests migrate_anon_huge_empty: an untouched MADV_HUGEPAGE region
// (read-only) migrates whole, every hole filled by a device page of zeros.
TEST_F(HmmSelftest2, MigrateAnonHugeEmpty) {
  const uint64_t a = MapThp(1, kProtRead);
  ASSERT_TRUE(dev_->Watch(a, kHugePageSize).has_value());
  auto moved = dev_->MigrateToDevice(a, a + kHugePageSize);
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(*moved, kPagesPerHuge);
  EXPECT_EQ(DevRead(a, kHugePageSize), std::vector<uint8_t>(kHugePageSize, 0));
  EXPECT_EQ(dev_->cpu_faults(), 0u);
}

// hmm-tests migrate_anon_huge_zero: after a CPU read of the region (our THP
// read fault maps a zeroed huge page rather than the huge zero page), the
// whole 2 MiB migrates and faults back as zeros.
TEST_F(HmmSelftest2, MigrateAnonHugeZero) {
  const uint64_t a = MapThp(1, kProtRead);
  ASSERT_TRUE(dev_->Watch(a, kHugePageSize).has_value());
  EXPECT_EQ(*as_->AtomicLoad(a), 0u);
  auto moved = dev_->MigrateToDevice(a, a + kHugePageSize);
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(*moved, kPagesPerHuge);
  EXPECT_EQ(DevRead(a, kHugePageSize), std::vector<uint8_t>(kHugePageSize, 0));
  EXPECT_EQ(CpuRead(a, kHugePageSize), std::vector<uint8_t>(kHugePageSize, 0));
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kPresent);
}

// hmm-tests migrate_anon_huge_free: migrate a written huge page, then
// MADV_FREE it: the call succeeds and the bytes are still readable (device
// pages are not lazily freed).
TEST_F(HmmSelftest2, MigrateAnonHugeFree) {
  const uint64_t a = MapThp(1);
  ASSERT_TRUE(dev_->Watch(a, kHugePageSize).has_value());
  auto data = Pattern(kHugePageSize, 5);
  ASSERT_TRUE(as_->Write(a, data.data(), data.size()).has_value());
  ASSERT_TRUE(as_->QueryPte(a).huge);
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + kHugePageSize), kPagesPerHuge);
  EXPECT_EQ(DevRead(a, kHugePageSize), data);
  ASSERT_TRUE(as_->Madvise(a, kHugePageSize, kMadvFree).has_value());
  EXPECT_EQ(CpuRead(a, kHugePageSize), data);
}

// ---- get_user_pages ------------------------------------------------------------

// hmm-tests hmm_gup_test (device-private variant): GUP_BASIC_TEST and
// GUP_FAST_BENCHMARK (short-term references) and the two FOLL_LONGTERM pin
// benchmarks on four migrated pages: all four end up in system memory,
// writable, with their bytes.
TEST_F(HmmSelftest2, HmmGupTest) {
  const uint64_t n = 4, len = n * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 40);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), n);
  EXPECT_EQ(DevRead(a, len), data);

  Pfn p[4];
  ASSERT_TRUE(as_->GetUserPages(a, 1, true, &p[0]).has_value());
  ASSERT_TRUE(as_->GetUserPages(a + kPageSize, 1, true, &p[1]).has_value());
  ASSERT_TRUE(as_->PinUserPages(a + 2 * kPageSize, 1, true, &p[2]).has_value());
  ASSERT_TRUE(as_->PinUserPages(a + 3 * kPageSize, 1, true, &p[3]).has_value());
  as_->PutUserPage(p[0]);
  as_->PutUserPage(p[1]);
  as_->UnpinUserPage(p[2]);
  as_->UnpinUserPage(p[3]);

  auto words = dev_->Snapshot(a, a + len);
  ASSERT_TRUE(words.has_value());
  for (uint64_t i = 0; i < n; ++i) {
    EXPECT_EQ((*words)[i] & (kPfnValid | kPfnWrite | kPfnDevice | kPfnError), kPfnValid | kPfnWrite) << i;
    EXPECT_EQ(HmmPfn((*words)[i]), p[i]) << i;
  }
  EXPECT_EQ(CpuRead(a, len), data);
}

// ---- the device-coherent variants ------------------------------------------------

// hmm-tests runs every case on device-coherent memory too. migrate_file_private
// there: the written pages (private copies) move to coherent memory, which the
// CPU then reads in place; page-cache pages and holes stay.
TEST(HmmSelftest2Coherent, MigrateCollectsPrivateCopiesOfFilePages) {
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  {
    testing::CoherentDevice dev(64);
    const uint64_t n = 8, len = n * kPageSize;
    auto f = *SimFile::TryCreate(*pool, len);
    const uint64_t a = *as->Mmap(0, len, kRW, kMapPrivate, f, 0);
    auto data = Pattern(len, 5);
    ASSERT_TRUE(as->Write(a, data.data(), 6 * kPageSize).has_value());  // pages 6, 7 untouched
    {
      ReadLock l(as->mmap_lock());
      auto moved = dev.Move(*as, a, a + len, true);
      ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
      EXPECT_EQ(*moved, 6u);
    }
    for (uint64_t p = 0; p < 6; ++p) {
      const PteInfo e = as->QueryPte(a + p * kPageSize);
      EXPECT_EQ(e.kind, PteInfo::Kind::kPresent);
      EXPECT_TRUE(e.device_memory) << p;
    }
    EXPECT_EQ(as->QueryPte(a + 6 * kPageSize).kind, PteInfo::Kind::kNone);
    std::vector<uint8_t> back(6 * kPageSize);
    ASSERT_TRUE(as->Read(a, back.data(), back.size()).has_value());
    EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin()));
    EXPECT_EQ(dev.to_ram, 0);  // read in place, never migrated home
    std::vector<uint8_t> file(len, 0xff);
    ASSERT_EQ(*f->Pread(0, file.data(), len), len);
    EXPECT_EQ(file, std::vector<uint8_t>(len, 0));
    ASSERT_TRUE(as->Munmap(a, len).has_value());
  }
  as->Exit();
}

// A hugetlb mapping is never migrated, to coherent memory either
// (migrate_vma_setup: EINVAL for a hugetlb VMA).
TEST(HmmSelftest2Coherent, HugetlbIsNeverMigrated) {
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  {
    testing::CoherentDevice dev(64);
    ASSERT_EQ(pool->SetHugetlbPages(1), 1u);
    const uint64_t a = *as->Mmap(0, kHugePageSize, kRW, kMapPrivate | kMapAnonymous | kMapHugetlb);
    const uint64_t v = 11;
    ASSERT_TRUE(as->Write(a, &v, 8).has_value());
    ReadLock l(as->mmap_lock());
    auto moved = dev.Move(*as, a, a + 16 * kPageSize, true);
    ASSERT_FALSE(moved.has_value());
    EXPECT_EQ(moved.error(), Errc::kInval);
  }
  as->Exit();
}

}  // namespace
}  // namespace usvm::mm
