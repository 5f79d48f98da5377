// The scenarios of the kernel's HMM selftests (tools/testing/selftests/mm/
// hmm-tests.c, driving lib/test_hmm.c), one test each, through our mirror
// device (dmirror.h): device read/write of anonymous memory, forked
// children, huge pages, file mappings, migration to and from device memory,
// two devices, snapshots, teardown, COW/munmap/mremap of migrated memory and
// allocation failures.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;

using testing::Pattern;

class HmmSelftest : public ::testing::Test {
 protected:
  void SetUp() override { Init(Env::Default()); }
  void Init(Env& env) {
    pool_ = testing::MakePool(256, env);
    as_ = testing::MakeSpace(*pool_, env);
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
  // A MADV_HUGEPAGE region of n 2 MiB-aligned huge pages; returns its
  // aligned start.
  uint64_t MapHuge(uint64_t n) {
    auto r = as_->Mmap(0, (n + 1) * kHugePageSize, kRW, kMapPrivate | kMapAnonymous);
    EXPECT_TRUE(r.has_value());
    const uint64_t base = (*r + kHugePageSize - 1) & kHugeMask;
    EXPECT_TRUE(as_->Madvise(base, n * kHugePageSize, kMadvHugePage).has_value());
    return base;
  }
  std::vector<uint8_t> CpuRead(AddressSpace& as, uint64_t a, uint64_t len) {
    std::vector<uint8_t> v(len);
    auto r = as.Read(a, v.data(), len);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return v;
  }
  std::vector<uint8_t> DevRead(DMirror& d, uint64_t a, uint64_t len,
                               std::vector<uint64_t>* words = nullptr) {
    std::vector<uint8_t> v(len);
    auto r = d.Read(a, v.data(), len, words);
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return v;
  }
  void ExpectAllDevicePrivate(AddressSpace& as, uint64_t a, uint64_t len) {
    for (uint64_t p = a; p < a + len; p += kPageSize)
      ASSERT_EQ(as.QueryPte(p).kind, PteInfo::Kind::kDevicePrivate) << "page " << (p - a) / kPageSize;
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<DMirror> dev_;
};

// ---- anonymous read/write -------------------------------------------------

// hmm-tests anon_read: the device reads what the CPU wrote.
TEST_F(HmmSelftest, AnonReadSeesCpuWrites) {
  const uint64_t len = 64 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 1);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  std::vector<uint64_t> w;
  EXPECT_EQ(DevRead(*dev_, a, len, &w), data);
  ASSERT_EQ(w.size(), 64u);
  for (uint64_t i = 0; i < 64; ++i) {
    EXPECT_EQ(w[i] & (kPfnValid | kPfnDevice), kPfnValid);
    EXPECT_EQ(HmmPfn(w[i]), as_->QueryPte(a + i * kPageSize).pfn);
  }
}

// anon_read of never-touched memory: a read fault maps the zero page, which
// the device reads as zeros, read-only.
TEST_F(HmmSelftest, AnonReadOfUntouchedMemoryReadsTheZeroPage) {
  const uint64_t len = 16 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  std::vector<uint64_t> w;
  EXPECT_EQ(DevRead(*dev_, a, len, &w), std::vector<uint8_t>(len, 0));
  for (uint64_t x : w) {
    EXPECT_EQ(x & kPfnFlags, kPfnValid);
    EXPECT_EQ(HmmPfn(x), FramePool::kZeroPfn);
  }
  EXPECT_TRUE(as_->QueryPte(a).zero_page);
}

// anon_read_prot: a PROT_NONE mapping is EFAULT to the device until
// mprotect makes it readable; writing stays EPERM while it is read-only.
TEST_F(HmmSelftest, AnonReadProtNoneIsEfaultUntilMprotect) {
  const uint64_t len = 4 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 2);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_TRUE(as_->Mprotect(a, len, kProtNone).has_value());
  std::vector<uint8_t> got(len);
  auto r = dev_->Read(a, got.data(), len);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kFault);
  ASSERT_TRUE(as_->Mprotect(a, len, kProtRead).has_value());
  EXPECT_EQ(DevRead(*dev_, a, len), data);
  auto wr = dev_->Write(a, data.data(), len);
  ASSERT_FALSE(wr.has_value());
  EXPECT_EQ(wr.error(), Errc::kPerm);
}

// anon_write: the CPU reads what the device wrote.
TEST_F(HmmSelftest, AnonWriteIsSeenByTheCpu) {
  const uint64_t len = 64 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 3);
  std::vector<uint64_t> w;
  ASSERT_TRUE(dev_->Write(a, data.data(), len, &w).has_value());
  for (uint64_t x : w) EXPECT_EQ(x & (kPfnValid | kPfnWrite), kPfnValid | kPfnWrite);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// anon_write_prot: a device write to a read-only mapping is EPERM; after
