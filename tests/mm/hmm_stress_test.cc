// HMM stress: CPU threads write their own words while device threads
// migrate the pages back and forth (and read them through range fault),
// and a remapper thread munmaps and remaps one chunk of the range. Every
// byte is checked against a reference at the end.
//
// Layout: kChunks chunks of kChunkPages pages. Chunks [0, kChunks - 1) are
// shared by the CPU threads: word i belongs to thread i % kCpuThreads,
// which writes a monotonically increasing counter tagged with its id, so a
// lost or misplaced write shows. The last chunk belongs to the remapper: it
// munmaps it, maps it again (MAP_FIXED) and rewrites every word with a new
// generation value. The final contents are therefore known exactly.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

using testing::kTsan;

constexpr int kCpuThreads = 3;
constexpr int kDeviceThreads = 2;
constexpr uint64_t kChunkPages = 16;
constexpr uint64_t kChunks = 4;
constexpr uint64_t kChunkBytes = kChunkPages * kPageSize;
constexpr uint64_t kLen = kChunks * kChunkBytes;
constexpr uint64_t kWordsPerChunk = kChunkBytes / 8;
constexpr uint64_t kSharedWords = (kChunks - 1) * kWordsPerChunk;

constexpr int kCpuWrites = kTsan ? 300000 : 5000000;
constexpr int kRemaps = kTsan ? 50 : 500;

uint64_t CpuValue(int t, uint64_t counter) { return (uint64_t{0xC0 + static_cast<uint64_t>(t)} << 56) | counter; }
uint64_t GenValue(uint64_t gen, uint64_t word) { return (uint64_t{0xEE} << 56) | (gen << 24) | word; }

