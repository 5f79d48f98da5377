// Access counters (access_counters.h): remote accesses counted per region,
// a notification at the threshold, granularity, the bounded buffer's
// overflow, the doorbell on the fault unit, and nothing at all when off.
// Kernels run one thread at a time here, so every count is exact.
#include <gtest/gtest.h>

#include <thread>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Machine;
using testing::SmallConfig;

constexpr uint64_t kVa = uint64_t{0x7000} << 20;  // 2 MiB aligned

GpuConfig Counting(uint32_t threshold, uint64_t granularity = k64K, uint32_t entries = 64) {
  GpuConfig c = SmallConfig(1);
  c.access_counters = {.enabled = true, .granularity = granularity, .threshold = threshold,
                       .buffer_entries = entries};
  return c;
}

// `n` loads of `va` on one kernel thread.
void Loads(Gpu& g, uint64_t va, uint32_t n) {
  auto l = g.LaunchKernel([va, n](KernelContext& ctx) {
                for (uint32_t i = 0; i < n; ++i) (void)ctx.Load(va + (i % 512) * 8);
              }).value();
  ASSERT_TRUE(l.Wait().has_value());
}

TEST(AccessCountersTest, BadConfigIsEinval) {
  EXPECT_EQ(AccessCounters::TryCreate({.enabled = true, .granularity = 4096}).error(), Errc::kInval);
  EXPECT_EQ(AccessCounters::TryCreate({.enabled = true, .threshold = 0}).error(), Errc::kInval);
  EXPECT_EQ(AccessCounters::TryCreate({.enabled = true, .threshold = 65536}).error(), Errc::kInval);
  EXPECT_EQ(AccessCounters::TryCreate({.enabled = true, .buffer_entries = 0}).error(), Errc::kInval);
  EXPECT_TRUE(AccessCounters::TryCreate({.enabled = true, .threshold = 65535}).has_value());
  Env env;
  auto sys = ArenaSystemMemory::TryCreate(16).value();
  GpuConfig c = SmallConfig();
  c.access_counters.granularity = 3 * k64K;
  EXPECT_EQ(Gpu::TryCreate(0, c, sys.get(), env).error(), Errc::kInval);
  auto ac = AccessCounters::TryCreate({.enabled = true}).value();
  EXPECT_EQ(ac->Clear(kVaLimit).error(), Errc::kInval);
  EXPECT_EQ(ac->Clear(kVa).error(), Errc::kNoEnt);
  EXPECT_EQ(ac->SlotFor(kVaLimit, MemKind::kSystem, 0), nullptr);
}

TEST(AccessCountersTest, OffCountsNothingAndNeverRings) {
  Machine m;  // counters off (the default)
  Gpu& g = *m.gpu[0];
  ASSERT_FALSE(g.access_counters().enabled());
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(5), kProtRead}).has_value());
  Loads(g, kVa, 5000);
  EXPECT_EQ(g.access_counters().Stats().regions, 0u);
  EXPECT_EQ(g.access_counters().Stats().notifications, 0u);
  EXPECT_EQ(g.access_counters().DebugCount(kVa), 0u);
  EXPECT_EQ(g.access_counters().SlotFor(kVa, MemKind::kSystem, 0), nullptr);
  // No doorbell: Fetch times out as before.
  EXPECT_EQ(g.fault_unit().Fetch(4, 1'000'000).error(), Errc::kTime);
}

TEST(AccessCountersTest, NotifiesOnceAtTheThresholdUntilCleared) {
  Machine m(1, Counting(100));
  Gpu& g = *m.gpu[0];
  AccessCounters& ac = g.access_counters();
  ASSERT_TRUE(g.page_table().Bind({kVa + 3 * k64K, PageSize::k4K, PhysAddr::System(5), kProtRead}).has_value());
  Loads(g, kVa + 3 * k64K, 99);
  EXPECT_EQ(ac.DebugCount(kVa + 3 * k64K), 99u);
  EXPECT_EQ(ac.pending(), 0u);
  Loads(g, kVa + 3 * k64K, 1);  // the 100th
  auto n = ac.TryFetch(8);
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].va, kVa + 3 * k64K);
  EXPECT_EQ(n[0].size, k64K);
  EXPECT_EQ(n[0].count, 100u);
  EXPECT_EQ(n[0].aperture, MemKind::kSystem);
  // It keeps counting, but does not notify again until cleared.
  Loads(g, kVa + 3 * k64K, 300);
  EXPECT_EQ(ac.pending(), 0u);
  EXPECT_EQ(ac.DebugCount(kVa + 3 * k64K), 400u);
  ASSERT_TRUE(ac.Clear(kVa + 3 * k64K + 8).has_value());
  EXPECT_EQ(ac.DebugCount(kVa + 3 * k64K), 0u);
  Loads(g, kVa + 3 * k64K, 100);
  EXPECT_EQ(ac.TryFetch(8).size(), 1u);
  const AccessCounterStats s = ac.Stats();
  EXPECT_EQ(s.regions, 1u);
  EXPECT_EQ(s.notifications, 2u);
  EXPECT_EQ(s.fetched, 2u);
  EXPECT_EQ(s.dropped, 0u);
  // ClearAll resets every region.
  Loads(g, kVa + 3 * k64K, 10);
  ac.ClearAll();
  EXPECT_EQ(ac.DebugCount(kVa + 3 * k64K), 0u);
}