// mprotect(PROT_READ | PROT_WRITE) it succeeds.
TEST_F(HmmSelftest, AnonWriteReadOnlyIsEpermThenOkAfterMprotect) {
  const uint64_t len = 8 * kPageSize;
  const uint64_t a = MapAnon(len, kProtRead);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  EXPECT_EQ(DevRead(*dev_, a, len), std::vector<uint8_t>(len, 0));
  auto data = Pattern(len, 4);
  auto r = dev_->Write(a, data.data(), len);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kPerm);
  EXPECT_EQ(CpuRead(*as_, a, len), std::vector<uint8_t>(len, 0));
  ASSERT_TRUE(as_->Mprotect(a, len, kRW).has_value());
  ASSERT_TRUE(dev_->Write(a, data.data(), len).has_value());
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// anon_write_child: a device mirroring the fork child writes the child's
// private memory; copy-on-write keeps the parent's bytes.
TEST_F(HmmSelftest, AnonWriteByForkedChildKeepsParentData) {
  const uint64_t len = 16 * kPageSize;
  const uint64_t a = MapAnon(len);
  auto parent_data = Pattern(len, 5);
  ASSERT_TRUE(as_->Write(a, parent_data.data(), len).has_value());
  auto child = *as_->Fork();
  {
    auto cdev = DMirror::Create(child, 64);
    ASSERT_TRUE(cdev);
    ASSERT_TRUE(cdev->Watch(a, len).has_value());
    EXPECT_EQ(DevRead(*cdev, a, len), parent_data);
    auto child_data = Pattern(len, 6);
    ASSERT_TRUE(cdev->Write(a, child_data.data(), len).has_value());
    EXPECT_EQ(CpuRead(*child, a, len), child_data);
    EXPECT_EQ(DevRead(*cdev, a, len), child_data);
  }
  EXPECT_EQ(CpuRead(*as_, a, len), parent_data);
  child->Exit();
}

// anon_write_child_shared: with MAP_SHARED anonymous memory the child's
// device writes are the parent's bytes too.
TEST_F(HmmSelftest, AnonWriteByForkedChildToSharedMemoryIsShared) {
  const uint64_t len = 16 * kPageSize;
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapShared | kMapAnonymous);
  auto parent_data = Pattern(len, 7);
  ASSERT_TRUE(as_->Write(a, parent_data.data(), len).has_value());
  auto child = *as_->Fork();
  auto child_data = Pattern(len, 8);
  {
    auto cdev = DMirror::Create(child, 64);
    ASSERT_TRUE(cdev);
    ASSERT_TRUE(cdev->Watch(a, len).has_value());
    EXPECT_EQ(DevRead(*cdev, a, len), parent_data);
    ASSERT_TRUE(cdev->Write(a, child_data.data(), len).has_value());
  }
  EXPECT_EQ(CpuRead(*as_, a, len), child_data);
  child->Exit();
}

// anon_write_huge: device writes to a MADV_HUGEPAGE region map it with a
// 2 MiB page; the device sees order 9 on every entry.
TEST_F(HmmSelftest, AnonWriteHugeReportsOrderNine) {
  const uint64_t base = MapHuge(1);
  ASSERT_TRUE(dev_->Watch(base, kHugePageSize).has_value());
  auto data = Pattern(kHugePageSize, 9);
  std::vector<uint64_t> w;
  ASSERT_TRUE(dev_->Write(base, data.data(), kHugePageSize, &w).has_value());
  ASSERT_EQ(w.size(), kPagesPerHuge);
  for (uint64_t i = 0; i < kPagesPerHuge; ++i) {
    ASSERT_EQ(HmmOrder(w[i]), 9u) << i;
    ASSERT_EQ(HmmPfn(w[i]), HmmPfn(w[0]) + i) << i;
  }
  EXPECT_TRUE(as_->QueryPte(base).huge);
  std::vector<uint64_t> rw;
  EXPECT_EQ(DevRead(*dev_, base, kHugePageSize, &rw), data);
  for (uint64_t x : rw) ASSERT_EQ(HmmOrder(x), 9u);
  EXPECT_EQ(CpuRead(*as_, base, kHugePageSize), data);
}

// ---- file mappings ----------------------------------------------------------

// file_read: the device reads a shared file mapping's page cache.
TEST_F(HmmSelftest, FileReadOfSharedMappingSeesFileContents) {
  const uint64_t len = 8 * kPageSize;
  auto f = *SimFile::TryCreate(*pool_, len);
  auto data = Pattern(len, 10);
  ASSERT_TRUE(f->Pwrite(0, data.data(), len).has_value());
  const uint64_t a = *as_->Mmap(0, len, kProtRead, kMapShared, f, 0);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  EXPECT_EQ(DevRead(*dev_, a, len), data);
}

