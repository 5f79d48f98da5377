// Pagemap stress (TSan): threads migrating chunks to device memory (two
// peer devices, direct and bounced device-to-device copies), CPU writers
// and readers touching them (CPU faults bring allocations home), evictors
// moving allocations back by frame, and writers that munmap and remap their
// chunks. Every word is checked against a model at the end, every
// allocation is released exactly once, and no device page stays in use.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gpusvm/test_vram.h"
#include "mm/test_util.h"
#include "usvm/base/mutex.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/address_space.h"

namespace usvm::gpusvm {
namespace {

using mm::kPageSize;
using mm::testing::kTsan;
using testing::TestVram;

// The region: `chunks` chunks of `chunk_pages` pages; with `thp`, 2 MiB
// aligned and MADV_HUGEPAGE (chunks of 512 pages then move as 2 MiB
// device pages).
struct Shape {
  uint64_t chunk_pages;
  uint64_t chunks;
  bool thp;
};

// A word's value names its address, so a reader can tell a torn or
// misplaced word from a stale one: (addr << 16) | sequence, or 0.
uint64_t WordValue(uint64_t addr, uint64_t seq) { return (addr << 16) | (seq & 0xffff) | 1; }
bool PlausibleWord(uint64_t addr, uint64_t v) { return v == 0 || (v >> 16) == addr; }

bool Allowed(const Error& e) {
  return e.code() == Errc::kBusy || e.code() == Errc::kNoMem || e.code() == Errc::kNoEnt;
}

void RunStress(const Shape& shape) {
  const uint64_t kChunkPages = shape.chunk_pages, kChunks = shape.chunks;
  const uint64_t kChunk = kChunkPages * kPageSize, kWordsPerChunk = kChunk / 8;
  auto pool = mm::testing::MakePool(256);
  auto as = mm::testing::MakeSpace(*pool);
  static int shared_owner;
  // Two peers (one owner): device-to-device migrations, direct one way,
  // bounced the other (B has no direct path from A).
  auto a = TestVram::Create({.npages = kChunks * kChunkPages / 2, .owner = &shared_owner});
  auto b = TestVram::Create({.npages = kChunks * kChunkPages / 2, .owner = &shared_owner});
  ASSERT_TRUE(a && b);
  a->LinkPeer(*b, /*direct=*/true);
  b->SetDirectFrom(*a, false);
  TestVram* vrams[2] = {a.get(), b.get()};

  auto base_r = as->Mmap(0, kChunks * kChunk + (shape.thp ? mm::kHugePageSize : 0),
                         mm::kProtRead | mm::kProtWrite, mm::kMapPrivate | mm::kMapAnonymous);
  ASSERT_TRUE(base_r.has_value());
  const uint64_t base = shape.thp ? mm::HugeAlignUp(*base_r) : *base_r;
  if (shape.thp) {
    ASSERT_TRUE(as->Madvise(base, kChunks * kChunk, mm::kMadvHugePage).has_value());
  }
  auto chunk_addr = [&](uint64_t c) { return base + c * kChunk; };

  // Model: only writer (c % kWriters) writes chunk c, so its model is exact.
  constexpr int kWriters = 3, kMigrators = 2, kEvictors = 1, kReaders = 1;
  const int iters = kTsan ? 400 : 1500;
  std::vector<std::vector<uint64_t>> model(kChunks, std::vector<uint64_t>(kWordsPerChunk, 0));

  Mutex live_mu;
  std::vector<std::shared_ptr<TestVram::VramAlloc>> live;  // guarded by live_mu
  std::atomic<uint64_t> bad{0}, migrated{0}, evicted{0}, remaps{0};
  std::atomic<int> writers_left{kWriters};

  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      Rng rng(100 + w);
      uint64_t seq = 0;
      // At least iters * 4 operations, and on until the migrators have
      // done their share too (bounded by 20 s of real time).
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      for (int i = 0; i < iters * 4 || (migrated.load() < static_cast<uint64_t>(iters) &&
                                        std::chrono::steady_clock::now() < deadline);
           ++i) {
        uint64_t c = rng.Uniform(kChunks / kWriters) * kWriters + w;
        if (rng.OneIn(200)) {
          // munmap and map again: the chunk reads as zeros.
          if (auto r = as->Munmap(chunk_addr(c), kChunk); !r) {
            ADD_FAILURE() << "munmap " << r.error().ToString();
            bad++;
          }
          auto r = as->Mmap(chunk_addr(c), kChunk, mm::kProtRead | mm::kProtWrite,
                            mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed);
          if (!r || *r != chunk_addr(c)) {
            ADD_FAILURE() << "mmap " << (r ? "moved" : r.error().ToString());
            bad++;
          } else if (shape.thp && !as->Madvise(chunk_addr(c), kChunk, mm::kMadvHugePage)) {
            bad++;
          }
          std::fill(model[c].begin(), model[c].end(), 0);
          remaps++;
          continue;
        }
        const uint64_t wi = rng.Uniform(kWordsPerChunk);
        const uint64_t addr = chunk_addr(c) + wi * 8;
        if (rng.OneIn(4)) {
          auto v = as->AtomicLoad(addr);
          if (!v || *v != model[c][wi]) {
            ADD_FAILURE() << "writer load " << (v ? std::to_string(*v) : v.error().ToString())
                          << " want " << model[c][wi];
            bad++;
          }
        } else {
          const uint64_t v = WordValue(addr, ++seq);
          if (auto r = as->AtomicStore(addr, v); !r) {
            ADD_FAILURE() << "writer store " << r.error().ToString();
            bad++;
          }
          model[c][wi] = v;
        }
      }
      writers_left--;
    });
  }
  for (int m = 0; m < kMigrators; ++m) {
    threads.emplace_back([&, m] {
      Rng rng(200 + m);
      while (writers_left.load() > 0) {
        const uint64_t c = rng.Uniform(kChunks);
        TestVram* v = vrams[rng.Uniform(2)];
        uint64_t start = chunk_addr(c), end = start + kChunk;
        if (rng.OneIn(3)) {  // a sub-range
          const uint64_t p = rng.Uniform(kChunkPages);
          start += p * kPageSize;
          end = start + (1 + rng.Uniform(kChunkPages - p)) * kPageSize;
        }
        MigrateDetails d;
        d.source_peer_migrates = rng.OneIn(2);
        d.can_migrate_same_pagemap = rng.OneIn(2);
        d.timeslice_ms = rng.OneIn(8) ? 1 : 0;
        auto r = v->Migrate(as, start, end, d);
        if (r) {
          migrated++;
          MutexLock l(live_mu);
          live.push_back(std::move(*r));
        } else if (!Allowed(r.error())) {
          ADD_FAILURE() << r.error().ToString();
          bad++;
        }
      }
    });
  }
  for (int e = 0; e < kEvictors; ++e) {
    threads.emplace_back([&, e] {
      Rng rng(300 + e);
      while (writers_left.load() > 0) {
        std::shared_ptr<TestVram::VramAlloc> d;
        {
          MutexLock l(live_mu);
          if (!live.empty()) {
            const uint64_t k = rng.Uniform(live.size());
            d = live[k];
            live[k] = live.back();
            live.pop_back();
          }
        }
        if (!d) {
          std::this_thread::yield();
          continue;
        }
        auto r = d->pagemap().EvictToRam(d);
        if (r)
          evicted++;
        else if (r.error().code() != Errc::kBusy) {
          ADD_FAILURE() << "evict " << r.error().ToString();
          bad++;
        }
      }
    });
  }
  for (int rd = 0; rd < kReaders; ++rd) {
    threads.emplace_back([&, rd] {
      Rng rng(400 + rd);
      std::vector<uint64_t> buf(kWordsPerChunk);
      while (writers_left.load() > 0) {
        const uint64_t c = rng.Uniform(kChunks);
        // Word by word (atomics), as the writers race with us.
        for (uint64_t i = 0; i < kWordsPerChunk; i += 37) {
          const uint64_t addr = chunk_addr(c) + i * 8;
          auto v = as->AtomicLoad(addr);
          // EFAULT: the chunk's writer has it unmapped right now.
          if (v ? !PlausibleWord(addr, *v) : v.error().code() != Errc::kFault) {
            ADD_FAILURE() << "reader " << (v ? std::to_string(*v) : v.error().ToString());
            bad++;
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0u);

  // Every word, exactly.
  std::vector<uint64_t> buf(kWordsPerChunk);
  for (uint64_t c = 0; c < kChunks; ++c) {
    ASSERT_TRUE(as->Read(chunk_addr(c), buf.data(), kChunk).has_value());
    for (uint64_t i = 0; i < kWordsPerChunk; ++i)
      ASSERT_EQ(buf[i], model[c][i]) << "chunk " << c << " word " << i;
  }
  // Nothing is on a device now (the reads brought everything home), and
  // every allocation has been released exactly once.
  {
    MutexLock l(live_mu);
    for (auto& d : live) EXPECT_TRUE(d->detached());
    live.clear();
  }
  for (TestVram* v : vrams) {
    EXPECT_EQ(v->pages_in_use(), 0u);
    EXPECT_EQ(v->free_pages(), v->npages());
    EXPECT_EQ(v->releases(), v->allocs());
    EXPECT_EQ(v->pagemap().DebugLiveAllocations(), 0u);
  }
  EXPECT_GT(migrated.load(), 0u);
  std::printf("migrated %lu evicted %lu remaps %lu; A %lu->dev %lu->ram direct %lu bounced %lu; "
              "B %lu->dev %lu->ram direct %lu bounced %lu\n",
              static_cast<unsigned long>(migrated.load()), static_cast<unsigned long>(evicted.load()),
              static_cast<unsigned long>(remaps.load()),
              static_cast<unsigned long>(a->pagemap().stats().pages_to_devmem),
              static_cast<unsigned long>(a->pagemap().stats().pages_to_ram),
              static_cast<unsigned long>(a->pagemap().stats().peer_pages_direct),
              static_cast<unsigned long>(a->pagemap().stats().peer_pages_bounced),
              static_cast<unsigned long>(b->pagemap().stats().pages_to_devmem),
              static_cast<unsigned long>(b->pagemap().stats().pages_to_ram),
              static_cast<unsigned long>(b->pagemap().stats().peer_pages_direct),
              static_cast<unsigned long>(b->pagemap().stats().peer_pages_bounced));
  for (TestVram* v : vrams)
    std::printf("2 MiB device pages: %lu\n",
                static_cast<unsigned long>(v->pagemap().stats().huge_pages_to_devmem));
  ASSERT_TRUE(as->Munmap(base, kChunks * kChunk).has_value());
}

TEST(PagemapStressTest, MigrateTouchEvictMunmap) { RunStress({.chunk_pages = 8, .chunks = 24, .thp = false}); }

// 2 MiB chunks of THPs: whole-chunk migrations move 2 MiB device pages,
// sub-ranges and CPU touches split them.
TEST(PagemapStressTest, TwoMiBChunks) { RunStress({.chunk_pages = 512, .chunks = 6, .thp = true}); }

}  // namespace
}  // namespace usvm::gpusvm
