// GpuSvm under concurrency: GPU-fault threads and CPU threads reading and
// writing the same memory, while other threads mprotect it, fork, munmap
// and remap a second region, migrate pages to a device and back, and the
// garbage collector runs. Checked all along: no range is valid or has a
// GPU PTE after its invalidation (the test driver counts it), every read
// returns what the reference model says; and at the end: every byte, no
// backstop unmapping, nothing left after Fini.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "gpusvm/test_driver.h"
#include "gpusvm/test_vram.h"
#include "mm/dmirror.h"
#include "mm/test_util.h"
#include "usvm/base/env.h"

namespace usvm::gpusvm::testing {
namespace {

using mm::kMapAnonymous;
using mm::kMapFixed;
using mm::kMapPrivate;
using mm::kProtRead;
using mm::kProtWrite;
using mm::testing::kTsan;

constexpr uint64_t kData = uint64_t{1} << 30;
constexpr uint64_t kDataLen = 4 * kSize2M;
constexpr uint64_t kVolatile = kData + (uint64_t{64} << 20);
constexpr uint64_t kVolatileLen = kSize2M;
constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint32_t kAnon = kMapPrivate | kMapAnonymous | kMapFixed;
constexpr int kOwners = 3;
// Words each owner uses, spread over every page of the data region.
constexpr uint64_t kWordsPerOwner = 2048;

uint64_t WordAddr(int owner, uint64_t k) {
  // Owner t's k-th word: page (k * 7 + t) mod pages, a slot per owner.
  const uint64_t pages = kDataLen / kPageSize;
  const uint64_t page = (k * 7 + static_cast<uint64_t>(owner)) % pages;
  const uint64_t slot = (k / pages) * kOwners + static_cast<uint64_t>(owner);
  return kData + page * kPageSize + (slot % (kPageSize / 8)) * 8;
}

TEST(GpuSvmStress, FaultsCpuAccessesAndEveryKindOfInvalidationKeepEveryByteRight) {
  auto pool = mm::testing::MakePool(512);
  auto as = mm::testing::MakeSpace(*pool);
  ASSERT_TRUE(as->Mmap(kData, kDataLen, kRW, kAnon).has_value());
  ASSERT_TRUE(as->Madvise(kData, kDataLen / 2, mm::kMadvHugePage).has_value());
  ASSERT_TRUE(as->Mmap(kVolatile, kVolatileLen, kRW, kAnon).has_value());
  // The GPU's own VRAM (a gpusvm Pagemap): GPU faults map its pages where
  // they are (kLocal), CPU touches bring allocations home.
  auto vram = TestVram::Create({.npages = 4096});
  ASSERT_NE(vram, nullptr);
  TestDriver::Options o;
  o.notifier_size = kSize2M;  // several notifiers
  o.device = vram->device();
  o.evict_on_eopnotsupp = true;
  auto d = TestDriver::Create(as, o);
  ASSERT_NE(d, nullptr);
  d->SetDeviceBytes(
      [](void* cookie, const DeviceAddr& a) -> std::byte* {
        auto* v = static_cast<TestVram*>(cookie);
        return v->Data(v->pagemap().pgmap().base() + a.addr / kPageSize);
      },
      vram.get());
  Ctx gpu_ctx;
  gpu_ctx.device_private_page_owner = vram->pagemap().owner();
  gpu_ctx.devmem_possible = true;
  ASSERT_NE(d, nullptr);
  auto dev = mm::testing::DMirror::Create(as, 1024);
  ASSERT_NE(dev, nullptr);

  const int iters = kTsan ? 150 : 4000;
  // Chaos pacing; longer under TSan, where every refault is ~50x slower.
  const auto pace = std::chrono::microseconds(kTsan ? 3000 : 300);
  // The owners go on until every chaos thread has done this many rounds.
  const uint64_t rounds = kTsan ? 150 : 400;
  std::atomic<uint64_t> protect_rounds{0}, migrate_rounds{0}, churn_rounds{0};
  auto chaos_done = [&] {
    return protect_rounds.load() >= rounds && migrate_rounds.load() >= rounds &&
           churn_rounds.load() >= rounds;
  };
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> mismatches{0}, gpu_ops{0}, cpu_ops{0};
  // The model: one value per owned word, written only by its owner.
  std::vector<std::vector<uint64_t>> model(kOwners, std::vector<uint64_t>(kWordsPerOwner, 0));

  auto owner = [&](int t) {
    Rng rng(1000 + t);
    uint64_t counter = 0;
    for (int i = 0; i < iters || !chaos_done(); ++i) {
      const uint64_t k = rng.Uniform(kWordsPerOwner);
      const uint64_t addr = WordAddr(t, k);
      const uint64_t op = rng.Uniform(4);
      if (op < 2) {
        const uint64_t v = (uint64_t(t + 1) << 56) | ++counter;
        for (;;) {  // mprotect may have made it read-only for a while
          auto r = op == 0 ? d->GpuWrite(addr, &v, 8, gpu_ctx) : as->Write(addr, &v, 8);
          if (r) break;
          ASSERT_TRUE(r.error() == Errc::kPerm || r.error() == Errc::kFault) << r.error().ToString();
          std::this_thread::yield();
        }
        model[t][k] = v;
        (op == 0 ? gpu_ops : cpu_ops).fetch_add(1);
      } else {
        uint64_t v = 0;
        auto r = op == 2 ? d->GpuRead(addr, &v, 8, gpu_ctx) : as->Read(addr, &v, 8);
        ASSERT_TRUE(r.has_value()) << r.error().ToString();
        if (v != model[t][k]) mismatches.fetch_add(1);
        (op == 2 ? gpu_ops : cpu_ops).fetch_add(1);
      }
    }
  };

  // mprotect flips, forks with writes in the child, on the data region.
  auto protector = [&] {
    Rng rng(7);
    while (!stop.load()) {
      const uint64_t off = rng.Uniform(kDataLen / kSize64K) * kSize64K;
      const uint64_t len = std::min<uint64_t>(kDataLen - off, kSize64K * (1 + rng.Uniform(4)));
      ASSERT_TRUE(as->Mprotect(kData + off, len, kProtRead).has_value());
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      ASSERT_TRUE(as->Mprotect(kData + off, len, kRW).has_value());
      // Paced: the point is interleavings, not a livelock of refaults.
      std::this_thread::sleep_for(pace);
      protect_rounds.fetch_add(1);
      if (rng.OneIn(4)) {
        auto child = as->Fork();
        ASSERT_TRUE(child.has_value());
        const uint64_t junk = ~uint64_t{0};
        (void)(*child)->Write(kData + off, &junk, 8);  // the child's own copy
        (*child)->Exit();
      }
    }
  };

  // Device migrations of data pages (data preserved; GPU and CPU faults
  // bring them home).
  auto migrator = [&] {
    Rng rng(11);
    while (!stop.load()) {
      const uint64_t off = rng.Uniform(kDataLen / kSize64K) * kSize64K;
      (void)dev->MigrateToDevice(kData + off, kData + off + kSize64K);
      std::this_thread::sleep_for(pace);
      if (rng.OneIn(2)) (void)dev->MigrateToSystem(kData + off, kData + off + kSize64K);
      // And to the GPU's VRAM (all-or-nothing: a chunk with pages elsewhere
      // is refused), sometimes evicted again by frame.
      const uint64_t voff = rng.Uniform(kDataLen / kSize64K) * kSize64K;
      auto a = vram->Migrate(as, kData + voff, kData + voff + kSize64K);
      if (a && rng.OneIn(2)) (void)vram->pagemap().EvictToRam(*a);
      migrate_rounds.fetch_add(1);
    }
  };

  // The volatile region: munmap / mmap, DONTNEED, with GPU readers that
  // accept holes; the collector runs beside them.
  auto churn = [&] {
    Rng rng(13);
    while (!stop.load()) {
      const uint64_t off = rng.Uniform(kVolatileLen / kSize64K) * kSize64K;
      if (rng.OneIn(2)) {
        ASSERT_TRUE(as->Munmap(kVolatile + off, kSize64K).has_value());
        ASSERT_TRUE(as->Mmap(kVolatile + off, kSize64K, kRW, kAnon).has_value());
      } else {
        ASSERT_TRUE(as->Madvise(kVolatile + off, kSize64K, mm::kMadvDontNeed).has_value());
      }
      churn_rounds.fetch_add(1);
      std::this_thread::sleep_for(pace);
    }
  };
  auto volatile_reader = [&] {
    Rng rng(17);
    while (!stop.load()) {
      const uint64_t addr = kVolatile + rng.Uniform(kVolatileLen / 8) * 8;
      uint64_t v = 1;
      auto r = rng.OneIn(2) ? d->GpuRead(addr, &v, 8) : d->GpuWrite(addr, &v, 8);
      // A hole between munmap and mmap is ENOENT; everything else works.
      if (!r) {
        ASSERT_EQ(r.error(), Errc::kNoEnt) << r.error().ToString();
      }
      d->CollectGarbage();
    }
  };

  std::vector<std::thread> workers;
  for (int t = 0; t < kOwners; ++t) workers.emplace_back(owner, t);
  std::vector<std::thread> chaos;
  chaos.emplace_back(protector);
  chaos.emplace_back(migrator);
  chaos.emplace_back(churn);
  chaos.emplace_back(volatile_reader);
  for (auto& w : workers) w.join();
  stop.store(true);
  for (auto& c : chaos) c.join();

  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_EQ(d->stale_after_invalidate(), 0u);
  EXPECT_EQ(d->gc_failures(), 0u);
  // Every word, through the CPU and through the GPU.
  for (int t = 0; t < kOwners; ++t) {
    for (uint64_t k = 0; k < kWordsPerOwner; ++k) {
      uint64_t c = 0, g = 0;
      ASSERT_TRUE(as->Read(WordAddr(t, k), &c, 8).has_value());
      ASSERT_TRUE(d->GpuRead(WordAddr(t, k), &g, 8, gpu_ctx).has_value());
      ASSERT_EQ(c, model[t][k]) << "owner " << t << " word " << k;
      ASSERT_EQ(g, model[t][k]) << "owner " << t << " word " << k;
    }
  }
  d->CollectGarbage();
  auto s = d->svm().GetStats();
  EXPECT_GT(s.invalidations, 0u);
  std::printf("vram migrations %lu evict-retries %lu devmem maps %lu\n", (unsigned long)vram->releases(),
              (unsigned long)d->evict_retries(), (unsigned long)s.devmem_maps);
  std::printf("gpu ops %lu cpu ops %lu invalidations %lu get_pages %lu retries %lu commit_retries %lu collected %lu ranges made %lu\n",
              (unsigned long)gpu_ops.load(), (unsigned long)cpu_ops.load(), (unsigned long)s.invalidations,
              (unsigned long)s.get_pages, (unsigned long)s.get_pages_retries,
              (unsigned long)d->commit_retries(), (unsigned long)d->collected(),
              (unsigned long)s.range_inserts);
  d->DestroySvm();
  EXPECT_EQ(d->live_ranges(), 0);
  EXPECT_EQ(d->backstop_frees(), 0u);
  EXPECT_EQ(as->notifiers().DebugTreeSize(), 0u);
  dev.reset();
  as->Exit();
  EXPECT_EQ(vram->pages_in_use(), 0u);
  EXPECT_EQ(vram->releases(), vram->allocs());
  EXPECT_EQ(vram->device_maps(), vram->device_unmaps());
  EXPECT_GT(gpu_ops.load(), 0u);
  EXPECT_GT(cpu_ops.load(), 0u);
}

}  // namespace
}  // namespace usvm::gpusvm::testing
