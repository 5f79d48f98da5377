// The rules of MMU notifiers (mm/mmu_notifier.c), one test per rule,
// driving the hub directly. Concurrent rules are in
// mmu_notifier_concurrency_test.cc.
#include "usvm/mm/mmu_notifier.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "usvm/base/env.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPage = 4096;

NotifierRange Range(uint64_t start, uint64_t end, NotifyEvent ev = NotifyEvent::kUnmap,
                    bool blockable = true, const void* owner = nullptr) {
  NotifierRange r;
  r.start = start;
  r.end = end;
  r.event = ev;
  r.blockable = blockable;
  r.owner = owner;
  return r;
}

// Records every callback; single-pass.
struct Call {
  MmuIntervalNotifier* sub;
  uint64_t start, end, cur_seq;
  NotifyEvent event;
  const void* owner;
};
class RecordingOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    calls.push_back({sub, r.start, r.end, cur_seq, r.event, r.owner});
    sub->SetSeq(cur_seq);
    return !(fail_nonblockable && !r.blockable) && !fail_always;
  }
  std::vector<Call> calls;
  bool fail_nonblockable = false;
  bool fail_always = false;
};

// A two-pass mirror writing "S<id>" in pass 1 and "F<id>" in pass 2, or
// "X<id>" when it falls back to a single complete pass.
class Log {
 public:
  std::vector<std::string> v;
  void Add(const char* what, int id) { v.push_back(what + std::to_string(id)); }
  std::string Join() const {
    std::string s;
    for (const auto& e : v) s += e + " ";
    return s;
  }
};

struct TwoPassFinish;
class TwoPassOps;
struct TwoPassFinish : MmuIntervalFinish {
  TwoPassOps* ops = nullptr;
  void Finish(const NotifierRange& range, uint64_t cur_seq) override;
};

class TwoPassOps : public MmuIntervalNotifierOps {
 public:
  TwoPassOps(int id, Log* log, Env& env) : id(id), log(log), pool(env) {}
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    log->Add("X", id);
    return true;
  }
  bool InvalidateStart(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq,
                       MmuIntervalFinish** finish) override {
    TwoPassFinish* f = pool.TryAlloc();
    if (!f) return Invalidate(sub, r, cur_seq);  // fallback: complete single pass
    sub->SetSeq(cur_seq);
    log->Add("S", id);
    f->ops = this;
    *finish = f;
    return !(fail_nonblockable && !r.blockable);
  }
  int id;
  Log* log;
  MmuIntervalFinishPool<TwoPassFinish, 1> pool;
  bool fail_nonblockable = false;
};

void TwoPassFinish::Finish(const NotifierRange&, uint64_t) {
  TwoPassOps* o = ops;
  o->log->Add("F", o->id);
  o->pool.Free(this);
}

TEST(MmuIntervalNotifier, InsertRejectsBadIntervalsAndDoubleInsert) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier sub;
  EXPECT_EQ(hub.Insert(&sub, 0, 0, &ops).error(), Errc::kInval);
  EXPECT_EQ(hub.Insert(&sub, UINT64_MAX - kPage + 2, kPage, &ops).error(), Errc::kInval);
  EXPECT_EQ(hub.Insert(nullptr, 0, kPage, &ops).error(), Errc::kInval);
  EXPECT_EQ(hub.Insert(&sub, 0, kPage, nullptr).error(), Errc::kInval);
  ASSERT_TRUE(hub.Insert(&sub, kPage, kPage, &ops));
  EXPECT_EQ(hub.Insert(&sub, kPage, kPage, &ops).error(), Errc::kInval);
  EXPECT_EQ(sub.start(), kPage);
  EXPECT_EQ(sub.end(), 2 * kPage);
  EXPECT_EQ(sub.hub(), &hub);
  ASSERT_TRUE(hub.Remove(&sub));
  EXPECT_EQ(hub.Remove(&sub).error(), Errc::kInval);
  EXPECT_EQ(sub.hub(), nullptr);
}

