// End-to-end tests of the driver layer, one group per section of IGT's
// xe_exec_system_allocator: a simulated process (mm::AddressSpace) and
// software GPUs (driver::Device) share buffers through driver::Svm, and
// every byte is checked against a host reference, from the CPU and from
// GPU kernels.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "driver/driver_test_util.h"
#include "usvm/mm/sim_file.h"

namespace usvm::driver::testing {
namespace {

using gpu::PteKind;

constexpr uint64_t k1M = uint64_t{1} << 20;
constexpr uint64_t kPagesPer2M = k2M / k4K;

AttributeUpdate Pref(Location l) {
  AttributeUpdate u;
  u.preferred = l;
  return u;
}
AttributeUpdate Atomic(AtomicMode a) {
  AttributeUpdate u;
  u.atomic = a;
  return u;
}
AttributeUpdate InPlace(bool b) {
  AttributeUpdate u;
  u.access_in_place = b;
  return u;
}

// ---- malloc / mmap ------------------------------------------------------------

// IGT "malloc": an aligned_alloc'd buffer (2 MiB aligned anonymous memory)
// the CPU wrote; the GPU reads it, writes it, and the CPU reads it back.
TEST(DriverE2e, MallocLikeBufferRoundTrip) {
  Machine m;
  const uint64_t len = 2 * k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 1));
  ref.Fill(va, len, 1);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 2));
  ref.Fill(va, len, 2);
  // The default placement migrates to the faulting GPU's VRAM.
  EXPECT_EQ(DevicePages(m.as(), va, len), len / k4K);
  EXPECT_GT(m.dev().vram_stats().allocations, 0u);
  EXPECT_GT(m.dev().vram_stats().bytes_to_vram, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  const VmStats vs = m.vm().stats();
  EXPECT_GT(vs.faults, 0u);
  EXPECT_EQ(vs.faults_cancelled, 0u);
  EXPECT_GT(vs.by_size[2].faults, 0u) << "2 MiB aligned buffer: 2 MiB ranges";
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // Every page was touched by the CPU: all home again.
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_GT(m.dev().vram_stats().bytes_to_ram, 0u);
}

// IGT "mmap": a buffer where mmap put it, of a size that is no multiple of
// 2 MiB (64 KiB and 4 KiB ranges at the edges).
TEST(DriverE2e, MmapLikeOddSizeBufferRoundTrip) {
  Machine m;
  const uint64_t len = k2M + 5 * k64K + 3 * k4K;
  const uint64_t va = m.Mmap(len);
  ASSERT_NE(va, 0u);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 11));
  ref.Fill(va, len, 11);
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 7));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 7);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // The GPU never touched beyond the buffer: the neighbours are not mapped.
  EXPECT_EQ(Code(GpuRead(m.vm(), va + len, k4K)), Errc::kNoEnt);
}

// IGT "free" / "new": a new buffer per exec, freed after it. The VA is
// reused by the next mmap: no stale GPU mapping may survive the munmap.
TEST(DriverE2e, NewBufferPerExecAndFreeAfter) {
  Machine m;
  const uint64_t len = 256 * 1024;
  for (uint64_t i = 0; i < 8; ++i) {
    const uint64_t va = m.Mmap(len);
    ASSERT_NE(va, 0u);
    Ref ref(va, len);
    USVM_ASSERT_OK(CpuFill(m.as(), va, len, 100 + i));
    ref.Fill(va, len, 100 + i);
    USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, i + 1));
    for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + i + 1);
    ASSERT_TRUE(GpuMatches(m.vm(), ref)) << "exec " << i;
    if (i % 2 == 0) {
      ASSERT_TRUE(CpuMatches(m.as(), ref)) << "exec " << i;
    }
    USVM_ASSERT_OK(m.as().Munmap(va, len));
    EXPECT_FALSE(GpuPteKind(m.vm(), va).has_value()) << "GPU PTE survived munmap, exec " << i;
  }
  EXPECT_GT(m.svm().stats().unmap_events, 0u);
  // The collector removes the unmapped ranges; their device pages are freed.
  Eventually([&] { return m.svm().stats().ranges == 0; });
  Eventually([&] { return m.dev().vram_stats().allocations == 0; });
}

// IGT "many execs": one buffer, many kernels, CPU reads in between.
TEST(DriverE2e, ManyExecsOnOneBuffer) {
  Machine m;
  const uint64_t len = 512 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 3));
  ref.Fill(va, len, 3);
  for (int i = 0; i < 40; ++i) {
    USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
    for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
    if (i % 8 == 7) {
      // A CPU touch of one page in the middle: it comes home, the rest of
      // the range follows (or not); the next kernel must see it all.
      uint64_t w = 0;
      const uint64_t a = va + (i * 4096 + 64) % len;
      USVM_ASSERT_OK(m.as().Read(a, &w, 8));
      EXPECT_EQ(w, ref.Get64(a)) << "exec " << i;
    }
  }
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// IGT "free-race": a kernel keeps storing into a buffer while the CPU
// unmaps it; the frames and VRAM it had are reused by another buffer. The
// kernel ends (cancelled with ENOENT, or done before the munmap) and no
// stale GPU mapping writes into the reused memory.
TEST(DriverE2e, FreeRaceMunmapWhileTheGpuWrites) {
  Machine m;
  int cancelled = 0;
  for (int round = 0; round < 4; ++round) {
    const uint64_t len = k2M;
    const uint64_t a = m.MmapAligned(len);
    std::atomic<bool> started{false};
    auto l = m.vm().LaunchKernel(
        [a, len, &started](gpu::KernelContext& k) {
          // Until the munmap cancels it (5 s at most: then the test fails).
          const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
          for (uint64_t it = 0; !k.cancelled() && std::chrono::steady_clock::now() < end; ++it) {
            for (uint64_t off = k.thread_id() * 8; off < len && !k.cancelled(); off += 8 * k.num_threads() * 61)
              k.Store(a + off, 0xdeadbeef00000000ull | (it & 0xffffffff));
            started.store(true);
          }
        },
        {.threads = 4});
    ASSERT_TRUE(l.has_value());
    while (!started.load()) std::this_thread::yield();
    USVM_ASSERT_OK(m.as().Munmap(a, len));
    // Reuse: a CPU buffer (frames) and a GPU buffer (VRAM).
    const uint64_t b = m.MmapAligned(len), c = m.MmapAligned(len);
    Ref rb(b, len), rc(c, len);
    USVM_ASSERT_OK(CpuFill(m.as(), b, len, 40 + round));
    rb.Fill(b, len, 40 + round);
    USVM_ASSERT_OK(GpuFill(m.vm(), c, len, 50 + round));
    rc.Fill(c, len, 50 + round);
    auto r = WaitLaunch(*l);
    if (!r) {
      EXPECT_EQ(r.error().code(), Errc::kNoEnt) << r.error().ToString();
      ++cancelled;
    }
    EXPECT_TRUE(GpuMatches(m.vm(), rc)) << "round " << round;
    EXPECT_TRUE(CpuMatches(m.as(), rb)) << "round " << round;
    EXPECT_TRUE(CpuMatches(m.as(), rc)) << "round " << round;
    USVM_ASSERT_OK(m.as().Munmap(b, len));
    USVM_ASSERT_OK(m.as().Munmap(c, len));
  }
  EXPECT_GT(cancelled, 0) << "the kernel always finished before the munmap: no race tested";
}

// ---- race -------------------------------------------------------------------

// IGT "race": CPU threads write one half of a 2 MiB range while a GPU
// kernel writes the other half (the range ping-pongs between VRAM and
// system memory); both halves must hold what was written.
TEST(DriverE2e, RaceCpuAndGpuWritingHalvesOfOneRange) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  const uint64_t half = len / 2;
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 1));
  for (uint64_t round = 0; round < 3; ++round) {
    const uint64_t cpu_seed = 10 + round, gpu_seed = 20 + round;
    auto launch = LaunchWords(m.vm(), va + half, half, [gpu_seed](gpu::KernelContext& k, uint64_t, uint64_t a) {
      k.Store(a, Word(gpu_seed, a));
    });
    ASSERT_TRUE(launch.has_value());
    std::vector<std::thread> cpus;
    std::atomic<int> cpu_errors{0};
    for (int t = 0; t < 4; ++t) {
      cpus.emplace_back([&, t] {
        const uint64_t q = half / 4;
        for (uint64_t a = va + t * q; a < va + (t + 1) * q; a += k4K)
          if (!CpuFill(m.as(), a, k4K, cpu_seed)) cpu_errors++;
      });
    }
    for (auto& t : cpus) t.join();
    USVM_ASSERT_OK(WaitLaunch(*launch));
    EXPECT_EQ(cpu_errors.load(), 0);
    ref.Fill(va, half, cpu_seed);
    ref.Fill(va + half, half, gpu_seed);
    ASSERT_TRUE(GpuMatches(m.vm(), ref)) << "round " << round;
    ASSERT_TRUE(CpuMatches(m.as(), ref)) << "round " << round;
  }
}

