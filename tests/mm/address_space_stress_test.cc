// Races on AddressSpace; runs under TSan in CI (label concurrency).
//
// CPU threads write and read back their own regions and bump a shared
// atomic counter while a mutator thread mprotects those regions, munmaps
// and remaps a chaos region, zaps it with MADV_DONTNEED, and forks (each
// child checks what it inherited, then exits).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"

namespace usvm::mm {
namespace {

constexpr int kWriters = 3;
constexpr uint64_t kRegionPages = 32;

TEST(AddressSpaceStressTest, WritersRacingMunmapMprotectForkAndDontNeed) {
  auto pool = testing::MakePool(512);
  auto as = testing::MakeSpace(*pool);
  const uint64_t region_bytes = kRegionPages * kPageSize;
  std::vector<uint64_t> regions;
  for (int i = 0; i < kWriters; ++i)
    regions.push_back(*as->Mmap(0, region_bytes, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous));
  const uint64_t chaos = *as->Mmap(0, region_bytes, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t counter = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapShared | kMapAnonymous);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> adds{0}, bad{0}, writes_ok{0}, writes_faulted{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kWriters; ++t) {
    ts.emplace_back([&, t] {
      Rng rng(100 + t);
      uint64_t seq = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        // Own region: a successful write must read back (the mutator only
        // changes its protection, never its bytes).
        const uint64_t a = regions[t] + rng.Uniform(kRegionPages * kPageSize / 8) * 8;
        const uint64_t v = (uint64_t(t + 1) << 48) | ++seq;
        if (as->Write(a, &v, 8).has_value()) {
          uint64_t back = 0;
          if (!as->Read(a, &back, 8).has_value() || back != v) bad++;
          writes_ok++;
        } else {
          writes_faulted++;
        }
        // Chaos region: may fault (unmapped) or read zero (zapped).
        const uint64_t c = chaos + rng.Uniform(kRegionPages) * kPageSize + t * 8;
        (void)as->Write(c, &v, 8);
        uint64_t cv = 0;
        if (as->Read(c, &cv, 8).has_value() && cv != 0 && (cv >> 48) != uint64_t(t + 1)) bad++;
        if (as->AtomicFetchAdd(counter, 1).has_value()) adds++;
      }
    });
  }

  std::thread mutator([&] {
    Rng rng(7);
    for (int round = 0; round < 3000; ++round) {
      const int r = int(rng.Uniform(kWriters));
      const uint64_t page = regions[r] + rng.Uniform(kRegionPages) * kPageSize;
      switch (rng.Uniform(5)) {
        case 0:
          (void)as->Mprotect(page, 4 * kPageSize > regions[r] + region_bytes - page ? kPageSize : 4 * kPageSize, kProtRead);
          (void)as->Mprotect(regions[r], region_bytes, kProtRead | kProtWrite);
          break;
        case 1:
          (void)as->Munmap(chaos, region_bytes);
          (void)as->Mmap(chaos, region_bytes, kProtRead | kProtWrite,
                         kMapPrivate | kMapAnonymous | kMapFixed);
          break;
        case 2:
          (void)as->Madvise(chaos + rng.Uniform(kRegionPages) * kPageSize, kPageSize, kMadvDontNeed);
          break;
        case 3: {
          auto child = as->Fork();
          if (!child) {
            bad++;
            break;
          }
          // Every word the child inherited is zero or was written by the
          // owner of its region (no torn or misplaced copies).
          std::vector<uint64_t> buf(region_bytes / 8);
          for (int w = 0; w < kWriters; ++w) {
            if (!(*child)->Read(regions[w], buf.data(), region_bytes).has_value()) bad++;
            for (uint64_t x : buf)
              if (x != 0 && (x >> 48) != uint64_t(w + 1)) bad++;
          }
          // The child writes its copy; the parent must not see it.
          const uint64_t junk = 0xDEADull << 48;
          (void)(*child)->Write(regions[0], &junk, 8);
          (*child)->Exit();
          break;
        }
        case 4:
          (void)as->Mremap(chaos, region_bytes, region_bytes, kMremapMayMove | kMremapFixed,
                           chaos);  // overlapping: EINVAL, no change
          break;
      }
    }
    stop = true;
  });
  mutator.join();
  for (auto& t : ts) t.join();

  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GT(writes_ok.load(), 0u);
  EXPECT_EQ(*as->AtomicLoad(counter), adds.load());
  uint64_t w0 = 0;
  for (uint64_t a = regions[0]; a < regions[0] + region_bytes; a += 8) {
    ASSERT_TRUE(as->Read(a, &w0, 8).has_value());
    ASSERT_NE(w0 >> 48, 0xDEADu);
  }
  as->Exit();
  auto st = pool->GetStats();
  EXPECT_EQ(st.free_frames, st.total_frames - 1);
}

// Many threads first-touch disjoint and overlapping pages of one huge-page
// region and one 4 KiB region at once: every fault resolves exactly once
// and every byte lands.
TEST(AddressSpaceStressTest, ConcurrentFirstTouchFaults) {
  auto pool = testing::MakePool(256);
  auto as = testing::MakeSpace(*pool);
  const uint64_t len = 4 * kHugePageSize;
  const uint64_t a = *as->Mmap(0, len + kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t base = (a + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as->Madvise(base, 2 * kHugePageSize, kMadvHugePage).has_value());
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      for (uint64_t off = t * 8; off < len; off += kPageSize / 2) {
        const uint64_t v = off;
        ASSERT_TRUE(as->Write(base + off, &v, 8).has_value());
      }
    });
  for (auto& t : ts) t.join();
  for (int t = 0; t < 4; ++t)
    for (uint64_t off = t * 8; off < len; off += kPageSize / 2) {
      uint64_t v = 1;
      ASSERT_TRUE(as->Read(base + off, &v, 8).has_value());
      ASSERT_EQ(v, off);
    }
  EXPECT_EQ(as->GetStats().huge_faults, 2u);
  EXPECT_EQ(as->GetStats().rss_pages, len / kPageSize);
}

}  // namespace
}  // namespace usvm::mm
