// Device-private page lifetime under concurrent CPU faults (do_swap_page's
// recheck / reference / page lock around migrate_to_ram).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

// Bug: the CPU fault path read a device-private entry, dropped the page
// table lock and called MigrateToRam with no recheck, no reference and no
// page lock. Two threads touching one device page both called the driver;
// the second one for a page the first had already migrated and freed.
// Each round: one page goes to the device, two threads read it at once,
// the driver is slow (so both threads fault while the first migrates).
// MigrateToRam must run once per round, on a live, locked page.
TEST(HmmDevicePageConcurrencyTest, TwoCpuThreadsFaultingOneDevicePageMigrateItOnce) {
  constexpr int kRounds = 20;
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 8);
  ASSERT_TRUE(dev);
  const uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kPageSize).has_value());
  dev->set_migrate_to_ram_delay_us(5000);
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_TRUE(as->AtomicStore(a, 1000 + round).has_value());
    ASSERT_EQ(*dev->MigrateToDevice(a, a + kPageSize), 1u);
    ASSERT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
    std::atomic<int> ready{0};
    uint64_t seen[2] = {0, 0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
      threads.emplace_back([&, t] {
        ready.fetch_add(1);
        while (ready.load() < 2) std::this_thread::yield();
        auto v = as->AtomicLoad(a);
        seen[t] = v ? *v : ~uint64_t{0};
      });
    for (auto& th : threads) th.join();
    EXPECT_EQ(seen[0], uint64_t(1000 + round));
    EXPECT_EQ(seen[1], uint64_t(1000 + round));
    EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kPresent);
  }
  EXPECT_EQ(dev->cpu_faults(), uint64_t{kRounds});
  EXPECT_EQ(dev->bad_migrate_to_ram(), 0u);
  EXPECT_EQ(dev->device_pages_in_use(), 0u);
}

}  // namespace
}  // namespace usvm::mm