// file_write: device writes through a shared file mapping reach the file.
TEST_F(HmmSelftest, FileWriteThroughSharedMappingReachesTheFile) {
  const uint64_t len = 8 * kPageSize;
  auto f = *SimFile::TryCreate(*pool_, len);
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapShared, f, 0);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 11);
  ASSERT_TRUE(dev_->Write(a, data.data(), len).has_value());
  std::vector<uint8_t> got(len);
  ASSERT_EQ(*f->Pread(0, got.data(), len), len);
  EXPECT_EQ(got, data);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// A private file mapping: the device reads the file, and its writes go to
// private copies that the file never sees.
TEST_F(HmmSelftest, FileWriteThroughPrivateMappingStaysPrivate) {
  const uint64_t len = 8 * kPageSize;
  auto f = *SimFile::TryCreate(*pool_, len);
  auto file_data = Pattern(len, 12);
  ASSERT_TRUE(f->Pwrite(0, file_data.data(), len).has_value());
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapPrivate, f, 0);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  EXPECT_EQ(DevRead(*dev_, a, len), file_data);
  auto data = Pattern(len, 13);
  ASSERT_TRUE(dev_->Write(a, data.data(), len).has_value());
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  std::vector<uint8_t> got(len);
  ASSERT_EQ(*f->Pread(0, got.data(), len), len);
  EXPECT_EQ(got, file_data);
}

// ---- migration --------------------------------------------------------------

// migrate: every page moves to device memory; the device then reads its
// own pages (kPfnDevice) without any CPU fault.
TEST_F(HmmSelftest, MigrateMovesEveryPageToTheDevice) {
  const uint64_t len = 64 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 14);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 64u);
  ExpectAllDevicePrivate(*as_, a, len);
  EXPECT_EQ(dev_->device_pages_in_use(), 64u);
  std::vector<uint64_t> w;
  EXPECT_EQ(DevRead(*dev_, a, len, &w), data);
  for (uint64_t x : w) {
    EXPECT_TRUE(x & kPfnDevice);
    EXPECT_TRUE(dev_->Owns(HmmPfn(x)));
  }
  EXPECT_EQ(dev_->cpu_faults(), 0u);
}

// migrate_fault: after migration, CPU reads fault every page back with
// its bytes.
TEST_F(HmmSelftest, MigrateThenCpuFaultBringsEveryPageBack) {
  const uint64_t len = 64 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 15);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 64u);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  EXPECT_EQ(dev_->cpu_faults(), 64u);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  for (uint64_t p = a; p < a + len; p += kPageSize) ASSERT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kPresent);
  // And the device reads system memory again.
  EXPECT_EQ(DevRead(*dev_, a, len), data);
}

// migrate_multiple: migrate, check, CPU-write (which faults back), over
// and over.
TEST_F(HmmSelftest, MigrateMultipleTimesKeepsData) {
  const uint64_t len = 32 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  for (int round = 0; round < 10; ++round) {
    auto data = Pattern(len, static_cast<uint8_t>(16 + round));
    ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
    ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 32u) << "round " << round;
    ExpectAllDevicePrivate(*as_, a, len);
    EXPECT_EQ(DevRead(*dev_, a, len), data);
    EXPECT_EQ(CpuRead(*as_, a, len), data);
    EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  }
  EXPECT_EQ(dev_->free_pages(), dev_->pagemap().npages());
}

// migrate_release: destroying the device (its pagemap) with pages still
// in device memory brings them home intact.
TEST_F(HmmSelftest, MigrateReleaseOfDeviceMemoryKeepsData) {
  const uint64_t len = 32 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 30);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 32u);
  dev_.reset();
  for (uint64_t p = a; p < a + len; p += kPageSize) ASSERT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// migrate_shared: shared anonymous memory cannot be migrated.
TEST_F(HmmSelftest, MigrateSharedAnonymousMemoryIsRefused) {
  const uint64_t len = 8 * kPageSize;
  const uint64_t a = *as_->Mmap(0, len, kRW, kMapShared | kMapAnonymous);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 31);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + len), 0u);
  for (uint64_t p = a; p < a + len; p += kPageSize) EXPECT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kPresent);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  EXPECT_EQ(DevRead(*dev_, a, len), data);
}

// ---- two devices ------------------------------------------------------------

