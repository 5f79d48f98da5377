// The driver under injected failures (Env fault points) and unusual
// lifetimes: the collector failing (the VM error state), VRAM allocation,
// copies, page-table allocation and range allocation failing, a Device
// destroyed before its Svm, Close with kernels in flight. Data must stay
// byte-exact wherever an operation reports success.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

using gpu::PteKind;

constexpr uint64_t k1M = uint64_t{1} << 20;

// "driver.gc": the collector fails to remove a range; the VM enters its
// error state and every later fault is cancelled with it.
TEST(DriverFaults, CollectorFailureSetsTheVmErrorState) {
  MachineConfig c;
  c.svm.gc_worker = false;
  Machine m(c);
  const uint64_t a = m.MmapAligned(k64K), b = m.MmapAligned(k64K);
  USVM_ASSERT_OK(GpuFill(m.vm(), a, k64K, 1));
  USVM_EXPECT_OK(m.svm().error());
  USVM_ASSERT_OK(m.as().Munmap(a, k64K));
  m.env().faults().FailNth("driver.gc", 1);
  auto r = m.svm().CollectGarbage();
  m.env().faults().ClearAll();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kIo);
  EXPECT_EQ(Code(m.svm().error()), Errc::kIo);
  // Every later fault fails with the error state.
  EXPECT_EQ(Code(GpuFill(m.vm(), b, k64K, 2)), Errc::kIo);
  // The CPU is unaffected; Close still cleans up.
  Ref ref(b, k64K);
  USVM_ASSERT_OK(CpuFill(m.as(), b, k64K, 3));
  ref.Fill(b, k64K, 3);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  m.svm().Close();
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
}

// "gpu.vram_alloc" always failing: no device memory, ever. Plain accesses
// are served from system memory; atomics fail with EACCES.
TEST(DriverFaults, NoVramAllocationFallsBackToSystemMemory) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 4));
  ref.Fill(va, len, 4);
  m.env().faults().FailEvery("gpu.vram_alloc", 1);
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), PteKind::kSystem);
  EXPECT_GT(m.vm().stats().migrate_failures, 0u);
  auto at = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); }));
  ASSERT_FALSE(at.has_value());
  EXPECT_EQ(at.error().code(), Errc::kAcces) << at.error().ToString();
  m.env().faults().ClearAll();
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // With VRAM back, the atomic works (and migrates).
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
  ref.Set64(va, ref.Get64(va) + 1);
  EXPECT_TRUE(InDeviceMemory(m.as(), va));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// "gpu.copy" failing now and then while migrating to VRAM: a failed
// migration leaves the data where it was; nothing is lost.
TEST(DriverFaults, CopyFailuresDuringMigrationLoseNothing) {
  Machine m;
  const uint64_t len = 8 * k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 5));
  ref.Fill(va, len, 5);
  m.env().faults().FailEvery("gpu.copy", 3);
  for (uint64_t off = 0; off < len; off += k2M) {
    USVM_ASSERT_OK(GpuAdd(m.vm(), va + off, k2M, off / k2M + 1));
    for (uint64_t a = va + off; a < va + off + k2M; a += 8) ref.Set64(a, ref.Get64(a) + off / k2M + 1);
  }
  m.env().faults().ClearAll();
  EXPECT_GT(m.vm().stats().migrate_failures, 0u) << "no copy failed: the fault point was not reached";
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// "gpu.pt_alloc": the GPU page table cannot grow: the fault fails with
// ENOMEM, the kernel is cancelled; the next launch works.
TEST(DriverFaults, PageTableAllocationFailureCancelsTheKernelOnly) {
  Machine m;
  const uint64_t va = m.MmapAligned(k64K);
  m.env().faults().FailEvery("gpu.pt_alloc", 1);
  auto r = GpuFill(m.vm(), va, k64K, 6);
  m.env().faults().ClearAll();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kNoMem) << r.error().ToString();
  Ref ref(va, k64K);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, k64K, 7));
  ref.Fill(va, k64K, 7);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_EXPECT_OK(m.svm().error());
}

// "gpusvm.range_alloc" / "gpusvm.notifier_alloc": ENOMEM for that fault.
TEST(DriverFaults, RangeAndNotifierAllocationFailures) {
  Machine m;
  uint64_t far = uint64_t{0x300000000000};
  for (const char* site : {"gpusvm.range_alloc", "gpusvm.notifier_alloc"}) {
    // A fresh notifier-sized region each time (notifiers are 512 MiB).
    const uint64_t va = m.Mmap(k64K, far);
    far += uint64_t{1} << 30;
    m.env().faults().FailEvery(site, 1);
    auto r = GpuRead(m.vm(), va, k64K);
    m.env().faults().ClearAll();
    ASSERT_FALSE(r.has_value()) << site;
    EXPECT_EQ(r.error().code(), Errc::kNoMem) << site << ": " << r.error().ToString();
    Ref ref(va, k64K);
    USVM_ASSERT_OK(GpuFill(m.vm(), va, k64K, 8));
    ref.Fill(va, k64K, 8);
    EXPECT_TRUE(CpuMatches(m.as(), ref)) << site;
  }
  USVM_EXPECT_OK(m.svm().error());
}

