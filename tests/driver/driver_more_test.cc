// More end-to-end driver tests beyond the xe_exec_system_allocator
// sections: CPU/GPU atomics, threadless fault servicing, madvise
// DONTNEED / FREE, mprotect of SVM memory, THP leaves, the collector,
// pinned pages, a fork child with a GPU of its own, invalidation modes,
// HandleFault called directly, mremap shrink. Every byte is checked.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

using gpu::PteKind;

constexpr uint64_t kPagesPer2M = k2M / k4K;
constexpr uint64_t k1M = uint64_t{1} << 20;

AttributeUpdate Atomic(AtomicMode a) {
  AttributeUpdate u;
  u.atomic = a;
  return u;
}

// AtomicMode::kGlobal: the GPU's atomics migrate the page to VRAM, the
// CPU's fault it back; alternating, no increment is lost.
TEST(DriverMore, GlobalAtomicsAlternateBetweenCpuAndGpu) {
  Machine m;
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, Atomic(AtomicMode::kGlobal)));
  uint64_t want = 0;
  for (int round = 0; round < 10; ++round) {
    USVM_ASSERT_OK(Wait(m.vm().LaunchKernel(
        [va](gpu::KernelContext& k) {
          for (int i = 0; i < 50 && !k.cancelled(); ++i) k.AtomicAdd(va, 1);
        },
        {.threads = 8})));
    want += 400;
    EXPECT_TRUE(InDeviceMemory(m.as(), va)) << "round " << round;
    for (int i = 0; i < 25; ++i) USVM_ASSERT_OK(m.as().AtomicFetchAdd(va, 2));
    want += 50;
    EXPECT_FALSE(InDeviceMemory(m.as(), va)) << "a CPU atomic must bring the page home";
    auto v = m.as().AtomicLoad(va);
    ASSERT_TRUE(v.has_value());
    ASSERT_EQ(*v, want) << "round " << round;
  }
}

// CPU and GPU atomics at the same time on one counter.
TEST(DriverMore, ConcurrentCpuAndGpuAtomicsLoseNothing) {
  Machine m;
  const uint64_t va = m.MmapAligned(k4K * 16);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k4K * 16, Atomic(AtomicMode::kGlobal)));
  std::thread cpu([&] {
    for (int i = 0; i < 2000; ++i) ASSERT_TRUE(m.as().AtomicFetchAdd(va, 1).has_value());
  });
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel(
      [va](gpu::KernelContext& k) {
        for (int i = 0; i < 250 && !k.cancelled(); ++i) k.AtomicAdd(va, 1);
      },
      {.threads = 8})));
  cpu.join();
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, 4000u);
}

// DeviceConfig::fault_thread = false: the test serves the faults itself.
TEST(DriverMore, ServiceFaultsWithoutTheFaultThread) {
  MachineConfig c;
  c.fault_thread = false;
  Machine m(c);
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  EXPECT_EQ(Code(m.vm().ServiceFaults(1'000'000)), Errc::kTime);
  auto l = LaunchWords(m.vm(), va, len, [](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, Word(80, a)); });
  ASSERT_TRUE(l.has_value());
  size_t served = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!l->fence().IsSignalled()) {
    ASSERT_LT(std::chrono::steady_clock::now(), end) << "kernel never finished";
    auto r = m.vm().ServiceFaults(1'000'000);
    if (r) served += *r;
    else ASSERT_EQ(r.error().code(), Errc::kTime) << r.error().ToString();
  }
  USVM_ASSERT_OK(l->Wait());
  EXPECT_GT(served, 0u);
  Ref ref(va, len);
  ref.Fill(va, len, 80);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // Device::ServiceFaults serves the default context (the same Vm here).
  EXPECT_EQ(Code(m.dev().ServiceFaults(1'000'000)), Errc::kTime);
}

TEST(DriverMore, PeerAccessErrorsAndCanMapVramOf) {
  MachineConfig c;
  c.gpus = 3;
  c.shared_owner = true;
  Machine m(c);
  EXPECT_EQ(Code(m.dev(0).EnablePeerAccess(m.dev(0))), Errc::kInval);
  EXPECT_TRUE(m.dev(0).CanMapVramOf(m.dev(0)));
  EXPECT_FALSE(m.dev(0).CanMapVramOf(m.dev(1)));
  USVM_ASSERT_OK(m.dev(0).EnablePeerAccess(m.dev(1)));
  EXPECT_EQ(Code(m.dev(1).EnablePeerAccess(m.dev(0))), Errc::kExist);
  EXPECT_TRUE(m.dev(0).CanMapVramOf(m.dev(1)));
  EXPECT_TRUE(m.dev(1).CanMapVramOf(m.dev(0)));
  EXPECT_FALSE(m.dev(0).CanMapVramOf(m.dev(2)));
  // Different owners never map each other's VRAM, even with peer access.
  MachineConfig c2;
  c2.gpus = 2;
  c2.peer_access = true;
  Machine m2(c2);
  EXPECT_FALSE(m2.dev(0).CanMapVramOf(m2.dev(1)));
}

// MADV_DONTNEED of memory in VRAM: it reads as zero afterwards, on the GPU
// and the CPU; the rest of the range keeps its data.
TEST(DriverMore, MadvDontNeedOfMemoryInVram) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 81));
  ref.Fill(va, len, 81);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  USVM_ASSERT_OK(m.as().Madvise(va + k64K, 3 * k64K, mm::kMadvDontNeed));
  ref.Zero(va + k64K, 3 * k64K);
  EXPECT_FALSE(GpuPteKind(m.vm(), va + k64K).has_value());
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// MADV_FREE then reclaim of memory the GPU wrote (it came home first):
// discarded pages read as zero on the GPU too.
TEST(DriverMore, MadvFreeThenReclaim) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 82));
  ref.Fill(va, len, 82);
  USVM_ASSERT_OK(m.as().Madvise(va, k64K, mm::kMadvFree));
  auto n = m.as().ReclaimLazyFree();
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(*n, k64K / k4K);
  ref.Zero(va, k64K);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverMore, MprotectOfSvmMemory) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 83));
  ref.Fill(va, len, 83);
  USVM_ASSERT_OK(m.as().Mprotect(va, len / 2, mm::kProtRead));
  EXPECT_EQ(Code(GpuFill(m.vm(), va + k64K, 8, 1)), Errc::kPerm);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  USVM_ASSERT_OK(GpuFill(m.vm(), va + len / 2, len / 2, 84));  // the writable half
  ref.Fill(va + len / 2, len / 2, 84);
  USVM_ASSERT_OK(m.as().Mprotect(va, len / 2, kRW));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, k64K, 85));
  ref.Fill(va, k64K, 85);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  // PROT_NONE: the GPU cannot read either.
  USVM_ASSERT_OK(m.as().Mprotect(va, k64K, mm::kProtNone));
  EXPECT_NE(Code(GpuRead(m.vm(), va, 8)), Errc::kOk);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va + k64K, len - k64K));
}

