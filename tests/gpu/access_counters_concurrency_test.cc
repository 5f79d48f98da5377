// Access counters under concurrency (TSan): several execution threads
// count remote accesses to shared regions while a driver thread fetches
// notifications and clears the counters, and the TLB generation moves
// under them (micro-TLB entries and their counter slots are dropped and
// refilled). Every notification queued is fetched or still pending, every
// fetched one is serviced, and no region counts more accesses than were
// made.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Machine;
using testing::SmallConfig;

constexpr uint64_t kVa = uint64_t{0x7000} << 20;
constexpr uint32_t kRegions = 8;

TEST(AccessCountersConcurrencyTest, ThreadsCountWhileTheDriverFetchesAndClears) {
  GpuConfig c = SmallConfig(4);
  c.access_counters = {.enabled = true, .granularity = k64K, .threshold = 64, .buffer_entries = 4};
  Machine m(1, c);
  Gpu& g = *m.gpu[0];
  AccessCounters& ac = g.access_counters();
  for (uint32_t i = 0; i < kRegions; ++i)
    ASSERT_TRUE(g.page_table().Bind({kVa + i * k64K, PageSize::k4K, PhysAddr::System(10 + i), kProtRead}).has_value());

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> serviced{0};
  std::thread driver([&] {
    while (!stop.load()) {
      auto f = g.fault_unit().Fetch(16, 2'000'000);  // woken by the doorbell
      for (const AccessCounterNotification& n : ac.TryFetch(16)) {
        EXPECT_EQ(n.va % k64K, 0u);
        EXPECT_EQ(n.count, 64u);
        serviced.fetch_add(1);
        EXPECT_TRUE(ac.Clear(n.va).has_value());
      }
    }
  });
  std::thread flusher([&] {
    // Moves the TLB generation: micro-TLB entries (and their counter
    // slots) are dropped and refilled under the counting threads.
    for (int i = 0; i < 50 && !stop.load(); ++i) {
      auto f = g.InvalidateTlb(kVa, kRegions * k64K);
      if (f) (void)f->Wait();
      std::this_thread::yield();
    }
  });
  constexpr uint32_t kThreads = 16, kLoads = 4000;
  auto l = g.LaunchKernel(
                [](KernelContext& ctx) {
                  for (uint32_t i = 0; i < kLoads; ++i)
                    (void)ctx.Load(kVa + ((ctx.thread_id() + i) % kRegions) * k64K + (i % 64) * 8);
                },
                {kThreads})
               .value();
  ASSERT_TRUE(l.Wait().has_value());
  flusher.join();
  stop.store(true);
  driver.join();
  const AccessCounterStats s = ac.Stats();
  EXPECT_EQ(s.regions, kRegions);
  EXPECT_EQ(s.fetched + ac.pending(), s.notifications);
  EXPECT_GT(s.notifications, 0u);
  EXPECT_EQ(serviced.load(), s.fetched);
  // Each notification is a crossing of the threshold; between crossings
  // a region either was cleared or overflowed (its count restarted).
  uint64_t left = 0;
  for (uint32_t i = 0; i < kRegions; ++i) left += ac.DebugCount(kVa + i * k64K);
  EXPECT_LE(left, uint64_t{kThreads} * kLoads);
  EXPECT_EQ(l.stats().accesses, uint64_t{kThreads} * kLoads);
}

}  // namespace
}  // namespace usvm::gpu