// A Device destroyed before the Svm detaches itself; what it held in VRAM
// comes home intact, the other GPU keeps working.
TEST(DriverFaults, DeviceDestroyedBeforeItsSvm) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t a = m.MmapAligned(len), b = m.MmapAligned(len);
  Ref ra(a, len), rb(b, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), a, len, 9));
  USVM_ASSERT_OK(GpuFill(m.vm(1), b, len, 10));
  ra.Fill(a, len, 9);
  rb.Fill(b, len, 10);
  ASSERT_EQ(DevicePages(m.as(), b, len), len / k4K);
  m.DestroyDevice(1);
  EXPECT_EQ(m.svm().vm(1), nullptr);
  EXPECT_EQ(DevicePages(m.as(), b, len), 0u);
  EXPECT_TRUE(GpuMatches(m.vm(0), rb));
  EXPECT_TRUE(GpuMatches(m.vm(0), ra));
  EXPECT_TRUE(CpuMatches(m.as(), ra));
  EXPECT_TRUE(CpuMatches(m.as(), rb));
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// Close while kernels are faulting: every kernel ends (completes or is
// cancelled), nothing hangs, no device page is left.
TEST(DriverFaults, CloseWithKernelsInFlight) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 8 * k2M;
  const uint64_t va = m.MmapAligned(len);
  std::vector<gpu::Launch> launches;
  std::vector<uint64_t> chunk;
  for (uint32_t g = 0; g < 2; ++g) {
    for (uint64_t off = g * len / 2; off < (g + 1) * len / 2; off += k2M) {
      auto l = LaunchWords(m.vm(g), va + off, k2M, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, a); });
      ASSERT_TRUE(l.has_value());
      launches.push_back(*l);
      chunk.push_back(va + off);
    }
  }
  m.svm().Close();
  size_t ok = 0;
  std::vector<bool> done;
  for (auto& l : launches) {
    done.push_back(WaitLaunch(l).has_value());
    ok += done.back();
  }
  EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  // The kernels that completed wrote their chunk completely.
  for (size_t i = 0; i < launches.size(); ++i) {
    if (!done[i]) continue;
    Ref want(chunk[i], k2M);
    for (uint64_t a = chunk[i]; a < chunk[i] + k2M; a += 8) want.Set64(a, a);
    EXPECT_TRUE(CpuMatches(m.as(), want)) << "completed kernel " << i;
  }
  printf("close in flight: %zu of %zu kernels completed\n", ok, launches.size());
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// The address space exits while kernels fault on it: they end with an
// error (or complete), nothing hangs, no device page is left.
TEST(DriverFaults, ExitWithKernelsInFlight) {
  Machine m;
  const uint64_t len = 4 * k2M;
  const uint64_t va = m.MmapAligned(len);
  std::vector<gpu::Launch> launches;
  for (uint64_t off = 0; off < len; off += k2M) {
    auto l = LaunchWords(m.vm(), va + off, k2M, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, a); });
    ASSERT_TRUE(l.has_value());
    launches.push_back(*l);
  }
  m.as().Exit();
  for (auto& l : launches) (void)WaitLaunch(l);
  EXPECT_NE(Code(GpuRead(m.vm(), va, 8)), Errc::kOk);
  Eventually([&] { return m.dev().vram_stats().allocations == 0; });
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// GPU 1 maps GPU 0's VRAM over the peer link; GPU 0 goes away. Its pages
// come home first and GPU 1's peer mappings of them are gone: GPU 1 reads
// the data from system memory.
TEST(DriverFaults, DeviceDestroyedWhileAPeerMapsItsVram) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 11));
  ref.Fill(va, len, 11);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  ASSERT_EQ(GpuPteKind(m.vm(1), va), PteKind::kPeerVram);
  m.DestroyDevice(0);
  EXPECT_NE(GpuPteKind(m.vm(1), va), PteKind::kPeerVram) << "peer PTE into a destroyed GPU";
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u) << "device pages of a destroyed GPU";
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// A device destroyed while its kernels fault: they end (ECANCELED or
// done), their fences stay valid, the Svm and the other GPU go on.
TEST(DriverFaults, DeviceDestroyedWithKernelsInFlight) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 8 * k2M;
  const uint64_t va = m.MmapAligned(len);
  std::vector<gpu::Launch> launches;
  for (uint64_t off = 0; off < len; off += k2M) {
    auto l = LaunchWords(m.vm(1), va + off, k2M, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, a); });
    ASSERT_TRUE(l.has_value());
    launches.push_back(*l);
  }
  m.DestroyDevice(1);
  for (auto& l : launches) (void)WaitLaunch(l);
  EXPECT_EQ(m.svm().vm(1), nullptr);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u) << "device pages of a destroyed GPU";
  auto got = GpuRead(m.vm(0), va, len);
  ASSERT_TRUE(got.has_value()) << got.error().ToString();
  for (uint64_t i = 0; i < len / 8; ++i) {
    uint64_t w;
    std::memcpy(&w, got->data() + i * 8, 8);
    ASSERT_TRUE(w == 0 || w == va + i * 8) << "word " << i;
  }
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// "gpu.copy" failing while pages leave VRAM (a CPU touch, an eviction):
// the move fails, the data stays where it was; nothing is lost, and once
// copies work again everything comes home intact.
TEST(DriverFaults, CopyFailuresOnTheWayHomeLoseNothing) {
  Machine m;
  const uint64_t len = 2 * k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 12));
  ref.Fill(va, len, 12);
  ASSERT_EQ(DevicePages(m.as(), va, len), len / k4K);
  m.env().faults().FailEvery("gpu.copy", 1);
  uint64_t w = 0;
  auto r = m.as().Read(va + 8, &w, 8);
  if (r) {
    EXPECT_EQ(w, ref.Get64(va + 8));
  }
  const uint64_t stayed = m.dev().EvictAll();
  printf("copies failing: CPU read %s, EvictAll left %llu allocations, %llu device pages\n",
         r ? "ok" : r.error().ToString().c_str(), (unsigned long long)stayed,
         (unsigned long long)DevicePages(m.as(), va, len));
  m.env().faults().ClearAll();
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_EXPECT_OK(m.svm().error());
}