// A THP in system memory is mapped with a 2 MiB GPU leaf.
TEST(DriverMore, TransparentHugePageGetsA2MLeaf) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(m.as().Madvise(va, len, mm::kMadvHugePage));
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 86));
  ref.Fill(va, len, 86);
  ASSERT_TRUE(m.as().QueryPte(va).huge);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  auto w = m.vm().context().page_table().Walk(va + 12345 * 8);
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->size, k2M);
  EXPECT_EQ(w->va, va);
  EXPECT_GT(m.vm().stats().leaves_2m, 0u);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Ranges of each size: a 2 MiB aligned buffer, a 64 KiB one, a 4 KiB one.
TEST(DriverMore, RangeSizesFollowAlignment) {
  Machine m;
  const uint64_t big = m.MmapAligned(k2M);
  const uint64_t mid = m.MmapAligned(k64K);
  const uint64_t small = m.MmapAligned(k4K);
  // Chunks up to check_pages_threshold (64 KiB) need every CPU page
  // present (drm_gpusvm_check_pages): the CPU touches the 64 KiB buffer.
  USVM_ASSERT_OK(CpuFill(m.as(), mid, k64K, 9));
  USVM_ASSERT_OK(GpuFill(m.vm(), big, k2M, 1));
  USVM_ASSERT_OK(GpuFill(m.vm(), mid, k64K, 2));
  USVM_ASSERT_OK(GpuFill(m.vm(), small, k4K, 3));
  const VmStats s = m.vm().stats();
  EXPECT_GT(s.by_size[2].faults, 0u);
  EXPECT_GT(s.by_size[1].faults, 0u);
  EXPECT_GT(s.by_size[0].faults, 0u);
  EXPECT_GE(s.by_size[2].migrations, 1u);
  EXPECT_GE(s.by_size[2].bytes_copied, k2M);
  Ref r1(big, k2M), r2(mid, k64K), r3(small, k4K);
  r1.Fill(big, k2M, 1);
  r2.Fill(mid, k64K, 2);
  r3.Fill(small, k4K, 3);
  EXPECT_TRUE(CpuMatches(m.as(), r1));
  EXPECT_TRUE(CpuMatches(m.as(), r2));
  EXPECT_TRUE(CpuMatches(m.as(), r3));
}

// gc_worker = false: unmapped ranges stay until CollectGarbage (or the
// next fault) runs the collector.
TEST(DriverMore, CollectGarbageWithoutTheWorker) {
  MachineConfig c;
  c.svm.gc_worker = false;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 87));
  ASSERT_GT(m.svm().stats().ranges, 0u);
  USVM_ASSERT_OK(m.as().Munmap(va, len));
  EXPECT_GT(m.svm().stats().ranges, 0u) << "no worker: nothing collected yet";
  const uint64_t runs = m.svm().stats().gc_runs;
  USVM_ASSERT_OK(m.svm().CollectGarbage());
  EXPECT_EQ(m.svm().stats().ranges, 0u);
  EXPECT_GT(m.svm().stats().gc_runs, runs);
  EXPECT_GT(m.svm().stats().ranges_collected, 0u);
  EXPECT_EQ(m.dev().vram_stats().allocations, 0u);
  USVM_EXPECT_OK(m.svm().error());
}

// Partial munmap with gc_worker = false: the collector evicts the partly
// unmapped range (the rest comes home intact).
TEST(DriverMore, CollectorEvictsAPartiallyUnmappedRange) {
  MachineConfig c;
  c.svm.gc_worker = false;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 88));
  ref.Fill(va, len, 88);
  USVM_ASSERT_OK(m.as().Munmap(va + k64K, k64K));
  USVM_ASSERT_OK(m.svm().CollectGarbage());
  EXPECT_GT(m.svm().stats().gc_evictions, 0u);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, k64K));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va + 2 * k64K, len - 2 * k64K));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va + 2 * k64K, len - 2 * k64K));
}

// Long-term pinned pages cannot migrate: the GPU is served from system
// memory (the migration fails and falls back); data correct.
TEST(DriverMore, PinnedPagesStayAndTheGpuStillWorks) {
  Machine m;
  const uint64_t len = k64K;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 89));
  ref.Fill(va, len, 89);
  std::vector<mm::Pfn> pins(len / k4K);
  USVM_ASSERT_OK(m.as().PinUserPages(va, pins.size(), true, pins.data()));
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  // The pinned frames hold the GPU's bytes (what a DMA user of the pin sees).
  for (uint64_t i = 0; i < pins.size(); ++i) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(m.pool().Data(pins[i]));
    EXPECT_EQ(Diff(va + i * k4K, p, ref.bytes.data() + i * k4K, k4K), "") << "page " << i;
  }
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  for (mm::Pfn p : pins) m.as().UnpinUserPage(p);
}

// A fork child gets an Svm and a GPU of its own: the two processes' GPU
// writes stay apart.
TEST(DriverMore, ForkChildWithItsOwnGpu) {
  MachineConfig c;
  c.gpus = 2;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  const uint64_t len = 512 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref base(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 90));
  base.Fill(va, len, 90);
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 0), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) base.Set64(a, base.Get64(a) + 1);
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.AddProcess(*child, {1});
  Ref parent = base, kid = base;
  USVM_ASSERT_OK(GpuAdd(m.vm(1, 1), va, len, 10));
  for (uint64_t a = va; a < va + len; a += 8) kid.Set64(a, kid.Get64(a) + 10);
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 0), va, len / 2, 100));
  for (uint64_t a = va; a < va + len / 2; a += 8) parent.Set64(a, parent.Get64(a) + 100);
  EXPECT_TRUE(GpuMatches(m.vm(1, 1), kid));
  EXPECT_TRUE(GpuMatches(m.vm(0, 0), parent));
  EXPECT_TRUE(CpuMatches(m.as(1), kid));
  EXPECT_TRUE(CpuMatches(m.as(0), parent));
}