TEST(MmuIntervalNotifier, SeqIsEvenIdleAndOddOnlyWhileAnInvalidationHitsASubscription) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 10 * kPage, 10 * kPage, &ops));
  const uint64_t idle = hub.DebugInvalidateSeq();
  EXPECT_EQ(idle % 2, 0u);

  // A miss (the range ends exactly where the subscription starts).
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 10 * kPage)));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle);
  EXPECT_EQ(hub.DebugActiveInvalidations(), 1u);
  hub.InvalidateRangeEnd(Range(0, 10 * kPage));
  EXPECT_TRUE(ops.calls.empty());
  EXPECT_EQ(hub.DebugActiveInvalidations(), 0u);

  // A hit on the last page.
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(19 * kPage, 30 * kPage)));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 1);
  ASSERT_EQ(ops.calls.size(), 1u);
  EXPECT_EQ(ops.calls[0].cur_seq, idle + 1);
  hub.InvalidateRangeEnd(Range(19 * kPage, 30 * kPage));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 2);
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifier, EveryOverlappingCallbackGetsSameCurSeqEventAndOwner) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier a, b, c;
  ASSERT_TRUE(hub.Insert(&a, 0, 4 * kPage, &ops));
  ASSERT_TRUE(hub.Insert(&b, 2 * kPage, 4 * kPage, &ops));
  ASSERT_TRUE(hub.Insert(&c, 8 * kPage, kPage, &ops));
  int cookie = 0;
  auto r = Range(3 * kPage, 5 * kPage, NotifyEvent::kMigrate, true, &cookie);
  ASSERT_TRUE(hub.InvalidateRangeStart(r));
  hub.InvalidateRangeEnd(r);
  ASSERT_EQ(ops.calls.size(), 2u);
  EXPECT_EQ(ops.calls[0].sub, &a);
  EXPECT_EQ(ops.calls[1].sub, &b);
  for (const Call& c0 : ops.calls) {
    EXPECT_EQ(c0.cur_seq, ops.calls[0].cur_seq);
    EXPECT_EQ(c0.cur_seq % 2, 1u);
    EXPECT_EQ(c0.event, NotifyEvent::kMigrate);
    EXPECT_EQ(c0.owner, &cookie);
    EXPECT_EQ(c0.start, 3 * kPage);
    EXPECT_EQ(c0.end, 5 * kPage);
  }
  for (auto* s : {&a, &b, &c}) ASSERT_TRUE(hub.Remove(s));
}

TEST(MmuIntervalNotifier, NestedInvalidationsShareOneOddSeqUntilTheLastEnds) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier a, b;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &ops));
  ASSERT_TRUE(hub.Insert(&b, 100 * kPage, kPage, &ops));
  const uint64_t idle = hub.DebugInvalidateSeq();
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(50 * kPage, 60 * kPage)));  // a miss, nested
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(100 * kPage, 101 * kPage)));
  ASSERT_EQ(ops.calls.size(), 2u);
  EXPECT_EQ(ops.calls[0].cur_seq, idle + 1);
  EXPECT_EQ(ops.calls[1].cur_seq, idle + 1);
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 1);
  hub.InvalidateRangeEnd(Range(100 * kPage, 101 * kPage));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 1);
  hub.InvalidateRangeEnd(Range(50 * kPage, 60 * kPage));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 2);
  ASSERT_TRUE(hub.Remove(&a));
  ASSERT_TRUE(hub.Remove(&b));
}

