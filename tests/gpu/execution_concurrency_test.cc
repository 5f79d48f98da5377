// Execution engine and fault unit: kernels through the MMU, pattern
// kernels, replayable faults (coalescing, replay), fatal faults that end
// only their kernel, TLB invalidation visibility.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Eventually;
using testing::FaultServer;
using testing::Machine;

constexpr uint64_t kVa = uint64_t{0x7000} << 20;


TEST(ExecutionTest, KernelLoadsAndStoresRealBytes) {
  Machine m;
  Gpu& g = *m.gpu[0];
  const uint64_t vo = g.vram().Alloc(k64K).value();
  std::vector<BindOp> ops = {{kVa, PageSize::k4K, PhysAddr::System(5), kProtWrite | kProtAtomic},
                             {kVa + k64K, PageSize::k64K, PhysAddr::Vram(0, vo), kProtWrite}};
  ASSERT_TRUE(g.page_table().Bind(ops).has_value());
  m.Frame64(5)[3] = 41;
  auto l = g.LaunchKernel(
                [](KernelContext& ctx) {
                  const uint64_t v = ctx.Load(kVa + 24);
                  ctx.Store(kVa + k64K + 0x3008, v + 1);
                  ctx.AtomicAdd(kVa, 5);
                  ctx.Store32(kVa + 12, 7);
                })
               .value();
  ASSERT_TRUE(l.Wait().has_value());
  EXPECT_EQ(reinterpret_cast<uint64_t*>(g.vram().Data(vo + 0x3008))[0], 42u);
  EXPECT_EQ(m.Frame64(5)[0], 5u);
  EXPECT_EQ(reinterpret_cast<uint32_t*>(m.sysmem->FrameData(5))[3], 7u);
  EXPECT_EQ(l.stats().accesses, 4u);
  EXPECT_EQ(l.stats().faults, 0u);
}

TEST(ExecutionTest, PatternKernelsComputeOnRealBytes) {
  Machine m;
  Gpu& g = *m.gpu[0];
  const uint64_t vo = g.vram().Alloc(k2M).value();
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k2M, PhysAddr::Vram(0, vo), kProtWrite}).has_value());
  const uint64_t words = k2M / 8;
  PatternParams p{.pattern = Pattern::kStreamWrite, .va = kVa, .length = k2M, .value = 1000, .threads = 7};
  auto w = g.LaunchPattern(p).value();
  ASSERT_TRUE(w.Wait().has_value());
  EXPECT_EQ(w.stats().accesses, words);
  const uint64_t* data = reinterpret_cast<uint64_t*>(g.vram().Data(vo));
  for (uint64_t i = 0; i < words; i += 997) ASSERT_EQ(data[i], 1000 + i);
  p.pattern = Pattern::kReadModifyWrite;
  p.value = 3;
  p.iterations = 2;
  ASSERT_TRUE(g.LaunchPattern(p).value().Wait().has_value());
  p.pattern = Pattern::kStreamRead;
  p.iterations = 1;
  auto r = g.LaunchPattern(p).value();
  ASSERT_TRUE(r.Wait().has_value());
  // sum of (1006 + i) for i < words
  EXPECT_EQ(r.stats().checksum, words * 1006 + words * (words - 1) / 2);
  p.pattern = Pattern::kStride;
  p.stride = 4096;
  auto s = g.LaunchPattern(p).value();
  ASSERT_TRUE(s.Wait().has_value());
  EXPECT_EQ(s.stats().accesses, k2M / 4096);
  uint64_t expect = 0;
  for (uint64_t i = 0; i < words; i += 512) expect += 1006 + i;
  EXPECT_EQ(s.stats().checksum, expect);
  p.pattern = Pattern::kRandomGather;
  p.count = 1000;
  auto gth = g.LaunchPattern(p).value();
  ASSERT_TRUE(gth.Wait().has_value());
  EXPECT_EQ(gth.stats().accesses, 7000u);
  EXPECT_GE(gth.stats().checksum, 7000u * 1006);
}