// Both invalidation modes: one munmap reaches all four GPUs; the two-pass
// mode runs finish passes, the single-pass one does not.
class DriverModeTest : public ::testing::TestWithParam<InvalidationMode> {};

TEST_P(DriverModeTest, MunmapReachesEveryGpu) {
  MachineConfig c;
  c.gpus = 4;
  c.svm.invalidation = GetParam();
  c.svm.placement = Placement::kSystem;  // every GPU maps the same system pages
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 91));
  ref.Fill(va, len, 91);
  for (uint32_t g = 0; g < 4; ++g) EXPECT_TRUE(GpuMatches(m.vm(g), ref));
  for (uint32_t g = 0; g < 4; ++g) ASSERT_TRUE(GpuPteKind(m.vm(g), va).has_value());
  const SvmStats s0 = m.svm().stats();
  USVM_ASSERT_OK(m.as().Munmap(va, k64K));
  const SvmStats s1 = m.svm().stats();
  for (uint32_t g = 0; g < 4; ++g) {
    EXPECT_FALSE(GpuPteKind(m.vm(g), va).has_value()) << "GPU " << g;
    EXPECT_EQ(Code(GpuRead(m.vm(g), va, 8)), Errc::kNoEnt);
    EXPECT_TRUE(GpuMatchesSpan(m.vm(g), ref, va + k64K, len - k64K)) << "GPU " << g;
  }
  EXPECT_GT(s1.invalidations, s0.invalidations);
  EXPECT_GE(s1.ranges_zapped - s0.ranges_zapped, 4u);
  EXPECT_GE(s1.tlb_flushes - s0.tlb_flushes, 4u);
  if (GetParam() == InvalidationMode::kTwoPass) {
    EXPECT_GT(s1.two_pass_finishes, s0.two_pass_finishes);
  } else {
    EXPECT_EQ(s1.two_pass_finishes, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, DriverModeTest,
                         ::testing::Values(InvalidationMode::kTwoPass, InvalidationMode::kSinglePass),
                         [](const ::testing::TestParamInfo<InvalidationMode>& i) {
                           return i.param == InvalidationMode::kTwoPass ? std::string("TwoPass")
                                                                        : std::string("SinglePass");
                         });

// HandleFault, called as the fault thread would.
TEST(DriverMore, HandleFaultDirectly) {
  Machine m;
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 92));
  USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
  EXPECT_TRUE(GpuPteKind(m.vm(), va).has_value());
  USVM_ASSERT_OK(m.vm().HandleFault(va + k4K, gpu::kAccessWrite));
  auto w = m.vm().context().page_table().Walk(va + k4K);
  ASSERT_TRUE(w.has_value());
  EXPECT_TRUE(w->pte.writable());
  EXPECT_EQ(Code(m.vm().HandleFault(m.ReserveVa(k64K), gpu::kAccessRead)), Errc::kNoEnt);
  const uint64_t ro = m.Mmap(k64K, 0, mm::kProtRead);
  EXPECT_EQ(Code(m.vm().HandleFault(ro, gpu::kAccessWrite)), Errc::kPerm);
  USVM_EXPECT_OK(m.vm().HandleFault(ro, gpu::kAccessRead));
  Ref ref(va, k64K);
  ref.Fill(va, k64K, 92);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
}

// mremap shrinking a buffer in VRAM: the tail is gone for the GPU, the
// head keeps its data.
TEST(DriverMore, MremapShrinkOfMemoryInVram) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 93));
  ref.Fill(va, len, 93);
  auto r = m.as().Mremap(va, len, len / 4, 0);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  ASSERT_EQ(*r, va);
  EXPECT_FALSE(GpuPteKind(m.vm(), va + len / 2).has_value());
  EXPECT_EQ(Code(GpuRead(m.vm(), va + len / 2, 8)), Errc::kNoEnt);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, len / 4));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, len / 4));
  // Growing it back (in place): the new part is zero.
  auto g = m.as().Mremap(va, len / 4, len, 0);
  ASSERT_TRUE(g.has_value()) << g.error().ToString();
  ref.Zero(va + len / 4, len - len / 4);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}


// A page GPU 1 maps over the peer link from GPU 0's VRAM: when GPU 0
// evicts it and reuses the VRAM for other data, GPU 1 must not read the
// new owner's bytes through a stale peer PTE.
TEST(DriverMore, EvictionZapsPeerMappings) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  c.vram_bytes = 4 * k2M;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 94));
  ref.Fill(va, len, 94);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  ASSERT_EQ(GpuPteKind(m.vm(1), va), PteKind::kPeerVram) << "precondition: a peer mapping";
  EXPECT_EQ(m.dev(0).EvictAll(), 0u);
  EXPECT_NE(GpuPteKind(m.vm(1), va), PteKind::kPeerVram) << "stale peer PTE after eviction";
  // GPU 0 fills its VRAM with other data.
  const uint64_t other = m.MmapAligned(4 * k2M);
  USVM_ASSERT_OK(GpuFill(m.vm(0), other, 4 * k2M, 95));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  Ref rother(other, 4 * k2M);
  rother.Fill(other, 4 * k2M, 95);
  EXPECT_TRUE(CpuMatches(m.as(), rother));
}

// Preferred location: another GPU's VRAM. GPU 0's faults place the data
// in GPU 1's VRAM (and map it over the link).
TEST(DriverMore, PreferredLocationIsAnotherGpu) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  AttributeUpdate u;
  u.preferred = Location::Device(1);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, u));
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 96));
  ref.Fill(va, len, 96);
  EXPECT_EQ(DevicePages(m.as(), va, len), len / k4K);
  EXPECT_GT(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(0), va), PteKind::kPeerVram);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kLocalVram);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Prefetch over a span with a hole: ENOENT, and what was prefetched before