// ---- prefetch ---------------------------------------------------------------

TEST(DriverE2e, PrefetchToVramThenGpuUseWithoutFaults) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 5));
  ref.Fill(va, len, 5);
  Vm& vm = m.vm();
  USVM_ASSERT_OK(vm.Prefetch(va, len, Location::Device(0)));
  EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  EXPECT_GE(vm.stats().prefetches, 1u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  EXPECT_GE(m.dev().vram_stats().bytes_to_vram, len);
  const uint64_t faults_before = vm.stats().faults;
  auto out = std::make_shared<std::vector<uint64_t>>(len / 8);
  uint64_t* p = out->data();
  auto l = LaunchWords(vm, va, len, [p](gpu::KernelContext& k, uint64_t i, uint64_t a) { p[i] = k.Load(a); });
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  EXPECT_EQ(l->stats().faults, 0u) << "prefetched range faulted";
  EXPECT_EQ(vm.stats().faults, faults_before);
  EXPECT_EQ(Diff(va, reinterpret_cast<uint8_t*>(p), ref.bytes.data(), len), "");
  // Prefetching again is a no-op (already valid there).
  const uint64_t copied = m.dev().vram_stats().bytes_to_vram;
  USVM_ASSERT_OK(vm.Prefetch(va, len, Location::Device(0)));
  EXPECT_EQ(m.dev().vram_stats().bytes_to_vram, copied);
}

TEST(DriverE2e, PrefetchToSystemBringsPagesHomeAndMapsThem) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 6));
  ref.Fill(va, len, 6);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  USVM_ASSERT_OK(m.vm().Prefetch(va, len, Location::System()));
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kSystem);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  auto out = std::make_shared<std::vector<uint64_t>>(len / 8);
  uint64_t* p = out->data();
  auto l = LaunchWords(m.vm(), va, len, [p](gpu::KernelContext& k, uint64_t i, uint64_t a) { p[i] = k.Load(a); });
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  EXPECT_EQ(l->stats().faults, 0u);
  EXPECT_EQ(Diff(va, reinterpret_cast<uint8_t*>(p), ref.bytes.data(), len), "");
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, PrefetchToVramUnderSystemPlacement) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 4));
  ref.Fill(va, len, 4);
  USVM_ASSERT_OK(m.vm().Prefetch(va, len, Location::Device(0)));
  EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  EXPECT_GT(m.dev().vram_stats().allocations, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, PrefetchErrors) {
  Machine m;
  const uint64_t va = m.MmapAligned(k2M);
  EXPECT_EQ(Code(m.vm().Prefetch(va + 8, k4K, Location::Device(0))), Errc::kInval);
  EXPECT_EQ(Code(m.vm().Prefetch(va, 100, Location::Device(0))), Errc::kInval);
  EXPECT_EQ(Code(m.vm().Prefetch(va, k4K, Location::Device(7))), Errc::kInval);
  EXPECT_EQ(Code(m.vm().Prefetch(m.ReserveVa(k2M), k2M, Location::Device(0))), Errc::kNoEnt);
}

// ---- madvise (attributes) ---------------------------------------------------

TEST(DriverE2e, MadvisePreferredSystemKeepsPagesInSystemMemory) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Pref(Location::System())));
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 8));
  ref.Fill(va, len, 8);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kSystem);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev().vram_stats().bytes_to_vram, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, MadvisePreferredDeviceOverridesSystemPlacement) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 9));
  ref.Fill(va, len, 9);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u) << "Placement::kSystem migrated";
  const uint64_t inval = m.svm().stats().attribute_invalidations;
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Pref(Location::Device(0))));
  EXPECT_GT(m.svm().stats().attribute_invalidations, inval);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, MadviseAtomicCpuRefusesGpuAtomicsWithEacces) {
  Machine m;
  const uint64_t len = 64 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 12));
  ref.Fill(va, len, 12);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Atomic(AtomicMode::kCpu)));
  const uint64_t cancelled = m.vm().stats().faults_cancelled;
  auto r = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); }));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kAcces) << r.error().ToString();
  EXPECT_GT(m.vm().stats().faults_cancelled, cancelled);
  // Plain loads and stores still work; the atomic changed nothing.
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 3));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 3);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // Back to the default: the atomic works.
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Atomic(AtomicMode::kUndefined)));
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
  ref.Set64(va, ref.Get64(va) + 1);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// AtomicMode::kCpu holds for atomics that find a PTE too: a read fault that
// maps pages of this GPU's VRAM commits no atomic permission under kCpu, so
// a later GPU atomic faults and is refused. Both variants: the page already
// in VRAM, and a page the read fault itself migrates there (default
// placement). (Once a bug: found by
// DriverConcurrency.AttributeChangesRaceGpuAtomics.)
TEST(DriverE2e, MadviseAtomicCpuAfterAReadFault) {
  for (bool in_vram : {true, false}) {
    Machine m;
    const uint64_t va = m.MmapAligned(k64K);
    USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 1));
    if (in_vram) {
      USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
      ASSERT_TRUE(InDeviceMemory(m.as(), va));
    }
    USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, Atomic(AtomicMode::kCpu)));
    USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { (void)k.Load(va); })));
    auto w = m.vm().context().page_table().Walk(va);
    ASSERT_TRUE(w.has_value());
    EXPECT_FALSE(w->pte.atomic()) << (in_vram ? "in VRAM" : "migrated by the read") << ": atomic PTE under kCpu";
    auto r = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); }));
    EXPECT_EQ(Code(r), Errc::kAcces) << (in_vram ? "in VRAM" : "migrated by the read") << ": GPU atomic allowed under kCpu";
  }
}

// The same through Prefetch: under kCpu, a prefetch into VRAM maps the
// range here; a GPU atomic afterwards must still be refused.
TEST(DriverE2e, MadviseAtomicCpuAfterAPrefetch) {
  Machine m;
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 1));
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, Atomic(AtomicMode::kCpu)));
  USVM_ASSERT_OK(m.vm().Prefetch(va, k64K, Location::Device(0)));
  auto r = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); }));
  EXPECT_EQ(Code(r), Errc::kAcces) << "GPU atomic allowed under kCpu after a prefetch";
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, Word(1, va)) << "the refused atomic changed memory";
}

// Atomics need device memory (AtomicMode::kUndefined / kDevice, and
// Placement::kSystem says "atomics still migrate"). A read fault first maps
// the page from system memory; the atomic after it must still fault and
// migrate, not run on system memory through an atomic PTE.
TEST(DriverE2e, GpuAtomicAfterAReadFaultStillMigrates) {
  for (AtomicMode mode : {AtomicMode::kUndefined, AtomicMode::kDevice}) {
    MachineConfig c;
    c.svm.placement = Placement::kSystem;
    Machine m(c);
    const uint64_t va = m.MmapAligned(k64K);
    USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 2));
    USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, Atomic(mode)));
    USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { (void)k.Load(va); })));
    ASSERT_FALSE(InDeviceMemory(m.as(), va));
    auto w = m.vm().context().page_table().Walk(va);
    ASSERT_TRUE(w.has_value());
    EXPECT_FALSE(w->pte.atomic()) << AtomicModeName(mode) << ": a system page mapped with atomic permission";
    USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
    EXPECT_TRUE(InDeviceMemory(m.as(), va)) << AtomicModeName(mode) << ": the GPU atomic ran on system memory";
    auto v = m.as().AtomicLoad(va);
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(*v, Word(2, va) + 1);
  }
}