TEST(ExecutionTest, FaultsAreServicedAndReplayed) {
  Machine m;
  Gpu& g = *m.gpu[0];
  for (int i = 0; i < 16; ++i) m.Frame64(200 + i)[0] = 100 + i;
  FaultServer server(g.fault_unit(), [&](const Fault& f) {
    const uint64_t page = (f.va - kVa) / kPageSize;
    if (f.va < kVa || page >= 16) return false;
    // Another thread's fault on this page may have been serviced first.
    auto r = g.page_table().Bind({f.va, PageSize::k4K, PhysAddr::System(200 + page), kProtWrite});
    return r.has_value() || r.error() == Errc::kExist;
  });
  auto l = g.LaunchKernel(
                [](KernelContext& ctx) {
                  for (int i = 0; i < 16; ++i) {
                    const uint64_t v = ctx.Load(kVa + i * kPageSize);
                    ctx.Store(kVa + i * kPageSize + 8, v * 2);
                  }
                },
                {.threads = 4})
               .value();
  ASSERT_TRUE(l.Wait().has_value());
  for (int i = 0; i < 16; ++i) EXPECT_EQ(m.Frame64(200 + i)[1], 2u * (100 + i));
  EXPECT_GE(l.stats().faults, 16u);
  EXPECT_EQ(l.stats().faults, l.stats().stalls);
  EXPECT_EQ(l.stats().accesses, 4u * 32);
  const FaultStats fs = g.fault_unit().Stats();
  EXPECT_EQ(fs.raised, fs.replayed + fs.coalesced);
  EXPECT_EQ(fs.cancelled, 0u);
  EXPECT_EQ(g.fault_unit().outstanding(), 0u);
}

TEST(ExecutionTest, DuplicateFaultsOnOnePageCoalesce) {
  Machine m(1, testing::SmallConfig(4));
  Gpu& g = *m.gpu[0];
  m.Frame64(9)[0] = 77;
  auto l = g.LaunchKernel([](KernelContext& ctx) { EXPECT_EQ(ctx.Load(kVa + ctx.thread_id() * 8), ctx.thread_id() == 0 ? 77u : 0u); },
                          {.threads = 4})
               .value();
  FaultUnit& fu = g.fault_unit();
  // All four execution threads block on the same page.
  Eventually([&] { return fu.Stats().raised == 4; });
  auto batch = fu.TryFetch(16);
  ASSERT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch[0].va, kVa);
  EXPECT_EQ(batch[0].raisers, 4u);
  EXPECT_EQ(batch[0].access, kAccessRead);
  EXPECT_EQ(fu.Stats().coalesced, 3u);
  EXPECT_FALSE(l.fence().IsSignalled());
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(9), 0}).has_value());
  ASSERT_TRUE(fu.Replay(batch[0].id).has_value());
  EXPECT_EQ(fu.Replay(batch[0].id).error(), Errc::kNoEnt);  // answered once
  ASSERT_TRUE(l.Wait().has_value());
  EXPECT_EQ(l.stats().faults, 4u);
}

TEST(ExecutionTest, FatalFaultEndsOnlyItsKernel) {
  Machine m;
  Gpu& g = *m.gpu[0];
  FaultServer server(g.fault_unit(), [&](const Fault& f) {
    if (f.va >= kVa + k2M || f.va < kVa) return false;  // outside the "heap"
    auto r = g.page_table().Bind({f.va, PageSize::k4K, PhysAddr::System(f.va / kPageSize % 1024), kProtWrite});
    return r.has_value() || r.error() == Errc::kExist;
  });
  std::atomic<bool> after_fault{false};
  auto bad = g.LaunchKernel(
                  [&](KernelContext& ctx) {
                    ctx.Store(kVa, 1);
                    ctx.Load(0x1000);  // never serviceable
                    if (!ctx.cancelled()) after_fault = true;
                    EXPECT_EQ(ctx.error(), Errc::kFault);
                    EXPECT_EQ(ctx.Load(kVa), 0u);  // accesses are dropped now
                  })
                 .value();
  PatternParams p{.pattern = Pattern::kStreamWrite, .va = kVa + k64K, .length = 16 * kPageSize, .value = 5, .threads = 3};
  auto good = g.LaunchPattern(p).value();
  EXPECT_EQ(bad.Wait().error(), Errc::kFault);
  ASSERT_TRUE(good.Wait().has_value());
  EXPECT_FALSE(after_fault.load());
  // The good kernel's bytes are there, through the page table.
  for (uint64_t w = 0; w < 16 * kPageSize / 8; w += 100) {
    const uint64_t va = kVa + k64K + w * 8;
    EXPECT_EQ(m.Frame64(va / kPageSize % 1024)[(va % kPageSize) / 8], 5 + w);
  }
  // The GPU still runs kernels afterwards.
  auto again = g.LaunchKernel([](KernelContext& ctx) { ctx.Store(kVa + 8, 9); }).value();
  EXPECT_TRUE(again.Wait().has_value());
}

