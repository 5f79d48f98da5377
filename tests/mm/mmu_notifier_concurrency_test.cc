// Concurrent rules of MMU interval notifiers: blocking ReadBegin, Remove
// from a worker while invalidations run, concurrent invalidations sharing
// one odd sequence, the busy fallback of two-pass, and the reader protocol
// against a model page table. Runs under TSan (the `concurrency` label).
//
// Ordering checks use flags, not timing: a thread that must stay blocked
// until X records whether X had happened when it woke; the sleeps only give
// a wrong implementation the chance to wake early.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPage = 4096;

NotifierRange Range(uint64_t start, uint64_t end, bool blockable = true) {
  NotifierRange r;
  r.start = start;
  r.end = end;
  r.event = NotifyEvent::kUnmap;
  r.blockable = blockable;
  return r;
}

void Pause() { std::this_thread::sleep_for(std::chrono::milliseconds(20)); }

class SeqOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    MutexLock l(mu);
    sub->SetSeq(cur_seq);
    last_seq.store(cur_seq, std::memory_order_relaxed);
    calls.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  Mutex mu;
  std::atomic<uint64_t> last_seq{0};
  std::atomic<int> calls{0};
};

TEST(MmuIntervalNotifierConcurrency, ReadBeginBlocksUntilTheLastNestedInvalidationEnds) {
  MmuNotifierSubscriptions hub(nullptr);
  SeqOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 2 * kPage)));
  std::atomic<bool> last_end_done{false};
  std::atomic<bool> woke_after_last_end{false};
  std::atomic<bool> woke{false};
  std::thread reader([&] {
    uint64_t seq = sub.ReadBegin();
    woke_after_last_end.store(last_end_done.load());
    woke.store(true);
    MutexLock l(ops.mu);
    EXPECT_FALSE(sub.ReadRetry(seq));
  });
  Pause();
  hub.InvalidateRangeEnd(Range(0, kPage));
  Pause();
  EXPECT_FALSE(woke.load());  // one invalidation is still active
  last_end_done.store(true);
  hub.InvalidateRangeEnd(Range(0, 2 * kPage));
  reader.join();
  EXPECT_TRUE(woke_after_last_end.load());
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifierConcurrency, InsertedMidInvalidationCollidesOnItsFirstReadBegin) {
  MmuNotifierSubscriptions hub(nullptr);
  SeqOps ops;
  MmuIntervalNotifier sub;
  // The invalidation hits nothing yet: the tree is empty.
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  std::atomic<bool> end_done{false};
  std::atomic<bool> woke_after_end{false};
  std::thread reader([&] {
    (void)sub.ReadBegin();
    woke_after_end.store(end_done.load());
  });
  Pause();
  end_done.store(true);
  hub.InvalidateRangeEnd(Range(0, kPage));
  reader.join();
  EXPECT_TRUE(woke_after_end.load());
  EXPECT_EQ(ops.calls.load(), 0);
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifierConcurrency, RemoveWaitsForTheInvalidationInFlight) {
  MmuNotifierSubscriptions hub(nullptr);
  SeqOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  std::atomic<bool> end_done{false};
  std::atomic<bool> returned_after_end{false};
  std::thread worker([&] {
    ASSERT_TRUE(hub.Remove(&sub));
    returned_after_end.store(end_done.load());
  });
  // The removal is parked on the deferred list until the end.
  while (hub.DebugDeferredSize() == 0) std::this_thread::yield();
  Pause();
  end_done.store(true);
  hub.InvalidateRangeEnd(Range(0, kPage));
  worker.join();
  EXPECT_TRUE(returned_after_end.load());
  EXPECT_EQ(hub.DebugTreeSize(), 0u);
  EXPECT_EQ(sub.hub(), nullptr);
}

