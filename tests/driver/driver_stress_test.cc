// Stress of the driver layer (TSan's `concurrency` label): several GPUs
// running kernels the whole time, CPU threads writing disjoint slices of
// one 2 MiB range (so it ping-pongs between VRAM and system memory), a
// thread that mmaps / munmaps / partly mremaps its own buffer, a fork
// thread and an attribute thread, all on one Svm, with small VRAM
// (evictions). Every byte each thread owns is checked, in flight and at
// the end; no crash, no hang, no cancelled kernel outside the unmapped
// buffer.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

#if defined(__SANITIZE_THREAD__)
constexpr bool kTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif
#else
constexpr bool kTsan = false;
#endif

constexpr auto kDuration = std::chrono::milliseconds(kTsan ? 2500 : 1500);

class Failures {
 public:
  void Add(std::string s) {
    std::lock_guard<std::mutex> l(mu_);
    if (list_.size() < 20) list_.push_back(std::move(s));
    ++count_;
  }
  size_t count() {
    std::lock_guard<std::mutex> l(mu_);
    return count_;
  }
  std::string Summary() {
    std::lock_guard<std::mutex> l(mu_);
    std::string s;
    for (auto& f : list_) s += f + "\n";
    return s;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> list_;
  size_t count_ = 0;
};

class DriverStressTest : public ::testing::TestWithParam<InvalidationMode> {};

TEST_P(DriverStressTest, CpuThreadsMunmapForkAndGpuKernels) {
  constexpr uint32_t kGpus = 3, kCpuThreads = 3;
  constexpr uint64_t kSlice = 256 * 1024;
  MachineConfig c;
  c.gpus = kGpus;
  c.vram_bytes = uint64_t{4} << 20;
  c.shared_owner = true;
  c.peer_access = true;
  c.svm.invalidation = GetParam();
  // Now and then a GPU store stays in flight past its translation: an
  // invalidation that lets the old page go before its TLB flush drained
  // loses it (two concurrent two-pass invalidations of one range did).
  c.latency.inflight_store_every = 997;
  c.latency.inflight_store_ns = 200'000;
  Machine m(c);
  AddressSpace& as = m.as();

  // One 2 MiB range: CPU slices [0, 3 * kSlice), GPU slices after them.
  const uint64_t shared = m.MmapAligned(k2M);
  auto cpu_slice = [&](uint32_t t) { return shared + t * kSlice; };
  auto gpu_slice = [&](uint32_t g) { return shared + (kCpuThreads + g) * kSlice; };
  static_assert((kCpuThreads + kGpus) * kSlice <= k2M);
  // Written once, never again: every reader must see exactly this.
  const uint64_t frozen = m.MmapAligned(k2M);
  Ref frozen_ref(frozen, k2M);
  USVM_ASSERT_OK(CpuFill(as, frozen, k2M, 77));
  frozen_ref.Fill(frozen, k2M, 77);
  // The munmap / mmap thread's buffer.
  const uint64_t churn = m.ReserveVa(512 * 1024);
  const uint64_t churn_to = m.ReserveVa(512 * 1024);  // where mremap moves a piece

  std::vector<Ref> gpu_ref;
  for (uint32_t g = 0; g < kGpus; ++g) {
    gpu_ref.emplace_back(gpu_slice(g), kSlice);
    USVM_ASSERT_OK(CpuFill(as, gpu_slice(g), kSlice, 500 + g));
    gpu_ref[g].Fill(gpu_slice(g), kSlice, 500 + g);
  }

  Failures fail;
  std::atomic<bool> stop{false};
  std::vector<uint64_t> gpu_adds(kGpus, 0);
  std::vector<uint64_t> cpu_last_seed(kCpuThreads, 0);
  std::atomic<uint64_t> forks{0}, churns{0}, attr_flips{0};
  std::vector<std::thread> threads;

  // GPU drivers: each adds 1 to its own slice (migrating the 2 MiB range
  // under the CPU writers: the slices share it) and now and then reads the
  // frozen buffer (checked exactly). (No GPU reads of the CPU slices while
  // they are written: a CPU memcpy racing a GPU load is a data race of the
  // test itself.)
  for (uint32_t g = 0; g < kGpus; ++g) {
    threads.emplace_back([&, g] {
      Vm& vm = m.vm(g);
      for (uint64_t i = 0; !stop.load(); ++i) {
        auto r = GpuAdd(vm, gpu_slice(g), kSlice, 1);
        if (!r) {
          fail.Add("GPU " + std::to_string(g) + " add: " + r.error().ToString());
          return;
        }
        ++gpu_adds[g];
        if (i % 4 == 1) {
          auto ok = GpuMatches(vm, frozen_ref);
          if (!ok) fail.Add("GPU " + std::to_string(g) + " frozen: " + ok.message());
        }
      }
    });
  }
  // CPU writers: each owns a slice; what it reads back must be what it
  // wrote last.
  for (uint32_t t = 0; t < kCpuThreads; ++t) {
    threads.emplace_back([&, t] {
      Ref ref(cpu_slice(t), kSlice);
      for (uint64_t i = 1; !stop.load(); ++i) {
        const uint64_t seed = 1000 * (t + 1) + i;
        // Page by page, as a CPU loop would (faults interleave with the GPUs).
        for (uint64_t a = cpu_slice(t); a < cpu_slice(t) + kSlice; a += k64K) {
          if (auto r = CpuFill(as, a, k64K, seed); !r) {
            fail.Add("CPU " + std::to_string(t) + " write: " + r.error().ToString());
            return;
          }
        }
        ref.Fill(cpu_slice(t), kSlice, seed);
        cpu_last_seed[t] = seed;
        if (auto ok = CpuMatches(as, ref); !ok) fail.Add("CPU " + std::to_string(t) + ": " + ok.message());
      }
    });
  }
  // mmap / munmap churn on its own buffer, used by a GPU each time.
  threads.emplace_back([&] {
    const uint64_t len = 512 * 1024;
    for (uint64_t i = 0; !stop.load(); ++i) {
      auto va = as.Mmap(churn, len, kRW, kAnonPrivate | mm::kMapFixed);
      if (!va) {
        fail.Add("churn mmap: " + va.error().ToString());
        return;
      }
      Ref ref(churn, len);
      Vm& vm = m.vm(i % kGpus);
      if (auto r = CpuFill(as, churn, len / 2, 900 + i); !r) fail.Add("churn cpu fill: " + r.error().ToString());
      ref.Fill(churn, len / 2, 900 + i);
      if (auto r = GpuFill(vm, churn + len / 2, len / 2, 950 + i); !r)
        fail.Add("churn gpu fill: " + r.error().ToString());
      ref.Fill(churn + len / 2, len / 2, 950 + i);
      if (auto ok = GpuMatches(vm, ref); !ok) fail.Add(std::string("churn GPU: ") + ok.message());
      if (i % 2) {
        // Partial munmap first: the hole fails, the rest is intact.
        if (auto r = as.Munmap(churn + 64 * 1024, 64 * 1024); !r) fail.Add("churn munmap: " + r.error().ToString());
        if (Code(GpuRead(vm, churn + 64 * 1024, 8)) != Errc::kNoEnt) fail.Add("churn: hole readable or wrong error");
        if (auto ok = GpuMatchesSpan(vm, ref, churn + len / 2, len / 2); !ok) fail.Add(std::string("churn after hole: ") + ok.message());
      }
      if (i % 3 == 2) {
        // Partial mremap: a piece of the GPU-written half moves away.
        const uint64_t piece = churn + len / 2 + 64 * 1024, plen = 128 * 1024;
        auto r = as.Mremap(piece, plen, plen, mm::kMremapMayMove | mm::kMremapFixed, churn_to);
        if (!r) {
          fail.Add("churn mremap: " + r.error().ToString());
        } else {
          Ref moved(churn_to, plen);
          std::memcpy(moved.bytes.data(), ref.bytes.data() + (piece - churn), plen);
          if (auto ok = GpuMatches(m.vm((i + 1) % kGpus), moved); !ok) fail.Add(std::string("churn moved GPU: ") + ok.message());
          if (auto ok = CpuMatches(as, moved); !ok) fail.Add(std::string("churn moved CPU: ") + ok.message());
          if (Code(GpuRead(vm, piece, 8)) != Errc::kNoEnt) fail.Add("churn: moved-from piece readable or wrong error");
          if (auto ok = GpuMatchesSpan(vm, ref, churn + len / 2, 64 * 1024); !ok) fail.Add(std::string("churn after mremap: ") + ok.message());
          if (auto rr = as.Munmap(churn_to, plen); !rr) fail.Add("churn munmap moved: " + rr.error().ToString());
        }
        // What is left of the GPU half is checked below around the hole.
        ref.Zero(piece, plen);  // not checked: it is gone
        if (auto ok = CpuMatchesSpan(as, ref, churn + len / 2, 64 * 1024); !ok) fail.Add(std::string("churn CPU: ") + ok.message());
        if (auto ok = CpuMatchesSpan(as, ref, piece + plen, churn + len - piece - plen); !ok) fail.Add(std::string("churn CPU: ") + ok.message());
      } else if (auto ok = CpuMatchesSpan(as, ref, churn + len / 2, len / 2); !ok) {
        fail.Add(std::string("churn CPU: ") + ok.message());
      }
      if (auto r = as.Munmap(churn, len); !r) fail.Add("churn munmap: " + r.error().ToString());
      ++churns;
    }
  });
  // fork: the child reads the frozen buffer (exactly) and the GPU slices.
  threads.emplace_back([&] {
    while (!stop.load()) {
      auto child = as.Fork();
      if (!child) {
        fail.Add("fork: " + child.error().ToString());
        return;
      }
      if (auto ok = CpuMatches(**child, frozen_ref); !ok) fail.Add(std::string("fork child frozen: ") + ok.message());
      if (auto r = CpuRead(**child, gpu_slice(0), kGpus * kSlice); !r) fail.Add("fork child read: " + r.error().ToString());
      (*child)->Exit();
      ++forks;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  // Attributes: flip the frozen buffer's preferred location (placement is
  // decided again on every flip).
  threads.emplace_back([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      AttributeUpdate u;
      u.preferred = i % 3 == 0 ? Location::System() : i % 3 == 1 ? Location::Device(i % kGpus) : Location::Default();
      if (auto r = m.svm().SetAttributes(frozen, k2M, u); !r) fail.Add("attrs: " + r.error().ToString());
      ++attr_flips;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });

  std::this_thread::sleep_for(kDuration);
  stop.store(true);
  for (auto& t : threads) t.join();

  EXPECT_EQ(fail.count(), 0u) << fail.Summary();
  // Final state: every byte.
  for (uint32_t g = 0; g < kGpus; ++g) {
    EXPECT_GT(gpu_adds[g], 0u) << "GPU " << g << " made no progress";
    Ref want = gpu_ref[g];
    for (uint64_t a = want.va; a < want.end(); a += 8) want.Set64(a, want.Get64(a) + gpu_adds[g]);
    EXPECT_TRUE(GpuMatches(m.vm((g + 1) % kGpus), want)) << "GPU slice " << g;
    EXPECT_TRUE(CpuMatches(as, want)) << "GPU slice " << g;
  }
  for (uint32_t t = 0; t < kCpuThreads; ++t) {
    ASSERT_GT(cpu_last_seed[t], 0u);
    Ref want(cpu_slice(t), kSlice);
    want.Fill(cpu_slice(t), kSlice, cpu_last_seed[t]);
    EXPECT_TRUE(GpuMatches(m.vm(t % kGpus), want)) << "CPU slice " << t;
    EXPECT_TRUE(CpuMatches(as, want)) << "CPU slice " << t;
  }
  EXPECT_TRUE(CpuMatches(as, frozen_ref));
  EXPECT_GT(forks.load(), 0u);
  EXPECT_GT(churns.load(), 0u);
  USVM_EXPECT_OK(m.svm().error());
  uint64_t faults = 0;
  for (uint32_t g = 0; g < kGpus; ++g) faults += m.vm(g).stats().faults;
  EXPECT_GT(faults, 0u);
  uint64_t evictions = 0, to_vram = 0, peer_maps = 0;
  for (uint32_t g = 0; g < kGpus; ++g) {
    evictions += m.dev(g).vram_stats().evictions;
    to_vram += m.dev(g).vram_stats().bytes_to_vram;
    peer_maps += m.vm(g).stats().peer_maps;
  }
  EXPECT_GT(to_vram, 0u) << "nothing ever migrated: the test did not stress migration";
  printf("stress: gpu adds %llu/%llu/%llu, forks %llu, churns %llu, attr flips %llu, faults %llu, "
         "evictions %llu, MiB to VRAM %llu, peer maps %llu, invalidations %llu\n",
         (unsigned long long)gpu_adds[0], (unsigned long long)gpu_adds[1], (unsigned long long)gpu_adds[2],
         (unsigned long long)forks.load(), (unsigned long long)churns.load(),
         (unsigned long long)attr_flips.load(), (unsigned long long)faults, (unsigned long long)evictions,
         (unsigned long long)(to_vram >> 20), (unsigned long long)peer_maps,
         (unsigned long long)m.svm().stats().invalidations);
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

INSTANTIATE_TEST_SUITE_P(Modes, DriverStressTest,
                         ::testing::Values(InvalidationMode::kTwoPass, InvalidationMode::kSinglePass),
                         [](const ::testing::TestParamInfo<InvalidationMode>& i) {
                           return i.param == InvalidationMode::kTwoPass ? std::string("TwoPass")
                                                                        : std::string("SinglePass");
                         });

}  // namespace
}  // namespace usvm::driver::testing