// the hole is correct.
TEST(DriverMore, PrefetchAcrossAHole) {
  Machine m;
  const uint64_t len = 2 * k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 97));
  ref.Fill(va, len, 97);
  USVM_ASSERT_OK(m.as().Munmap(va + k2M, k64K));
  EXPECT_EQ(Code(m.vm().Prefetch(va, len, Location::Device(0))), Errc::kNoEnt);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, k2M));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va + k2M + k64K, k2M - k64K));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, k2M));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va + k2M + k64K, k2M - k64K));
}

// The atomic timeslice: memory an atomic fault moved to VRAM stays there at
// least atomic_timeslice_ms against a CPU touch (the CPU fault waits).
TEST(DriverMore, AtomicTimesliceHoldsOffTheCpu) {
  MachineConfig c;
  c.svm.atomic_timeslice_ms = 60;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k64K, Atomic(AtomicMode::kGlobal)));
  USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 1));
  const uint64_t before = Word(1, va);
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(InDeviceMemory(m.as(), va));
  auto v = m.as().AtomicLoad(va);
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, before + 1);
  // The launch's own wait already took some of the 60 ms: ask for half.
  EXPECT_GE(std::chrono::duration_cast<std::chrono::milliseconds>(waited).count(), 20)
      << "the CPU took the page back inside the atomic timeslice";
}

// Vm::LaunchPattern through the Vm (pattern kernels fault like any other).
TEST(DriverMore, PatternKernelsThroughTheVm) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  gpu::PatternParams p;
  p.pattern = gpu::Pattern::kStreamWrite;
  p.va = va;
  p.length = len;
  p.value = 1000;
  p.threads = 8;
  USVM_ASSERT_OK(Wait(m.vm().LaunchPattern(p)));
  Ref ref(va, len);
  for (uint64_t i = 0; i < len / 8; ++i) ref.Set64(va + 8 * i, 1000 + i);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  p.pattern = gpu::Pattern::kReadModifyWrite;
  p.value = 5;
  USVM_ASSERT_OK(Wait(m.vm().LaunchPattern(p)));
  for (uint64_t i = 0; i < len / 8; ++i) ref.Set64(va + 8 * i, 1005 + i);
  p.pattern = gpu::Pattern::kStreamRead;
  auto l = m.vm().LaunchPattern(p);
  ASSERT_TRUE(l.has_value());
  USVM_ASSERT_OK(WaitLaunch(*l));
  uint64_t sum = 0;
  for (uint64_t i = 0; i < len / 8; ++i) sum += 1005 + i;
  EXPECT_EQ(l->stats().checksum, sum);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Window checks of the other entry points.
TEST(DriverMore, EntryPointsOutsideTheWindow) {
  MachineConfig c;
  c.svm.va_start = uint64_t{1} << 44;
  c.svm.va_size = uint64_t{1} << 46;
  Machine m(c);
  const uint64_t low = m.Mmap(k64K, uint64_t{1} << 32);
  EXPECT_EQ(Code(m.vm().Bind(low, k64K)), Errc::kInval);
  EXPECT_EQ(Code(m.vm().Prefetch(low, k64K, Location::Device(0))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().SetAttributes(low, k64K, Atomic(AtomicMode::kCpu))), Errc::kInval);
  EXPECT_EQ(Code(m.svm().QueryAttributes(low, k64K)), Errc::kInval);
}

// Attributes of a range the GPU used are reset when it is unmapped (the
// collector, as xe's garbage collector does): a new buffer at the same VA
// starts from the defaults.
TEST(DriverMore, UnmapResetsTheAttributesOfUsedRanges) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, Atomic(AtomicMode::kCpu)));
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 1));
  USVM_ASSERT_OK(m.as().Munmap(va, len));
  Eventually([&] { return m.svm().stats().ranges == 0; });
  auto spans = m.svm().QueryAttributes(va, len);
  ASSERT_TRUE(spans.has_value());
  for (const AttributeSpan& sp : *spans) EXPECT_EQ(sp.attrs, Attributes{}) << std::hex << sp.start;
  ASSERT_EQ(m.Mmap(len, va), va);
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 3); })));
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, 3u);
}

// A bind over memory the SVM path put in VRAM: the bind maps system
// memory (the pages come home), the data is intact; a munmap reaches the
// bind on GPU 0 and the SVM mapping on GPU 1 alike.
TEST(DriverMore, BindOverSvmMemoryInVram) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 256 * 1024;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 2));
  ref.Fill(va, len, 2);
  ASSERT_GT(DevicePages(m.as(), va, len), 0u);
  auto h = m.vm(0).Bind(va, len);
  ASSERT_TRUE(h.has_value()) << h.error().ToString();
  EXPECT_EQ(DevicePages(m.as(), va, len), 0u);
  EXPECT_EQ(GpuPteKind(m.vm(0), va), PteKind::kSystem);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref)) << "GPU 1 misses GPU 0's writes through its bind";
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_ASSERT_OK(m.as().Munmap(va, len));
  EXPECT_FALSE(GpuPteKind(m.vm(0), va).has_value());
  EXPECT_FALSE(GpuPteKind(m.vm(1), va).has_value());
  EXPECT_NE(Code(GpuRead(m.vm(0), va, 8)), Errc::kOk);
  EXPECT_EQ(Code(GpuRead(m.vm(1), va, 8)), Errc::kNoEnt);
  USVM_ASSERT_OK(m.vm(0).Unbind(*h));
}

