// The bounded replayable fault buffer (GpuConfig::fault_buffer_entries):
// a fault that finds the buffer full is dropped, its raiser waits for the
// driver's next answer and then retries the access, faulting again while
// the page is still unmapped -- as real fault buffers overflow.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Eventually;
using testing::FaultServer;
using testing::Machine;

constexpr uint64_t kVa = uint64_t{0x7000} << 20;


TEST(FaultBufferTest, AFullBufferDropsTheFaultUntilTheNextReplay) {
  Env env;
  FaultUnit fu(env, /*capacity=*/2);
  EXPECT_EQ(fu.capacity(), 2u);
  std::atomic<int> returned{0};
  std::vector<std::thread> t;
  for (int i = 0; i < 3; ++i)
    t.emplace_back([&, i] {
      EXPECT_TRUE(fu.Raise(kVa + i * kPageSize, kAccessRead, i, 1).has_value());
      returned.fetch_add(1);
    });
  Eventually([&] { return fu.Stats().raised == 3; });
  const FaultStats s = fu.Stats();
  EXPECT_EQ(s.dropped, 1u);        // the third found two entries queued
  EXPECT_EQ(fu.outstanding(), 2u);  // and got none
  EXPECT_EQ(returned.load(), 0);    // everyone waits
  auto batch = fu.Fetch(8, 1'000'000'000);
  ASSERT_TRUE(batch.has_value());
  ASSERT_EQ(batch->size(), 2u);
  // The first answer releases the dropped raiser too (it retries its
  // access); the other faulting thread still waits for its own answer.
  ASSERT_TRUE(fu.Replay((*batch)[0].id).has_value());
  Eventually([&] { return returned.load() == 2; });
  ASSERT_TRUE(fu.Replay((*batch)[1].id).has_value());
  for (auto& th : t) th.join();
  EXPECT_EQ(returned.load(), 3);
  EXPECT_EQ(fu.outstanding(), 0u);
}

TEST(FaultBufferTest, DroppedRaisersSeeShutdown) {
  Env env;
  FaultUnit fu(env, 1);
  std::thread a([&] { (void)fu.Raise(kVa, kAccessRead, 0, 1); });
  Eventually([&] { return fu.outstanding() == 1; });
  Result<void> dropped_result;
  std::thread b([&] { dropped_result = fu.Raise(kVa + kPageSize, kAccessRead, 1, 1); });
  Eventually([&] { return fu.Stats().dropped == 1; });
  fu.Shutdown();
  a.join();
  b.join();
  ASSERT_FALSE(dropped_result.has_value());
  EXPECT_EQ(dropped_result.error(), Errc::kCanceled);
}

// End to end: a one-entry buffer, eight threads faulting on 64 pages. The
// kernel completes with every byte right; faults were dropped and raised
// again, and every fault that got an entry was serviced.
TEST(FaultBufferTest, KernelsCompleteThroughAnOverflowingBuffer) {
  GpuConfig config = testing::SmallConfig(/*exec_threads=*/8);
  config.fault_buffer_entries = 1;
  Machine m(1, config);
  Gpu& g = *m.gpu[0];
  ASSERT_EQ(g.fault_unit().capacity(), 1u);
  constexpr int kPages = 64;
  for (int i = 0; i < kPages; ++i) m.Frame64(200 + i)[0] = 1000 + i;
  FaultServer server(g.fault_unit(), [&](const Fault& f) {
    const uint64_t page = (f.va - kVa) / kPageSize;
    if (f.va < kVa || page >= kPages) return false;
    auto r = g.page_table().Bind({f.va, PageSize::k4K, PhysAddr::System(200 + page), kProtWrite});
    return r.has_value() || r.error() == Errc::kExist;
  });
  auto l = g.LaunchKernel(
                [](KernelContext& ctx) {
                  for (int i = 0; i < kPages; ++i) {
                    const int p = (i * 7 + static_cast<int>(ctx.thread_id()) * 13) % kPages;
                    const uint64_t v = ctx.Load(kVa + p * kPageSize);
                    ctx.Store(kVa + p * kPageSize + 8 + 8 * ctx.thread_id(), v + 1);
                  }
                },
                {.threads = 8})
               .value();
  ASSERT_TRUE(l.Wait().has_value());
  for (int p = 0; p < kPages; ++p)
    for (uint64_t t = 0; t < 8; ++t) EXPECT_EQ(m.Frame64(200 + p)[1 + t], 1000u + p + 1);
  const FaultStats fs = g.fault_unit().Stats();
  EXPECT_EQ(fs.cancelled, 0u);
  EXPECT_EQ(fs.raised, fs.replayed + fs.coalesced + fs.dropped);

  EXPECT_EQ(g.fault_unit().outstanding(), 0u);
}

}  // namespace
}  // namespace usvm::gpu
