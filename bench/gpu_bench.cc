// gpu layer benchmarks: translated loads on TLB hits, streaming kernels
// against memcpy of the same bytes, buddy alloc+free, TLB invalidation
// round trip (zero-latency model). Real clock, zero-latency model: only
// the software GPU's own overhead is measured.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "usvm/gpu/arena_system_memory.h"
#include "usvm/gpu/gpu.h"

namespace usvm::gpu {
namespace {

constexpr uint64_t kVa = uint64_t{0x40} << 30;

std::unique_ptr<Gpu> MakeGpu(uint32_t exec_threads, uint64_t vram) {
  GpuConfig c;
  c.vram_bytes = vram;
  c.exec_threads = exec_threads;
  c.latency = LatencyModel::Zero();
  return std::move(Gpu::TryCreate(0, c, nullptr, Env::Default()).value());
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// 8-byte loads that all hit the micro-TLB: 16 pages of VRAM, one device
// thread. Goal: >= 100M loads/s per device thread.
void BM_TlbHitLoads(benchmark::State& state) {
  auto gpu = MakeGpu(1, uint64_t{64} << 20);
  const uint64_t off = gpu->vram().Alloc(k64K).value();
  std::memset(gpu->vram().Data(off), 1, k64K);
  if (!gpu->page_table().Bind({kVa, PageSize::k64K, PhysAddr::Vram(0, off), kProtWrite})) {
    state.SkipWithError("bind failed");
    return;
  }
  constexpr uint64_t kLoads = uint64_t{1} << 24;
  uint64_t total = 0;
  double secs = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto l = gpu->LaunchKernel([](KernelContext& ctx) {
                  uint64_t sum = 0;
                  for (uint64_t i = 0; i < kLoads; ++i) sum += ctx.Load(kVa + ((i * 8) & (k64K - 1)));
                  benchmark::DoNotOptimize(sum);
                }).value();
    (void)l.Wait();
    const auto t1 = std::chrono::steady_clock::now();
    secs += Seconds(t0, t1);
    state.SetIterationTime(Seconds(t0, t1));
    total += l.stats().accesses;
  }
  state.SetItemsProcessed(int64_t(total));
  state.counters["Mloads_per_s_per_thread"] = double(total) / secs / 1e6;
}
BENCHMARK(BM_TlbHitLoads)->UseManualTime()->Unit(benchmark::kMillisecond);

// A streaming pattern kernel (one device thread) over 32 MiB of VRAM
// mapped with 2 MiB leaves, against memcpy of the same 32 MiB in the same
// run. Goal: kernel >= 30% of memcpy.
void StreamVsMemcpy(benchmark::State& state, Pattern pattern) {
  constexpr uint64_t kBytes = uint64_t{32} << 20;
  auto gpu = MakeGpu(1, uint64_t{64} << 20);
  const uint64_t off = gpu->vram().Alloc(kBytes).value();
  std::vector<BindOp> ops;
  for (uint64_t o = 0; o < kBytes; o += k2M)
    ops.push_back({kVa + o, PageSize::k2M, PhysAddr::Vram(0, off + o), kProtWrite});
  if (!gpu->page_table().Bind(ops)) {
    state.SkipWithError("bind failed");
    return;
  }
  std::memset(gpu->vram().Data(off), 3, kBytes);
  std::vector<std::byte> dst(kBytes);
  std::memset(dst.data(), 0, kBytes);
  double kernel_s = 0, memcpy_s = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto l = gpu->LaunchPattern({.pattern = pattern, .va = kVa, .length = kBytes, .value = 7}).value();
    (void)l.Wait();
    const auto t1 = std::chrono::steady_clock::now();
    std::memcpy(dst.data(), gpu->vram().Data(off), kBytes);
    benchmark::ClobberMemory();
    const auto t2 = std::chrono::steady_clock::now();
    kernel_s += Seconds(t0, t1);
    memcpy_s += Seconds(t1, t2);
    state.SetIterationTime(Seconds(t0, t1));
  }
  const double n = double(state.iterations());
  state.SetBytesProcessed(int64_t(n * kBytes));
  state.counters["kernel_GBps"] = n * kBytes / kernel_s / 1e9;
  state.counters["memcpy_GBps"] = n * kBytes / memcpy_s / 1e9;
  state.counters["kernel_vs_memcpy"] = memcpy_s / kernel_s;
}
void BM_StreamReadVsMemcpy(benchmark::State& state) { StreamVsMemcpy(state, Pattern::kStreamRead); }
void BM_StreamWriteVsMemcpy(benchmark::State& state) { StreamVsMemcpy(state, Pattern::kStreamWrite); }
BENCHMARK(BM_StreamReadVsMemcpy)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_StreamWriteVsMemcpy)->UseManualTime()->Unit(benchmark::kMillisecond);