TEST(MmuIntervalNotifierConcurrency, ConcurrentInvalidationsShareOneOddSeqUntilTheLastEnds) {
  MmuNotifierSubscriptions hub(nullptr);
  SeqOps ops;
  MmuIntervalNotifier a, b;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &ops));
  ASSERT_TRUE(hub.Insert(&b, kPage, kPage, &ops));
  const uint64_t idle = hub.DebugInvalidateSeq();
  std::atomic<int> step{0};
  std::atomic<uint64_t> seq_a{0}, seq_b{0}, seq_after_first_end{0};
  std::thread ta([&] {
    ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
    seq_a.store(ops.last_seq.load());
    step.store(1);
    while (step.load() != 2) std::this_thread::yield();
    hub.InvalidateRangeEnd(Range(0, kPage));
    seq_after_first_end.store(hub.DebugInvalidateSeq());
    step.store(3);
  });
  std::thread tb([&] {
    while (step.load() != 1) std::this_thread::yield();
    ASSERT_TRUE(hub.InvalidateRangeStart(Range(kPage, 2 * kPage)));
    seq_b.store(ops.last_seq.load());
    step.store(2);
    while (step.load() != 3) std::this_thread::yield();
    hub.InvalidateRangeEnd(Range(kPage, 2 * kPage));
  });
  ta.join();
  tb.join();
  EXPECT_EQ(seq_a.load(), idle + 1);
  EXPECT_EQ(seq_b.load(), idle + 1);
  EXPECT_EQ(seq_after_first_end.load(), idle + 1);
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 2);
  ASSERT_TRUE(hub.Remove(&a));
  ASSERT_TRUE(hub.Remove(&b));
}

// Two-pass ops whose finish can be held at a gate, with one finish object.
struct GateFinish;
class GatedOps;
struct GateFinish : MmuIntervalFinish {
  GatedOps* ops = nullptr;
  void Finish(const NotifierRange&, uint64_t) override;
};
class GatedOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    single_passes.fetch_add(1);
    return true;
  }
  bool InvalidateStart(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq,
                       MmuIntervalFinish** finish) override {
    GateFinish* f = pool.TryAlloc();
    if (!f) return Invalidate(sub, r, cur_seq);
    sub->SetSeq(cur_seq);
    f->ops = this;
    *finish = f;
    return true;
  }
  MmuIntervalFinishPool<GateFinish, 1> pool;
  std::atomic<bool> in_finish{false};
  std::atomic<bool> open{false};
  std::atomic<int> single_passes{0};
  std::atomic<int> finishes{0};
};
void GateFinish::Finish(const NotifierRange&, uint64_t) {
  GatedOps* o = ops;
  o->in_finish.store(true);
  while (!o->open.load()) std::this_thread::yield();
  o->finishes.fetch_add(1);
  o->pool.Free(this);
}

TEST(MmuIntervalNotifierConcurrency, TwoPassFallsBackWhenAConcurrentInvalidationHoldsTheFinish) {
  MmuNotifierSubscriptions hub(nullptr);
  GatedOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  std::thread first([&] {
    ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
    hub.InvalidateRangeEnd(Range(0, kPage));
  });
  while (!ops.in_finish.load()) std::this_thread::yield();
  // The first invalidation is in its second pass and holds the only finish
  // object: this one must do a complete single pass, and not wait.
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  EXPECT_EQ(ops.single_passes.load(), 1);
  EXPECT_EQ(ops.finishes.load(), 0);
  hub.InvalidateRangeEnd(Range(0, kPage));
  ops.open.store(true);
  first.join();
  EXPECT_EQ(ops.finishes.load(), 1);
  EXPECT_EQ(ops.pool.DebugInUse(), 0u);
  ASSERT_TRUE(hub.Remove(&sub));
}

