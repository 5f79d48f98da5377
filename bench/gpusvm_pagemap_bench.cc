// Pagemap benchmarks (gpusvm device memory, drm_pagemap): 2 MiB moved
// through Pagemap/Devmem with the test VRAM driver (tests/gpusvm/
// test_vram.h), against a plain memcpy of the same bytes in the same run,
// with a ratio table at the end (medians when --benchmark_repetitions > 1).
//
//   BM_RoundTrip2M/cpu-touch   2 MiB: MigrateToDevmem (system -> device),
//                              then a CPU touch brings the whole allocation
//                              home (MigrateToRam). bytes/s of 2 x 2 MiB.
//   BM_RoundTrip2M/evict       the same, home by EvictToRam (by frame, no
//                              mmap lock).
//   BM_RoundTrip2M/thp-cpu-touch  the same from a THP: one 2 MiB device page
//                              there, one 2 MiB system page home.
//   BM_Memcpy2M/round-trip     memcpy of 2 MiB to a buffer and back (the
//                              same 2 x 2 MiB): the bound.
//   BM_ToDevmem2M/4K           MigrateToDevmem of 2 MiB of 4 KiB pages
//                              alone (the way home, EvictToRam, untimed).
//   BM_ToDevmem2M/thp          the same from a THP (MADV_COLLAPSE, untimed)
//                              into one 2 MiB device page (compound).
//   BM_Memcpy2M/one-way        memcpy of the same 2 MiB once.
//   BM_Peer2M/direct           2 MiB moved device A -> device B -> A (peers
//                              sharing an owner, source_peer_migrates),
//                              copied straight between the VRAMs
//                              (DevmemOps::CopyFromPeer).
//   BM_Peer2M/bounced          the same through a system-memory bounce
//                              buffer inside the migration (no direct path).
//   BM_Peer2M/evict-migrate    the kernel's way: EvictToRam from A, then
//                              MigrateToDevmem to B (and back the same way).
// Goal: round trip >= 0.7x memcpy. Direct peer copies should beat both
// bounced forms; a 2 MiB device page should beat 512 small ones.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../tests/gpusvm/test_vram.h"
#include "median_reporter.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::gpusvm {
namespace {

using testing::TestVram;
constexpr uint64_t k2M = uint64_t{2} << 20;

struct World {
  std::unique_ptr<mm::FramePool> pool;
  std::shared_ptr<mm::AddressSpace> as;
  std::unique_ptr<TestVram> a, b;
  uint64_t addr = 0;

  explicit World(bool peers, bool direct, bool thp = false) {
    pool = std::move(*mm::FramePool::TryCreate(uint64_t{64} << 20, Env::Default()));
    as = *mm::AddressSpace::TryCreate(*pool);
    static int owner;
    a = TestVram::Create({.npages = 1024, .owner = &owner});
    if (peers) {
      b = TestVram::Create({.npages = 1024, .owner = &owner});
      a->LinkPeer(*b, direct);
    }
    // A 2 MiB-aligned 2 MiB inside a larger mapping.
    const uint64_t m =
        *as->Mmap(0, 2 * k2M, mm::kProtRead | mm::kProtWrite, mm::kMapPrivate | mm::kMapAnonymous);
    addr = mm::HugeAlignUp(m);
    if (thp) (void)as->Madvise(addr, k2M, mm::kMadvHugePage);
    std::vector<uint8_t> bytes(k2M);
    for (uint64_t i = 0; i < k2M; ++i) bytes[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
    (void)as->Write(addr, bytes.data(), k2M);
  }
  ~World() {
    a.reset();
    b.reset();
    as.reset();
  }
};

void BM_RoundTrip2M(benchmark::State& state, bool evict, bool thp) {
  World w(false, false, thp);
  const uint64_t copy0 = w.a->copy_ns();
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    auto d = w.a->Migrate(w.as, w.addr, w.addr + k2M);
    if (!d) {
      state.SkipWithError("migrate failed");
      break;
    }
    if (evict) {
      if (!w.a->pagemap().EvictToRam(*d)) {
        state.SkipWithError("evict failed");
        break;
      }
    } else {
      uint8_t x;
      if (!w.as->Read(w.addr, &x, 1)) {
        state.SkipWithError("touch failed");
        break;
      }
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * k2M));
  // The share of the time spent in the driver's copy loops; the rest is
  // the framework (mm migrate calls, page references, allocations, the
  // fault).
  const double total_ns = static_cast<double>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  state.counters["copy_share"] = static_cast<double>(w.a->copy_ns() - copy0) / std::max(1.0, total_ns);
}

// To device memory only; home (and, for THP, the collapse back into a
// 2 MiB page) untimed.
void BM_ToDevmem2M(benchmark::State& state, bool thp) {
  World w(false, false, thp);
  for (auto _ : state) {
    state.PauseTiming();
    if (thp && !w.as->Madvise(w.addr, k2M, mm::kMadvCollapse)) {
      state.SkipWithError("collapse failed");
      break;
    }
    state.ResumeTiming();
    auto d = w.a->Migrate(w.as, w.addr, w.addr + k2M);
    state.PauseTiming();
    if (!d || !w.a->pagemap().EvictToRam(*d)) {
      state.SkipWithError("migrate or evict failed");
      break;
    }
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * k2M));
  state.counters["huge_units"] = static_cast<double>(w.a->pagemap().stats().huge_pages_to_devmem);
}

