// Concurrency of hugetlb mappings (also run under TSan): CPU threads
// incrementing counters in shared and private hugetlb pages while another
// thread zaps private pages and forks short-lived children (whole-page
// copy-on-write), and a mirror device reads the private mapping through
// range fault; and an owner taking pages back from a reading child.
// Checks: no shared increment is lost, nothing fails, and every pool page
// and reservation comes back at the end.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

using testing::DMirror;

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kPages = 4;  // huge pages per mapping

TEST(HugetlbStress, FaultsCowZapForkAndDeviceReadsRace) {
  auto pool = testing::MakePool(256);
  ASSERT_EQ(pool->SetHugetlbPages(4 * kPages), 4 * kPages);
  auto as = testing::MakeSpace(*pool);
  const uint64_t len = kPages * kHugePageSize;
  const uint64_t shared = *as->Mmap(0, len, kRW, kMapShared | kMapAnonymous | kMapHugetlb);
  const uint64_t priv = *as->Mmap(0, len, kRW, kMapPrivate | kMapAnonymous | kMapHugetlb);
  auto dev = DMirror::Create(as, 16);
  ASSERT_TRUE(dev);
  ASSERT_TRUE(dev->Watch(priv, len).has_value());

  constexpr int kWriters = 3;
  constexpr int kIters = 10000;
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> forks{0};
  std::atomic<uint64_t> increments{0};
  constexpr int kMinForks = 20;
  std::atomic<uint64_t> child_cow{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t + 1);
      // At least kIters rounds, and until the forking thread got its
      // rounds in (a writer-starved rwsem may hold it off for a while).
      for (int i = 0; i < kIters || forks.load() < kMinForks; ++i) {
        const uint64_t page = rng() % kPages;
        if (!as->AtomicFetchAdd(shared + page * kHugePageSize + 8 * t, 1)) ++failures;
        if (!as->AtomicFetchAdd(priv + page * kHugePageSize + 8 * t, 1)) ++failures;
        ++increments;
      }
    });
  }
  threads.emplace_back([&] {  // zaps and forks
    std::mt19937 rng(99);
    while (!stop.load()) {
      const uint64_t page = rng() % kPages;
      if (!as->Madvise(priv + page * kHugePageSize, kHugePageSize, kMadvDontNeed)) ++failures;
      auto child = as->Fork();
      if (!child) {
        ++failures;
        continue;
      }
      // The child reads the page just zapped (a fresh fault of its own)
      // and writes another one, shared with the parent (a whole-page copy).
      uint64_t v;
      const uint64_t other = (page + 1) % kPages;
      if (!(*child)->Read(priv + page * kHugePageSize, &v, 8)) ++failures;
      if (!(*child)->AtomicFetchAdd(priv + other * kHugePageSize + 64, 1)) ++failures;
      child_cow += (*child)->GetStats().cow_breaks;
      (*child)->Exit();
      ++forks;
    }
  });
  threads.emplace_back([&] {  // the device reads the private mapping
    std::vector<uint8_t> buf(64);
    std::mt19937 rng(7);
    while (!stop.load()) {
      const uint64_t page = rng() % kPages;
      if (!dev->Read(priv + page * kHugePageSize, buf.data(), buf.size())) ++failures;
    }
  });
  for (int t = 0; t < kWriters; ++t) threads[t].join();
  stop.store(true);
  for (size_t t = kWriters; t < threads.size(); ++t) threads[t].join();

  EXPECT_EQ(failures.load(), 0);
  EXPECT_GE(forks.load(), kMinForks);
  EXPECT_GT(child_cow.load(), 0u);
  uint64_t total = 0;
  for (uint64_t p = 0; p < kPages; ++p)
    for (int t = 0; t < kWriters; ++t) total += *as->AtomicLoad(shared + p * kHugePageSize + 8 * t);
  EXPECT_EQ(total, increments.load());
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_TRUE(as->QueryPte(shared + p * kHugePageSize).hugetlb);
  }
  dev.reset();
  as->Exit();
  const auto st = pool->GetHugetlbStats();
  EXPECT_EQ(st.free, st.total);
  EXPECT_EQ(st.reserved, 0u);
}

// The owner takes pages back from a child (unmap_ref_private) while the
// child keeps reading them: every owner write succeeds, the child sees
// either the old bytes or SIGBUS, never the owner's new bytes.
TEST(HugetlbStress, OwnerTakesPagesBackWhileTheChildReads) {
  auto pool = testing::MakePool(64);
  ASSERT_EQ(pool->SetHugetlbPages(kPages), kPages);  // no page to spare for a copy
  auto as = testing::MakeSpace(*pool);
  const uint64_t len = kPages * kHugePageSize;
  const uint64_t a = *as->Mmap(0, len, kRW, kMapPrivate | kMapAnonymous | kMapHugetlb);
  for (uint64_t p = 0; p < kPages; ++p) ASSERT_TRUE(as->AtomicStore(a + p * kHugePageSize, 1).has_value());
  auto child = *as->Fork();
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::atomic<uint64_t> sigbus{0};
  std::thread reader([&] {
    std::mt19937 rng(5);
    while (!stop.load()) {
      const uint64_t p = rng() % kPages;
      auto v = child->AtomicLoad(a + p * kHugePageSize);
      if (!v) {
        if (v.error() == Errc::kFault) ++sigbus; else ++bad;
      } else if (*v != 1) {
        ++bad;
      }
    }
  });
  for (int round = 0; round < 200; ++round)
    for (uint64_t p = 0; p < kPages; ++p)
      if (!as->AtomicStore(a + p * kHugePageSize, 2 + round)) ++bad;
  stop.store(true);
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(*as->AtomicLoad(a + p * kHugePageSize), 201u);
    EXPECT_EQ(child->QueryPte(a + p * kHugePageSize).kind, PteInfo::Kind::kNone);
  }
  EXPECT_EQ(child->AtomicLoad(a).error(), Errc::kFault);
  child->Exit();
  as->Exit();
  EXPECT_EQ(pool->GetHugetlbStats().free, kPages);
  EXPECT_EQ(pool->GetHugetlbStats().reserved, 0u);
}

}  // namespace
}  // namespace usvm::mm