TEST(AccessCountersTest, OwnVramIsNotCountedPeerVramIs) {
  Machine m(2, Counting(50));
  Gpu& g0 = *m.gpu[0];
  Gpu& g1 = *m.gpu[1];
  ASSERT_TRUE(g0.EnablePeerAccess(g1).has_value());
  const uint64_t own = g0.vram().Alloc(k64K).value();
  const uint64_t peer = g1.vram().Alloc(k64K).value();
  ASSERT_TRUE(g0.page_table().Bind({kVa, PageSize::k64K, PhysAddr::Vram(0, own), kProtRead}).has_value());
  ASSERT_TRUE(g0.page_table().Bind({kVa + k2M, PageSize::k64K, PhysAddr::Vram(1, peer), kProtRead}).has_value());
  Loads(g0, kVa, 500);
  EXPECT_EQ(g0.access_counters().Stats().regions, 0u);
  Loads(g0, kVa + k2M, 50);
  auto n = g0.access_counters().TryFetch(8);
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].va, kVa + k2M);
  EXPECT_EQ(n[0].aperture, MemKind::kVram);
  EXPECT_EQ(n[0].peer, 1u);
  // The other GPU's counters saw nothing.
  EXPECT_EQ(g1.access_counters().Stats().regions, 0u);
}

TEST(AccessCountersTest, GranularityGroupsPagesIntoRegions) {
  for (uint64_t gran : {k64K, k2M}) {
    SCOPED_TRACE(gran);
    Machine m(1, Counting(10, gran));
    Gpu& g = *m.gpu[0];
    ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(5), kProtRead}).has_value());
    ASSERT_TRUE(g.page_table().Bind({kVa + k64K, PageSize::k4K, PhysAddr::System(6), kProtRead}).has_value());
    // 6 + 6 accesses to two pages 64 KiB apart: two regions of 6 at 64
    // KiB, one region of 12 (>= 10: a notification) at 2 MiB.
    Loads(g, kVa, 6);
    Loads(g, kVa + k64K, 6);
    auto n = g.access_counters().TryFetch(8);
    if (gran == k64K) {
      EXPECT_EQ(n.size(), 0u);
      EXPECT_EQ(g.access_counters().Stats().regions, 2u);
      EXPECT_EQ(g.access_counters().DebugCount(kVa + k64K), 6u);
    } else {
      ASSERT_EQ(n.size(), 1u);
      EXPECT_EQ(n[0].va, kVa);
      EXPECT_EQ(n[0].size, k2M);
      EXPECT_EQ(g.access_counters().Stats().regions, 1u);
      EXPECT_EQ(g.access_counters().DebugCount(kVa + k64K), 12u);
    }
  }
}

TEST(AccessCountersTest, AFullBufferDropsAndCountsTheOverflow) {
  Machine m(1, Counting(1, k64K, /*entries=*/2));
  Gpu& g = *m.gpu[0];
  AccessCounters& ac = g.access_counters();
  for (uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(g.page_table().Bind({kVa + i * k64K, PageSize::k4K, PhysAddr::System(5 + i), kProtRead}).has_value());
  for (uint64_t i = 0; i < 4; ++i) Loads(g, kVa + i * k64K, 1);
  EXPECT_EQ(ac.pending(), 2u);
  AccessCounterStats s = ac.Stats();
  EXPECT_EQ(s.notifications, 2u);
  EXPECT_EQ(s.dropped, 2u);
  // A dropped region starts again and notifies once there is room.
  EXPECT_EQ(ac.DebugCount(kVa + 3 * k64K), 0u);
  auto n = ac.TryFetch(8);
  ASSERT_EQ(n.size(), 2u);
  EXPECT_EQ(n[0].va, kVa);
  EXPECT_EQ(n[1].va, kVa + k64K);
  Loads(g, kVa + 3 * k64K, 1);
  n = ac.TryFetch(8);
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].va, kVa + 3 * k64K);
}

TEST(AccessCountersTest, ANotificationRingsTheFaultUnit) {
  Machine m(1, Counting(20));
  Gpu& g = *m.gpu[0];
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(5), kProtRead}).has_value());
  // A driver blocked in Fetch wakes with an empty batch ...
  Result<std::vector<Fault>> got = Err(Errc::kInval, "not yet");
  std::thread driver([&] { got = g.fault_unit().Fetch(16, 20'000'000'000); });
  Loads(g, kVa, 20);
  driver.join();
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->empty());
  EXPECT_EQ(g.access_counters().pending(), 1u);
  // ... once: the next Fetch waits for faults again.
  EXPECT_EQ(g.fault_unit().Fetch(16, 1'000'000).error(), Errc::kTime);
}

}  // namespace
}  // namespace usvm::gpu