// IGT "many-stride" / a fault storm: two GPUs, 16 kernel threads each,
// writing scattered words of a 24 MiB buffer at the same time (thread t of
// GPU g owns the words whose index is t * 2 + g modulo 32): many faults on
// the same ranges from both GPUs at once, ranges moving between the two
// VRAMs. Every word ends as its owner wrote it, the rest stays zero.
TEST(DriverMore, FaultStormFromTwoGpus) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  c.vram_bytes = 16 * (uint64_t{1} << 20);  // smaller than the buffer: evictions too
  Machine m(c);
  const uint64_t len = 24 * (uint64_t{1} << 20);
  const uint64_t words = len / 8;
  const uint64_t va = m.MmapAligned(len);
  constexpr uint64_t kStride = 4099;  // words between one thread's stores (prime)
  std::vector<gpu::Launch> ls;
  for (uint32_t g = 0; g < 2; ++g) {
    auto l = m.vm(g).LaunchKernel(
        [va, words, g](gpu::KernelContext& k) {
          const uint64_t owner = k.thread_id() * 2 + g;
          for (uint64_t i = 0; i < 600 && !k.cancelled(); ++i) {
            const uint64_t w = ((i * kStride) / 32 * 32 + owner) % words;
            k.Store(va + w * 8, Word(owner + 1, va + w * 8));
          }
        },
        {.threads = 16});
    ASSERT_TRUE(l.has_value());
    ls.push_back(*l);
  }
  for (auto& l : ls) USVM_ASSERT_OK(WaitLaunch(l));
  Ref ref(va, len);
  for (uint64_t owner = 0; owner < 32; ++owner)
    for (uint64_t i = 0; i < 600; ++i) {
      const uint64_t w = ((i * kStride) / 32 * 32 + owner) % words;
      ref.Set64(va + w * 8, Word(owner + 1, va + w * 8));
    }
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  USVM_EXPECT_OK(m.svm().error());
}

// ignore_own_migrate: the MIGRATE events of the driver's own migrations
// are skipped (counted) when set, handled as invalidations when not; the
// data is the same either way.
TEST(DriverMore, OwnMigrateEvents) {
  for (bool ignore : {true, false}) {
    MachineConfig c;
    c.svm.ignore_own_migrate = ignore;
    Machine m(c);
    const uint64_t len = k2M;
    const uint64_t va = m.MmapAligned(len);
    Ref ref(va, len);
    USVM_ASSERT_OK(CpuFill(m.as(), va, len, 1));
    USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
    ref.Fill(va, len, 1);
    for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
    ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
    if (ignore) {
      EXPECT_GT(m.svm().stats().own_migrate_ignored, 0u);
    } else {
      EXPECT_EQ(m.svm().stats().own_migrate_ignored, 0u);
    }
    EXPECT_TRUE(GpuMatches(m.vm(), ref)) << "ignore " << ignore;
    EXPECT_TRUE(CpuMatches(m.as(), ref)) << "ignore " << ignore;
  }
}

// MADV_COLLAPSE copies 512 small pages into a new THP and frees the old
// frames: a GPU mapping of the old frames must not survive (CLEAR event),
// the GPU then sees the CPU's later writes.
TEST(DriverMore, CollapseReplacesFramesUnderAGpuMapping) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 1));
  ref.Fill(va, len, 1);
  ASSERT_FALSE(m.as().QueryPte(va).huge);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  ASSERT_TRUE(GpuPteKind(m.vm(), va).has_value());
  USVM_ASSERT_OK(m.as().Madvise(va, len, mm::kMadvCollapse));
  ASSERT_TRUE(m.as().QueryPte(va).huge);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 2));
  ref.Fill(va, len, 2);
  EXPECT_TRUE(GpuMatches(m.vm(), ref)) << "the GPU reads the frames collapse freed";
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// A THP the GPU maps with one 2 MiB leaf is split by a munmap of 4 KiB in
// its middle: the leaf goes, the rest is mapped again correctly, later CPU
// writes are seen.
TEST(DriverMore, ThpSplitUnderA2MLeaf) {
  MachineConfig c;
  c.svm.placement = Placement::kSystem;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  USVM_ASSERT_OK(m.as().Madvise(va, len, mm::kMadvHugePage));
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 3));
  ref.Fill(va, len, 3);
  ASSERT_TRUE(m.as().QueryPte(va).huge);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  auto w = m.vm().context().page_table().Walk(va);
  ASSERT_TRUE(w.has_value());
  ASSERT_EQ(w->size, k2M);
  const uint64_t hole = va + k1M;
  USVM_ASSERT_OK(m.as().Munmap(hole, k4K));
  EXPECT_FALSE(m.as().QueryPte(va).huge);
  EXPECT_FALSE(GpuPteKind(m.vm(), va).has_value()) << "the 2 MiB leaf survived the split";
  EXPECT_EQ(Code(GpuRead(m.vm(), hole, 8)), Errc::kNoEnt);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, hole - va));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, hole + k4K, va + len - hole - k4K));
  USVM_ASSERT_OK(CpuFill(m.as(), va, k64K, 4));
  ref.Fill(va, k64K, 4);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(), ref, va, hole - va));
}

// Pinning memory that is in VRAM brings it home first (the GPU mapping of
// the device pages goes); later GPU writes land in the pinned frames.
TEST(DriverMore, PinningMemoryInVram) {
  Machine m;
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(), va, len, 5));
  ref.Fill(va, len, 5);
  ASSERT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  std::vector<mm::Pfn> pins(16);
  USVM_ASSERT_OK(m.as().PinUserPages(va, pins.size(), true, pins.data()));
  EXPECT_EQ(DevicePages(m.as(), va, 16 * k4K), 0u);
  EXPECT_NE(GpuPteKind(m.vm(), va), PteKind::kLocalVram);
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, len, 7));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 7);
  for (uint64_t i = 0; i < pins.size(); ++i) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(m.pool().Data(pins[i]));
    EXPECT_EQ(Diff(va + i * k4K, p, ref.bytes.data() + i * k4K, k4K), "") << "pinned page " << i;
  }
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  for (mm::Pfn p : pins) m.as().UnpinUserPage(p);
}