// hmm-tests migrate with two devices: a page in device 1's memory is not
// collected by device 0's migration (another owner); device 0 reading it
// faults it back to RAM through device 1's migrate_to_ram; both devices
// read the same bytes.
TEST_F(HmmSelftest, TwoDevicesPageOnDevice1StaysAndBothReadTheSameData) {
  auto dev1 = DMirror::Create(as_, 256);
  ASSERT_TRUE(dev1);
  const uint64_t len = 16 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  ASSERT_TRUE(dev1->Watch(a, len).has_value());
  auto data = Pattern(len, 32);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev1->MigrateToDevice(a, a + len), 16u);
  // Device 0 cannot take another owner's pages.
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + len), 0u);
  for (uint64_t p = a; p < a + len; p += kPageSize) {
    PteInfo pte = as_->QueryPte(p);
    ASSERT_EQ(pte.kind, PteInfo::Kind::kDevicePrivate);
    EXPECT_TRUE(dev1->Owns(pte.pfn));
  }
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  // Device 1 reads its own memory.
  std::vector<uint64_t> w1;
  EXPECT_EQ(DevRead(*dev1, a, len, &w1), data);
  for (uint64_t x : w1) EXPECT_TRUE(x & kPfnDevice);
  EXPECT_EQ(dev1->cpu_faults(), 0u);
  // Device 0's range fault makes device 1 migrate them to RAM.
  std::vector<uint64_t> w0;
  EXPECT_EQ(DevRead(*dev_, a, len, &w0), data);
  for (uint64_t x : w0) EXPECT_FALSE(x & kPfnDevice);
  EXPECT_EQ(dev1->cpu_faults(), 16u);
  EXPECT_EQ(dev1->device_pages_in_use(), 0u);
  EXPECT_EQ(DevRead(*dev1, a, len), data);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  // Now device 0 may take them.
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + len), 16u);
  EXPECT_EQ(DevRead(*dev1, a, len), data);
}

// ---- snapshot ---------------------------------------------------------------