// "gpusvm.dma_map" / "gpusvm.device_map" failing once: that access may
// fail (or be retried); afterwards everything works and no byte is wrong.
TEST(DriverFaults, MapFailuresOnce) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  for (const char* site : {"gpusvm.dma_map", "gpusvm.device_map"}) {
    const uint64_t len = k2M;
    const uint64_t va = m.MmapAligned(len);
    Ref ref(va, len);
    USVM_ASSERT_OK(CpuFill(m.as(), va, len, 13));
    ref.Fill(va, len, 13);
    USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len / 2, 1));  // half in VRAM 0
    for (uint64_t a = va; a < va + len / 2; a += 8) ref.Set64(a, ref.Get64(a) + 1);
    m.env().faults().FailNth(site, 1);
    (void)GpuRead(m.vm(1), va, len);  // peer / system mappings of GPU 1
    (void)GpuRead(m.vm(0), va, len);
    m.env().faults().ClearAll();
    EXPECT_TRUE(GpuMatches(m.vm(1), ref)) << site;
    EXPECT_TRUE(GpuMatches(m.vm(0), ref)) << site;
    EXPECT_TRUE(CpuMatches(m.as(), ref)) << site;
  }
  USVM_EXPECT_OK(m.svm().error());
}

// Close with the collector's queue full (ranges just unmapped, partly and
// wholly): Close drains it; no device page, no leaked frame.
TEST(DriverFaults, CloseWithAFullCollectorQueue) {
  for (bool worker : {true, false}) {
    MachineConfig c;
    c.svm.gc_worker = worker;
    Machine m(c);
    std::vector<uint64_t> bufs;
    for (int i = 0; i < 6; ++i) {
      const uint64_t va = m.MmapAligned(k2M);
      USVM_ASSERT_OK(GpuFill(m.vm(), va, k2M, i + 1));
      bufs.push_back(va);
    }
    for (int i = 0; i < 6; ++i) {
      if (i % 2) {
        USVM_ASSERT_OK(m.as().Munmap(bufs[i], k2M));
      } else {
        USVM_ASSERT_OK(m.as().Munmap(bufs[i] + k64K, k64K));
      }
    }
    m.svm().Close();
    EXPECT_EQ(m.dev().vram_stats().allocations, 0u) << "worker " << worker;
    EXPECT_EQ(m.svm().stats().ranges, 0u) << "worker " << worker;
    for (int i = 0; i < 6; i += 2) {
      Ref ref(bufs[i], k64K);
      ref.Fill(bufs[i], k64K, i + 1);
      EXPECT_TRUE(CpuMatches(m.as(), ref)) << "worker " << worker;
    }
    m.Teardown();
    EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
  }
}

