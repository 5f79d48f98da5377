// Access counter migrations under concurrency (label `concurrency`: the
// TSan job runs it): two address spaces on one GPU (the second in a GPU
// context of its own, so each context's counters ring its own fault
// unit), every fault mapping system memory, the GPU's counters notifying
// hot regions while the fault threads service them (migrating under the
// driver lock, with the uvm thrashing policy's hints), and CPU threads
// reading the same buffers (bringing migrated pages home; the GPU leaves
// the words they read alone, see GpuAddExcept). Every byte is checked at
// the end.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

TEST(AccessCounterConcurrency, HotRegionsMigrateWhileCpusTouchThem) {
  MachineConfig c;
  c.vram_bytes = 8 * k2M;
  c.svm.chunk_sizes = {k64K, k4K};
  c.svm.placement = Placement::kSystem;
  c.svm.access_counters = "on";
  c.svm.thrashing = "uvm";
  c.svm.policy.lapse_ns = 2000;
  c.access_counters = {.enabled = true, .granularity = gpu::k64K, .threshold = 64, .buffer_entries = 8};
  Machine m(c);
  m.AddProcess({0}, c.svm);
  const uint64_t len = 2 * k2M;
  uint64_t va[2];
  for (uint32_t p = 0; p < 2; ++p) {
    va[p] = m.Mmap(len, m.ReserveVa(len), kRW, kAnonPrivate, p);
    USVM_ASSERT_OK(CpuFill(m.as(p), va[p], len, p + 1));
  }
  constexpr int kRounds = 4;
  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> gpu, cpu;
  for (uint32_t p = 0; p < 2; ++p) {
    gpu.emplace_back([&, p] {
      for (int i = 0; i < kRounds; ++i)
        if (!GpuAddExcept(m.vm(0, p), va[p], len, 1, 4 * k64K, 0)) ++failures;
    });
    cpu.emplace_back([&, p] {
      while (!done.load()) {
        for (uint64_t a = va[p]; a < va[p] + len && !done.load(); a += 4 * k64K)
          if (!CpuRead(m.as(p), a, k4K)) ++failures;
        std::this_thread::yield();
      }
    });
  }
  for (auto& t : gpu) t.join();
  done.store(true);
  for (auto& t : cpu) t.join();
  EXPECT_EQ(failures.load(), 0);
  uint64_t notifications = 0;
  for (uint32_t p = 0; p < 2; ++p) {
    Ref ref(va[p], len);
    ref.Fill(va[p], len, p + 1);
    for (uint64_t a = va[p]; a < va[p] + len; a += 8)
      if ((a - va[p]) % (4 * k64K) >= k4K) ref.Set64(a, ref.Get64(a) + kRounds);
    EXPECT_TRUE(GpuMatches(m.vm(0, p), ref)) << "process " << p;
    EXPECT_TRUE(CpuMatches(m.as(p), ref)) << "process " << p;
    notifications += m.vm(0, p).stats().ac_notifications;
  }
  // Each pass makes 16384 accesses (a load and a store per word) per
  // 64 KiB region, the threshold is 64: notifications were serviced (how
  // many moved depends on the CPU threads' timing).
  EXPECT_GT(notifications, 0u);
}

}  // namespace
}  // namespace usvm::driver::testing
