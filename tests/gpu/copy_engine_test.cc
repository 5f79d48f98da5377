// CopyEngine: real bytes over every route, modelled completion time,
// injected failures.
#include <gtest/gtest.h>

#include <cstring>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Machine;

void FillPattern(std::byte* p, uint64_t seed) {
  Rng rng(seed);
  for (uint64_t i = 0; i < kPageSize; i += 8) {
    const uint64_t v = rng.Next();
    std::memcpy(p + i, &v, 8);
  }
}

TEST(CopyEngineTest, SystemToVramToPeerAndBackKeepsBytes) {
  Machine m(2);
  Gpu& a = *m.gpu[0];
  Gpu& b = *m.gpu[1];
  ASSERT_TRUE(a.EnablePeerAccess(b).has_value());
  constexpr int kPages = 37;
  std::vector<PhysAddr> sys, va_, vb, back;
  const uint64_t oa = a.vram().Alloc(kPages * kPageSize).value();
  const uint64_t ob = b.vram().Alloc(kPages * kPageSize).value();
  for (int i = 0; i < kPages; ++i) {
    sys.push_back(PhysAddr::System(100 + 3 * i));  // scattered frames
    back.push_back(PhysAddr::System(1000 + i));
    va_.push_back(PhysAddr::Vram(0, oa + (kPages - 1 - i) * kPageSize));  // reversed order
    vb.push_back(PhysAddr::Vram(1, ob + i * kPageSize));
    FillPattern(m.sysmem->FrameData(100 + 3 * i), i + 1);
  }
  ASSERT_TRUE(a.Copy(0, sys, va_).value().Wait().has_value());
  ASSERT_TRUE(a.Copy(1, va_, vb).value().Wait().has_value());  // peer write over the link
  ASSERT_TRUE(b.Copy(0, vb, back).value().Wait().has_value());
  for (int i = 0; i < kPages; ++i)
    ASSERT_EQ(std::memcmp(m.sysmem->FrameData(100 + 3 * i), m.sysmem->FrameData(1000 + i), kPageSize), 0)
        << "page " << i;
  // Local VRAM to VRAM.
  const uint64_t oc = a.vram().Alloc(kPages * kPageSize).value();
  std::vector<PhysAddr> vc;
  for (int i = 0; i < kPages; ++i) vc.push_back(PhysAddr::Vram(0, oc + i * kPageSize));
  ASSERT_TRUE(a.Copy(0, va_, vc).value().Wait().has_value());
  EXPECT_EQ(std::memcmp(a.vram().Data(oa), a.vram().Data(oc + (kPages - 1) * kPageSize), kPageSize), 0);
  EXPECT_EQ(a.copy_engine_count(), 2u);
}

TEST(CopyEngineTest, PeerCopyNeedsPeerAccess) {
  Machine m(2);
  const uint64_t ob = m.gpu[1]->vram().Alloc(kPageSize).value();
  PhysAddr src = PhysAddr::System(1), dst = PhysAddr::Vram(1, ob);
  EXPECT_EQ(m.gpu[0]->Copy(0, {&src, 1}, {&dst, 1}).error(), Errc::kInval);
  ASSERT_TRUE(m.gpu[0]->EnablePeerAccess(*m.gpu[1]).has_value());
  EXPECT_TRUE(m.gpu[0]->Copy(0, {&src, 1}, {&dst, 1}).value().Wait().has_value());
  ASSERT_TRUE(m.gpu[1]->DisablePeerAccess(*m.gpu[0]).has_value());
  EXPECT_EQ(m.gpu[0]->Copy(0, {&src, 1}, {&dst, 1}).error(), Errc::kInval);
}

TEST(CopyEngineTest, FenceSignalsAfterModelledTime) {
  GpuConfig c = testing::SmallConfig();
  c.latency.link_bandwidth_bytes_per_s = 4096ull * 1000;  // one page per ms
  c.latency.link_latency_ns = 5000;
  Machine m(1, c);
  auto* clock = static_cast<ManualClock*>(&m.env->clock());
  const uint64_t o = m.gpu[0]->vram().Alloc(4 * kPageSize).value();
  std::vector<PhysAddr> src, dst;
  for (int i = 0; i < 4; ++i) {
    src.push_back(PhysAddr::System(i));
    dst.push_back(PhysAddr::Vram(0, o + i * kPageSize));
  }
  const uint64_t t0 = clock->NowNs();
  Fence f1 = m.gpu[0]->Copy(0, src, dst).value();
  Fence f2 = m.gpu[0]->Copy(0, src, dst).value();  // queued behind f1
  EXPECT_EQ(f1.deadline_ns(), t0 + 5000 + 4'000'000);
  EXPECT_EQ(f2.deadline_ns(), f1.deadline_ns() + 5000 + 4'000'000);
  // The bytes may have moved, but the clock has not reached the deadline.
  EXPECT_FALSE(f1.IsSignalled());
  ASSERT_TRUE(f1.Wait().has_value());
  EXPECT_GE(clock->NowNs(), f1.deadline_ns());
  EXPECT_TRUE(f1.IsSignalled());
  ASSERT_TRUE(f2.Wait().has_value());
  EXPECT_GE(clock->NowNs(), f2.deadline_ns());
}

TEST(CopyEngineTest, InjectedFailureSignalsEio) {
  Machine m(1);
  Gpu& g = *m.gpu[0];
  const uint64_t o = g.vram().Alloc(kPageSize).value();
  PhysAddr src = PhysAddr::System(7), dst = PhysAddr::Vram(0, o);
  FillPattern(m.sysmem->FrameData(7), 99);
  m.env->faults().FailNth("gpu.copy", 1);
  EXPECT_EQ(g.Copy(0, {&src, 1}, {&dst, 1}).value().Wait().error(), Errc::kIo);
  ASSERT_TRUE(g.Copy(0, {&src, 1}, {&dst, 1}).value().Wait().has_value());
  EXPECT_EQ(std::memcmp(m.sysmem->FrameData(7), g.vram().Data(o), kPageSize), 0);
  EXPECT_EQ(m.env->faults().Failures("gpu.copy"), 1u);
}

}  // namespace
}  // namespace usvm::gpu