TEST(DriverE2e, MadviseAtomicDeviceGpuAtomicsWorkInVram) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;  // only the atomic may migrate
  Machine m(c);
  const uint64_t len = 64 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 13));
  ref.Fill(va, len, 13);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Atomic(AtomicMode::kDevice)));
  constexpr uint32_t kThreads = 16, kIters = 100;
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel(
      [va](gpu::KernelContext& k) {
        for (uint32_t i = 0; i < kIters && !k.cancelled(); ++i) {
          k.AtomicAdd(va, 1);                               // shared counter
          k.AtomicAdd(va + 8 * (1 + k.thread_id()), 2);     // own word
        }
      },
      {.threads = kThreads})));
  ref.Set64(va, ref.Get64(va) + kThreads * kIters);
  for (uint32_t t = 0; t < kThreads; ++t) ref.Set64(va + 8 * (1 + t), ref.Get64(va + 8 * (1 + t)) + 2 * kIters);
  EXPECT_TRUE(InDeviceMemory(m.as(), va)) << "GPU atomic did not migrate to VRAM";
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, MadviseUnchangedAttributesCauseNoInvalidation) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 14));
  ref.Fill(va, len, 14);
  ASSERT_GT(m.svm().stats().ranges, 0u);
  const uint64_t i0 = m.svm().stats().attribute_invalidations;
  // Default -> default: nothing changes.
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Atomic(AtomicMode::kUndefined)));
  EXPECT_EQ(m.svm().stats().attribute_invalidations, i0);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram) << "unchanged attributes zapped the GPU";
  // A change invalidates ...
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Pref(Location::System())));
  const uint64_t i1 = m.svm().stats().attribute_invalidations;
  EXPECT_GT(i1, i0);
  // ... the same again does not.
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Pref(Location::System())));
  EXPECT_EQ(m.svm().stats().attribute_invalidations, i1);
  auto spans = m.svm().QueryAttributes(va, len);
  ASSERT_TRUE(spans.has_value());
  ASSERT_EQ(spans->size(), 1u);
  EXPECT_EQ((*spans)[0].start, va);
  EXPECT_EQ((*spans)[0].end, va + len);
  EXPECT_EQ((*spans)[0].attrs.preferred, Location::System());
  // A partial span: gaps are filled with defaults, in address order.
  USVM_ASSERT_OK(m.svm().SetAttributes(va + k64K, k64K, Atomic(AtomicMode::kCpu)));
  spans = m.svm().QueryAttributes(va, 4 * k64K);
  ASSERT_TRUE(spans.has_value());
  ASSERT_EQ(spans->size(), 3u);
  EXPECT_EQ((*spans)[1].start, va + k64K);
  EXPECT_EQ((*spans)[1].end, va + 2 * k64K);
  EXPECT_EQ((*spans)[1].attrs.atomic, AtomicMode::kCpu);
  EXPECT_EQ((*spans)[1].attrs.preferred, Location::System());
  EXPECT_EQ((*spans)[2].attrs.atomic, AtomicMode::kUndefined);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, MadviseErrors) {
  Machine m;
  const uint64_t va = m.MmapAligned(k2M);
  EXPECT_EQ(Code(m.svm().SetAttributes(va + 1, k4K, Atomic(AtomicMode::kCpu))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().SetAttributes(va, 0, Atomic(AtomicMode::kCpu))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().SetAttributes(va, k4K + 1, Atomic(AtomicMode::kCpu))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().SetAttributes(va, k4K, Pref(Location::Device(5)))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().QueryAttributes(va + 1, k4K)), Errc::kInval);
  EXPECT_EQ(Code(m.svm().QueryAttributes(va, 0)), Errc::kInval);
  auto spans = m.svm().QueryAttributes(va, k2M);  // nothing set: one default span
  ASSERT_TRUE(spans.has_value());
  ASSERT_EQ(spans->size(), 1u);
  EXPECT_EQ((*spans)[0].attrs, Attributes{});
  EXPECT_EQ((*spans)[0].start, va);
  EXPECT_EQ((*spans)[0].end, va + k2M);
}

// ---- memory that cannot migrate ---------------------------------------------

TEST(DriverE2e, SharedAnonymousMemoryStaysInSystemMemory) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.Mmap(len, 0, kRW, mm::kMapShared | mm::kMapAnonymous);
  ASSERT_NE(va, 0u);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 15));
  ref.Fill(va, len, 15);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len / 2, 16));
  ref.Fill(va, len / 2, 16);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kSystem);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // A fork child shares the pages: it sees the GPU's writes.
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.Keep(*child);
  EXPECT_TRUE(CpuMatches(**child, ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va + len / 2, len / 2, 17));
  ref.Fill(va + len / 2, len / 2, 17);
  EXPECT_TRUE(CpuMatches(**child, ref)) << "shared memory: the child sees GPU writes after fork";
}

TEST(DriverE2e, FileBackedSharedMappingStaysInSystemMemory) {
  Machine m;
  const uint64_t len = 256 * 1024;
  auto file = mm::SimFile::TryCreate(m.pool(), len, "data");
  ASSERT_TRUE(file.has_value());
  auto va_r = m.as().Mmap(0, len, kRW, mm::kMapShared, *file, 0);
  ASSERT_TRUE(va_r.has_value()) << va_r.error().ToString();
  const uint64_t va = *va_r;
  Ref ref(va, len);
  // pwrite the file: the GPU reads it through the mapping.
  {
    std::vector<uint64_t> w(len / 8);
    for (uint64_t i = 0; i < w.size(); ++i) w[i] = Word(18, va + 8 * i);
    USVM_ASSERT_OK((*file)->Pwrite(0, w.data(), len));
    ref.Fill(va, len, 18);
  }
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 19));
  ref.Fill(va, len, 19);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  // The GPU's stores are in the page cache.
  std::vector<uint8_t> got(len);
  auto n = (*file)->Pread(0, got.data(), len);
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(*n, len);
  EXPECT_EQ(Diff(va, got.data(), ref.bytes.data(), len), "");
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, FileBackedPrivateMappingDataCorrect) {
  Machine m;
  const uint64_t len = 128 * 1024;
  auto file = mm::SimFile::TryCreate(m.pool(), len, "data");
  ASSERT_TRUE(file.has_value());
  std::vector<uint8_t> orig(len, 0x5a);
  USVM_ASSERT_OK((*file)->Pwrite(0, orig.data(), len));
  auto va_r = m.as().Mmap(0, len, kRW, mm::kMapPrivate, *file, 0);
  ASSERT_TRUE(va_r.has_value());
  const uint64_t va = *va_r;
  Ref ref(va, len);
  std::memset(ref.bytes.data(), 0x5a, len);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len / 2, 20));
  ref.Fill(va, len / 2, 20);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // Private: the file is unchanged.
  std::vector<uint8_t> got(len);
  ASSERT_TRUE((*file)->Pread(0, got.data(), len).has_value());
  EXPECT_EQ(got, orig);
}

TEST(DriverE2e, HugetlbMemoryStaysInSystemMemory) {
  Machine m;
  ASSERT_EQ(m.pool().SetHugetlbPages(2), 2u);
  const uint64_t len = k2M;
  const uint64_t va = m.Mmap(len, 0, kRW, kAnonPrivate | mm::kMapHugetlb);
  ASSERT_NE(va, 0u);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 21));
  ref.Fill(va, len, 21);
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 5));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 5);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_ASSERT_OK(m.as().Munmap(va, len));
  EXPECT_EQ(Code(GpuRead(m.vm(), va, k4K)), Errc::kNoEnt);
}

// ---- no CPU first touch --------------------------------------------------------

TEST(DriverE2e, GpuFirstTouchOfUntouchedMemory) {
  Machine m;
  const uint64_t len = k2M + k64K;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);  // zeros
  EXPECT_TRUE(GpuMatches(m.vm(), ref)) << "untouched memory must read as zero";
  USVM_ASSERT_OK(GpuFill(m.vm(), va + k4K, len - 2 * k4K, 22));
  ref.Fill(va + k4K, len - 2 * k4K, 22);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// ---- fork ---------------------------------------------------------------------

// After fork the range's device-private pages are shared copy-on-write
// (read-only in both): the parent's GPU write must break the COW, not
// write into the page the child still maps.
TEST(DriverE2e, ForkChildSeesPreForkDataAndNotLaterGpuWrites) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref before(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 23));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len / 2, 24));  // half of it by the GPU (VRAM)
  before.Fill(va, len, 23);
  before.Fill(va, len / 2, 24);
  ASSERT_GT(DevicePages(m.as(), va, len), 0u);
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value()) << child.error().ToString();
  m.Keep(*child);
  // The parent's GPU writes after the fork.
  Ref after = before;
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 25));
  after.Fill(va, len, 25);
  EXPECT_TRUE(CpuMatches(**child, before)) << "the child sees the GPU's post-fork writes or lost pre-fork data";
  EXPECT_TRUE(GpuMatches(m.vm(), after));
  EXPECT_TRUE(CpuMatches(m.as(), after));
  // And the child's own writes do not reach the parent's GPU.
  USVM_ASSERT_OK(CpuFill(**child, va, k64K, 26));
  EXPECT_TRUE(GpuMatches(m.vm(), after));
}