TEST(MmuIntervalNotifier, ReadRetryIsTrueOnlyAfterACallbackSetSeq) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  uint64_t seq = sub.ReadBegin();
  EXPECT_EQ(seq % 2, 1u);
  EXPECT_FALSE(sub.ReadRetry(seq));
  EXPECT_FALSE(sub.CheckRetry(seq));
  // An invalidation elsewhere does not disturb the reader.
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(kPage, 2 * kPage)));
  hub.InvalidateRangeEnd(Range(kPage, 2 * kPage));
  EXPECT_FALSE(sub.ReadRetry(seq));
  // One that hits it does.
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  EXPECT_TRUE(sub.ReadRetry(seq));
  EXPECT_TRUE(sub.CheckRetry(seq));
  hub.InvalidateRangeEnd(Range(0, kPage));
  // The next read section starts clean.
  seq = sub.ReadBegin();
  EXPECT_FALSE(sub.ReadRetry(seq));
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifier, InsertDuringInvalidationIsDeferredUntilTheLastEnds) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier a, late;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  ASSERT_TRUE(hub.Insert(&late, 0, kPage, &ops));
  EXPECT_EQ(hub.DebugTreeSize(), 1u);
  EXPECT_EQ(hub.DebugDeferredSize(), 1u);
  // It collides: its seq is the current odd one, so ReadBegin would wait.
  EXPECT_EQ(hub.DebugInvalidateSeq() % 2, 1u);
  // A nested invalidation does not see it (the tree is frozen).
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  EXPECT_EQ(ops.calls.size(), 2u);
  for (const Call& c : ops.calls) EXPECT_EQ(c.sub, &a);
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(hub.DebugDeferredSize(), 1u);
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(hub.DebugTreeSize(), 2u);
  EXPECT_EQ(hub.DebugDeferredSize(), 0u);
  // Applied: the next invalidation reaches it, and its reader is free.
  const uint64_t seq = late.ReadBegin();
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(ops.calls.size(), 4u);
  EXPECT_TRUE(late.ReadRetry(seq));
  ASSERT_TRUE(hub.Remove(&a));
  ASSERT_TRUE(hub.Remove(&late));
}

TEST(MmuIntervalNotifier, InsertWhileAMissIsActiveCollidesWithoutDeferring) {
  // An invalidation is between Start and End but hit nothing: the seq is
  // even, the tree may change, yet the new subscription must be treated as
  // hit because its range might be part of the change.
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier sub;
  const uint64_t idle = hub.DebugInvalidateSeq();
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle);
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  EXPECT_EQ(hub.DebugTreeSize(), 1u);
  EXPECT_EQ(hub.DebugDeferredSize(), 0u);
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 1);
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 2);
  EXPECT_TRUE(ops.calls.empty());
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifier, RemoveOfAPendingInsertCancelsIt) {
  MmuNotifierSubscriptions hub(nullptr);
  RecordingOps ops;
  MmuIntervalNotifier a, late;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  ASSERT_TRUE(hub.Insert(&late, 0, kPage, &ops));
  ASSERT_TRUE(hub.Remove(&late));  // does not wait: it was never walked
  EXPECT_EQ(hub.DebugDeferredSize(), 0u);
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(hub.DebugTreeSize(), 1u);
  ASSERT_TRUE(hub.Remove(&a));
  EXPECT_EQ(hub.DebugTreeSize(), 0u);
}

class RemovingOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    result = sub->Remove();
    return true;
  }
  Result<void> result;
};

TEST(MmuIntervalNotifier, RemoveFromACallbackFailsWithEdeadlk) {
  MmuNotifierSubscriptions hub(nullptr);
  RemovingOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0, kPage, &ops));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  ASSERT_FALSE(ops.result);
  EXPECT_EQ(ops.result.error(), Errc::kDeadlk);
  EXPECT_EQ(sub.hub(), &hub);  // still inserted
  ASSERT_TRUE(hub.Remove(&sub));
}

TEST(MmuIntervalNotifier, NonBlockableFailureReturnsEagainStopsTheWalkAndNeedsNoEnd) {
  MmuNotifierSubscriptions hub(nullptr);
  Env env;
  Log log;
  TwoPassOps first(1, &log, env);
  RecordingOps failing;
  failing.fail_nonblockable = true;
  RecordingOps after;
  MmuIntervalNotifier a, b, c;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &first));
  ASSERT_TRUE(hub.Insert(&b, kPage, kPage, &failing));
  ASSERT_TRUE(hub.Insert(&c, 2 * kPage, kPage, &after));
  const uint64_t idle = hub.DebugInvalidateSeq();
  auto r = Range(0, 3 * kPage, NotifyEvent::kClear, /*blockable=*/false);
  Result<void> res = hub.InvalidateRangeStart(r);
  ASSERT_FALSE(res);
  EXPECT_EQ(res.error(), Errc::kAgain);
  // The walk stopped at the failing callback; the one that succeeded got
  // its finish pass; no End is owed.
  EXPECT_EQ(failing.calls.size(), 1u);
  EXPECT_TRUE(after.calls.empty());
  EXPECT_EQ(log.Join(), "S1 F1 ");
  EXPECT_EQ(hub.DebugActiveInvalidations(), 0u);
  EXPECT_EQ(hub.DebugInvalidateSeq(), idle + 2);
  EXPECT_EQ(first.pool.DebugInUse(), 0u);
  // A blockable invalidation is not allowed to fail: the false return is a
  // warning and the walk goes on.
  failing.fail_always = true;
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 3 * kPage)));
  hub.InvalidateRangeEnd(Range(0, 3 * kPage));
  EXPECT_EQ(after.calls.size(), 1u);
  EXPECT_EQ(hub.DebugWarnings(), 1u);
  for (auto* s : {&a, &b, &c}) ASSERT_TRUE(hub.Remove(s));
}