// hmm-tests snapshot / compound: a snapshot (no fault) reports each kind
// of entry as the kernel does.
TEST_F(HmmSelftest, SnapshotReportsEveryEntryKind) {
  auto dev1 = DMirror::Create(as_, 16);
  ASSERT_TRUE(dev1);
  // One region: small pages in the first 2 MiB, a huge page in the second.
  const uint64_t region = MapHuge(2);  // both huge-advised; the first is split below
  const uint64_t len = 2 * kHugePageSize;
  ASSERT_TRUE(as_->Madvise(region, kHugePageSize, kMadvNoHugePage).has_value());
  ASSERT_TRUE(dev_->Watch(region, len).has_value());
  auto page = [&](int i) { return region + i * kPageSize; };
  uint8_t v = 0x5A;
  // 0: never touched.
  // 1: the zero page.
  ASSERT_TRUE(as_->Read(page(1), &v, 1).has_value());
  // 2: present, read-only (written, then mprotect PROT_READ).
  ASSERT_TRUE(as_->Write(page(2), &v, 1).has_value());
  ASSERT_TRUE(as_->Mprotect(page(2), kPageSize, kProtRead).has_value());
  // 3: present, writable.
  ASSERT_TRUE(as_->Write(page(3), &v, 1).has_value());
  // 4: our device page.
  ASSERT_TRUE(as_->Write(page(4), &v, 1).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(page(4), page(5)), 1u);
  // 5: the other device's page.
  ASSERT_TRUE(as_->Write(page(5), &v, 1).has_value());
  ASSERT_EQ(*dev1->MigrateToDevice(page(5), page(6)), 1u);
  // 6: PROT_NONE.
  ASSERT_TRUE(as_->Mprotect(page(6), kPageSize, kProtNone).has_value());
  // 7: a hole.
  ASSERT_TRUE(as_->Munmap(page(7), kPageSize).has_value());
  // The second 2 MiB: one huge page.
  ASSERT_TRUE(as_->Write(region + kHugePageSize, &v, 1).has_value());
  ASSERT_TRUE(as_->QueryPte(region + kHugePageSize).huge);

  auto snap = dev_->Snapshot(region, region + len);
  ASSERT_TRUE(snap.has_value()) << snap.error().ToString();
  const auto& w = *snap;
  EXPECT_EQ(w[0], 0u) << "none";
  EXPECT_EQ(w[1] & kPfnFlags, kPfnValid) << "zero page";
  EXPECT_EQ(HmmPfn(w[1]), FramePool::kZeroPfn);
  EXPECT_EQ(w[2] & kPfnFlags, kPfnValid) << "read-only";
  EXPECT_EQ(HmmPfn(w[2]), as_->QueryPte(page(2)).pfn);
  EXPECT_EQ(w[3] & kPfnFlags, kPfnValid | kPfnWrite) << "writable";
  EXPECT_EQ(HmmPfn(w[3]), as_->QueryPte(page(3)).pfn);
  EXPECT_EQ(w[4] & kPfnFlags, kPfnValid | kPfnWrite | kPfnDevice) << "own device page";
  EXPECT_TRUE(dev_->Owns(HmmPfn(w[4])));
  EXPECT_EQ(w[5], 0u) << "other device's page";
  EXPECT_EQ(w[6], kPfnError) << "PROT_NONE";
  EXPECT_EQ(w[7], kPfnError) << "hole";
  EXPECT_EQ(w[8], 0u) << "none after the hole";
  for (uint64_t i = kPagesPerHuge; i < 2 * kPagesPerHuge; ++i) {
    ASSERT_EQ(w[i] & (kPfnValid | kPfnWrite | kPfnError), kPfnValid | kPfnWrite) << i;
    ASSERT_EQ(HmmOrder(w[i]), 9u) << i;
    ASSERT_EQ(HmmPfn(w[i]), HmmPfn(w[kPagesPerHuge]) + (i - kPagesPerHuge)) << i;
  }
  // A snapshot faults nothing in and moves nothing.
  EXPECT_EQ(as_->QueryPte(page(0)).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(as_->QueryPte(page(5)).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(dev1->cpu_faults(), 0u);
}

// ---- teardown ---------------------------------------------------------------

// anon_teardown: the process exits while the device reads in a loop; the
// device gets a clean error and nothing crashes.
TEST_F(HmmSelftest, TeardownRacingDeviceReadGivesACleanError) {
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(round);
    auto as = testing::MakeSpace(*pool_);
    auto dev = DMirror::Create(as, 64);
    ASSERT_TRUE(dev);
    dev->set_timeout_ns(200'000'000);
    const uint64_t len = 32 * kPageSize;
    const uint64_t a = *as->Mmap(0, len, kRW, kMapPrivate | kMapAnonymous);
    ASSERT_TRUE(dev->Watch(a, len).has_value());
    auto data = Pattern(len, static_cast<uint8_t>(round));
    ASSERT_TRUE(as->Write(a, data.data(), len).has_value());
    if (round % 2) {
      ASSERT_EQ(*dev->MigrateToDevice(a, a + len / 2), 16u);
    }
    std::atomic<int> reads{0};
    std::atomic<bool> done{false};
    Result<void> last;
    std::thread reader([&] {
      std::vector<uint8_t> got(len);
      for (;;) {
        last = dev->Read(a, got.data(), len);
        if (!last) {
          done.store(true);
          return;
        }
        if (got != data) {
          ADD_FAILURE() << "device read wrong bytes";
          return;
        }
        reads.fetch_add(1, std::memory_order_relaxed);
      }
    });
    while (reads.load(std::memory_order_relaxed) < round % 4 && !done.load()) std::this_thread::yield();
    as->Exit();
    reader.join();
    ASSERT_FALSE(last.has_value());
    const Errc e = last.error().code();
    EXPECT_TRUE(e == Errc::kFault || e == Errc::kBusy || e == Errc::kTime) << last.error().ToString();
    dev.reset();
  }
}

// ---- migrated memory and the address space ----------------------------------

// Fork after migration: device pages are shared copy-on-write; writes on
// either side (CPU and device) leave the other side's bytes alone.
TEST_F(HmmSelftest, ForkAfterMigrateKeepsBothSidesData) {
  const uint64_t len = 16 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto orig = Pattern(len, 40);
  ASSERT_TRUE(as_->Write(a, orig.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 16u);
  auto child = *as_->Fork();
  ExpectAllDevicePrivate(*child, a, len);
  // The child writes the first half from the CPU.
  auto child_half = Pattern(len / 2, 41);
  ASSERT_TRUE(child->Write(a, child_half.data(), len / 2).has_value());
  // The parent's device writes the second half.
  auto parent_half = Pattern(len / 2, 42);
  ASSERT_TRUE(dev_->Write(a + len / 2, parent_half.data(), len / 2).has_value());

  std::vector<uint8_t> want_parent = orig, want_child = orig;
  std::copy(parent_half.begin(), parent_half.end(), want_parent.begin() + len / 2);
  std::copy(child_half.begin(), child_half.end(), want_child.begin());
  EXPECT_EQ(DevRead(*dev_, a, len), want_parent);
  EXPECT_EQ(CpuRead(*child, a, len), want_child);
  EXPECT_EQ(CpuRead(*as_, a, len), want_parent);
  child->Exit();
  EXPECT_EQ(CpuRead(*as_, a, len), want_parent);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

// munmap of half of a migrated huge region frees the device pages of that
// half; the other half faults back with its bytes.
TEST_F(HmmSelftest, PartialMunmapOfMigratedHugeRegionFreesItsDevicePages) {
  const uint64_t base = MapHuge(1);
  ASSERT_TRUE(dev_->Watch(base, kHugePageSize).has_value());
  auto data = Pattern(kHugePageSize, 50);
  ASSERT_TRUE(as_->Write(base, data.data(), kHugePageSize).has_value());
  ASSERT_TRUE(as_->QueryPte(base).huge);
  ASSERT_EQ(*dev_->MigrateToDevice(base, base + kHugePageSize), kPagesPerHuge);
  ExpectAllDevicePrivate(*as_, base, kHugePageSize);
  const uint64_t free_before = dev_->free_pages();
  const uint64_t half = kHugePageSize / 2;
  ASSERT_TRUE(as_->Munmap(base + half, half).has_value());
  EXPECT_EQ(dev_->free_pages(), free_before + kPagesPerHuge / 2);
  EXPECT_EQ(dev_->device_pages_in_use(), kPagesPerHuge / 2);
  EXPECT_EQ(as_->QueryPte(base + half).kind, PteInfo::Kind::kNone);
  uint8_t b;
  EXPECT_EQ(as_->Read(base + half, &b, 1).error(), Errc::kFault);
  // The remaining half: the device still reads it in place, the CPU
  // brings it back.
  EXPECT_EQ(DevRead(*dev_, base, half), std::vector<uint8_t>(data.begin(), data.begin() + half));
  EXPECT_EQ(CpuRead(*as_, base, half), std::vector<uint8_t>(data.begin(), data.begin() + half));
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

// mremap of a migrated huge region moves the device-private entries; a CPU
// read at the new address faults them back with the right bytes.
TEST_F(HmmSelftest, MremapOfMigratedHugeRegionMovesDeviceEntries) {
  const uint64_t base = MapHuge(1);
  auto data = Pattern(kHugePageSize, 60);
  ASSERT_TRUE(as_->Write(base, data.data(), kHugePageSize).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(base, base + kHugePageSize), kPagesPerHuge);
  // Move the upper half to a fresh 2 MiB-aligned place.
  const uint64_t half = kHugePageSize / 2;
  const uint64_t dest = MapHuge(1);
  auto moved = as_->Mremap(base + half, half, half, kMremapMayMove | kMremapFixed, dest);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  ASSERT_EQ(*moved, dest);
  EXPECT_EQ(as_->QueryPte(base + half).kind, PteInfo::Kind::kNone);
  ExpectAllDevicePrivate(*as_, dest, half);
  EXPECT_EQ(dev_->device_pages_in_use(), kPagesPerHuge);
  // The device mirrors the new place too and reads its own pages there.
  ASSERT_TRUE(dev_->Watch(dest, half).has_value());
  std::vector<uint64_t> w;
  EXPECT_EQ(DevRead(*dev_, dest, half, &w), std::vector<uint8_t>(data.begin() + half, data.end()));
  for (uint64_t x : w) EXPECT_TRUE(x & kPfnDevice);
  EXPECT_EQ(CpuRead(*as_, dest, half), std::vector<uint8_t>(data.begin() + half, data.end()));
  EXPECT_EQ(CpuRead(*as_, base, half), std::vector<uint8_t>(data.begin(), data.begin() + half));
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  // The whole region with mremap growing it (moves all of it).
  const uint64_t b2 = MapHuge(1);
  ASSERT_TRUE(as_->Write(b2, data.data(), kHugePageSize).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(b2, b2 + kHugePageSize), kPagesPerHuge);
  auto grown = as_->Mremap(b2, kHugePageSize, 2 * kHugePageSize, kMremapMayMove);
  ASSERT_TRUE(grown.has_value()) << grown.error().ToString();
  EXPECT_EQ(CpuRead(*as_, *grown, kHugePageSize), data);
  EXPECT_EQ(CpuRead(*as_, *grown + kHugePageSize, kHugePageSize), std::vector<uint8_t>(kHugePageSize, 0));
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

// ---- device-exclusive access and pinning --------------------------------------

// hmm-tests exclusive: the device takes exclusive access for atomics; a
// CPU write to a page revokes it for that page only, and the CPU sees the
// device's atomic results.
TEST_F(HmmSelftest, ExclusiveAccessIsRevokedByCpuWrites) {
  const uint64_t len = 8 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  std::vector<uint64_t> words(len / 8);
  for (uint64_t i = 0; i < words.size(); ++i) words[i] = i;
  ASSERT_TRUE(as_->Write(a, words.data(), len).has_value());
  auto n = dev_->MakeExclusive(a, a + len);
  ASSERT_TRUE(n.has_value()) << n.error().ToString();
  ASSERT_EQ(*n, 8u);
  for (uint64_t p = a; p < a + len; p += kPageSize) {
    ASSERT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kDeviceExclusive);
    ASSERT_TRUE(dev_->HasExclusive(p));
  }
  // Device atomics on the first word of every page.
  for (uint64_t p = 0; p < 8; ++p) {
    auto old = dev_->AtomicFetchAdd(a + p * kPageSize, 100);
    ASSERT_TRUE(old.has_value()) << old.error().ToString();
    EXPECT_EQ(*old, p * kPageSize / 8);
  }
  // The CPU writes page 3: its entry is restored and the device loses it.
  const uint64_t v = 0xABCD;
  ASSERT_TRUE(as_->Write(a + 3 * kPageSize + 8, &v, 8).has_value());
  EXPECT_EQ(as_->QueryPte(a + 3 * kPageSize).kind, PteInfo::Kind::kPresent);
  EXPECT_FALSE(dev_->HasExclusive(a + 3 * kPageSize));
  EXPECT_EQ(dev_->AtomicFetchAdd(a + 3 * kPageSize, 1).error(), Errc::kPerm);
  for (uint64_t p : {0, 1, 2, 4, 5, 6, 7}) {
    EXPECT_EQ(as_->QueryPte(a + p * kPageSize).kind, PteInfo::Kind::kDeviceExclusive) << p;
    EXPECT_TRUE(dev_->HasExclusive(a + p * kPageSize)) << p;
  }
  // The CPU reads everything (revoking the rest) and sees the atomics.
  std::vector<uint64_t> want = words;
  for (uint64_t p = 0; p < 8; ++p) want[p * kPageSize / 8] += 100;
  want[3 * kPageSize / 8 + 1] = v;
  std::vector<uint64_t> got(len / 8);
  ASSERT_TRUE(as_->Read(a, got.data(), len).has_value());
  EXPECT_EQ(got, want);
  for (uint64_t p = a; p < a + len; p += kPageSize) {
    EXPECT_EQ(as_->QueryPte(p).kind, PteInfo::Kind::kPresent);
    EXPECT_FALSE(dev_->HasExclusive(p));
  }
  EXPECT_EQ(dev_->exclusive_revoked(), 8u);
  // The device reads the same bytes through range fault.
  std::vector<uint64_t> dgot(len / 8);
  ASSERT_TRUE(dev_->Read(a, dgot.data(), len).has_value());
  EXPECT_EQ(dgot, want);
}

// hmm-tests exclusive_mprotect: write-protecting the range revokes
// exclusive access; a device write then fails with EPERM.
TEST_F(HmmSelftest, ExclusiveAccessIsRevokedByMprotect) {
  const uint64_t len = 4 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 100);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MakeExclusive(a, a + len), 4u);
  ASSERT_TRUE(as_->Mprotect(a, len, kProtRead).has_value());
  for (uint64_t p = a; p < a + len; p += kPageSize) EXPECT_FALSE(dev_->HasExclusive(p));
  EXPECT_EQ(dev_->AtomicFetchAdd(a, 1).error(), Errc::kPerm);
  EXPECT_EQ(dev_->Write(a, data.data(), len).error(), Errc::kPerm);
  EXPECT_EQ(DevRead(*dev_, a, len), data);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// hmm-tests exclusive_cow: fork revokes exclusive access (the entries
// become normal copy-on-write entries); parent and child then write
// independently.
TEST_F(HmmSelftest, ExclusiveAccessIsRevokedByFork) {
  const uint64_t len = 4 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 110);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MakeExclusive(a, a + len), 4u);
  ASSERT_TRUE(dev_->AtomicFetchAdd(a, 1).has_value());
  data[0] = static_cast<uint8_t>(data[0] + 1);  // little endian: the low byte of word 0
  ASSERT_NE(data[0], 0);  // no carry in this pattern
  auto child = *as_->Fork();
  for (uint64_t p = a; p < a + len; p += kPageSize) {
    EXPECT_NE(as_->QueryPte(p).kind, PteInfo::Kind::kDeviceExclusive);
    EXPECT_NE(child->QueryPte(p).kind, PteInfo::Kind::kDeviceExclusive);
    EXPECT_FALSE(dev_->HasExclusive(p));
  }
  EXPECT_EQ(dev_->AtomicFetchAdd(a, 1).error(), Errc::kPerm);
  EXPECT_EQ(CpuRead(*child, a, len), data);
  auto child_data = Pattern(len, 111);
  ASSERT_TRUE(child->Write(a, child_data.data(), len).has_value());
  auto parent_data = Pattern(len, 112);
  ASSERT_TRUE(dev_->Write(a, parent_data.data(), len).has_value());
  EXPECT_EQ(CpuRead(*child, a, len), child_data);
  EXPECT_EQ(CpuRead(*as_, a, len), parent_data);
  child->Exit();
}

// hmm-tests hmm_gup_test with FOLL_LONGTERM: pinning migrated pages brings
// them to system memory first; pinned pages are not migrated again until
// unpinned.
TEST_F(HmmSelftest, PinningMigratedPagesBringsThemHomeAndKeepsThemThere) {
  const uint64_t len = 4 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 120);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 4u);
  std::vector<Pfn> pfns(4);
  auto r = as_->PinUserPages(a, 4, true, pfns.data());
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  for (uint64_t i = 0; i < 4; ++i) {
    PteInfo pte = as_->QueryPte(a + i * kPageSize);
    ASSERT_EQ(pte.kind, PteInfo::Kind::kPresent);
    EXPECT_EQ(pte.pfn, pfns[i]);
    EXPECT_EQ(std::memcmp(pool_->Data(pfns[i]), data.data() + i * kPageSize, kPageSize), 0);
  }
  // Pinned: migration skips every page.
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + len), 0u);
  // The pinned frames are the memory: a write through the pin is seen by
  // the CPU and the device.
  std::memset(pool_->Data(pfns[1]), 0x11, 16);
  std::memset(data.data() + kPageSize, 0x11, 16);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  EXPECT_EQ(DevRead(*dev_, a, len), data);
  for (Pfn p : pfns) as_->UnpinUserPage(p);
  EXPECT_EQ(*dev_->MigrateToDevice(a, a + len), 4u);
  EXPECT_EQ(DevRead(*dev_, a, len), data);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
}