TEST(DriverE2e, ForkChildReadsFirstThenParentGpuWrites) {
  Machine m;
  const uint64_t len = 512 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref before(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 27));  // no CPU first touch: all in VRAM
  before.Fill(va, len, 27);
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.Keep(*child);
  EXPECT_TRUE(CpuMatches(**child, before));
  Ref after = before;
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) after.Set64(a, after.Get64(a) + 1);
  EXPECT_TRUE(CpuMatches(**child, before));
  EXPECT_TRUE(GpuMatches(m.vm(), after));
  EXPECT_TRUE(CpuMatches(m.as(), after));
}

// ---- mremap -------------------------------------------------------------------

TEST(DriverE2e, MremapMoveGpuFollowsTheData) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len / 2, 28));
  USVM_ASSERT_OK(GpuFill(m.vm(), va + len / 2, len / 2, 29));
  ref.Fill(va, len / 2, 28);
  ref.Fill(va + len / 2, len / 2, 29);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));  // the whole range in VRAM
  const uint64_t to = m.ReserveVa(len);
  auto moved = m.as().Mremap(va, len, len, mm::kMremapMayMove | mm::kMremapFixed, to);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  ASSERT_EQ(*moved, to);
  EXPECT_FALSE(GpuPteKind(m.vm(), va).has_value()) << "GPU PTE of the old address survived mremap";
  Ref moved_ref = ref;
  moved_ref.va = to;
  EXPECT_TRUE(GpuMatches(m.vm(), moved_ref));
  EXPECT_EQ(Code(GpuRead(m.vm(), va, k4K)), Errc::kNoEnt);
  USVM_ASSERT_OK(GpuAdd(m.vm(), to, len, 2));
  for (uint64_t a = to; a < to + len; a += 8) moved_ref.Set64(a, moved_ref.Get64(a) + 2);
  EXPECT_TRUE(CpuMatches(m.as(), moved_ref));
}

TEST(DriverE2e, MremapDontUnmapLeavesAnEmptyOldMapping) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 30));
  ref.Fill(va, len, 30);
  auto moved = m.as().Mremap(va, len, len, mm::kMremapMayMove | mm::kMremapDontUnmap);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  ASSERT_NE(*moved, va);
  Ref moved_ref = ref;
  moved_ref.va = *moved;
  Ref empty(va, len);
  EXPECT_TRUE(GpuMatches(m.vm(), moved_ref));
  EXPECT_TRUE(GpuMatches(m.vm(), empty)) << "the old mapping must read as zero after DONTUNMAP";
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 31));
  empty.Fill(va, len, 31);
  EXPECT_TRUE(CpuMatches(m.as(), moved_ref));
  EXPECT_TRUE(CpuMatches(m.as(), empty));
}

TEST(DriverE2e, MremapOfReadOnlyMappingGpuWriteFailsEperm) {
  Machine m;
  const uint64_t len = 128 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 32));
  ref.Fill(va, len, 32);
  USVM_ASSERT_OK(m.as().Mprotect(va, len, mm::kProtRead));
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(Code(GpuFill(m.vm(), va, k4K, 33)), Errc::kPerm);
  const uint64_t to = m.ReserveVa(len);
  auto moved = m.as().Mremap(va, len, len, mm::kMremapMayMove | mm::kMremapFixed, to);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  Ref moved_ref = ref;
  moved_ref.va = to;
  EXPECT_TRUE(GpuMatches(m.vm(), moved_ref));
  EXPECT_EQ(Code(GpuFill(m.vm(), to + k64K, k4K, 33)), Errc::kPerm);
  EXPECT_TRUE(CpuMatches(m.as(), moved_ref));
}

// IGT "mmap-remap-ro-dontunmap": a read-only mapping the GPU read (so it
// may sit in VRAM) moved with DONTUNMAP: the new place has the data, the
// old one reads as zero; GPU writes fail with EPERM on both.
TEST(DriverE2e, MremapDontUnmapOfReadOnlyMapping) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 150));
  ref.Fill(va, len, 150);
  USVM_ASSERT_OK(m.as().Mprotect(va, len, mm::kProtRead));
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  auto moved = m.as().Mremap(va, len, len, mm::kMremapMayMove | mm::kMremapDontUnmap);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  Ref moved_ref = ref;
  moved_ref.va = *moved;
  Ref empty(va, len);
  EXPECT_TRUE(GpuMatches(m.vm(), moved_ref));
  EXPECT_TRUE(GpuMatches(m.vm(), empty));
  EXPECT_EQ(Code(GpuFill(m.vm(), *moved, 8, 1)), Errc::kPerm);
  EXPECT_EQ(Code(GpuFill(m.vm(), va, 8, 1)), Errc::kPerm);
  EXPECT_TRUE(CpuMatches(m.as(), moved_ref));
  EXPECT_TRUE(CpuMatches(m.as(), empty));
}

// ---- partial munmap -----------------------------------------------------------

void PartialMunmap(bool cpu_fault_after) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 34));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 35));
  ref.Fill(va, len, 35);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  const uint64_t hole = va + 512 * 1024, hole_len = 256 * 1024;
  const uint64_t unmaps = m.svm().stats().unmap_events;
  USVM_ASSERT_OK(m.as().Munmap(hole, hole_len));
  EXPECT_GT(m.svm().stats().unmap_events, unmaps);
  EXPECT_FALSE(GpuPteKind(m.vm(), hole).has_value());
  if (cpu_fault_after) {
    uint64_t w = 0;
    USVM_ASSERT_OK(m.as().Read(va + len - 8, &w, 8));
    EXPECT_EQ(w, ref.Get64(va + len - 8));
  }
  EXPECT_EQ(Code(GpuRead(m.vm(), hole + k4K, k4K)), Errc::kNoEnt);
  EXPECT_EQ(Code(GpuFill(m.vm(), hole, 8, 1)), Errc::kNoEnt);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, hole - va));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, hole + hole_len, va + len - hole - hole_len));
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, hole - va, 1));
  for (uint64_t a = va; a < hole; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, hole - va));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, hole + hole_len, va + len - hole - hole_len));
  EXPECT_EQ(Code(CpuRead(m.as(), hole, 8)), Errc::kFault);
  USVM_EXPECT_OK(m.svm().error());
}

TEST(DriverE2e, PartialMunmapOfTheMiddleOfARange) { PartialMunmap(false); }
TEST(DriverE2e, PartialMunmapOfTheMiddleOfARangeThenCpuFault) { PartialMunmap(true); }

// IGT "partial-remap-{cpu,no-cpu}-fault": the middle of a 2 MiB range in
// VRAM is mremap'ed elsewhere; both the moved piece and what stayed are
// intact for the GPU and the CPU; the hole is gone.
// Repeated: the collector once followed a queued partially-unmapped range
// that the fault path had already removed (its notifier gone with it) into
// RangeEvict -- an assertion, a use-after-free under TSan -- about one run
// in three. Fixed: the collector and GpuSvm::RangeEvict check the range is
// still in its tree, and the fault path leaves unmapped ranges to it.
void PartialRemapOnce(bool cpu_fault_after);
void PartialRemap(bool cpu_fault_after) {
  for (int round = 0; round < 4 && !::testing::Test::HasFailure(); ++round) PartialRemapOnce(cpu_fault_after);
}

void PartialRemapOnce(bool cpu_fault_after) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 140));
  ref.Fill(va, len, 140);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  const uint64_t piece = va + 768 * 1024, plen = 256 * 1024;
  const uint64_t to = m.ReserveVa(plen);
  auto r = m.as().Mremap(piece, plen, plen, mm::kMremapMayMove | mm::kMremapFixed, to);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  Ref moved(to, plen);
  std::memcpy(moved.bytes.data(), ref.bytes.data() + (piece - va), plen);
  if (cpu_fault_after) {
    uint64_t w = 0;
    USVM_ASSERT_OK(m.as().Read(va, &w, 8));
    EXPECT_EQ(w, ref.Get64(va));
  }
  EXPECT_EQ(Code(GpuRead(m.vm(), piece, 8)), Errc::kNoEnt);
  EXPECT_TRUE(GpuMatches(m.vm(), moved));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, piece - va));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, piece + plen, va + len - piece - plen));
  USVM_ASSERT_OK(GpuAdd(m.vm(), to, plen, 1));
  for (uint64_t a = to; a < to + plen; a += 8) moved.Set64(a, moved.Get64(a) + 1);
  EXPECT_TRUE(CpuMatches(m.as(), moved));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, piece - va));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, piece + plen, va + len - piece - plen));
}