// Warm, page-aligned buffers, 4 KiB at a time (as the migration copies):
// one way, or there and back (`round_trip`).
void BM_Memcpy2M(benchmark::State& state, bool round_trip) {
  std::vector<std::byte> src(k2M + 4096), dst(k2M + 4096);
  auto align = [](std::byte* p) {
    return reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(p) + 4095) & ~uintptr_t{4095});
  };
  std::byte* s = align(src.data());
  std::byte* d = align(dst.data());
  std::memset(s, 1, k2M);
  std::memset(d, 2, k2M);
  for (auto _ : state) {
    for (uint64_t off = 0; off < k2M; off += 4096) std::memcpy(d + off, s + off, 4096);
    benchmark::ClobberMemory();
    if (!round_trip) continue;
    for (uint64_t off = 0; off < k2M; off += 4096) std::memcpy(s + off, d + off, 4096);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(
      static_cast<int64_t>(state.iterations() * (round_trip ? 2 : 1) * k2M));
}

enum class PeerMode { kDirect, kBounced, kEvictMigrate };

void BM_Peer2M(benchmark::State& state, PeerMode mode) {
  World w(true, mode == PeerMode::kDirect);
  auto on = w.a->Migrate(w.as, w.addr, w.addr + k2M);
  if (!on) {
    state.SkipWithError("initial migrate failed");
    return;
  }
  std::shared_ptr<TestVram::VramAlloc> cur = *on;
  TestVram* vr[2] = {w.a.get(), w.b.get()};
  int where = 0;
  MigrateDetails d;
  d.source_peer_migrates = mode != PeerMode::kEvictMigrate;
  for (auto _ : state) {
    for (int hop = 0; hop < 2; ++hop) {
      if (mode == PeerMode::kEvictMigrate && !vr[where]->pagemap().EvictToRam(cur)) {
        state.SkipWithError("evict failed");
        return;
      }
      auto next = vr[1 - where]->Migrate(w.as, w.addr, w.addr + k2M, d);
      if (!next) {
        state.SkipWithError("peer migrate failed");
        return;
      }
      cur = std::move(*next);
      where = 1 - where;
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * k2M));
  state.counters["direct_pages"] = static_cast<double>(w.a->pagemap().stats().peer_pages_direct +
                                                       w.b->pagemap().stats().peer_pages_direct);
}

std::vector<usvm::bench::RatioPair>& Pairs() {
  static std::vector<usvm::bench::RatioPair> p;
  return p;
}

void RegisterAll() {
  using benchmark::RegisterBenchmark;
  RegisterBenchmark("BM_RoundTrip2M/cpu-touch", BM_RoundTrip2M, false, false)
      ->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_RoundTrip2M/evict", BM_RoundTrip2M, true, false)
      ->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_RoundTrip2M/thp-cpu-touch", BM_RoundTrip2M, false, true)
      ->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Memcpy2M/round-trip", BM_Memcpy2M, true)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_ToDevmem2M/4K", BM_ToDevmem2M, false)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_ToDevmem2M/thp", BM_ToDevmem2M, true)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Memcpy2M/one-way", BM_Memcpy2M, false)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Peer2M/direct", BM_Peer2M, PeerMode::kDirect)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Peer2M/bounced", BM_Peer2M, PeerMode::kBounced)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Peer2M/evict-migrate", BM_Peer2M, PeerMode::kEvictMigrate)
      ->Unit(benchmark::kMicrosecond);
  Pairs() = {
      {"2M to devmem + CPU touch home",
       "BM_RoundTrip2M/cpu-touch", "BM_Memcpy2M/round-trip", "bytes_per_second", 0.7},
      {"2M to devmem + evict home",
       "BM_RoundTrip2M/evict", "BM_Memcpy2M/round-trip", "bytes_per_second", 0.7},
      {"2M THP to devmem + CPU touch home (2M pages both ways)", "BM_RoundTrip2M/thp-cpu-touch",
       "BM_Memcpy2M/round-trip", "bytes_per_second", 0.7},
      {"2M to devmem (4K pages)", "BM_ToDevmem2M/4K", "BM_Memcpy2M/one-way", "bytes_per_second", 0},
      {"2M THP to devmem (2M page)",
       "BM_ToDevmem2M/thp", "BM_Memcpy2M/one-way", "bytes_per_second", 0},
      {"2M page / 512 4K pages", "BM_ToDevmem2M/thp", "BM_ToDevmem2M/4K", "bytes_per_second", 1.0},
      {"peer 2M direct / bounced",
       "BM_Peer2M/direct", "BM_Peer2M/bounced", "bytes_per_second", 1.0},
      {"peer 2M direct / evict+migrate",
       "BM_Peer2M/direct", "BM_Peer2M/evict-migrate", "bytes_per_second", 1.0},
      {"peer 2M direct / memcpy",
       "BM_Peer2M/direct", "BM_Memcpy2M/round-trip", "bytes_per_second", 0},
  };
}

class RatioReporter : public usvm::bench::MedianReporter {
 public:
  void Finalize() override {
    PrintRatios("ratios (bytes/s; medians when repeated):", Pairs());
    ConsoleReporter::Finalize();
  }
};

}  // namespace
}  // namespace usvm::gpusvm

int main(int argc, char** argv) {
  const bool console = usvm::bench::ConsoleFormat(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  usvm::gpusvm::RegisterAll();
  if (console) {
    usvm::gpusvm::RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
