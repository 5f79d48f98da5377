// Device-private page lifetime under concurrent CPU faults (do_swap_page's
// recheck / reference / page lock around migrate_to_ram).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/migrate_device.h"

namespace usvm::mm {
namespace {

using testing::kTsan;

// Bug: the CPU fault path read a device-private entry, dropped the page
// table lock and called MigrateToRam with no recheck, no reference and no
// page lock. Two threads touching one device page both called the driver;
// the second one for a page the first had already migrated and freed.
// Each round: one page goes to the device, two threads read it at once,
// the driver is slow (so both threads fault while the first migrates).
// MigrateToRam must run once per round, on a live, locked page.
TEST(HmmDevicePageConcurrencyTest, TwoCpuThreadsFaultingOneDevicePageMigrateItOnce) {
  constexpr int kRounds = 20;
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 8);
  ASSERT_TRUE(dev);
  const uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kPageSize).has_value());
  dev->set_migrate_to_ram_delay_us(5000);
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_TRUE(as->AtomicStore(a, 1000 + round).has_value());
    ASSERT_EQ(*dev->MigrateToDevice(a, a + kPageSize), 1u);
    ASSERT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
    std::atomic<int> ready{0};
    uint64_t seen[2] = {0, 0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
      threads.emplace_back([&, t] {
        ready.fetch_add(1);
        while (ready.load() < 2) std::this_thread::yield();
        auto v = as->AtomicLoad(a);
        seen[t] = v ? *v : ~uint64_t{0};
      });
    for (auto& th : threads) th.join();
    EXPECT_EQ(seen[0], uint64_t(1000 + round));
    EXPECT_EQ(seen[1], uint64_t(1000 + round));
    EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kPresent);
  }
  EXPECT_EQ(dev->cpu_faults(), uint64_t{kRounds});
  EXPECT_EQ(dev->bad_migrate_to_ram(), 0u);
  EXPECT_EQ(dev->device_pages_in_use(), 0u);
}

// The same bug through the range-fault and pin paths: a CPU read, another
// device's range fault (which faults someone else's device page) and a
// long-term pin touch one device page at once; its owner migrates it once.
TEST(HmmDevicePageConcurrencyTest, CpuRangeFaultAndPinOnOneDevicePageMigrateItOnce) {
  constexpr int kRounds = 10;
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  auto owner = testing::DMirror::Create(as, 8);
  auto other = testing::DMirror::Create(as, 8);
  ASSERT_TRUE(owner && other);
  const uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(owner->Watch(a, kPageSize).has_value());
  ASSERT_TRUE(other->Watch(a, kPageSize).has_value());
  owner->set_migrate_to_ram_delay_us(5000);
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_TRUE(as->AtomicStore(a, 500 + round).has_value());
    ASSERT_EQ(*owner->MigrateToDevice(a, a + kPageSize), 1u);
    std::atomic<int> ready{0};
    auto go = [&] {
      ready.fetch_add(1);
      while (ready.load() < 3) std::this_thread::yield();
    };
    std::thread cpu([&] {
      go();
      auto v = as->AtomicLoad(a);
      EXPECT_TRUE(v && *v == uint64_t(500 + round));
    });
    std::thread dev([&] {
      go();
      uint64_t v = 0;
      EXPECT_TRUE(other->Read(a, &v, 8).has_value());
      EXPECT_EQ(v, uint64_t(500 + round));
    });
    std::thread pin([&] {
      go();
      Pfn p;
      auto r = as->PinUserPages(a, 1, false, &p);
      EXPECT_TRUE(r.has_value());
      if (r) as->UnpinUserPage(p);
    });
    cpu.join();
    dev.join();
    pin.join();
  }
  EXPECT_EQ(owner->cpu_faults(), uint64_t{kRounds});
  EXPECT_EQ(owner->bad_migrate_to_ram(), 0u);
  EXPECT_EQ(other->cpu_faults(), 0u);
}