TEST(DriverE2e, PartialRemapNoCpuFault) { PartialRemap(false); }
TEST(DriverE2e, PartialRemapCpuFault) { PartialRemap(true); }

// IGT "madvise-split-vma": attributes on the middle of a range in VRAM.
// The next faults honour them per span: the middle goes to system memory,
// the rest stays in VRAM; atomics are refused only in the kCpu span.
TEST(DriverE2e, MadviseSplitsARange) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 141));
  ref.Fill(va, len, 141);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  const uint64_t mid = va + k1M, mlen = 4 * k64K;
  AttributeUpdate u;
  u.preferred = Location::System();
  u.atomic = AtomicMode::kCpu;
  USVM_ASSERT_OK(m.svm().SetAttributes(mid, mlen, u));
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  // The first pass remakes the ranges inside the spans (64 KiB ones: the
  // pages of the old 2 MiB allocation move as each new range migrates,
  // which may evict that allocation under ranges mapped just before); the
  // second finds the steady state.
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(DevicePages(m.as(), mid, mlen), 0u) << "preferred system not honoured in the split span";
  EXPECT_EQ(GpuPteKind(m.vm(), mid), PteKind::kSystem);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  EXPECT_EQ(DevicePages(m.as(), va, mid - va), (mid - va) / k4K);
  auto at = Wait(m.vm().LaunchKernel([mid](gpu::KernelContext& k) { k.AtomicAdd(mid + k64K, 1); }));
  ASSERT_FALSE(at.has_value());
  EXPECT_EQ(at.error().code(), Errc::kAcces);
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va + 8, 5); })));
  ref.Set64(va + 8, ref.Get64(va + 8) + 5);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// IGT "processes-evict-malloc": two address spaces on one GPU, each with a
// working set of most of VRAM: they evict each other; no byte is lost.
TEST(DriverE2e, ProcessesEvictEachOther) {
  MachineConfig c;
  c.vram_bytes = 8 * k1M;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  m.AddProcess({0});
  const uint64_t len = 6 * k1M;
  std::vector<Ref> refs;
  for (uint32_t p = 0; p < 2; ++p) {
    const uint64_t va = m.ReserveVa(len);
    ASSERT_EQ(m.Mmap(len, va, kRW, kAnonPrivate, p), va);
    refs.emplace_back(va, len);
  }
  std::vector<std::thread> threads;
  std::vector<std::string> errs(2);
  for (uint32_t p = 0; p < 2; ++p) {
    threads.emplace_back([&, p] {
      Ref& ref = refs[p];
      for (uint64_t i = 0; i < 4; ++i) {
        for (uint64_t off = 0; off < len; off += k2M) {
          auto r = GpuAdd(m.vm(0, p), ref.va + off, k2M, p + 1);
          if (!r) {
            errs[p] = r.error().ToString();
            return;
          }
        }
        for (uint64_t a = ref.va; a < ref.end(); a += 8) ref.Set64(a, ref.Get64(a) + p + 1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errs[0], "");
  EXPECT_EQ(errs[1], "");
  EXPECT_GT(m.dev(0).vram_stats().evictions, 0u);
  for (uint32_t p = 0; p < 2; ++p) {
    EXPECT_TRUE(GpuMatches(m.vm(0, p), refs[p])) << "process " << p;
    EXPECT_TRUE(CpuMatches(m.as(p), refs[p])) << "process " << p;
  }
}

// ---- bad address ----------------------------------------------------------------

TEST(DriverE2e, BadAddressCancelsOnlyThatKernel) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  const uint64_t bad = m.ReserveVa(k2M);
  Ref ref(va, len);
  // The bad kernel and a good one in flight together on the same GPU.
  auto bad_launch = m.vm().LaunchKernel([bad](gpu::KernelContext& k) {
    for (uint64_t i = 0; i < 64 && !k.cancelled(); ++i) k.Store(bad + i * 8, i);
  }, {.threads = 4});
  ASSERT_TRUE(bad_launch.has_value());
  auto good = LaunchWords(m.vm(), va, len, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, Word(36, a)); });
  ASSERT_TRUE(good.has_value());
  auto rb = WaitLaunch(*bad_launch);
  ASSERT_FALSE(rb.has_value());
  EXPECT_EQ(rb.error().code(), Errc::kNoEnt) << rb.error().ToString();
  USVM_ASSERT_OK(WaitLaunch(*good));
  ref.Fill(va, len, 36);
  EXPECT_GE(m.vm().stats().faults_cancelled, 1u);
  // The GPU keeps working.
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_EXPECT_OK(m.svm().error());
  // A PROT_NONE mapping is no better.
  const uint64_t none = m.Mmap(k64K, 0, mm::kProtNone);
  EXPECT_NE(Code(GpuRead(m.vm(), none, 8)), Errc::kOk);
}

TEST(DriverE2e, AccessOutsideTheGpuWindowIsEinval) {
  MachineConfig c;
  c.svm.va_start = uint64_t{1} << 44;
  c.svm.va_size = uint64_t{1} << 46;
  Machine m(c);
  const uint64_t low = m.Mmap(k64K, uint64_t{1} << 32);  // below the window
  ASSERT_NE(low, 0u);
  EXPECT_EQ(Code(GpuRead(m.vm(), low, 8)), Errc::kInval);
  EXPECT_EQ(Code(m.vm().HandleFault(low, gpu::kAccessRead)), Errc::kInval);
  const uint64_t in = m.MmapAligned(k64K);  // 0x2000'0000'0000 is inside
  Ref ref(in, k64K);
  USVM_ASSERT_OK(GpuFill(m.vm(), in, k64K, 37));
  ref.Fill(in, k64K, 37);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// ---- eviction -------------------------------------------------------------------

TEST(DriverE2e, EvictionWithWorkingSetTwiceVram) {
  MachineConfig c;
  c.vram_bytes = 8 * k1M;
  Machine m(c);
  const uint64_t len = 16 * k1M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len / 2, 38));
  ref.Fill(va, len / 2, 38);
  for (uint64_t off = 0; off < len; off += k2M) {
    USVM_ASSERT_OK(GpuAdd(m.vm(), va + off, k2M, off + 1));
    for (uint64_t a = va + off; a < va + off + k2M; a += 8) ref.Set64(a, ref.Get64(a) + off + 1);
  }
  // A second pass over all of it, in the same order (LRU: every chunk evicted).
  for (uint64_t off = 0; off < len; off += k2M) {
    USVM_ASSERT_OK(GpuAdd(m.vm(), va + off, k2M, 3));
    for (uint64_t a = va + off; a < va + off + k2M; a += 8) ref.Set64(a, ref.Get64(a) + 3);
  }
  const VramStats vs = m.dev().vram_stats();
  EXPECT_GT(vs.evictions, 0u);
  EXPECT_GT(vs.bytes_evicted, 0u);
  EXPECT_GT(vs.bytes_to_ram, 0u);
  EXPECT_LE(vs.bytes_used, vs.bytes_total);
  EXPECT_EQ(vs.bytes_total, c.vram_bytes);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, EvictAllAndEvictForKeepTheData) {
  Machine m;
  const uint64_t len = 4 * k1M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 39));
  ref.Fill(va, len, 39);
  ASSERT_GT(m.dev().vram_stats().allocations, 0u);
  EXPECT_EQ(Code(m.dev().EvictFor(2 * m.dev().vram_stats().bytes_total)), Errc::kNoMem);
  USVM_ASSERT_OK(m.dev().EvictFor(m.dev().vram_stats().bytes_total));
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  USVM_EXPECT_OK(m.dev().EvictFor(k2M));  // nothing to evict, room enough
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  ASSERT_GT(m.dev().vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev().EvictAll(), 0u);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev().vram_stats().bytes_used, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// ---- threads ----------------------------------------------------------------------

