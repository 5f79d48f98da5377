// 2 MiB device pages under concurrency: a migrator moves 2 MiB units to
// the device and back (kMigrateSelectCompound, with 4 KiB fallbacks) while
// a CPU thread increments words (CPU faults bring pages home through
// MigrateToRam, whole or per page) and a third thread flips one page's
// protection (splitting 2 MiB entries under the migrations, which then
// finalize page by page). Every word must hold what the CPU wrote, and no
// device page or frame may leak. Runs under TSan (the `concurrency` label).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "huge_device.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

TEST(HmmCompoundStress, MigrationsCpuWritesAndSplitsKeepEveryWord) {
  constexpr uint64_t kRegions = 4;
  constexpr uint64_t kLen = kRegions * kHugePageSize;
  constexpr uint64_t kWords = kLen / 8;
  auto pool = testing::MakePool(256);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::HugeDevice::Create(kRegions + 2, DeviceMemoryKind::kPrivate);
  ASSERT_NE(dev, nullptr);
  const uint64_t raw = *as->Mmap(0, kLen + kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t a = (raw + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as->Madvise(a, kLen, kMadvHugePage).has_value());
  ASSERT_TRUE(as->Populate(a, kLen, true).has_value());
  std::vector<uint64_t> shadow(kWords, 0);  // written by the CPU thread only

  std::atomic<bool> stop{false};
  std::atomic<bool> migrator_done{false};
  std::atomic<uint64_t> moved{0}, migrate_errors{0};
  std::thread migrator([&] {
    std::mt19937_64 rng(1);
    for (int i = 0; i < 400 && !stop.load(); ++i) {
      const uint64_t r = a + (rng() % kRegions) * kHugePageSize;
      // Splits and per-page faults break THPs up; collapse them again
      // (fails harmlessly while the region holds device pages).
      if (i % 2 == 0) (void)as->Madvise(r, kHugePageSize, kMadvCollapse);
      dev->set_fail_huge_alloc(rng() % 8 == 0);  // now and then the 4 KiB fallback
      ReadLock l(as->mmap_lock());
      auto res = (i % 2 == 0) ? dev->ToDevice(*as, r, r + kHugePageSize) : dev->ToRam(*as, r, r + kHugePageSize);
      // EINVAL when the protection flip split the VMA under the range.
      if (res)
        moved.fetch_add(*res);
      else if (res.error() != Errc::kInval)
        migrate_errors.fetch_add(1);
    }
    dev->set_fail_huge_alloc(false);
    migrator_done.store(true);
  });
  std::thread flipper([&] {
    std::mt19937_64 rng(2);
    while (!stop.load()) {
      const uint64_t p = a + (rng() % (kLen / kPageSize)) * kPageSize;
      (void)as->Mprotect(p, kPageSize, kProtRead);
      (void)as->Mprotect(p, kPageSize, kProtRead | kProtWrite);
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  std::mt19937_64 rng(3);
  uint64_t cpu_errors = 0;
  // Until the migrator is done (and at least a few thousand accesses).
  for (int i = 0; i < 2000 || !migrator_done.load(); ++i) {
    const uint64_t w = rng() % kWords;
    auto r = as->AtomicFetchAdd(a + w * 8, 1);
    if (r) {
      if (*r != shadow[w]) ++cpu_errors;
      ++shadow[w];
    } else if (r.error() != Errc::kFault) {  // EFAULT: the page was read-only just then
      ++cpu_errors;
    }
  }
  migrator.join();
  stop.store(true);
  flipper.join();

  EXPECT_EQ(cpu_errors, 0u);
  EXPECT_EQ(migrate_errors.load(), 0u);
  EXPECT_GT(moved.load(), 0u);
  const auto st = dev->stats();
  EXPECT_GT(st.huge_to_device + st.huge_to_ram, 0u);  // the 2 MiB path ran, not only the fallback
  std::printf("moved %llu pages; 2 MiB units to device %llu, to RAM %llu; 4 KiB fallbacks %llu / %llu; CPU faults %llu\n",
              (unsigned long long)moved.load(), (unsigned long long)st.huge_to_device,
              (unsigned long long)st.huge_to_ram, (unsigned long long)st.small_to_device,
              (unsigned long long)st.small_to_ram, (unsigned long long)st.cpu_faults);
  std::vector<uint64_t> all(kWords);
  ASSERT_TRUE(as->Read(a, all.data(), kLen).has_value());  // faults everything home
  uint64_t mismatches = 0;
  for (uint64_t w = 0; w < kWords; ++w) mismatches += all[w] != shadow[w];
  EXPECT_EQ(mismatches, 0u);
  ASSERT_TRUE(as->Munmap(raw, kLen + kHugePageSize).has_value());
  EXPECT_EQ(dev->pgmap().DebugPagesInUse(), 0u);
  dev.reset();
  as->Exit();
}

}  // namespace
}  // namespace usvm::mm