// Device-frame eviction (no mmap lock) racing CPU faults in a parent and
// its fork child, device migrations and device reads. The parent's CPU
// threads own interleaved words and write increasing counters; the child
// reads its words, which must keep the values they had at fork. Every
// word is checked at the end, and no device page may leak.
TEST(HmmDevicePageConcurrencyTest, CpuFaultsDuringDeviceFrameEvictionKeepEveryByte) {
  constexpr uint64_t kPagesN = 32;
  constexpr uint64_t kLen = kPagesN * kPageSize;
  constexpr uint64_t kWords = kLen / 8;
  constexpr int kCpuThreads = 2;
  const int kWrites = kTsan ? 20000 : 300000;
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 2 * kPagesN);
  ASSERT_TRUE(dev);
  const uint64_t a = *as->Mmap(0, kLen, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kLen).has_value());
  for (uint64_t w = 0; w < kWords; ++w) ASSERT_TRUE(as->AtomicStore(a + w * 8, w).has_value());
  ASSERT_EQ(*dev->MigrateToDevice(a, a + kLen), kPagesN);
  auto child = *as->Fork();  // shares the device pages copy-on-write

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> evicted{0};
  std::vector<std::vector<uint64_t>> last(kCpuThreads, std::vector<uint64_t>(kWords, 0));
  std::vector<std::thread> threads;
  for (int t = 0; t < kCpuThreads; ++t)
    threads.emplace_back([&, t] {
      uint64_t x = 12345 + t;
      for (int i = 1; i <= kWrites; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const uint64_t w = ((x >> 33) % (kWords / kCpuThreads)) * kCpuThreads + t;
        const uint64_t v = (uint64_t(t + 1) << 48) | uint64_t(i);
        auto r = as->AtomicStore(a + w * 8, v);
        if (!r) {
          ADD_FAILURE() << "cpu store: " << r.error().ToString();
          break;
        }
        last[t][w] = v;
      }
    });
  threads.emplace_back([&] {  // the child reads what it had at fork
    uint64_t x = 999;
    while (!stop.load()) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const uint64_t w = (x >> 33) % kWords;
      auto v = child->AtomicLoad(a + w * 8);
      if (!v || *v != w) {
        ADD_FAILURE() << "child word " << w << " reads " << (v ? *v : ~0ull);
        break;
      }
    }
  });
  threads.emplace_back([&] {  // the device: migrate to device, read, evict by frame
    std::vector<DevicePfn> all(dev->pagemap().npages());
    for (uint64_t i = 0; i < all.size(); ++i) all[i] = dev->pagemap().PfnOf(i);
    std::vector<uint64_t> buf(kWords);
    uint64_t round = 0;
    while (!stop.load()) {
      switch (round++ % 3) {
        case 0:
          if (auto r = dev->MigrateToDevice(a, a + kLen); !r) ADD_FAILURE() << r.error().ToString();
          break;
        case 1:
          if (auto r = dev->Read(a, buf.data(), kLen); !r) ADD_FAILURE() << r.error().ToString();
          break;
        default:
          if (auto r = EvictDevicePages(dev->pagemap(), all.data(), all.size()))
            evicted.fetch_add(*r);
          else
            ADD_FAILURE() << r.error().ToString();
      }
    }
  });
  for (int t = 0; t < kCpuThreads; ++t) threads[t].join();
  stop.store(true);
  for (size_t t = kCpuThreads; t < threads.size(); ++t) threads[t].join();

  for (uint64_t w = 0; w < kWords; ++w) {
    const uint64_t want = last[w % kCpuThreads][w] ? last[w % kCpuThreads][w] : w;
    ASSERT_EQ(*as->AtomicLoad(a + w * 8), want) << "parent word " << w;
    ASSERT_EQ(*child->AtomicLoad(a + w * 8), w) << "child word " << w;
  }
  EXPECT_GT(evicted.load(), 0u);
  EXPECT_EQ(dev->bad_migrate_to_ram(), 0u);
  child->Exit();
  ASSERT_TRUE(dev->MigrateToSystem(a, a + kLen).has_value());
  EXPECT_EQ(dev->device_pages_in_use(), 0u) << "device pages leaked";
}

// Address spaces torn down while device-frame eviction walks them: fork
// children that share the device pages are exited (and destroyed) at
// random moments while another thread evicts by frame and the parent
// migrates back to the device. The rmap hands the evictor strong
// references, so nothing is used after free; no page leaks, and the
// parent's bytes survive.
TEST(HmmDevicePageConcurrencyTest, SpacesExitingDuringDeviceFrameEvictionLeakNothing) {
  constexpr uint64_t kPagesN = 16;
  constexpr uint64_t kLen = kPagesN * kPageSize;
  const int kRounds = kTsan ? 30 : 200;
  auto pool = testing::MakePool(64);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 4 * kPagesN);
  ASSERT_TRUE(dev);
  const uint64_t a = *as->Mmap(0, kLen, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kLen).has_value());
  for (uint64_t p = 0; p < kPagesN; ++p) ASSERT_TRUE(as->AtomicStore(a + p * kPageSize, 77 + p).has_value());
  std::atomic<bool> stop{false};
  std::thread evictor([&] {
    std::vector<DevicePfn> all(dev->pagemap().npages());
    for (uint64_t i = 0; i < all.size(); ++i) all[i] = dev->pagemap().PfnOf(i);
    while (!stop.load())
      if (auto r = EvictDevicePages(dev->pagemap(), all.data(), all.size()); !r) ADD_FAILURE() << r.error().ToString();
  });
  for (int round = 0; round < kRounds; ++round) {
    auto moved = dev->MigrateToDevice(a, a + kLen);
    ASSERT_TRUE(moved.has_value());
    auto child = as->Fork();
    ASSERT_TRUE(child.has_value());
    if (round % 2) {
      const uint64_t p = round % kPagesN;
      auto v = (*child)->AtomicLoad(a + p * kPageSize);
      EXPECT_TRUE(v && *v == 77 + p);
    }
    (*child)->Exit();
    child->reset();  // destroyed here, or by the evictor's last reference
  }
  stop.store(true);
  evictor.join();
  for (uint64_t p = 0; p < kPagesN; ++p) EXPECT_EQ(*as->AtomicLoad(a + p * kPageSize), 77 + p);
  ASSERT_TRUE(dev->MigrateToSystem(a, a + kLen).has_value());
  EXPECT_EQ(dev->device_pages_in_use(), 0u) << "device pages leaked";
  for (uint64_t p = 0; p < dev->pagemap().npages(); ++p) EXPECT_EQ(dev->pagemap().DebugRmapCount(p), 0u);
}

}  // namespace
}  // namespace usvm::mm