// ---- allocation failures ----------------------------------------------------

// Device memory full: migration moves what fits, the rest stays in system
// memory, and every byte is still right everywhere.
TEST_F(HmmSelftest, MigrateWithDeviceMemoryFullMovesWhatFits) {
  auto small = DMirror::Create(as_, 8);
  ASSERT_TRUE(small);
  const uint64_t len = 24 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(small->Watch(a, len).has_value());
  auto data = Pattern(len, 70);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  EXPECT_EQ(*small->MigrateToDevice(a, a + len), 8u);
  EXPECT_EQ(small->device_full(), 16u);
  uint64_t on_device = 0;
  for (uint64_t p = a; p < a + len; p += kPageSize)
    on_device += as_->QueryPte(p).kind == PteInfo::Kind::kDevicePrivate;
  EXPECT_EQ(on_device, 8u);
  EXPECT_EQ(small->free_pages(), 0u);
  EXPECT_EQ(DevRead(*small, a, len), data);
  // Freeing device memory lets a second pass move more.
  EXPECT_EQ(*small->MigrateToSystem(a, a + len), 8u);
  EXPECT_EQ(*small->MigrateToDevice(a + 8 * kPageSize, a + len), 8u);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  EXPECT_EQ(small->device_pages_in_use(), 0u);
}