TEST(MmuIntervalNotifier, TwoPassRunsEveryStartThenEveryFinishInOrderBeforeStartReturns) {
  MmuNotifierSubscriptions hub(nullptr);
  Env env;
  Log log;
  TwoPassOps o1(1, &log, env), o2(2, &log, env), o3(3, &log, env);
  RecordingOps single;
  MmuIntervalNotifier s1, s2, s3, s4;
  ASSERT_TRUE(hub.Insert(&s1, 0, kPage, &o1));
  ASSERT_TRUE(hub.Insert(&s2, kPage, kPage, &o2));
  ASSERT_TRUE(hub.Insert(&s4, 2 * kPage, kPage, &single));
  ASSERT_TRUE(hub.Insert(&s3, 3 * kPage, kPage, &o3));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 4 * kPage)));
  // Before Start returned: three first passes in tree order, then three
  // finishes in the same order.
  EXPECT_EQ(log.Join(), "S1 S2 S3 F1 F2 F3 ");
  EXPECT_EQ(single.calls.size(), 1u);
  hub.InvalidateRangeEnd(Range(0, 4 * kPage));
  EXPECT_EQ(log.Join(), "S1 S2 S3 F1 F2 F3 ");
  for (auto* s : {&s1, &s2, &s3, &s4}) ASSERT_TRUE(hub.Remove(s));
}

TEST(MmuIntervalNotifier, TwoPassFallsBackToSinglePassWhenFinishAllocationFails) {
  MmuNotifierSubscriptions hub(nullptr);
  Env env;
  Log log;
  TwoPassOps o1(1, &log, env), o2(2, &log, env), o3(3, &log, env);
  MmuIntervalNotifier s1, s2, s3;
  ASSERT_TRUE(hub.Insert(&s1, 0, kPage, &o1));
  ASSERT_TRUE(hub.Insert(&s2, kPage, kPage, &o2));
  ASSERT_TRUE(hub.Insert(&s3, 2 * kPage, kPage, &o3));
  env.faults().FailNth("mmu_notifier.finish_alloc", 2);
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 3 * kPage)));
  // The second notifier could not get a finish object: it did the whole
  // job in the first pass and has no finish.
  EXPECT_EQ(log.Join(), "S1 X2 S3 F1 F3 ");
  hub.InvalidateRangeEnd(Range(0, 3 * kPage));
  EXPECT_EQ(env.faults().Failures("mmu_notifier.finish_alloc"), 1u);
  for (auto* s : {&s1, &s2, &s3}) ASSERT_TRUE(hub.Remove(s));
}

TEST(MmuIntervalNotifier, TwoPassFallsBackToSinglePassWhenFinishObjectIsBusy) {
  // Two subscriptions share one ops whose pool holds a single finish
  // object: the second is busy while the first invalidation holds it.
  MmuNotifierSubscriptions hub(nullptr);
  Env env;
  Log log;
  TwoPassOps o(7, &log, env);
  MmuIntervalNotifier s1, s2;
  ASSERT_TRUE(hub.Insert(&s1, 0, kPage, &o));
  ASSERT_TRUE(hub.Insert(&s2, kPage, kPage, &o));
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, 2 * kPage)));
  EXPECT_EQ(log.Join(), "S7 X7 F7 ");
  hub.InvalidateRangeEnd(Range(0, 2 * kPage));
  EXPECT_EQ(o.pool.DebugInUse(), 0u);
  ASSERT_TRUE(hub.Remove(&s1));
  ASSERT_TRUE(hub.Remove(&s2));
}