// Subscriptions come and go on workers while other threads invalidate; a
// callback must never run once Remove has returned.
class GuardedOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override;
};
struct Tracked {
  MmuIntervalNotifier sub;
  std::atomic<bool> removed{true};
  std::atomic<int> late_calls{0};
  Mutex mu;
};
bool GuardedOps::Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) {
  // The subscription is the first member of Tracked.
  auto* t = reinterpret_cast<Tracked*>(sub);
  if (t->removed.load(std::memory_order_acquire)) t->late_calls.fetch_add(1);
  MutexLock l(t->mu);
  sub->SetSeq(cur_seq);
  return true;
}

TEST(MmuIntervalNotifierConcurrency, RemoveFromAWorkerWhileInvalidationsAreInFlight) {
  MmuNotifierSubscriptions hub(nullptr);
  GuardedOps ops;
  constexpr int kSubs = 16;
  std::vector<std::unique_ptr<Tracked>> subs;
  for (int i = 0; i < kSubs; ++i) subs.push_back(std::make_unique<Tracked>());
  std::atomic<bool> stop{false};
  std::vector<std::thread> invalidators;
  for (int t = 0; t < 2; ++t) {
    invalidators.emplace_back([&, t] {
      Rng rng(100 + t);
      while (!stop.load(std::memory_order_relaxed)) {
        uint64_t s = rng.Uniform(kSubs) * kPage;
        auto r = Range(s, s + (1 + rng.Uniform(4)) * kPage);
        ASSERT_TRUE(hub.InvalidateRangeStart(r));
        hub.InvalidateRangeEnd(r);
      }
    });
  }
  std::thread worker([&] {
    Rng rng(7);
    for (int round = 0; round < 3000; ++round) {
      const uint64_t idx = rng.Uniform(kSubs);
      Tracked& t = *subs[idx];
      if (t.removed.load()) {
        t.removed.store(false, std::memory_order_release);
        ASSERT_TRUE(hub.Insert(&t.sub, idx * kPage, kPage, &ops));
        uint64_t seq = t.sub.ReadBegin();
        (void)t.sub.CheckRetry(seq);
      } else {
        ASSERT_TRUE(hub.Remove(&t.sub));
        t.removed.store(true, std::memory_order_release);
      }
    }
  });
  worker.join();
  stop.store(true);
  for (auto& th : invalidators) th.join();
  for (auto& t : subs) {
    EXPECT_EQ(t->late_calls.load(), 0);
    if (!t->removed.load()) {
      ASSERT_TRUE(hub.Remove(&t->sub));
    }
  }
  EXPECT_EQ(hub.DebugTreeSize(), 0u);
  EXPECT_EQ(hub.DebugActiveInvalidations(), 0u);
  EXPECT_EQ(hub.DebugInvalidateSeq() % 2, 0u);
}

// The reader protocol against a model CPU page table (no address space):
// readers mirror pages into a shadow table only through ReadBegin /
// ReadRetry; writers change the model table inside Start/End. The rule
// checked: once Start has returned, the shadow holds nothing in the range,
// and nothing stale is ever mapped.
class MirrorModel : public MmuIntervalNotifierOps {
 public:
  static constexpr int kPages = 64;
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    MutexLock l(mu);
    sub->SetSeq(cur_seq);
    for (uint64_t p = r.start / kPage; p < r.end / kPage && p < kPages; ++p) shadow[p] = 0;
    return true;
  }
  std::atomic<uint64_t> cpu[kPages] = {};  // model page table: 0 = none
  Mutex mu;
  uint64_t shadow[kPages] USVM_GUARDED_BY(mu) = {};
};