// Without fault threads, each address space's context is served by its
// own Vm::ServiceFaults; Device::ServiceFaults serves the default one.
TEST(DriverMore, ServiceFaultsPerContext) {
  MachineConfig c;
  c.fault_thread = false;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  m.AddProcess({0});
  ASSERT_NE(m.vm(0, 0).context().asid(), m.vm(0, 1).context().asid());
  const uint64_t len = 256 * 1024;
  std::vector<uint64_t> va(2);
  std::vector<gpu::Launch> ls;
  for (uint32_t p = 0; p < 2; ++p) {
    va[p] = m.ReserveVa(len);
    ASSERT_EQ(m.Mmap(len, va[p], kRW, kAnonPrivate, p), va[p]);
    auto l = LaunchWords(m.vm(0, p), va[p], len, [p](gpu::KernelContext& k, uint64_t, uint64_t a) { k.Store(a, Word(p + 1, a)); });
    ASSERT_TRUE(l.has_value());
    ls.push_back(*l);
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  uint64_t served[2] = {0, 0};
  while (!ls[0].fence().IsSignalled() || !ls[1].fence().IsSignalled()) {
    ASSERT_LT(std::chrono::steady_clock::now(), end) << "kernels never finished";
    // Process 1's context first through its Vm, process 0's through the device.
    if (auto r = m.vm(0, 1).ServiceFaults(200'000); r) served[1] += *r;
    if (auto r = m.dev(0).ServiceFaults(200'000); r) served[0] += *r;
  }
  for (uint32_t p = 0; p < 2; ++p) {
    USVM_ASSERT_OK(ls[p].Wait());
    EXPECT_GT(served[p], 0u) << "process " << p;
    Ref ref(va[p], len);
    ref.Fill(va[p], len, p + 1);
    EXPECT_TRUE(CpuMatches(m.as(p), ref)) << "process " << p;
  }
}

// Small notifiers: buffers spread over several; unmapping them all
// removes every notifier.
TEST(DriverMore, NotifiersComeAndGo) {
  MachineConfig c;
  c.svm.notifier_size = 2 * k2M;
  Machine m(c);
  std::vector<uint64_t> bufs;
  for (int i = 0; i < 4; ++i) {
    const uint64_t va = m.MmapAligned(k2M);
    USVM_ASSERT_OK(GpuFill(m.vm(), va, k2M, i + 1));
    bufs.push_back(va);
  }
  EXPECT_GE(m.svm().stats().notifiers, 4u);
  for (int i = 0; i < 4; ++i) {
    Ref ref(bufs[i], k2M);
    ref.Fill(bufs[i], k2M, i + 1);
    EXPECT_TRUE(CpuMatches(m.as(), ref));
    USVM_ASSERT_OK(m.as().Munmap(bufs[i], k2M));
  }
  Eventually([&] { return m.svm().stats().ranges == 0; });
  Eventually([&] { return m.svm().stats().notifiers == 0; });
}

// GPU atomics need device memory: on memory that cannot migrate (shared,
// hugetlb) they fail with EACCES; plain accesses still work there.
TEST(DriverMore, GpuAtomicsOnMemoryThatCannotMigrate) {
  Machine m;
  ASSERT_EQ(m.pool().SetHugetlbPages(1), 1u);
  const uint64_t shared = m.Mmap(k64K, 0, kRW, mm::kMapShared | mm::kMapAnonymous);
  const uint64_t huge = m.Mmap(k2M, 0, kRW, kAnonPrivate | mm::kMapHugetlb);
  for (uint64_t va : {shared, huge}) {
    ASSERT_NE(va, 0u);
    auto r = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); }));
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), Errc::kAcces) << r.error().ToString();
    USVM_ASSERT_OK(GpuAdd(m.vm(), va, k4K, 2));
    auto v = m.as().AtomicLoad(va);
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(*v, 2u);
  }
}

// Preferred location: a GPU the faulting GPU cannot reach (other owner, no
// peer link). Whatever the placement, GPU 0 must end up with a mapping it
// can use: data correct on both GPUs and the CPU, and GPU 0 never holds a
// peer PTE into GPU 1.
TEST(DriverMore, PreferredLocationOnAnUnreachableGpu) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  AttributeUpdate u;
  u.preferred = Location::Device(1);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, u));
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 21));
  ref.Fill(va, len, 21);
  EXPECT_NE(GpuPteKind(m.vm(0), va), PteKind::kPeerVram);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Detach removes the Vm's binds and userptrs with their PTEs; the
// notifiers go too (a later munmap must not call into the dead bind).
TEST(DriverMore, DetachRemovesBinds) {
  MachineConfig c;
  c.gpus = 2;
  Machine m(c);
  const uint64_t len = 128 * 1024;
  const uint64_t a = m.MmapAligned(len), b = m.MmapAligned(len);
  Ref ra(a, len);
  USVM_ASSERT_OK(CpuFill(m.as(), a, len, 31));
  ra.Fill(a, len, 31);
  ASSERT_TRUE(m.vm(1).Bind(a, len).has_value());
  ASSERT_TRUE(m.vm(1).Bind(b, len, {.userptr = true}).has_value());
  ASSERT_TRUE(GpuPteKind(m.vm(1), a).has_value());
  gpu::PageTable& pt1 = m.vm(1).context().page_table();
  USVM_ASSERT_OK(m.svm().Detach(m.dev(1)));
  EXPECT_FALSE(pt1.Walk(a).has_value()) << "a bind's PTEs survived Detach";
  EXPECT_FALSE(pt1.Walk(b).has_value()) << "a userptr's PTEs survived Detach";
  USVM_ASSERT_OK(m.as().Mprotect(a, len, mm::kProtRead));
  USVM_ASSERT_OK(m.as().Munmap(b, len));
  EXPECT_TRUE(GpuMatches(m.vm(0), ra));
  EXPECT_TRUE(CpuMatches(m.as(), ra));
}

// A fork child runs on the same GPU as its parent (a second context): the
// device pages the parent had in VRAM are shared copy-on-write between
// the two address spaces of the one device. Each side's GPU writes stay
// its own.
TEST(DriverMore, ForkChildOnTheSameGpu) {
  MachineConfig c;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref base(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0, 0), va, len, 41));
  base.Fill(va, len, 41);
  ASSERT_EQ(DevicePages(m.as(0), va, len), kPagesPer2M);
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.AddProcess(*child, {0});
  ASSERT_NE(&m.vm(0, 0).context(), &m.vm(0, 1).context());
  EXPECT_TRUE(GpuMatches(m.vm(0, 1), base)) << "child GPU read of COW-shared VRAM";
  // The parent writes first while the child's GPU maps the shared pages.
  Ref parent = base, kid = base;
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 0), va, k64K, 1));
  for (uint64_t a = va; a < va + k64K; a += 8) parent.Set64(a, parent.Get64(a) + 1);
  EXPECT_TRUE(GpuMatches(m.vm(0, 1), kid)) << "the parent's GPU write reached the child";
  EXPECT_TRUE(CpuMatches(m.as(1), kid)) << "the parent's GPU write reached the child";
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 1), va, len / 2, 5));
  for (uint64_t a = va; a < va + len / 2; a += 8) kid.Set64(a, kid.Get64(a) + 5);
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 0), va + len / 4, len / 2, 7));
  for (uint64_t a = va + len / 4; a < va + 3 * len / 4; a += 8) parent.Set64(a, parent.Get64(a) + 7);
  EXPECT_TRUE(GpuMatches(m.vm(0, 0), parent));
  EXPECT_TRUE(GpuMatches(m.vm(0, 1), kid));
  EXPECT_TRUE(CpuMatches(m.as(1), kid));
  EXPECT_TRUE(CpuMatches(m.as(0), parent));
}

