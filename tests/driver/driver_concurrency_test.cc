// Concurrency tests of the driver (TSan's `concurrency` label): atomics
// from the CPU and two GPUs on one counter (the page moves between two
// VRAMs and system memory), and userptr / bind revalidation racing CPU
// mprotect and munmap-less changes. Short: about a second each in release.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

constexpr auto kDuration = std::chrono::milliseconds(1000);

// Every increment is a compare-exchange whose success the kernel records:
// a cancelled kernel's CAS does nothing and returns false, so the sum of
// recorded successes is exactly what the counter must hold.
TEST(DriverConcurrency, AtomicsFromCpuAndTwoGpusOnOneCounter) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k64K);
  AttributeUpdate u;
  u.atomic = AtomicMode::kGlobal;
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, u));
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> gpu_incs{0}, cpu_incs{0}, launches{0}, cancelled{0};
  std::vector<std::string> errors;
  std::mutex err_mu;
  std::vector<std::thread> threads;
  for (uint32_t g = 0; g < 2; ++g) {
    threads.emplace_back([&, g] {
      while (!stop.load()) {
        constexpr uint32_t kThreads = 4;
        auto counts = std::make_shared<std::vector<uint64_t>>(kThreads, 0);
        uint64_t* cnt = counts->data();
        auto l = m.vm(g).LaunchKernel(
            [va, cnt](gpu::KernelContext& k) {
              for (int i = 0; i < 50 && !k.cancelled(); ++i) {
                uint64_t cur = k.Load(va);
                for (int tries = 0; tries < 1000 && !k.cancelled(); ++tries) {
                  if (k.AtomicCas(va, cur, cur + 1)) {
                    ++cnt[k.thread_id()];
                    break;
                  }
                }
              }
            },
            {.threads = kThreads});
        if (!l) {
          std::lock_guard<std::mutex> lk(err_mu);
          errors.push_back("launch: " + l.error().ToString());
          return;
        }
        auto r = WaitLaunch(*l);
        ++launches;
        if (!r) {
          ++cancelled;
          std::lock_guard<std::mutex> lk(err_mu);
          if (errors.size() < 10) errors.push_back("GPU " + std::to_string(g) + ": " + r.error().ToString());
        }
        for (uint64_t n : *counts) gpu_incs += n;
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop.load()) {
      auto r = m.as().AtomicFetchAdd(va, 1);
      if (!r) {
        std::lock_guard<std::mutex> lk(err_mu);
        errors.push_back("CPU: " + r.error().ToString());
        return;
      }
      ++cpu_incs;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  });
  std::this_thread::sleep_for(kDuration);
  stop.store(true);
  for (auto& t : threads) t.join();
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, gpu_incs.load() + cpu_incs.load()) << "increments lost or duplicated";
  EXPECT_GT(gpu_incs.load(), 0u);
  EXPECT_GT(cpu_incs.load(), 0u);
  // Contention between two GPUs and the CPU is no reason to cancel a
  // kernel (the atomic timeslice and retries are there for it).
  std::string all;
  for (auto& e : errors) all += e + "\n";
  EXPECT_EQ(cancelled.load(), 0u) << "of " << launches.load() << " launches:\n" << all;
  printf("atomics: %llu GPU + %llu CPU increments, %llu launches, %llu cancelled\n",
         (unsigned long long)gpu_incs.load(), (unsigned long long)cpu_incs.load(),
         (unsigned long long)launches.load(), (unsigned long long)cancelled.load());
}

// A userptr over constant data, revalidated by every launch while another
// thread keeps invalidating it (mprotect there and back, fork), and a plain
// bind beside it revalidated on faults: every GPU read is exact.
TEST(DriverConcurrency, UserptrRevalidationRacesInvalidations) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 128 * 1024;
  const uint64_t up = m.MmapAligned(len), bd = m.MmapAligned(len);
  Ref rup(up, len), rbd(bd, len);
  USVM_ASSERT_OK(CpuFill(m.as(), up, len, 1));
  USVM_ASSERT_OK(CpuFill(m.as(), bd, len, 2));
  rup.Fill(up, len, 1);
  rbd.Fill(bd, len, 2);
  auto h0 = m.vm(0).Bind(up, len, {.userptr = true});
  auto h1 = m.vm(1).Bind(bd, len);
  ASSERT_TRUE(h0.has_value() && h1.has_value());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, flips{0};
  std::vector<std::string> errors;
  std::mutex err_mu;
  auto fail = [&](std::string s) {
    std::lock_guard<std::mutex> lk(err_mu);
    if (errors.size() < 10) errors.push_back(std::move(s));
  };
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    while (!stop.load()) {
      if (auto ok = GpuMatches(m.vm(0), rup); !ok) fail(std::string("userptr: ") + ok.message());
      ++reads;
    }
  });
  threads.emplace_back([&] {
    while (!stop.load()) {
      if (auto ok = GpuMatches(m.vm(1), rbd); !ok) fail(std::string("bind: ") + ok.message());
      ++reads;
    }
  });
  threads.emplace_back([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      if (i % 8 == 7) {
        auto child = m.as().Fork();  // write-protects both buffers
        if (!child) fail("fork: " + child.error().ToString());
        else (*child)->Exit();
      } else {
        const uint64_t a = (i % 2) ? up : bd;
        if (!m.as().Mprotect(a, len, mm::kProtRead)) fail("mprotect ro");
        if (!m.as().Mprotect(a, len, kRW)) fail("mprotect rw");
      }
      ++flips;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::this_thread::sleep_for(kDuration);
  stop.store(true);
  for (auto& t : threads) t.join();
  std::string all;
  for (auto& e : errors) all += e + "\n";
  EXPECT_TRUE(errors.empty()) << all;
  EXPECT_GT(reads.load(), 10u);
  EXPECT_GT(flips.load(), 10u);
  EXPECT_GT(m.vm(0).stats().bind_invalidations, 0u);
  EXPECT_GT(m.vm(1).stats().bind_invalidations, 0u);
  EXPECT_EQ(m.svm().stats().ranges, 0u) << "accesses inside binds made SVM ranges";
  // Still coherent with the CPU afterwards.
  USVM_ASSERT_OK(CpuFill(m.as(), up, len, 3));
  rup.Fill(up, len, 3);
  EXPECT_TRUE(GpuMatches(m.vm(0), rup));
  USVM_ASSERT_OK(m.vm(0).Unbind(*h0));
  USVM_ASSERT_OK(m.vm(1).Unbind(*h1));
}

}  // namespace
}  // namespace usvm::driver::testing