TEST(MmuIntervalNotifierConcurrency, ReaderProtocolNeverLeavesAStaleShadowEntry) {
  MmuNotifierSubscriptions hub(nullptr);
  MirrorModel m;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, MirrorModel::kPages * kPage, &m));
  std::atomic<bool> stop{false};
  std::atomic<int> violations{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {  // readers
      Rng rng(10 + t);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t p = rng.Uniform(MirrorModel::kPages);
        for (;;) {
          const uint64_t seq = sub.ReadBegin();
          const uint64_t v = m.cpu[p].load(std::memory_order_acquire);
          MutexLock l(m.mu);
          if (sub.ReadRetry(seq)) continue;
          m.shadow[p] = v;
          break;
        }
      }
    });
  }
  std::thread writer([&] {
    Rng rng(3);
    for (int i = 0; i < 10000; ++i) {
      const uint64_t p = rng.Uniform(MirrorModel::kPages);
      const uint64_t n = 1 + rng.Uniform(4);
      auto r = Range(p * kPage, std::min<uint64_t>(p + n, MirrorModel::kPages) * kPage);
      ASSERT_TRUE(hub.InvalidateRangeStart(r));
      {
        MutexLock l(m.mu);
        for (uint64_t q = p; q < p + n && q < MirrorModel::kPages; ++q)
          if (m.shadow[q] != 0) violations.fetch_add(1);
      }
      for (uint64_t q = p; q < p + n && q < MirrorModel::kPages; ++q)
        m.cpu[q].store(static_cast<uint64_t>(i + 1), std::memory_order_release);
      {
        MutexLock l(m.mu);
        for (uint64_t q = p; q < p + n && q < MirrorModel::kPages; ++q)
          if (m.shadow[q] != 0) violations.fetch_add(1);
      }
      hub.InvalidateRangeEnd(r);
      // Outside a bracket every shadow entry is current.
      MutexLock l(m.mu);
      for (int q = 0; q < MirrorModel::kPages; ++q)
        if (m.shadow[q] != 0 && m.shadow[q] != m.cpu[q].load()) violations.fetch_add(1);
    }
    stop.store(true);
  });
  writer.join();
  for (auto& th : threads) th.join();
  EXPECT_EQ(violations.load(), 0);
  ASSERT_TRUE(hub.Remove(&sub));
}


// Regression (issue 8, bug 1): Remove of a subscription whose removal was
// deferred returned as soon as it saw the sequence move, while the last
// InvalidateRangeEnd was still about to apply the deferred list that links
// through that subscription; the owner then freed it under the walker.
// The kernel's mmu_interval_seq_released checks under the hub lock, so
// Remove returns only after the deferred list was applied. The hooks hold
// Remove between queueing and waiting until End has made the seq even,
// and hold End there for a while before it applies the list.
TEST(MmuIntervalNotifierConcurrency, RemoveReturnedWhileEndStillWalkedTheDeferredList) {
  struct Hooks : MmuNotifierSubscriptions::DebugHooks {
    std::atomic<bool> queued{false};
    std::atomic<bool> released{false};
    void RemoveDeferred() override {
      queued.store(true);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (!released.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    }
    void SeqReleasedLocked() override {
      released.store(true);
      // A wrong Remove returns during this pause (lock_ is held, so a
      // correct one cannot look at the seq until the list was applied).
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
    }
  } hooks;
  MmuNotifierSubscriptions hub(nullptr);
  SeqOps ops;
  MmuIntervalNotifier hit, target;
  ASSERT_TRUE(hub.Insert(&hit, 0, kPage, &ops));
  ASSERT_TRUE(hub.Insert(&target, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));  // seq odd
  hub.DebugSetHooks(&hooks);
  std::atomic<bool> removed{false};
  std::atomic<bool> pending_after_remove{true};
  std::thread remover([&] {
    EXPECT_TRUE(hub.Remove(&target));  // deferred: waits for the End
    // The owner may free `target` now: the hub must be done with it.
    pending_after_remove.store(target.DebugPending());
    removed.store(true);
  });
  while (!hooks.queued.load()) std::this_thread::yield();
  hub.InvalidateRangeEnd(Range(0, kPage));
  remover.join();
  EXPECT_TRUE(removed.load());
  EXPECT_FALSE(pending_after_remove.load());
  EXPECT_EQ(hub.DebugDeferredSize(), 0u);
  hub.DebugSetHooks(nullptr);
  ASSERT_TRUE(hub.Remove(&hit));
}

}  // namespace
}  // namespace usvm::mm