TEST(ExecutionTest, MisalignedAccessCancelsWithEinval) {
  Machine m;
  Gpu& g = *m.gpu[0];
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(1), kProtWrite}).has_value());
  auto l = g.LaunchKernel([](KernelContext& ctx) { ctx.Load(kVa + 4); }).value();
  EXPECT_EQ(l.Wait().error(), Errc::kInval);
  auto l2 = g.LaunchKernel([](KernelContext& ctx) { ctx.Load(kVaLimit + 8); }).value();
  EXPECT_EQ(l2.Wait().error(), Errc::kFault);
}

TEST(ExecutionTest, WriteToReadOnlyFaultsUntilUpgraded) {
  Machine m;
  Gpu& g = *m.gpu[0];
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(3), kProtRead}).has_value());
  std::atomic<uint8_t> seen_access{0};
  FaultServer server(g.fault_unit(), [&](const Fault& f) {
    seen_access = f.access;
    if (!g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(3), kProtWrite}, BindMode::kReplace)) return false;
    return g.InvalidateTlb(kVa, kPageSize).value().Wait().has_value();
  });
  auto l = g.LaunchKernel([](KernelContext& ctx) {
                ctx.Load(kVa);  // cached read-only
                ctx.Store(kVa, 123);
              }).value();
  ASSERT_TRUE(l.Wait().has_value());
  EXPECT_EQ(seen_access.load(), kAccessWrite);
  EXPECT_EQ(m.Frame64(3)[0], 123u);
}

TEST(ExecutionTest, InvalidationMakesRebindVisible) {
  Machine m;
  Gpu& g = *m.gpu[0];
  m.Frame64(10)[0] = 1;
  m.Frame64(11)[0] = 2;
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(10), 0}).has_value());
  auto load = [&]() -> uint64_t {
    std::atomic<uint64_t> v{0};
    EXPECT_TRUE(g.LaunchKernel([&](KernelContext& ctx) { v = ctx.Load(kVa); }).value().Wait().has_value());
    return v.load();
  };
  EXPECT_EQ(load(), 1u);
  ASSERT_TRUE(g.page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(11), 0}, BindMode::kReplace).has_value());
  Fence f = g.InvalidateTlb(kVa, kPageSize).value();
  ASSERT_TRUE(f.Wait().has_value());
  EXPECT_EQ(load(), 2u);
  EXPECT_GE(g.tlb().Stats().invalidations, 1u);
}

TEST(ExecutionTest, ShutdownCancelsBlockedKernels) {
  Launch l;
  {
    Machine m;
    l = m.gpu[0]->LaunchKernel([](KernelContext& ctx) { ctx.Load(kVa); }).value();
    Eventually([&] { return m.gpu[0]->fault_unit().Stats().raised == 1; });
  }
  EXPECT_EQ(l.Wait().error(), Errc::kCanceled);
}

TEST(ExecutionTest, PeerVramThroughThePageTable) {
  Machine m(2);
  Gpu& a = *m.gpu[0];
  Gpu& b = *m.gpu[1];
  const uint64_t ob = b.vram().Alloc(kPageSize).value();
  reinterpret_cast<uint64_t*>(b.vram().Data(ob))[0] = 555;
  EXPECT_EQ(a.page_table().Bind({kVa, PageSize::k4K, PhysAddr::Vram(1, ob), kProtWrite}).error(), Errc::kInval);
  ASSERT_TRUE(a.EnablePeerAccess(b).has_value());
  ASSERT_TRUE(a.page_table().Bind({kVa, PageSize::k4K, PhysAddr::Vram(1, ob), kProtWrite}).has_value());
  EXPECT_EQ(a.page_table().Walk(kVa).value().pte.kind(), PteKind::kPeerVram);
  auto l = a.LaunchKernel([](KernelContext& ctx) { ctx.Store(kVa + 8, ctx.Load(kVa) + 1); }).value();
  ASSERT_TRUE(l.Wait().has_value());
  EXPECT_EQ(reinterpret_cast<uint64_t*>(b.vram().Data(ob))[1], 556u);
}

}  // namespace
}  // namespace usvm::gpu
