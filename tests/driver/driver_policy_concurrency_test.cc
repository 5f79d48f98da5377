// Policies under concurrency (label `concurrency`: the TSan job runs it):
// two address spaces on one GPU -- two fault threads choosing eviction
// victims in one VRAM manager (its lock guards the per-allocation counters
// the eviction policies read), each Svm's migration and thrashing
// policies called under its driver lock -- while CPU threads touch the
// same buffers (migrations home, VRAM blocks released under the manager's
// lock; the GPU leaves the words they read alone, see GpuAddExcept). Every
// byte is checked at the end.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

class PolicyConcurrency : public ::testing::TestWithParam<std::string> {};

TEST_P(PolicyConcurrency, TwoAddressSpacesOversubscribeOneGpu) {
  MachineConfig c;
  c.vram_bytes = 4 * k2M;  // both working sets together are 3x this
  c.eviction = GetParam();
  c.svm.chunk_sizes = {k64K, k4K};
  c.svm.migration = "density";
  c.svm.thrashing = "uvm";
  c.svm.policy.lapse_ns = 2000;  // short naps
  c.svm.policy.pin_threshold = 2;
  Machine m(c);
  m.AddProcess({0}, c.svm);
  const uint64_t len = 6 * k2M;
  uint64_t va[2];
  for (uint32_t p = 0; p < 2; ++p) {
    va[p] = m.Mmap(len, m.ReserveVa(len), kRW, kAnonPrivate, p);
    USVM_ASSERT_OK(CpuFill(m.as(p), va[p], len, p + 1));
  }
  constexpr int kRounds = 4;
  std::atomic<bool> done{false};
  std::vector<std::thread> ts;
  std::atomic<int> failures{0};
  for (uint32_t p = 0; p < 2; ++p) {
    ts.emplace_back([&, p] {
      for (int i = 0; i < kRounds; ++i)
        if (!GpuAddExcept(m.vm(0, p), va[p], len, 1, k2M, k64K)) ++failures;
    });
    // A CPU thread reading (bringing pages home) while the GPU works.
    ts.emplace_back([&, p] {
      while (!done.load()) {
        for (uint64_t a = va[p]; a < va[p] + len && !done.load(); a += k2M)
          if (!CpuRead(m.as(p), a + k64K, k4K)) ++failures;
        std::this_thread::yield();
      }
    });
  }
  ts[0].join();
  ts[2].join();
  done.store(true);
  ts[1].join();
  ts[3].join();
  EXPECT_EQ(failures.load(), 0);
  for (uint32_t p = 0; p < 2; ++p) {
    Ref ref(va[p], len);
    ref.Fill(va[p], len, p + 1);
    for (uint64_t a = va[p]; a < va[p] + len; a += 8) {
      const uint64_t off = (a - va[p]) % k2M;
      if (off < k64K || off >= k64K + k4K) ref.Set64(a, ref.Get64(a) + kRounds);
    }
    EXPECT_TRUE(GpuMatches(m.vm(0, p), ref)) << "process " << p;
    EXPECT_TRUE(CpuMatches(m.as(p), ref)) << "process " << p;
  }
  EXPECT_GT(m.dev().vram_stats().evictions, 0u);
}

INSTANTIATE_TEST_SUITE_P(Eviction, PolicyConcurrency, ::testing::Values("lru", "lfu", "pseudo-lru"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace usvm::driver::testing