// The same with the child on a peer GPU that maps the parent's VRAM over
// the link (shared owner, peer access): then GPU 0 evicts everything.
TEST(DriverMore, ForkChildOnAPeerGpu) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref base(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0, 0), va, len, 42));
  base.Fill(va, len, 42);
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.AddProcess(*child, {1});
  EXPECT_TRUE(GpuMatches(m.vm(1, 1), base));
  Ref parent = base, kid = base;
  USVM_ASSERT_OK(GpuAdd(m.vm(0, 0), va, len, 3));
  for (uint64_t a = va; a < va + len; a += 8) parent.Set64(a, parent.Get64(a) + 3);
  EXPECT_TRUE(GpuMatches(m.vm(1, 1), kid)) << "the parent's GPU write reached the child's GPU";
  EXPECT_EQ(m.dev(0).EvictAll(), 0u);
  EXPECT_NE(GpuPteKind(m.vm(1, 1), va), PteKind::kPeerVram) << "peer PTE survived the eviction";
  USVM_ASSERT_OK(GpuAdd(m.vm(1, 1), va, len / 2, 9));
  for (uint64_t a = va; a < va + len / 2; a += 8) kid.Set64(a, kid.Get64(a) + 9);
  EXPECT_TRUE(GpuMatches(m.vm(0, 0), parent));
  EXPECT_TRUE(GpuMatches(m.vm(1, 1), kid));
  EXPECT_TRUE(CpuMatches(m.as(0), parent));
  EXPECT_TRUE(CpuMatches(m.as(1), kid));
}

// Prefetch(kDefault) follows the preferred-location attribute, else the
// placement policy.
TEST(DriverMore, PrefetchDefaultLocation) {
  Machine m;
  const uint64_t a = m.MmapAligned(k2M), b = m.MmapAligned(k2M);
  Ref ra(a, k2M), rb(b, k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), a, k2M, 1));
  USVM_ASSERT_OK(CpuFill(m.as(), b, k2M, 2));
  ra.Fill(a, k2M, 1);
  rb.Fill(b, k2M, 2);
  AttributeUpdate u;
  u.preferred = Location::System();
  USVM_ASSERT_OK(m.svm().SetAttributes(b, k2M, u));
  USVM_ASSERT_OK(m.vm().Prefetch(a, k2M, Location::Default()));
  USVM_ASSERT_OK(m.vm().Prefetch(b, k2M, Location::Default()));
  EXPECT_EQ(DevicePages(m.as(), a, k2M), kPagesPer2M) << "placement kFaultingGpu";
  EXPECT_EQ(DevicePages(m.as(), b, k2M), 0u) << "preferred system";
  EXPECT_EQ(GpuPteKind(m.vm(), a), PteKind::kLocalVram);
  EXPECT_EQ(GpuPteKind(m.vm(), b), PteKind::kSystem);
  EXPECT_TRUE(GpuMatches(m.vm(), ra));
  EXPECT_TRUE(GpuMatches(m.vm(), rb));
  EXPECT_TRUE(CpuMatches(m.as(), ra));
  EXPECT_TRUE(CpuMatches(m.as(), rb));
}

// Prefetch by GPU 0 into GPU 1's VRAM: the data lands there and GPU 0 maps
// it over the peer link.
TEST(DriverMore, PrefetchIntoAPeersVram) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 3));
  ref.Fill(va, len, 3);
  USVM_ASSERT_OK(m.vm(0).Prefetch(va, len, Location::Device(1)));
  EXPECT_EQ(DevicePages(m.as(), va, len), kPagesPer2M);
  EXPECT_GT(m.dev(1).vram_stats().allocations, 0u);
  EXPECT_EQ(m.dev(0).vram_stats().allocations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(0), va), PteKind::kPeerVram);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  EXPECT_TRUE(GpuMatches(m.vm(1), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Thousands of kernel threads faulting on the same few pages at once (the
// fault unit coalesces them; the driver serves each page once or more).
TEST(DriverMore, ManyKernelThreadsOnFewPages) {
  Machine m;
  const uint64_t len = 8 * k4K;
  const uint64_t va = m.MmapAligned(len);
  constexpr uint32_t kThreads = 4096;
  static_assert(kThreads * 8 == 8 * 4096);
  USVM_ASSERT_OK(Wait(m.vm().LaunchKernel(
      [va](gpu::KernelContext& k) { k.Store(va + 8 * k.thread_id(), Word(7, va + 8 * k.thread_id())); },
      {.threads = kThreads})));
  Ref ref(va, len);
  ref.Fill(va, len, 7);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

// Atomics need the faulting GPU's own memory: a page GPU 1 maps over the
// peer link (read first) must not carry the atomic permission; GPU 1's
// atomic then faults and moves the page into GPU 1's VRAM.
TEST(DriverMore, PeerMappingCarriesNoAtomicPermission) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k64K);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, k64K, 3));
  USVM_ASSERT_OK(Wait(m.vm(1).LaunchKernel([va](gpu::KernelContext& k) { (void)k.Load(va); })));
  auto w = m.vm(1).context().page_table().Walk(va);
  ASSERT_TRUE(w.has_value());
  ASSERT_EQ(w->pte.kind(), PteKind::kPeerVram);
  EXPECT_FALSE(w->pte.atomic()) << "a peer mapping with atomic permission";
  USVM_ASSERT_OK(Wait(m.vm(1).LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va, 1); })));
  EXPECT_EQ(GpuPteKind(m.vm(1), va), PteKind::kLocalVram) << "GPU 1's atomic ran on GPU 0's VRAM";
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, Word(3, va) + 1);
}