// gc_worker = false: a partial munmap queues the range; a GPU fault on what
// is left of it comes before any collection; then the collector runs.
// Done one after the other, no thread racing.
TEST(DriverFaults, PartialMunmapThenFaultBeforeCollection) {
  for (bool cpu_first : {false, true}) {
    MachineConfig c;
    c.svm.gc_worker = false;
    Machine m(c);
    const uint64_t len = k2M;
    const uint64_t va = m.MmapAligned(len);
    Ref ref(va, len);
    USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 14));
    ref.Fill(va, len, 14);
    USVM_ASSERT_OK(m.as().Munmap(va + k1M, k64K));
    if (cpu_first) {
      EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, k64K));
    }
    EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, k1M));
    EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va + k1M + k64K, k1M - k64K));
    USVM_EXPECT_OK(m.svm().CollectGarbage());
    EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, k1M));
    USVM_ASSERT_OK(m.as().Munmap(va, len));
    USVM_EXPECT_OK(m.svm().CollectGarbage());
    EXPECT_EQ(m.svm().stats().ranges, 0u);
    EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  }
}

// An invalidation between a fault's get-pages and its commit makes the
// commit retry (drm_gpusvm_range_pages_valid under the notifier lock, as
// mmu_interval_read_retry). A fork there write-protects the page the fault
// got for writing: the retry breaks copy-on-write, so the GPU's store is
// the parent's alone. Committing the pages got before the fork would
// write the frame the child now shares. SvmConfig::commit_window_* holds
// the fault between the two long enough for the fork to land there.
TEST(DriverFaults, AForkBetweenGetPagesAndCommitMakesTheCommitRetry) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  c.svm.commit_window_every = 1;
  c.svm.commit_window_ns = 200'000'000;  // 200 ms
  Machine m(c);
  // Svm::vm takes the driver lock, which the waiting fault holds.
  Vm& vm = m.vm();
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(m.as().AtomicStore(va, 1));
  auto got_pages = [&] {
    uint64_t n = 0;
    for (const auto& s : vm.stats().by_size) n += s.get_pages;
    return n;
  };
  auto launch = vm.LaunchKernel([va](gpu::KernelContext& k) { k.Store(va, 2); }, {.threads = 1});
  ASSERT_TRUE(launch.has_value());
  // The fault got its pages and now waits before its commit check.
  Eventually([&] { return got_pages() >= 1; });
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  USVM_ASSERT_OK(WaitLaunch(*launch));
  EXPECT_GE(vm.stats().commit_retries, 1u);
  EXPECT_EQ(*m.as().AtomicLoad(va), 2u);
  EXPECT_EQ(*(*child)->AtomicLoad(va), 1u);  // the child keeps the pre-fork page
  (*child)->Exit();
}

// A fault that keeps losing to invalidations (every pass sees one between
// get-pages and commit) gives up after its passes with EAGAIN; the fault
// service loop replays it rather than cancelling the kernel, as xe retries
// such a fault. Once the invalidations stop, the access completes.
TEST(DriverFaults, AFaultThatKeepsRacingIsReplayedNotCancelled) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  c.svm.commit_window_every = 1;
  c.svm.commit_window_ns = 10'000'000;  // 10 ms per pass
  Machine m(c);
  Vm& vm = m.vm();
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(m.as().AtomicStore(va, 0));
  std::atomic<bool> stop{false};
  // fork write-protects the page: an invalidation of the range each time.
  // It stops once a fault was replayed (else that fault could race on for
  // ever, as in xe).
  std::thread invalidator([&] {
    while (!stop.load() && vm.stats().race_replays == 0) {
      auto child = m.as().Fork();
      if (child) (*child)->Exit();
    }
  });
  // Each kernel's store faults (the last fork took the GPU's mapping). A
  // fault whose every pass met an invalidation ends with EAGAIN and is
  // replayed; one that found a quiet pass (a slow fork, a loaded machine)
  // just succeeds, and the next kernel tries again. Every kernel succeeds.
  uint64_t kernels = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (vm.stats().race_replays == 0 && std::chrono::steady_clock::now() < deadline) {
    auto launch = vm.LaunchKernel([va](gpu::KernelContext& k) { k.Store(va, k.Load(va) + 1); }, {.threads = 1});
    ASSERT_TRUE(launch.has_value());
    USVM_ASSERT_OK(WaitLaunch(*launch));
    ++kernels;
  }
  stop.store(true);
  invalidator.join();
  EXPECT_GE(vm.stats().race_replays, 1u);
  EXPECT_EQ(*m.as().AtomicLoad(va), kernels);
  EXPECT_EQ(vm.stats().faults_cancelled, 0u);
}

}  // namespace
}  // namespace usvm::driver::testing
