// TLB shootdown stress: kernels read tagged pages while the test thread
// rebinds them to fresh frames, invalidates the TLB of every GPU (two
// passes: start all, then wait all), then poisons the old frames. No load
// may return a tag whose invalidation fence had signalled before the load
// began, nor the poison. Run under TSan: the poison writes would also race
// with any load still in flight through a stale translation.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <deque>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Machine;

constexpr uint64_t kVa = uint64_t{0x5000} << 20;
constexpr uint32_t kPages = 8;
constexpr uint64_t kPoison = 0xdeaddeaddeaddeadull;

uint64_t Tag(uint32_t page, uint64_t version) { return (uint64_t{page} << 40) | version; }

void FillFrame(Machine& m, uint64_t pfn, uint64_t v) {
  uint64_t* p = m.Frame64(pfn);
  for (uint64_t i = 0; i < kPageSize / 8; ++i) p[i] = v;
}

void RunStress(uint32_t gpus, int rebinds) {
  Machine m(gpus, testing::SmallConfig(2), 256);
  std::array<std::atomic<uint64_t>, kPages> dead{};  // versions <= dead[i] are gone
  std::array<uint64_t, kPages> version{}, frame{};
  std::deque<uint64_t> free_frames;
  for (uint64_t f = kPages; f < 64; ++f) free_frames.push_back(f);
  for (uint32_t i = 0; i < kPages; ++i) {
    version[i] = 1;
    frame[i] = i;
    FillFrame(m, i, Tag(i, 1));
    for (auto& g : m.gpu)
      ASSERT_TRUE(g->page_table().Bind({kVa + i * kPageSize, PageSize::k4K, PhysAddr::System(i), 0}).has_value());
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> violations{0}, loads{0}, progress{0};
  std::vector<Launch> launches;
  for (auto& g : m.gpu) {
    launches.push_back(g->LaunchKernel(
                            [&](KernelContext& ctx) {
                              Rng rng(ctx.thread_id() * 31 + ctx.launch_id());
                              uint64_t n = 0;
                              while (!stop.load(std::memory_order_relaxed)) {
                                const uint32_t page = static_cast<uint32_t>(rng.Uniform(kPages));
                                const uint64_t floor = dead[page].load(std::memory_order_acquire);
                                const uint64_t v = ctx.Load(kVa + page * kPageSize + rng.Uniform(512) * 8);
                                if (v == kPoison || (v >> 40) != page || (v & 0xffffffffff) <= floor)
                                  violations.fetch_add(1);
                                // Be kind to the 2-core CI box: the test
                                // thread needs CPU to make progress.
                                if ((++n & 63) == 0) {
                                  progress.fetch_add(1, std::memory_order_relaxed);
                                  std::this_thread::yield();
                                }
                              }
                              loads.fetch_add(n);
                            },
                            {.threads = 2})
                           .value());
  }
  Rng rng(5);
  for (int it = 0; it < rebinds; ++it) {
    // Interleave with the readers: wait until they have made progress.
    const uint64_t p0 = progress.load();
    while (progress.load() == p0) std::this_thread::yield();
    const uint32_t page = static_cast<uint32_t>(rng.Uniform(kPages));
    const uint64_t old_frame = frame[page];
    const uint64_t nf = free_frames.front();
    free_frames.pop_front();
    FillFrame(m, nf, Tag(page, ++version[page]));
    std::vector<Fence> fences;
    for (auto& g : m.gpu)
      ASSERT_TRUE(g->page_table().Bind({kVa + page * kPageSize, PageSize::k4K, PhysAddr::System(nf), 0},
                                       BindMode::kReplace).has_value());
    // Pass 1: start invalidation on every GPU. Pass 2: wait for all.
    for (auto& g : m.gpu) fences.push_back(g->InvalidateTlb(kVa + page * kPageSize, kPageSize).value());
    ASSERT_TRUE(Fence::WaitAll(fences).has_value());
    dead[page].store(version[page] - 1, std::memory_order_release);
    // The old frame is free now: scribble on it and recycle it.
    FillFrame(m, old_frame, kPoison);
    frame[page] = nf;
    free_frames.push_back(old_frame);
  }
  stop = true;
  for (auto& l : launches) ASSERT_TRUE(l.Wait().has_value());
  EXPECT_EQ(violations.load(), 0u);
  EXPECT_GT(loads.load(), 0u);
  for (auto& g : m.gpu) EXPECT_GE(g->tlb().Stats().invalidations, uint64_t(rebinds));
}

TEST(TlbStressTest, NoLoadThroughAnInvalidatedTranslation) { RunStress(1, 5000); }
TEST(TlbStressTest, TwoGpusTwoPassInvalidation) { RunStress(2, 2500); }

// A fill by a walker that read the table before an invalidation must not
// survive it (the generation check in Tlb::Fill).
TEST(TlbStressTest, StaleFillIsDropped) {
  Env env(std::make_unique<ManualClock>(), 1);
  auto tlb = Tlb::TryCreate({}, 1, LatencyModel::Zero(), env).value();
  const uint64_t gen = tlb->Enter(0);
  Mapping m{0x1000, kPageSize, Pte::Make(PteKind::kSystem, 0, 0x5000, PageSize::k4K, 0)};
  tlb->Leave(0);
  Fence f = tlb->Invalidate(0x1000, kPageSize).value();
  ASSERT_TRUE(f.Wait().has_value());
  tlb->Fill(m, gen);
  EXPECT_FALSE(tlb->Lookup(0x1000).has_value());
  EXPECT_EQ(tlb->Stats().stale_fills_dropped, 1u);
  tlb->Fill(m, tlb->generation().load());
  EXPECT_TRUE(tlb->Lookup(0x1000).has_value());
}

// An invalidation fence cannot signal while a walker inside a kernel has
// not yet observed the new generation; it signals once it has.
TEST(TlbStressTest, FenceWaitsForActiveWalkers) {
  Env env(std::make_unique<ManualClock>(), 1);
  auto tlb = Tlb::TryCreate({}, 2, LatencyModel::Zero(), env).value();
  const uint64_t g0 = tlb->Enter(0);
  Fence f = tlb->Invalidate(0, kPageSize).value();
  EXPECT_FALSE(f.IsSignalled());
  tlb->Publish(0, g0 + 1);
  EXPECT_TRUE(f.IsSignalled());
  // Idle walkers never hold a fence back.
  tlb->Leave(0);
  EXPECT_TRUE(tlb->InvalidateAll().IsSignalled());
}

TEST(TlbStressTest, FenceHonoursModelledLatency) {
  Env env(std::make_unique<ManualClock>(), 1);
  LatencyModel lat;
  lat.tlb_invalidate_ns = 2000;
  auto tlb = Tlb::TryCreate({}, 1, lat, env).value();
  const uint64_t t0 = env.NowNs();
  Fence f = tlb->Invalidate(0, kPageSize).value();
  EXPECT_FALSE(f.IsSignalled());
  ASSERT_TRUE(f.Wait().has_value());
  EXPECT_GE(env.NowNs(), t0 + 2000);
  EXPECT_TRUE(f.IsSignalled());
}

}  // namespace
}  // namespace usvm::gpu