// The preferred location names a GPU that is then detached (and later
// destroyed): faults of the other GPU must still be served, data intact.
TEST(DriverMore, PreferredGpuDetachedThenDestroyed) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  Machine m(c);
  const uint64_t len = k2M;
  const uint64_t va = m.MmapAligned(len);
  AttributeUpdate u;
  u.preferred = Location::Device(1);
  USVM_ASSERT_OK(m.svm().SetAttributes(va, len, u));
  Ref ref(va, len);
  USVM_ASSERT_OK(GpuFill(m.vm(0), va, len, 4));
  ref.Fill(va, len, 4);
  ASSERT_GT(m.dev(1).vram_stats().allocations, 0u);
  USVM_ASSERT_OK(m.svm().Detach(m.dev(1)));
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  m.DestroyDevice(1);
  EXPECT_TRUE(GpuMatches(m.vm(0), ref));
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len, 1));
  for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// A userptr whose memory was partly unmapped cannot be revalidated: every
// launch through the Vm fails with EFAULT (as an xe exec with an invalid
// userptr) until it is unbound; a plain launch on the context still runs.
TEST(DriverMore, UserptrPartlyUnmappedBlocksVmLaunches) {
  Machine m;
  const uint64_t len = 128 * 1024;
  const uint64_t va = m.MmapAligned(len);
  const uint64_t other = m.MmapAligned(k64K);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len, 1));
  auto h = m.vm().Bind(va, len, {.userptr = true});
  ASSERT_TRUE(h.has_value());
  USVM_ASSERT_OK(m.as().Munmap(va + len / 2, len / 2));
  EXPECT_EQ(m.vm().BindValid(*h).value_or(true), false);
  EXPECT_EQ(Code(m.vm().LaunchKernel([other](gpu::KernelContext& k) { k.Store(other, 5); })), Errc::kFault);
  USVM_ASSERT_OK(Wait(m.vm().context().LaunchKernel([other](gpu::KernelContext& k) { k.Store(other, 5); })));
  USVM_ASSERT_OK(m.vm().Unbind(*h));
  Ref ref(va, len / 2);
  ref.Fill(va, len / 2, 1);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  auto v = m.as().AtomicLoad(other);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, 5u);
}

// Two address spaces on one GPU; one exits with data in VRAM: its device
// pages go, the other's stay and stay correct.
TEST(DriverMore, OneOfTwoAddressSpacesExits) {
  MachineConfig c;
  c.default_process = false;
  Machine m(c);
  m.AddProcess({0});
  m.AddProcess({0});
  const uint64_t len = k2M;
  std::vector<uint64_t> va(2);
  for (uint32_t p = 0; p < 2; ++p) {
    va[p] = m.ReserveVa(len);
    ASSERT_EQ(m.Mmap(len, va[p], kRW, kAnonPrivate, p), va[p]);
    USVM_ASSERT_OK(GpuFill(m.vm(0, p), va[p], len, 50 + p));
  }
  const uint64_t both = m.dev(0).vram_stats().allocations;
  ASSERT_GE(both, 2u);
  m.as(0).Exit();
  Eventually([&] { return m.dev(0).vram_stats().allocations < both; });
  EXPECT_NE(Code(GpuRead(m.vm(0, 0), va[0], 8)), Errc::kOk);
  Ref ref(va[1], len);
  ref.Fill(va[1], len, 51);
  EXPECT_EQ(DevicePages(m.as(1), va[1], len), kPagesPer2M);
  EXPECT_TRUE(GpuMatches(m.vm(0, 1), ref));
  EXPECT_TRUE(CpuMatches(m.as(1), ref));
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

// A mapping straddling the end of the GPU window: the part inside works
// (ranges stop at the window), the part outside is EINVAL.
TEST(DriverMore, MappingStraddlingTheWindowEnd) {
  MachineConfig c;
  c.svm.va_start = uint64_t{1} << 45;
  c.svm.va_size = uint64_t{1} << 30;
  Machine m(c);
  const uint64_t wend = c.svm.va_start + c.svm.va_size;
  const uint64_t va = wend - k2M - k64K;
  ASSERT_EQ(m.Mmap(4 * k2M, va), va);
  Ref ref(va, k2M + k64K);
  USVM_ASSERT_OK(CpuFill(m.as(), va, ref.len(), 9));
  ref.Fill(va, ref.len(), 9);
  USVM_ASSERT_OK(GpuAdd(m.vm(), va, ref.len(), 1));
  for (uint64_t a = va; a < ref.end(); a += 8) ref.Set64(a, ref.Get64(a) + 1);
  EXPECT_EQ(Code(GpuRead(m.vm(), wend, 8)), Errc::kInval);
  EXPECT_EQ(Code(GpuRead(m.vm(), wend - 8, 16)), Errc::kInval);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  EXPECT_FALSE(GpuPteKind(m.vm(), wend).has_value());
}


// Found by usvm fuzz (seed 2, op #3356): a GPU atomic inside a bind
// (which maps system memory, never with atomic permission) made the fault
// handler revalidate the bind and replay, forever. It is EACCES now.
TEST(DriverMore, AtomicInBindIsRefusedNotLivelocked) {
  Machine m;
  const uint64_t va = m.MmapAligned(k64K);
  for (bool userptr : {false, true}) {
    auto h = m.vm().Bind(va, k64K, {.userptr = userptr});
    ASSERT_TRUE(h.has_value());
    auto r = Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.AtomicAdd(va + 8, 1); }));
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), Errc::kAcces);
    // Loads and stores through the bind still work.
    USVM_ASSERT_OK(Wait(m.vm().LaunchKernel([va](gpu::KernelContext& k) { k.Store(va, k.Load(va) + 1); })));
    USVM_ASSERT_OK(m.vm().Unbind(*h));
  }
  auto v = m.as().AtomicLoad(va);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, 2u);
}

}  // namespace
}  // namespace usvm::driver::testing
