// The mirror invariant under stress: readers mirror CPU page table entries
// into a shadow "device" table with the interval notifier protocol while
// other threads munmap, mprotect, madvise, write and fork the address space.
//
// Reader protocol (what a GPU fault handler does):
//   seq = sub.ReadBegin();
//   pte = as->QueryPte(addr);          // snapshot of the CPU page table
//   lock driver; if (sub.ReadRetry(seq)) retry;
//   shadow[page] = pte; unlock.
// The interval callback zaps the shadow for the invalidated range under the
// driver lock. A classic notifier registered on the same address space runs
// right after every interval callback of each invalidation has returned,
// before the page table changes: it checks that no shadow entry remains in
// the range (the security rule: no device mapping survives an
// invalidation). (Not at the end: by then the interval part has ended and
// readers may legitimately mirror the new entries.)
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kPages = 64;

struct ShadowPte {
  bool valid = false;
  bool writable = false;
  Pfn pfn = kInvalidPfn;
};

class Mirror : public MmuIntervalNotifierOps {
 public:
  explicit Mirror(uint64_t base) : base_(base) {}

  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    if (!r.blockable) return false;
    MutexLock l(mu);
    sub->SetSeq(cur_seq);
    ForEachPage(r, [&](uint64_t p) { shadow[p] = ShadowPte{}; });
    invalidations.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  // Pages of the mirrored window inside r.
  template <typename F>
  void ForEachPage(const NotifierRange& r, F f) const {
    const uint64_t s = std::max(r.start, base_);
    const uint64_t e = std::min(r.end, base_ + kPages * kPage);
    for (uint64_t a = s; a < e; a += kPage) f((a - base_) / kPage);
  }

  // Counts shadow entries left in r. REQUIRES: mu.
  int LeftIn(const NotifierRange& r) USVM_REQUIRES(mu) {
    int n = 0;
    ForEachPage(r, [&](uint64_t p) { n += shadow[p].valid ? 1 : 0; });
    return n;
  }

  Mutex mu;
  ShadowPte shadow[kPages] USVM_GUARDED_BY(mu);
  std::atomic<uint64_t> invalidations{0};
  std::atomic<uint64_t> maps{0};

 private:
  const uint64_t base_;
};

// Registered after the interval subscription exists, so the hub calls it
// after every interval callback of the same invalidation has returned.
class Checker : public MmuNotifier {
 public:
  explicit Checker(Mirror& m) : m_(m) {}
  bool InvalidateRangeStart(const NotifierRange& r) override {
    Check(r);
    return true;
  }
  std::atomic<int> violations{0};
  std::atomic<uint64_t> checks{0};

 private:
  void Check(const NotifierRange& r) {
    MutexLock l(m_.mu);
    checks.fetch_add(1, std::memory_order_relaxed);
    if (m_.LeftIn(r) != 0) violations.fetch_add(1);
  }
  Mirror& m_;
};

TEST(MmuNotifierMirrorStress, NoShadowEntrySurvivesAnInvalidation) {
  auto pool = FramePool::TryCreate(64 << 20);
  ASSERT_TRUE(pool.has_value());
  auto as_r = AddressSpace::TryCreate(**pool);
  ASSERT_TRUE(as_r.has_value());
  std::shared_ptr<AddressSpace> as = *as_r;
  const uint64_t len = kPages * kPage;
  auto base_r = as->Mmap(0, len, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(base_r.has_value());
  const uint64_t base = *base_r;

  Mirror mirror(base);
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as->notifiers().Insert(&sub, base, len, &mirror));
  Checker checker(mirror);
  ASSERT_TRUE(as->notifiers().Register(&checker));

  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  constexpr int kReaders = 2;
  for (int t = 0; t < kReaders; ++t) {
    threads.emplace_back([&, t] {
      Rng rng(100 + t);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t p = rng.Uniform(kPages);
        for (;;) {
          const uint64_t seq = sub.ReadBegin();
          const PteInfo pte = as->QueryPte(base + p * kPage);
          MutexLock l(mirror.mu);
          if (sub.ReadRetry(seq)) continue;
          if (pte.kind == PteInfo::Kind::kPresent) {
            mirror.shadow[p] = ShadowPte{true, pte.writable, pte.pfn};
            mirror.maps.fetch_add(1, std::memory_order_relaxed);
          }
          break;
        }
      }
    });
  }
  // The CPU: touches pages so there is something to mirror.
  threads.emplace_back([&] {
    Rng rng(7);
    uint64_t v = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint64_t a = base + rng.Uniform(kPages) * kPage;
      ++v;
      // Atomics: two simulated CPUs touch the same words. EFAULT while a
      // page is unmapped or read-only is expected.
      if (rng.OneIn(2))
        (void)as->AtomicStore(a, v);
      else
        (void)as->AtomicLoad(a);
    }
  });

  // The mutators: munmap + remap, mprotect, madvise, fork.
  Rng rng(11);
  constexpr int kOps = 20000;
  for (int i = 0; i < kOps; ++i) {
    const uint64_t p = rng.Uniform(kPages);
    const uint64_t n = 1 + rng.Uniform(std::min<uint64_t>(8, kPages - p));
    const uint64_t a = base + p * kPage;
    switch (rng.Uniform(5)) {
      case 0:
        ASSERT_TRUE(as->Munmap(a, n * kPage));
        ASSERT_TRUE(as->Mmap(a, n * kPage, kProtRead | kProtWrite,
                             kMapPrivate | kMapAnonymous | kMapFixed));
        break;
      case 1:
        ASSERT_TRUE(as->Mprotect(a, n * kPage, kProtRead));
        ASSERT_TRUE(as->Mprotect(a, n * kPage, kProtRead | kProtWrite));
        break;
      case 2:
        ASSERT_TRUE(as->Madvise(a, n * kPage, kMadvDontNeed));
        break;
      case 3: {
        auto child = as->Fork();
        ASSERT_TRUE(child.has_value());
        (*child)->Exit();
        break;
      }
      case 4: {
        ASSERT_TRUE(as->AtomicStore(a, static_cast<uint64_t>(i)));  // COW break after a fork
        break;
      }
    }
  }
  stop.store(true);
  for (auto& t : threads) t.join();

  EXPECT_EQ(checker.violations.load(), 0);
  EXPECT_GT(mirror.invalidations.load(), 0u);
  EXPECT_GT(checker.checks.load(), 0u);
  EXPECT_GT(mirror.maps.load(), 0u);
  RecordProperty("maps", static_cast<int>(mirror.maps.load()));
  RecordProperty("invalidations", static_cast<int>(mirror.invalidations.load()));

  // Teardown: the RELEASE invalidation empties the shadow as well.
  as->Exit();
  {
    MutexLock l(mirror.mu);
    for (uint64_t p = 0; p < kPages; ++p) EXPECT_FALSE(mirror.shadow[p].valid) << p;
  }
  ASSERT_TRUE(as->notifiers().Remove(&sub));
  ASSERT_TRUE(as->notifiers().Unregister(&checker));
}

}  // namespace
}  // namespace usvm::mm