// A system frame allocation failure while migrating back (the CPU touching
// a device page): the CPU access fails cleanly, the page and its bytes
// stay on the device, and a later touch succeeds.
class HmmSelftestFaultInjection : public HmmSelftest {
 protected:
  void SetUp() override { Init(env_); }
  void TearDown() override {
    HmmSelftest::TearDown();
    as_.reset();
    pool_.reset();  // before env_
  }
  Env env_{std::make_unique<RealClock>(), 7};
};

TEST_F(HmmSelftestFaultInjection, FrameAllocFailureDuringMigrateBackKeepsDataOnDevice) {
  const uint64_t len = 8 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 80);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 8u);

  env_.faults().FailEvery("frame_pool.alloc", 1);
  std::vector<uint8_t> got(len);
  auto r = as_->Read(a, got.data(), len);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kNoMem) << r.error().ToString();
  EXPECT_GT(env_.faults().Failures("frame_pool.alloc"), 0u);
  ExpectAllDevicePrivate(*as_, a, len);
  EXPECT_EQ(dev_->device_pages_in_use(), 8u);
  // An explicit migration back moves nothing either.
  EXPECT_EQ(*dev_->MigrateToSystem(a, a + len), 0u);
  ExpectAllDevicePrivate(*as_, a, len);
  // The device still has the bytes.
  EXPECT_EQ(DevRead(*dev_, a, len), data);

  env_.faults().ClearAll();
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

// A single failed frame allocation in the middle of migrating a range
// back: that page stays on the device, the others come home.
TEST_F(HmmSelftestFaultInjection, OneFrameAllocFailureLeavesOnlyThatPageOnDevice) {
  const uint64_t len = 8 * kPageSize;
  const uint64_t a = MapAnon(len);
  ASSERT_TRUE(dev_->Watch(a, len).has_value());
  auto data = Pattern(len, 90);
  ASSERT_TRUE(as_->Write(a, data.data(), len).has_value());
  ASSERT_EQ(*dev_->MigrateToDevice(a, a + len), 8u);
  env_.faults().FailNth("frame_pool.alloc", 3);
  EXPECT_EQ(*dev_->MigrateToSystem(a, a + len), 7u);
  env_.faults().ClearAll();
  EXPECT_EQ(dev_->device_pages_in_use(), 1u);
  EXPECT_EQ(as_->QueryPte(a + 2 * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_EQ(DevRead(*dev_, a, len), data);
  EXPECT_EQ(CpuRead(*as_, a, len), data);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
}

}  // namespace
}  // namespace usvm::mm