TEST(HmmStressTest, CpuWritesDeviceMigrationsAndRemapKeepEveryByte) {
  auto pool = testing::MakePool(256);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 2 * kLen / kPageSize);
  ASSERT_TRUE(dev);
  const uint64_t a = *as->Mmap(0, kLen, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kLen).has_value());
  const uint64_t own = a + (kChunks - 1) * kChunkBytes;  // the remapper's chunk

  std::atomic<bool> stop{false};
  std::atomic<int> cpu_done{0};
  std::vector<std::vector<uint64_t>> ref(kCpuThreads, std::vector<uint64_t>(kSharedWords, 0));
  std::atomic<uint64_t> device_reads{0}, migrations{0}, remaps_done{0};
  std::vector<std::thread> threads;

  // CPU threads: write own words; sometimes read a word of the remapper's
  // chunk (EFAULT while it is unmapped, else zero or a generation value).
  for (int t = 0; t < kCpuThreads; ++t) {
    threads.emplace_back([&, t] {
      Rng rng(100 + t);
      auto& mine = ref[t];
      uint64_t counter = 0;
      for (int i = 0; i < kCpuWrites; ++i) {
        const uint64_t w = rng.Uniform(kSharedWords / kCpuThreads) * kCpuThreads + t;
        const uint64_t v = CpuValue(t, ++counter);
        auto r = as->AtomicStore(a + w * 8, v);
        if (!r) {
          ADD_FAILURE() << "cpu store: " << r.error().ToString();
          break;
        }
        mine[w] = v;
        if (rng.OneIn(8)) {
          auto got = as->AtomicLoad(a + w * 8);
          if (!got || *got != v) ADD_FAILURE() << "cpu load of own word";
        }
        if (rng.OneIn(16)) {
          const uint64_t ow = rng.Uniform(kWordsPerChunk);
          auto got = as->AtomicLoad(own + ow * 8);
          if (got && *got != 0 && (*got >> 56 != 0xEE || (*got & 0xFFFFFF) != ow))
            ADD_FAILURE() << "remapped chunk word " << ow << " reads " << std::hex << *got;
          if (!got && got.error() != Errc::kFault) ADD_FAILURE() << got.error().ToString();
        }
      }
      cpu_done.fetch_add(1);
    });
  }

  // Device threads: migrate random chunks to the device and back, and read
  // chunks through range fault checking that every word is well formed.
  for (int d = 0; d < kDeviceThreads; ++d) {
    threads.emplace_back([&, d] {
      Rng rng(200 + d);
      std::vector<uint64_t> buf(kWordsPerChunk);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t c = rng.Uniform(kChunks);
        const uint64_t s = a + c * kChunkBytes;
        switch (rng.Uniform(3)) {
          case 0: {
            auto r = dev->MigrateToDevice(s, s + kChunkBytes);
            if (r)
              migrations.fetch_add(*r);
            else if (!(c == kChunks - 1 && r.error() == Errc::kInval)) ADD_FAILURE() << "to device: " << r.error().ToString();
            break;
          }
          case 1: {
            auto r = dev->MigrateToSystem(s, s + kChunkBytes);
            if (r)
              migrations.fetch_add(*r);
            else if (!(c == kChunks - 1 && r.error() == Errc::kInval)) ADD_FAILURE() << "to system: " << r.error().ToString();
            break;
          }
          default: {
            auto r = dev->Read(s, buf.data(), kChunkBytes);
            if (!r) {
              // The remapper's chunk may be unmapped meanwhile.
              if (!(c == kChunks - 1 && r.error() == Errc::kFault))
                ADD_FAILURE() << "device read: " << r.error().ToString();
              break;
            }
            device_reads.fetch_add(1);
            for (uint64_t i = 0; i < kWordsPerChunk; ++i) {
              const uint64_t v = buf[i];
              if (v == 0) continue;
              const uint64_t gw = c * kWordsPerChunk + i;
              const bool ok = c == kChunks - 1
                                  ? (v >> 56 == 0xEE && (v & 0xFFFFFF) == i)
                                  : (v >> 56 == 0xC0 + gw % kCpuThreads);
              if (!ok) {
                ADD_FAILURE() << "device read chunk " << c << " word " << i << ": " << std::hex << v;
                break;
              }
            }
          }
        }
      }
    });
  }

  // The remapper: munmap its chunk, map it again in place, rewrite it.
  uint64_t last_gen = 0;
  threads.emplace_back([&] {
    for (uint64_t gen = 1; gen <= kRemaps || cpu_done.load() < kCpuThreads; ++gen) {
      auto u = as->Munmap(own, kChunkBytes);
      if (!u) {
        ADD_FAILURE() << "munmap: " << u.error().ToString();
        break;
      }
      auto m = as->Mmap(own, kChunkBytes, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous | kMapFixed);
      if (!m || *m != own) {
        ADD_FAILURE() << "mmap fixed failed";
        break;
      }
      // Word by word with atomic stores: CPU threads and the device read
      // these words concurrently.
      bool ok = true;
      for (uint64_t i = 0; i < kWordsPerChunk && ok; ++i) {
        auto w = as->AtomicStore(own + i * 8, GenValue(gen, i));
        if (!w) {
          ADD_FAILURE() << "rewrite: " << w.error().ToString();
          ok = false;
        }
      }
      if (!ok) break;
      last_gen = gen;
      remaps_done.fetch_add(1);
    }
  });

  // CPU threads and the remapper finish on their own; then the devices.
  for (int t = 0; t < kCpuThreads; ++t) threads[t].join();
  threads.back().join();
  stop.store(true);
  for (int d = 0; d < kDeviceThreads; ++d) threads[kCpuThreads + d].join();

  // Check every byte, once through the device and once through the CPU
  // (which faults everything back).
  std::vector<uint64_t> want(kLen / 8);
  for (uint64_t w = 0; w < kSharedWords; ++w) want[w] = ref[w % kCpuThreads][w];
  for (uint64_t i = 0; i < kWordsPerChunk; ++i) want[kSharedWords + i] = GenValue(last_gen, i);
  std::vector<uint64_t> got(kLen / 8);
  ASSERT_TRUE(dev->Read(a, got.data(), kLen).has_value());
  for (uint64_t w = 0; w < got.size(); ++w) ASSERT_EQ(got[w], want[w]) << "device view, word " << w;
  std::fill(got.begin(), got.end(), 0);
  ASSERT_TRUE(as->Read(a, got.data(), kLen).has_value());
  for (uint64_t w = 0; w < got.size(); ++w) ASSERT_EQ(got[w], want[w]) << "cpu view, word " << w;
  EXPECT_EQ(dev->device_pages_in_use(), 0u);
  EXPECT_GT(migrations.load(), 0u);
  EXPECT_GT(device_reads.load(), 0u);
  EXPECT_GE(remaps_done.load(), static_cast<uint64_t>(kRemaps));
  std::printf("migrated pages %lu, device reads %lu, remaps %lu, cpu faults on device pages %lu\n",
              static_cast<unsigned long>(migrations.load()), static_cast<unsigned long>(device_reads.load()),
              static_cast<unsigned long>(remaps_done.load()), static_cast<unsigned long>(dev->cpu_faults()));
  dev.reset();
  as->Exit();
}

}  // namespace
}  // namespace usvm::mm