TEST(DriverE2e, CpuThreadsLaunchingKernelsOnOneSvm) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  constexpr int kThreads = 4;
  const uint64_t len = 256 * 1024;
  std::vector<uint64_t> va(kThreads);
  for (int t = 0; t < kThreads; ++t) va[t] = m.MmapAligned(len);
  std::vector<std::string> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Ref ref(va[t], len);
      for (uint64_t i = 0; i < 6 && failures[t].empty(); ++i) {
        Vm& vm = m.vm((t + i) % 2);
        const uint64_t seed = 1000 * t + i;
        if (!CpuFill(m.as(), va[t], len, seed)) { failures[t] = "cpu fill"; break; }
        ref.Fill(va[t], len, seed);
        if (!GpuAdd(vm, va[t], len, i)) { failures[t] = "gpu add"; break; }
        for (uint64_t a = va[t]; a < va[t] + len; a += 8) ref.Set64(a, ref.Get64(a) + i);
        auto g = GpuMatches(vm, ref);
        if (!g) failures[t] = std::string("iter ") + std::to_string(i) + ": " + g.message();
        auto cp = CpuMatches(m.as(), ref);
        if (!cp) failures[t] = std::string("iter ") + std::to_string(i) + ": " + cp.message();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
}

// ---- several address spaces ---------------------------------------------------------

TEST(DriverE2e, SeveralAddressSpacesEachWithItsOwnGpus) {
  MachineConfig c;
  c.gpus = 4;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0, 1});
  m.AddProcess({2, 3});
  EXPECT_EQ(Code(m.svm(1).Attach(m.dev(2))), Errc::kExist);
  // The same VA in both, different data.
  const uint64_t len = k2M;
  const uint64_t va = m.ReserveVa(len);
  ASSERT_EQ(m.Mmap(len, va, kRW, kAnonPrivate, 0), va);
  ASSERT_EQ(m.Mmap(len, va, kRW, kAnonPrivate, 1), va);
  Ref r0(va, len), r1(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0, 0), va, len / 2, 40));
  USVM_ASSERT_OK(GpuFill(m.vm(2, 1), va, len / 2, 41));
  USVM_ASSERT_OK(GpuFill(m.vm(1, 0), va + len / 2, len / 2, 42));
  USVM_ASSERT_OK(GpuFill(m.vm(3, 1), va + len / 2, len / 2, 43));
  r0.Fill(va, len / 2, 40);
  r1.Fill(va, len / 2, 41);
  r0.Fill(va + len / 2, len / 2, 42);
  r1.Fill(va + len / 2, len / 2, 43);
  for (uint32_t g : {0u, 1u}) EXPECT_TRUE(GpuMatches(m.vm(g, 0), r0)) << "GPU " << g;
  for (uint32_t g : {2u, 3u}) EXPECT_TRUE(GpuMatches(m.vm(g, 1), r1)) << "GPU " << g;
  EXPECT_TRUE(CpuMatches(m.as(0), r0));
  EXPECT_TRUE(CpuMatches(m.as(1), r1));
  // Closing one leaves the other intact.
  m.svm(0).Close();
  EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(3, 1), r1));
  EXPECT_TRUE(CpuMatches(m.as(0), r0));
}

// One GPU runs two address spaces (a context each): same VA, different
// data, invalidations of one do not touch the other.
TEST(DriverE2e, OneGpuServesTwoAddressSpaces) {
  MachineConfig c;
  c.gpus = 2;
  c.default_process = false;
  Machine m(c);
  SvmConfig sc;
  sc.placement = Placement::kSystem;  // both GPUs keep their PTEs (system pages)
  m.AddProcess({0, 1}, sc);
  m.AddProcess({0, 1}, sc);
  ASSERT_NE(&m.vm(0, 0).context(), &m.vm(0, 1).context());
  const uint64_t len = k2M;
  const uint64_t va = m.ReserveVa(len);
  ASSERT_EQ(m.Mmap(len, va, kRW, kAnonPrivate, 0), va);
  ASSERT_EQ(m.Mmap(len, va, kRW, kAnonPrivate, 1), va);
  Ref r0(va, len), r1(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(1), va, len, 70));
  r1.Fill(va, len, 70);
  USVM_ASSERT_OK(GpuFill(m.vm(0, 0), va, len, 71));
  r0.Fill(va, len, 71);
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 1), va, len / 2, 1));
  for (uint64_t a = va; a < va + len / 2; a += 8) r1.Set64(a, r1.Get64(a) + 1);
  USVM_ASSERT_OK(GpuAdd(m.vm(1, 1), va + len / 2, len / 2, 2));
  for (uint64_t a = va + len / 2; a < va + len; a += 8) r1.Set64(a, r1.Get64(a) + 2);
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_TRUE(GpuMatches(m.vm(g, 0), r0)) << "GPU " << g << " process 0";
    EXPECT_TRUE(GpuMatches(m.vm(g, 1), r1)) << "GPU " << g << " process 1";
  }
  // munmap in process 0 zaps process 0's contexts only.
  for (uint32_t g = 0; g < 2; ++g) ASSERT_TRUE(GpuPteKind(m.vm(g, 1), va).has_value()) << "GPU " << g;
  USVM_ASSERT_OK(m.as(0).Munmap(va, len));
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_FALSE(GpuPteKind(m.vm(g, 0), va).has_value()) << "GPU " << g;
    EXPECT_TRUE(GpuPteKind(m.vm(g, 1), va).has_value()) << "GPU " << g;
    EXPECT_EQ(Code(GpuRead(m.vm(g, 0), va, 8)), Errc::kNoEnt);
    EXPECT_TRUE(GpuMatches(m.vm(g, 1), r1)) << "GPU " << g;
  }
  EXPECT_TRUE(CpuMatches(m.as(1), r1));
  // Closing process 1's Svm leaves no device page; GPU 0 still serves a
  // new buffer of process 0.
  USVM_ASSERT_OK(m.svm(1).SetAttributes(va, len, Pref(Location::Device(0))));
  EXPECT_TRUE(GpuMatches(m.vm(0, 1), r1));
  ASSERT_GT(m.dev(0).vram_stats().allocations, 0u);
  m.svm(1).Close();
  EXPECT_EQ(m.dev(0).vram_stats().allocations + m.dev(1).vram_stats().allocations, 0u);
  EXPECT_TRUE(CpuMatches(m.as(1), r1));
  const uint64_t b = m.MmapAligned(k64K, 0);
  Ref rb(b, k64K);
  USVM_ASSERT_OK(GpuFill(m.vm(0, 0), b, k64K, 72));
  rb.Fill(b, k64K, 72);
  EXPECT_TRUE(CpuMatches(m.as(0), rb));
}

// ---- explicit binds -----------------------------------------------------------------

TEST(DriverE2e, ExplicitBindServesGpuAccessWithoutSvmRanges) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 44));
  ref.Fill(va, len, 44);
  Vm& vm = m.vm();
  auto h = vm.Bind(va, len);
  ASSERT_TRUE(h.has_value()) << h.error().ToString();
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_EQ(vm.stats().binds, 1u);
  EXPECT_TRUE(GpuPteKind(m.vm(), va).has_value()) << "Bind maps before any fault";
  // Mapped up front: no fault, no SVM range.
  auto out = std::make_shared<std::vector<uint64_t>>(len / 8);
  uint64_t* p = out->data();
  auto l = LaunchWords(vm, va, len, [p](gpu::KernelContext& k, uint64_t i, uint64_t a) { p[i] = k.Load(a); }, false);
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  EXPECT_EQ(l->stats().faults, 0u);
  EXPECT_EQ(Diff(va, reinterpret_cast<uint8_t*>(p), ref.bytes.data(), len), "");
  USVM_ASSERT_OK(GpuFill(vm, va, len, 45));
  ref.Fill(va, len, 45);
  EXPECT_EQ(m.svm().stats().ranges, 0u);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u) << "a bind maps system pages";
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // mprotect invalidates; the next GPU fault (a plain launch, not through
  // the Vm) revalidates.
  const VmStats s0 = vm.stats();
  USVM_ASSERT_OK(m.as().Mprotect(va, len, mm::kProtRead));
  EXPECT_EQ(vm.BindValid(*h).value_or(true), false);
  EXPECT_GT(vm.stats().bind_invalidations, s0.bind_invalidations);
  EXPECT_FALSE(GpuPteKind(m.vm(), va).has_value()) << "invalidated bind still mapped";
  USVM_ASSERT_OK(m.as().Mprotect(va, len, kRW));
  l = LaunchWords(vm, va, len / 2, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, Word(47, a)); }, false);
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  ref.Fill(va, len / 2, 47);
  EXPECT_GT(l->stats().faults, 0u);
  EXPECT_GT(vm.stats().rebinds, s0.rebinds);
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_EQ(m.svm().stats().ranges, 0u) << "faults inside a bind made SVM ranges";
  EXPECT_TRUE(GpuMatches(vm, ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // munmap of half: that half fails; once unbound, the rest is served by SVM.
  USVM_ASSERT_OK(m.as().Munmap(va + len / 2, len / 2));
  EXPECT_FALSE(GpuPteKind(m.vm(), va + len / 2).has_value());
  EXPECT_NE(Code(GpuRead(vm, va + len / 2, k4K)), Errc::kOk);
  EXPECT_EQ(m.svm().stats().ranges, 0u);
  USVM_ASSERT_OK(vm.Unbind(*h));
  EXPECT_EQ(Code(vm.Unbind(*h)), Errc::kNoEnt);
  EXPECT_EQ(Code(vm.BindValid(*h)), Errc::kNoEnt);
  EXPECT_EQ(vm.stats().unbinds, 1u);
  EXPECT_FALSE(GpuPteKind(m.vm(), va).has_value()) << "Unbind left PTEs";
  EXPECT_TRUE(GpuMatchesSpan(vm, ref, va, len / 2));
  EXPECT_GT(m.svm().stats().ranges, 0u);
  EXPECT_EQ(Code(GpuRead(vm, va + len / 2, k4K)), Errc::kNoEnt);
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, len / 2));
}