TEST(MmuIntervalNotifier, ReleaseSendsOneReleaseOverTheWholeSpaceAndSubscriptionsStay) {
  MmuNotifierSubscriptions hub(nullptr);
  Env env;
  Log log;
  RecordingOps ops;
  TwoPassOps two(1, &log, env);
  MmuIntervalNotifier a, b, c;
  ASSERT_TRUE(hub.Insert(&a, 0, kPage, &ops));
  ASSERT_TRUE(hub.Insert(&b, UINT64_MAX - 2 * kPage + 1, kPage, &ops));
  ASSERT_TRUE(hub.Insert(&c, 1 << 30, kPage, &two));
  hub.Release();
  ASSERT_EQ(ops.calls.size(), 2u);
  for (const Call& call : ops.calls) {
    EXPECT_EQ(call.event, NotifyEvent::kRelease);
    EXPECT_EQ(call.start, 0u);
    EXPECT_EQ(call.end, UINT64_MAX);
  }
  EXPECT_EQ(log.Join(), "S1 F1 ");
  EXPECT_EQ(hub.DebugActiveInvalidations(), 0u);
  EXPECT_EQ(hub.DebugInvalidateSeq() % 2, 0u);
  // Still inserted; new ones are refused; a second Release does nothing.
  EXPECT_EQ(hub.DebugTreeSize(), 3u);
  MmuIntervalNotifier d;
  EXPECT_EQ(hub.Insert(&d, 0, kPage, &ops).error(), Errc::kInval);
  hub.Release();
  EXPECT_EQ(ops.calls.size(), 2u);
  for (auto* s : {&a, &b, &c}) ASSERT_TRUE(hub.Remove(s));
  EXPECT_EQ(hub.DebugTreeSize(), 0u);
}

// ---- classic notifiers -----------------------------------------------------

class CountingNotifier : public MmuNotifier {
 public:
  bool InvalidateRangeStart(const NotifierRange& r) override {
    ++starts;
    return !(fail_nonblockable && !r.blockable);
  }
  void InvalidateRangeEnd(const NotifierRange&) override { ++ends; }
  void Release(AddressSpace&) override { ++releases; }
  int starts = 0, ends = 0, releases = 0;
  bool fail_nonblockable = false;
};

TEST(MmuNotifier, RegisterSeesStartEndAndUnregisterReleasesOnce) {
  MmuNotifierSubscriptions hub(nullptr);
  CountingNotifier n;
  ASSERT_TRUE(hub.Register(&n));
  EXPECT_EQ(hub.Register(&n).error(), Errc::kInval);
  EXPECT_TRUE(hub.HasSubscribers());
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(n.starts, 1);
  EXPECT_EQ(n.ends, 1);
  ASSERT_TRUE(hub.Unregister(&n));
  EXPECT_EQ(n.releases, 0);  // no address space to pass (see the _mm test)
  EXPECT_EQ(hub.Unregister(&n).error(), Errc::kNoEnt);
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(n.starts, 1);
}

TEST(MmuNotifier, NonBlockableFailureEndsEveryNotifierAndReturnsEagain) {
  MmuNotifierSubscriptions hub(nullptr);
  CountingNotifier ok, failing;
  failing.fail_nonblockable = true;
  ASSERT_TRUE(hub.Register(&ok));
  ASSERT_TRUE(hub.Register(&failing));
  Result<void> r = hub.InvalidateRangeStart(Range(0, kPage, NotifyEvent::kClear, false));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), Errc::kAgain);
  EXPECT_EQ(ok.starts, 1);
  EXPECT_EQ(ok.ends, 1);  // ended by the hub, since the caller will not
  EXPECT_EQ(hub.DebugActiveInvalidations(), 0u);
  ASSERT_TRUE(hub.Unregister(&ok));
  ASSERT_TRUE(hub.Unregister(&failing));
}

