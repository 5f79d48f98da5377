// Shared helpers for the gpu tests: a deterministic machine (manual clock,
// arena system memory, GPUs) and a fault-servicing "driver" thread.
#ifndef USVM_TESTS_GPU_GPU_TEST_UTIL_H_
#define USVM_TESTS_GPU_GPU_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/gpu/arena_system_memory.h"
#include "usvm/gpu/gpu.h"

namespace usvm::gpu::testing {

inline std::unique_ptr<Env> ManualEnv(uint64_t seed = 1) {
  return std::make_unique<Env>(std::make_unique<ManualClock>(), seed);
}

// Waits (really) until cond() holds; fails the test after 20 s.
template <typename F>
void Eventually(F cond) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!cond()) {
    ASSERT_LT(std::chrono::steady_clock::now(), end) << "condition never held";
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

inline GpuConfig SmallConfig(uint32_t exec_threads = 2) {
  GpuConfig c;
  c.vram_bytes = uint64_t{16} << 20;
  c.exec_threads = exec_threads;
  c.copy_engines = 2;
  c.latency = LatencyModel::Zero();
  return c;
}

struct Machine {
  explicit Machine(uint32_t gpus = 1, GpuConfig config = SmallConfig(), uint64_t frames = 4096)
      : env(ManualEnv()) {
    sysmem = std::move(ArenaSystemMemory::TryCreate(frames).value());
    for (uint32_t i = 0; i < gpus; ++i)
      gpu.push_back(std::move(Gpu::TryCreate(i, config, sysmem.get(), *env).value()));
  }
  uint64_t* Frame64(uint64_t pfn) { return reinterpret_cast<uint64_t*>(sysmem->FrameData(pfn)); }

  std::unique_ptr<Env> env;
  std::unique_ptr<ArenaSystemMemory> sysmem;
  std::vector<std::unique_ptr<Gpu>> gpu;
};

// A driver thread: fetches fault batches, asks `service` about each
// (true: replay, false: cancel with EFAULT).
class FaultServer {
 public:
  FaultServer(FaultUnit& fu, std::function<bool(const Fault&)> service)
      : fu_(fu), service_(std::move(service)), thread_([this] { Loop(); }) {}
  ~FaultServer() { Stop(); }
  void Stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  uint64_t batches() const { return batches_.load(); }

 private:
  void Loop() {
    while (!stop_.load()) {
      auto batch = fu_.Fetch(16, 2'000'000);
      if (!batch) continue;
      batches_.fetch_add(1);
      for (const Fault& f : *batch) {
        if (service_(f)) {
          EXPECT_TRUE(fu_.Replay(f.id).has_value());
        } else {
          EXPECT_TRUE(fu_.Cancel(f.id, Error(Errc::kFault, "unserviceable")).has_value());
        }
      }
    }
  }
  FaultUnit& fu_;
  std::function<bool(const Fault&)> service_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> batches_{0};
  std::thread thread_;
};

}  // namespace usvm::gpu::testing

#endif  // USVM_TESTS_GPU_GPU_TEST_UTIL_H_