TEST(DriverE2e, BindErrors) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Vm& vm = m.vm();
  auto h = vm.Bind(va, len);
  ASSERT_TRUE(h.has_value()) << h.error().ToString();
  EXPECT_EQ(Code(vm.Bind(va + k64K, k64K)), Errc::kExist);
  EXPECT_EQ(Code(vm.Bind(va + len + 8, k4K)), Errc::kInval);
  EXPECT_EQ(Code(vm.Bind(va + len, 0)), Errc::kInval);
  EXPECT_EQ(Code(vm.Unbind(*h + 1000)), Errc::kNoEnt);
  // No VMA under a bind: EFAULT, as pinning a userptr there (a GPU fault
  // outside any VMA is ENOENT, find-or-insert's answer).
  EXPECT_EQ(Code(vm.Bind(m.ReserveVa(k64K), k64K)), Errc::kFault);
  // A write bind of a read-only mapping: EPERM (as a write fault).
  const uint64_t ro = m.Mmap(k64K, 0, mm::kProtRead);
  EXPECT_EQ(Code(vm.Bind(ro, k64K)), Errc::kPerm);
  EXPECT_TRUE(vm.Bind(ro, k64K, {.read_only = true}).has_value());
}

// A writable bind whose mapping became read-only still serves GPU reads;
// writes fail with EPERM.
TEST(DriverE2e, BindOverMappingMadeReadOnlyStillReads) {
  Machine m;
  const uint64_t len = 64 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 46));
  ref.Fill(va, len, 46);
  auto h = m.vm().Bind(va, len);
  ASSERT_TRUE(h.has_value());
  USVM_ASSERT_OK(m.as().Mprotect(va, len, mm::kProtRead));
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(Code(GpuFill(m.vm(), va, 8, 1)), Errc::kPerm);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverE2e, ReadOnlyBindRefusesGpuWrites) {
  Machine m;
  const uint64_t len = 64 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 48));
  ref.Fill(va, len, 48);
  auto h = m.vm().Bind(va, len, {.read_only = true});
  ASSERT_TRUE(h.has_value());
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_EQ(Code(GpuFill(m.vm(), va, 8, 49)), Errc::kPerm);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// ---- userptr --------------------------------------------------------------------------

TEST(DriverE2e, UserptrInvalidatedByCpuChangeRevalidatedByLaunch) {
  Machine m;
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 50));
  ref.Fill(va, len, 50);
  Vm& vm = m.vm();
  auto h = vm.Bind(va, len, {.userptr = true});
  ASSERT_TRUE(h.has_value()) << h.error().ToString();
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_TRUE(GpuMatches(vm, ref));
  // A CPU write to an already writable private page changes no PTE: the
  // userptr stays valid and the GPU sees the bytes (same frames).
  USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 51));
  ref.Fill(va, k64K, 51);
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_TRUE(GpuMatches(vm, ref));
  // mprotect there and back: invalidated.
  const VmStats s0 = vm.stats();
  USVM_ASSERT_OK(m.as().Mprotect(va, len, mm::kProtRead));
  USVM_ASSERT_OK(m.as().Mprotect(va, len, kRW));
  EXPECT_EQ(vm.BindValid(*h).value_or(true), false);
  EXPECT_GT(vm.stats().bind_invalidations, s0.bind_invalidations);
  // The launch through the Vm revalidates before the kernel runs: no fault.
  auto l = LaunchWords(vm, va, len, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, Word(52, a)); });
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  ref.Fill(va, len, 52);
  EXPECT_EQ(l->stats().faults, 0u) << "userptr not revalidated by LaunchKernel";
  EXPECT_GT(vm.stats().rebinds, s0.rebinds);
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_EQ(m.svm().stats().ranges, 0u);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // MADV_DONTNEED drops the pages: invalidated; RevalidateUserptrs maps the
  // new (zero) pages.
  USVM_ASSERT_OK(m.as().Madvise(va, k64K, mm::kMadvDontNeed));
  ref.Zero(va, k64K);
  EXPECT_EQ(vm.BindValid(*h).value_or(true), false);
  USVM_ASSERT_OK(vm.RevalidateUserptrs());
  EXPECT_EQ(vm.BindValid(*h).value_or(false), true);
  EXPECT_TRUE(GpuMatches(vm, ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Fork write-protects the parent's pages (a change that unmaps nothing):
// the userptr must be invalidated, or after the parent's CPU write breaks
// copy-on-write the GPU would keep using the old frame.
TEST(DriverE2e, UserptrFollowsCopyOnWriteAfterFork) {
  Machine m;
  const uint64_t len = 64 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 53));
  ref.Fill(va, len, 53);
  auto h = m.vm().Bind(va, len, {.userptr = true});
  ASSERT_TRUE(h.has_value());
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.Keep(*child);
  Ref child_ref = ref;
  EXPECT_EQ(m.vm().BindValid(*h).value_or(true), false) << "fork's write-protect did not invalidate";
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 54));  // breaks COW: new frames
  ref.Fill(va, len, 54);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len / 2, 55));
  ref.Fill(va, len / 2, 55);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  EXPECT_TRUE(CpuMatches(**child, child_ref));
}

// ---- several GPUs -----------------------------------------------------------------------

TEST(DriverE2e, TwoGpusShareABufferAndOneMunmapReachesBoth) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;  // GPU 1 maps GPU 0's VRAM: both have PTEs
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len / 2, 56));
  USVM_ASSERT_OK(GpuFill(m.vm(1), va + len / 2, len / 2, 57));
  ref.Fill(va, len / 2, 56);
  ref.Fill(va + len / 2, len / 2, 57);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(GpuPteKind(m.vm(0), va).has_value());
  EXPECT_TRUE(GpuPteKind(m.vm(1), va).has_value());
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_ASSERT_OK(m.as().Munmap(va, len));
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_FALSE(GpuPteKind(m.vm(g), va).has_value()) << "GPU " << g;
    EXPECT_FALSE(GpuPteKind(m.vm(g), va + len / 2).has_value()) << "GPU " << g;
    EXPECT_EQ(Code(GpuRead(m.vm(g), va, 8)), Errc::kNoEnt) << "GPU " << g;
  }
  Eventually([&] { return m.svm().stats().ranges == 0; });
  Eventually([&] { return m.dev(0).vram_stats().allocations + m.dev(1).vram_stats().allocations == 0; });
}