// Buddy alloc + free of one block (size = arg) in a 1 GiB space that is
// half full of 4 KiB .. 2 MiB blocks. Goal: <= 200 ns.
void BM_BuddyAllocFree(benchmark::State& state) {
  auto buddy = BuddyAllocator::TryCreate(uint64_t{1} << 30).value();
  Rng rng(1);
  std::vector<uint64_t> live;
  while (buddy->Stats().free_bytes > (uint64_t{1} << 29)) {
    auto r = buddy->Alloc(uint64_t{4096} << rng.Uniform(10));
    if (r) live.push_back(*r);
  }
  const uint64_t bytes = uint64_t(state.range(0));
  for (auto _ : state) {
    auto r = buddy->Alloc(bytes);
    benchmark::DoNotOptimize(r);
    (void)buddy->Free(*r);
  }
  state.counters["fragmentation"] = buddy->Stats().fragmentation;
}
BENCHMARK(BM_BuddyAllocFree)->Arg(4096)->Arg(64 << 10)->Arg(2 << 20);

// Invalidate a 2 MiB range and wait for the fence, zero-latency model.
// Arg 0: device threads idle; arg 1: a kernel thread is streaming loads on
// one of the two device threads (the fence must wait for it to observe the
// shootdown). Only one is kept busy so that the 2-core machine measures
// the protocol, not the scheduler.
void BM_TlbInvalidateRoundTrip(benchmark::State& state) {
  auto gpu = MakeGpu(2, uint64_t{64} << 20);
  const uint64_t off = gpu->vram().Alloc(k2M).value();
  (void)gpu->page_table().Bind({kVa, PageSize::k2M, PhysAddr::Vram(0, off), kProtWrite});
  std::atomic<bool> stop{false};
  Launch busy;
  if (state.range(0)) {
    busy = gpu->LaunchKernel(
                  [&](KernelContext& ctx) {
                    uint64_t sum = 0;
                    for (uint64_t i = 0; !stop.load(std::memory_order_relaxed); ++i)
                      sum += ctx.Load(kVa + ((i * 8) & (k2M - 1)));
                    benchmark::DoNotOptimize(sum);
                  },
                  {.threads = 1})
               .value();
  }
  for (auto _ : state) {
    Fence f = gpu->InvalidateTlb(kVa, k2M).value();
    (void)f.Wait();
  }
  stop = true;
  (void)busy.Wait();
}
BENCHMARK(BM_TlbInvalidateRoundTrip)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// Fault round trip: one kernel thread touches 256 unmapped pages one by
// one; a driver thread fetches, binds and replays each.
void BM_FaultRoundTrip(benchmark::State& state) {
  auto gpu = MakeGpu(1, uint64_t{64} << 20);
  const uint64_t off = gpu->vram().Alloc(uint64_t{1} << 20).value();
  constexpr uint64_t kPages = 256;
  std::atomic<bool> stop{false};
  std::thread driver([&] {
    while (!stop.load()) {
      auto batch = gpu->fault_unit().Fetch(64, 1'000'000);
      if (!batch) continue;
      for (const Fault& f : *batch) {
        (void)gpu->page_table().Bind({f.va, PageSize::k4K, PhysAddr::Vram(0, off + (f.va - kVa)), kProtWrite});
        (void)gpu->fault_unit().Replay(f.id);
      }
    }
  });
  for (auto _ : state) {
    auto l = gpu->LaunchKernel([](KernelContext& ctx) {
                  for (uint64_t p = 0; p < kPages; ++p) benchmark::DoNotOptimize(ctx.Load(kVa + p * kPageSize));
                }).value();
    (void)l.Wait();
    state.PauseTiming();
    (void)gpu->page_table().Unbind(kVa, kPages * kPageSize);
    (void)gpu->InvalidateTlb(kVa, kPages * kPageSize).value().Wait();
    state.ResumeTiming();
  }
  stop = true;
  driver.join();
  state.SetItemsProcessed(int64_t(state.iterations() * kPages));
}
BENCHMARK(BM_FaultRoundTrip)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace usvm::gpu

BENCHMARK_MAIN();
