// BuddyAllocator and Vram: property tests against a reference set of
// allocated intervals.
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "usvm/base/env.h"
#include "usvm/gpu/buddy_allocator.h"
#include "usvm/gpu/vram.h"

namespace usvm::gpu {
namespace {

uint64_t RoundPow2(uint64_t b) {
  uint64_t r = 4096;
  while (r < b) r <<= 1;
  return r;
}

class BuddyPropertyTest : public ::testing::TestWithParam<uint64_t> {};

// Random allocs and frees: blocks are aligned, inside the space, never
// overlap; ENOMEM only when no free block is large enough; freeing all
// restores the initial blocks.
TEST_P(BuddyPropertyTest, RandomAllocFreeAgainstReference) {
  const uint64_t size = GetParam();
  auto buddy = BuddyAllocator::TryCreate(size, 12).value();
  const BuddyStats initial = buddy->Stats();
  EXPECT_EQ(initial.free_bytes, size);
  std::map<uint64_t, uint64_t> live;  // offset -> bytes
  Rng rng(size);
  uint64_t enomem = 0;
  for (int i = 0; i < 20000; ++i) {
    if (live.empty() || rng.Uniform(100) < 55) {
      const uint64_t want = 1 + rng.Uniform(rng.OneIn(8) ? (uint64_t{4096} << 12) : 64 * 1024);
      const uint64_t largest_before = buddy->Stats().largest_free_block;
      auto r = buddy->Alloc(want);
      if (!r) {
        ASSERT_EQ(r.error(), Errc::kNoMem);
        // Truly full for this size: no free block that large.
        EXPECT_LT(largest_before, RoundPow2(want));
        ++enomem;
        continue;
      }
      const uint64_t off = *r, bytes = RoundPow2(want);
      EXPECT_EQ(buddy->BlockSize(off).value(), bytes);
      EXPECT_EQ(off % bytes, 0u) << "block not naturally aligned";
      EXPECT_LE(off + bytes, size);
      auto next = live.lower_bound(off);
      if (next != live.end()) { EXPECT_LE(off + bytes, next->first) << "overlaps next block"; }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        EXPECT_LE(prev->first + prev->second, off) << "overlaps previous block";
      }
      live[off] = bytes;
    } else {
      auto it = live.begin();
      std::advance(it, rng.Uniform(live.size()));
      ASSERT_TRUE(buddy->Free(it->first).has_value());
      live.erase(it);
    }
    if (i % 1000 == 0) { ASSERT_TRUE(buddy->DebugCheck().has_value()) << buddy->DebugCheck().error().what(); }
  }
  uint64_t used = 0;
  for (auto& [o, b] : live) used += b;
  EXPECT_EQ(buddy->Stats().allocated_bytes, used);
  EXPECT_GT(enomem + live.size(), 0u);
  for (auto& [o, b] : live) ASSERT_TRUE(buddy->Free(o).has_value());
  ASSERT_TRUE(buddy->DebugCheck().has_value());
  const BuddyStats end = buddy->Stats();
  EXPECT_EQ(end.free_bytes, size);
  EXPECT_EQ(end.allocated_blocks, 0u);
  EXPECT_EQ(end.free_blocks_per_order, initial.free_blocks_per_order) << "not fully coalesced";
  EXPECT_EQ(end.largest_free_block, initial.largest_free_block);
}

INSTANTIATE_TEST_SUITE_P(Sizes, BuddyPropertyTest,
                         ::testing::Values(uint64_t{64} << 20, (uint64_t{5} << 20) + 3 * 4096));

TEST(BuddyAllocatorTest, FillsExactlyThenEnomem) {
  const uint64_t size = (uint64_t{2} << 20) + 8 * 4096;
  auto buddy = BuddyAllocator::TryCreate(size, 9).value();
  std::vector<uint64_t> offs;
  for (;;) {
    auto r = buddy->Alloc(4096);
    if (!r) {
      EXPECT_EQ(r.error(), Errc::kNoMem);
      break;
    }
    offs.push_back(*r);
  }
  EXPECT_EQ(offs.size(), size / 4096);
  EXPECT_EQ(buddy->Stats().free_bytes, 0u);
  EXPECT_EQ(buddy->Stats().fragmentation, 0.0);
  // Free every other page: plenty free, but nothing above 4 KiB.
  for (size_t i = 0; i < offs.size(); i += 2) ASSERT_TRUE(buddy->Free(offs[i]).has_value());
  const BuddyStats s = buddy->Stats();
  EXPECT_EQ(s.largest_free_block, 4096u);
  EXPECT_GT(s.fragmentation, 0.99);
  EXPECT_EQ(buddy->Alloc(8192).error(), Errc::kNoMem);
  EXPECT_TRUE(buddy->Alloc(4096).has_value());
  ASSERT_TRUE(buddy->DebugCheck().has_value());
}

TEST(BuddyAllocatorTest, TwoMegabyteBlocksAndCoalescing) {
  auto buddy = BuddyAllocator::TryCreate(uint64_t{8} << 20, 9).value();
  auto a = buddy->Alloc(4096).value();
  // The 2 MiB block holding `a` is split; three others remain.
  std::vector<uint64_t> big;
  for (int i = 0; i < 3; ++i) big.push_back(buddy->Alloc(uint64_t{2} << 20).value());
  EXPECT_EQ(buddy->Alloc(uint64_t{2} << 20).error(), Errc::kNoMem);
  ASSERT_TRUE(buddy->Free(a).has_value());
  EXPECT_TRUE(buddy->Alloc(uint64_t{2} << 20).has_value()) << "4 KiB free did not coalesce to 2 MiB";
}

TEST(BuddyAllocatorTest, BadFreesChangeNothing) {
  auto buddy = BuddyAllocator::TryCreate(uint64_t{4} << 20, 10).value();
  const uint64_t a = buddy->Alloc(16384).value();
  const BuddyStats before = buddy->Stats();
  EXPECT_EQ(buddy->Free(a + 4096).error(), Errc::kInval);  // inside a block
  EXPECT_EQ(buddy->Free(a + 1).error(), Errc::kInval);
  EXPECT_EQ(buddy->Free(uint64_t{4} << 20).error(), Errc::kInval);
  EXPECT_EQ(buddy->Free(a + 65536).error(), Errc::kInval);  // a free block
  ASSERT_TRUE(buddy->Free(a).has_value());
  EXPECT_EQ(buddy->Free(a).error(), Errc::kInval);  // double free
  EXPECT_EQ(buddy->Stats().free_bytes, before.free_bytes + 16384);
  ASSERT_TRUE(buddy->DebugCheck().has_value());
}

TEST(VramTest, LazyArenaBytesAndInjectedEnomem) {
  Env env(std::make_unique<ManualClock>(), 3);
  // 8 GiB of VRAM costs nothing until touched.
  auto vram = Vram::TryCreate(uint64_t{8} << 30, env).value();
  const uint64_t off = vram->Alloc(uint64_t{2} << 20).value();
  std::memset(vram->Data(off), 0x5a, 4096);
  EXPECT_EQ(static_cast<unsigned char>(*vram->Data(off + 4095)), 0x5a);
  env.faults().FailNth("gpu.vram_alloc", 1);
  EXPECT_EQ(vram->Alloc(4096).error(), Errc::kNoMem);
  EXPECT_TRUE(vram->Alloc(4096).has_value());
  EXPECT_TRUE(vram->Free(off).has_value());
}

}  // namespace
}  // namespace usvm::gpu