TEST(DriverE2e, FourGpusShareABuffer) {
  MachineConfig c;
  c.gpus = 4;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = 4 * k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 58));
  ref.Fill(va, len, 58);
  for (uint32_t g = 0; g < 4; ++g) {
    USVM_ASSERT_OK(GpuAdd(m.vm(g), va + g * k2M, k2M, g + 1));
    for (uint64_t a = va + g * k2M; a < va + (g + 1) * k2M; a += 8) ref.Set64(a, ref.Get64(a) + g + 1);
  }
  for (uint32_t g = 0; g < 4; ++g) EXPECT_TRUE(GpuMatches(m.vm(g), ref)) << "GPU " << g;
  // Every GPU adds to every word (one after the other).
  for (uint32_t g = 0; g < 4; ++g) USVM_ASSERT_OK(GpuAdd(m.vm(g), va, len, 10));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 40);
  for (uint32_t g = 0; g < 4; ++g) EXPECT_TRUE(GpuMatches(m.vm(g), ref)) << "GPU " << g;
  // One munmap of the middle reaches all four.
  USVM_ASSERT_OK(m.as().Munmap(va + k2M, 2 * k2M));
  for (uint32_t g = 0; g < 4; ++g) {
    EXPECT_FALSE(GpuPteKind(m.vm(g), va + k2M).has_value()) << "GPU " << g;
    EXPECT_FALSE(GpuPteKind(m.vm(g), va + 2 * k2M).has_value()) << "GPU " << g;
    EXPECT_EQ(Code(GpuRead(m.vm(g), va + 2 * k2M, 8)), Errc::kNoEnt) << "GPU " << g;
    EXPECT_TRUE(GpuMatchesSpan(m.vm(g), ref, va, k2M)) << "GPU " << g;
    EXPECT_TRUE(GpuMatchesSpan(m.vm(g), ref, va + 3 * k2M, k2M)) << "GPU " << g;
  }
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, k2M));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va + 3 * k2M, k2M));
}

// A page in GPU 0's VRAM touched by GPU 1 under each PeerPolicy.
struct PeerCase {
  PeerPolicy policy;
  bool shared_owner;
  bool peer_access;
};

class DriverPeerTest : public ::testing::TestWithParam<PeerCase> {};

TEST_P(DriverPeerTest, PageInGpuAVramTouchedByGpuB) {
  const PeerCase pc = GetParam();
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = pc.shared_owner;
  c.peer_access = pc.peer_access;
  c.svm.peer_policy = pc.policy;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 60));
  ref.Fill(va, len, 60);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  ASSERT_EQ(GpuPteKind(m.vm(0), va), PteKind::kLocalVram);
  ASSERT_GT(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  const bool can_map = pc.shared_owner && pc.peer_access;
  switch (pc.policy) {
    case PeerPolicy::kMapRemote:
      if (can_map) {
        EXPECT_GT(m.vm(1).stats().peer_maps, 0u);
        EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kPeerVram);
        EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
        EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
        EXPECT_GT(m.dev(0).vram_stats().allocations, 0u);
      } else {
        // Not mappable: "else migrate to system memory" (driver.h).
        EXPECT_EQ(m.vm(1).stats().peer_maps, 0u);
        EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kSystem);
        EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
        EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
      }
      break;
    case PeerPolicy::kMigrate:
      EXPECT_EQ(m.vm(1).stats().peer_maps, 0u);
      EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kLocalVram);
      EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
      EXPECT_GT(m.dev(1).vram_stats().allocations, 0u);
      EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
      EXPECT_FALSE(GpuPteKind(m.vm(0), va).has_value()) << "GPU 0 still maps the moved range";
      break;
    case PeerPolicy::kSystem:
      EXPECT_EQ(m.vm(1).stats().peer_maps, 0u);
      EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kSystem);
      EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
      EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
      EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
      break;
  }
  // Both GPUs write again, both and the CPU see every byte.
  USVM_ASSERT_OK(GpuAdd(m.vm(1), va, len / 2, 1));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va + len / 2, len / 2, 2));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + (a < va + len / 2 ? 1 : 2));
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

INSTANTIATE_TEST_SUITE_P(Policies, DriverPeerTest,
                         ::testing::Values(PeerCase{PeerPolicy::kMapRemote, true, true},
                                           PeerCase{PeerPolicy::kMapRemote, false, true},
                                           PeerCase{PeerPolicy::kMapRemote, true, false},
                                           PeerCase{PeerPolicy::kMigrate, true, true},
                                           PeerCase{PeerPolicy::kSystem, true, true}),
                         [](const ::testing::TestParamInfo<PeerCase>& i) {
                           std::string n = PeerPolicyName(i.param.policy);
                           for (char& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n +
                                  (i.param.shared_owner ? "_SharedOwner" : "_OwnOwners") +
                                  (i.param.peer_access ? "_Peer" : "_NoPeer");
                         });

TEST(DriverE2e, AccessInPlaceMapsPeerVramDespiteMigratePolicy) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  c.svm.peer_policy = PeerPolicy::kMigrate;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, InPlace(true)));
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 61));
  ref.Fill(va, len, 61);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kPeerVram);
  EXPECT_GT(m.vm(1).stats().peer_maps, 0u);
  EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// ---- attach / detach / close ---------------------------------------------------------------

TEST(DriverE2e, AttachAndDetach) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  EXPECT_EQ(Code(m.svm().Attach(m.dev(0))), Errc::kExist);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(1), va, len, 62));
  ref.Fill(va, len, 62);
  USVM_ASSERT_OK(m.svm().Detach(m.dev(1)));
  EXPECT_EQ(m.svm().vm(1), nullptr);
  EXPECT_EQ(Code(m.svm().Detach(m.dev(1))), Errc::kNoEnt);
  EXPECT_FALSE(GpuPteKind(m.dev(1), va).has_value()) << "Detach left the page table";
  // The data GPU 1 wrote is still there, for GPU 0 and the CPU.
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // Re-attach: it works again.
  auto vm1 = m.svm().Attach(m.dev(1));
  ASSERT_TRUE(vm1.has_value()) << vm1.error().ToString();
  EXPECT_TRUE(GpuMatches(**vm1, ref));
}

TEST(DriverE2e, VmCloseLeavesNoDevicePageAndFreesEveryFrame) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 2 * k2M;
  const uint64_t a = m.MmapAligned(len), b = m.MmapAligned(len);
  Ref ra(a, len), rb(b, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), a, len, 63));
  USVM_ASSERT_OK(GpuFill(m.vm(1), b, len, 64));
  ra.Fill(a, len, 63);
  rb.Fill(b, len, 64);
  const uint64_t bind_va = m.MmapAligned(k64K);
  ASSERT_TRUE(m.vm(0).Bind(bind_va, k64K).has_value());
  ASSERT_GT(m.dev(0).vram_stats().allocations, 0u);
  ASSERT_GT(m.dev(1).vram_stats().allocations, 0u);
  m.svm().Close();
  EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(0).vram_stats().bytes_used, 0u);
  EXPECT_EQ(m.svm().stats().ranges, 0u);
  EXPECT_EQ(DevicePages(m.as(), a, len) + DevicePages(m.as(), b, len), 0u);
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_FALSE(GpuPteKind(m.dev(g), a).has_value());
    EXPECT_FALSE(GpuPteKind(m.dev(g), b).has_value());
    EXPECT_FALSE(GpuPteKind(m.dev(g), bind_va).has_value());
  }
  // The data was evicted home, not lost.
  EXPECT_TRUE(CpuMatches(m.as(), ra));
  EXPECT_TRUE(CpuMatches(m.as(), rb));
  m.svm().Close();  // idempotent
  EXPECT_EQ(Code(m.svm().Attach(m.dev(0))), Errc::kInval);
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

TEST(DriverE2e, AddressSpaceExitWithDataInVramThenClose) {
  Machine m;
  const uint64_t len = 2 * k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 65));
  ASSERT_GT(m.dev().vram_stats().allocations, 0u);
  m.as().Exit();
  // The address space is gone: its device pages with it; faults fail.
  Eventually([&] { return m.dev().vram_stats().allocations == 0; });
  EXPECT_NE(Code(GpuRead(m.vm(), va, 8)), Errc::kOk);
  m.svm().Close();
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

TEST(DriverE2e, TeardownAfterHeavyUseFreesEveryFrame) {
  MachineConfig c;
  c.gpus = 2;
  c.vram_bytes = 8 * k1M;
  Machine m(c);
  const uint64_t len = 12 * k1M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 66));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len, 1));
  USVM_ASSERT_OK(GpuAdd(m.vm(1), va, len / 2, 1));
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.Keep(*child);
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len / 2, 1));
  USVM_ASSERT_OK(m.as().Munmap(va + k2M, k2M));
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

}  // namespace
}  // namespace usvm::driver::testing