TEST(MmuNotifier, ReleaseUnhooksEveryNotifier) {
  MmuNotifierSubscriptions hub(nullptr);
  CountingNotifier n;
  ASSERT_TRUE(hub.Register(&n));
  hub.Release();
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(n.starts, 0);
  ASSERT_TRUE(hub.Unregister(&n));  // after release: a no-op
  CountingNotifier late;
  EXPECT_EQ(hub.Register(&late).error(), Errc::kSrch);
}

class SharedNotifier : public CountingNotifier {
 public:
  Result<void> unregister_result;
  bool try_unregister = false;
  MmuNotifierSubscriptions* hub = nullptr;
  bool InvalidateRangeStart(const NotifierRange& r) override {
    if (try_unregister) unregister_result = hub->Put(this);
    return CountingNotifier::InvalidateRangeStart(r);
  }
};

class Allocator : public MmuNotifierAllocator {
 public:
  Result<MmuNotifier*> AllocNotifier(AddressSpace*) override {
    ++allocs;
    return new SharedNotifier();
  }
  void FreeNotifier(MmuNotifier* n) override {
    ++frees;
    delete n;
  }
  int allocs = 0, frees = 0;
};

TEST(MmuNotifier, GetSharesOneRefcountedNotifierPerAllocatorFreedOnLastPut) {
  MmuNotifierSubscriptions hub(nullptr);
  Allocator alloc, other;
  MmuNotifier* a = hub.Get(&alloc).value();
  MmuNotifier* b = hub.Get(&alloc).value();
  MmuNotifier* c = hub.Get(&other).value();
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(alloc.allocs, 1);
  EXPECT_EQ(hub.Unregister(a).error(), Errc::kInval);  // Get'ed: use Put
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(static_cast<SharedNotifier*>(a)->starts, 1);
  ASSERT_TRUE(hub.Put(a));
  EXPECT_EQ(alloc.frees, 0);
  ASSERT_TRUE(hub.Put(b));
  EXPECT_EQ(alloc.frees, 1);
  // A new Get after the last Put allocates again.
  MmuNotifier* d = hub.Get(&alloc).value();
  EXPECT_EQ(alloc.allocs, 2);
  ASSERT_TRUE(hub.Put(d));
  ASSERT_TRUE(hub.Put(c));
  EXPECT_EQ(other.frees, 1);
}

// mmu_notifier_put may be called from the notifier's own callbacks: the
// notifier leaves the list at once (no later callback, not even the End
// of the bracket it was put in) and is freed when the walk ends.
TEST(MmuNotifier, PutFromACallbackUnhooksAtOnceAndFreesAfterTheWalk) {
  MmuNotifierSubscriptions hub(nullptr);
  Allocator alloc;
  auto* n = static_cast<SharedNotifier*>(hub.Get(&alloc).value());
  n->hub = &hub;
  n->try_unregister = true;
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  // The walk has ended: the notifier was freed (n dangles from here on).
  EXPECT_EQ(alloc.frees, 1);
  hub.InvalidateRangeEnd(Range(0, kPage));  // reaches nobody
  // A second reference keeps it alive through a callback's Put.
  auto* m = static_cast<SharedNotifier*>(hub.Get(&alloc).value());
  ASSERT_EQ(hub.Get(&alloc).value(), m);
  m->hub = &hub;
  m->try_unregister = true;
  ASSERT_TRUE(hub.InvalidateRangeStart(Range(0, kPage)));
  EXPECT_TRUE(m->unregister_result);
  EXPECT_EQ(alloc.frees, 1);
  m->try_unregister = false;
  hub.InvalidateRangeEnd(Range(0, kPage));
  EXPECT_EQ(m->ends, 1);
  ASSERT_TRUE(hub.Put(m));
  EXPECT_EQ(alloc.frees, 2);
}

TEST(MmuNotifier, PutAfterReleaseStillFrees) {
  MmuNotifierSubscriptions hub(nullptr);
  Allocator alloc;
  MmuNotifier* n = hub.Get(&alloc).value();
  hub.Release();
  EXPECT_EQ(hub.Get(&alloc).error(), Errc::kSrch);
  ASSERT_TRUE(hub.Put(n));
  EXPECT_EQ(alloc.frees, 1);
}

}  // namespace
}  // namespace usvm::mm
