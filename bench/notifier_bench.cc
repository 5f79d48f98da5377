// MMU interval notifier benchmarks (issue 3):
//   Invalidate/k          one Start+End over 1M one-page subscriptions,
//                         hitting k = 1, 4, 64 of them at a random place
//   InsertRemove/n        Insert + Remove of one subscription into a tree of
//                         n others
//   ReadBeginReadRetry    the uncontended reader fast path
//   SinglePass/N, TwoPass/N
//                         latency of one invalidation over N devices whose
//                         callback starts a TLB flush that a device thread
//                         completes 50 us later: single-pass waits inside
//                         the callback, two-pass waits in the finish pass.
#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPage = 4096;

NotifierRange Range(uint64_t start, uint64_t end) {
  NotifierRange r;
  r.start = start;
  r.end = end;
  r.event = NotifyEvent::kUnmap;
  return r;
}

class NopOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    return true;
  }
};

// 1M one-page subscriptions laid side by side, built once.
struct BigTree {
  static constexpr uint64_t kSubs = 1 << 20;
  MmuNotifierSubscriptions hub{nullptr};
  NopOps ops;
  std::unique_ptr<MmuIntervalNotifier[]> subs{new MmuIntervalNotifier[kSubs]};
  BigTree() {
    // Insert in a scrambled order so the tree is not built from sorted keys.
    for (uint64_t i = 0; i < kSubs; ++i) {
      const uint64_t j = (i * 0x9E3779B1u) & (kSubs - 1);
      (void)hub.Insert(&subs[j], j * kPage, kPage, &ops);
    }
  }
  ~BigTree() {
    for (uint64_t i = 0; i < kSubs; ++i) (void)hub.Remove(&subs[i]);
  }
  static BigTree& Get() {
    static BigTree* t = new BigTree();  // shared by every benchmark; never freed
    return *t;
  }
};

void BM_Invalidate(benchmark::State& state) {
  BigTree& t = BigTree::Get();
  const uint64_t k = static_cast<uint64_t>(state.range(0));
  Rng rng(1);
  std::vector<uint64_t> starts(4096);
  for (auto& s : starts) s = rng.Uniform(BigTree::kSubs - k) * kPage;
  size_t i = 0;
  for (auto _ : state) {
    const uint64_t s = starts[i++ & 4095];
    const NotifierRange r = Range(s, s + k * kPage);
    benchmark::DoNotOptimize(t.hub.InvalidateRangeStart(r));
    t.hub.InvalidateRangeEnd(r);
  }
  state.counters["subs_hit"] = static_cast<double>(k);
}
BENCHMARK(BM_Invalidate)->Name("Invalidate")->Arg(1)->Arg(4)->Arg(64);

void BM_InsertRemove(benchmark::State& state) {
  const uint64_t n = static_cast<uint64_t>(state.range(0));
  MmuNotifierSubscriptions hub(nullptr);
  NopOps ops;
  std::unique_ptr<MmuIntervalNotifier[]> others(new MmuIntervalNotifier[n]);
  for (uint64_t i = 0; i < n; ++i) (void)hub.Insert(&others[i], i * 2 * kPage, kPage, &ops);
  Rng rng(2);
  std::vector<uint64_t> starts(4096);
  for (auto& s : starts) s = (rng.Uniform(n ? n : 1) * 2 + 1) * kPage;
  MmuIntervalNotifier sub;
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(hub.Insert(&sub, starts[i++ & 4095], kPage, &ops));
    benchmark::DoNotOptimize(hub.Remove(&sub));
  }
  for (uint64_t j = 0; j < n; ++j) (void)hub.Remove(&others[j]);
}
BENCHMARK(BM_InsertRemove)->Name("InsertRemove")->Arg(1000)->Arg(1 << 20);

void BM_ReadBeginReadRetry(benchmark::State& state) {
  MmuNotifierSubscriptions hub(nullptr);
  NopOps ops;
  MmuIntervalNotifier sub;
  (void)hub.Insert(&sub, 0, kPage, &ops);
  for (auto _ : state) {
    const uint64_t seq = sub.ReadBegin();
    benchmark::DoNotOptimize(sub.ReadRetry(seq));
  }
  (void)hub.Remove(&sub);
}
BENCHMARK(BM_ReadBeginReadRetry)->Name("ReadBeginReadRetry");

// ---- multi-device TLB flush ------------------------------------------------

constexpr uint64_t kFlushNs = 50'000;

// One device's TLB: flushes are posted with a ticket and complete when the
// engine thread sees their deadline pass.
struct Tlb {
  std::atomic<uint64_t> posted{0};     // atomic: tickets handed out
  std::atomic<uint64_t> completed{0};  // atomic: highest completed ticket
  void WaitFor(uint64_t ticket) const {
    while (completed.load(std::memory_order_acquire) < ticket) std::this_thread::yield();
  }
};

// The "hardware": one thread completing every device's flushes on time.
class FlushEngine {
 public:
  FlushEngine() : thread_([this] { Run(); }) {}
  ~FlushEngine() {
    stop_.store(true);
    thread_.join();
  }
  uint64_t Post(Tlb& tlb) {
    const uint64_t ticket = tlb.posted.fetch_add(1) + 1;
    std::lock_guard<std::mutex> l(mu_);
    pending_.push_back({&tlb, ticket, Now() + kFlushNs});
    return ticket;
  }

 private:
  struct Req {
    Tlb* tlb;
    uint64_t ticket;
    uint64_t deadline;
  };
  static uint64_t Now() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }
  void Run() {
    while (!stop_.load(std::memory_order_relaxed)) {
      {
        std::lock_guard<std::mutex> l(mu_);
        const uint64_t now = Now();
        for (size_t i = 0; i < pending_.size();) {
          if (pending_[i].deadline <= now) {
            pending_[i].tlb->completed.store(pending_[i].ticket, std::memory_order_release);
            pending_[i] = pending_.back();
            pending_.pop_back();
          } else {
            ++i;
          }
        }
      }
      std::this_thread::yield();
    }
  }
  std::mutex mu_;
  std::vector<Req> pending_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class DeviceOps;
struct FlushFinish : MmuIntervalFinish {
  DeviceOps* dev = nullptr;
  uint64_t ticket = 0;
  void Finish(const NotifierRange&, uint64_t) override;
};

// One GPU mirroring the range: the driver lock, its TLB, a finish pool.
class DeviceOps : public MmuIntervalNotifierOps {
 public:
  DeviceOps(FlushEngine& engine, bool two_pass) : engine_(engine), two_pass_(two_pass) {}
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    uint64_t ticket;
    {
      MutexLock l(mu_);
      sub->SetSeq(cur_seq);
      ticket = engine_.Post(tlb_);
    }
    tlb_.WaitFor(ticket);
    return true;
  }
  bool InvalidateStart(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq,
                       MmuIntervalFinish** finish) override {
    FlushFinish* f = two_pass_ ? pool_.TryAlloc() : nullptr;
    if (!f) return Invalidate(sub, r, cur_seq);
    MutexLock l(mu_);
    sub->SetSeq(cur_seq);
    f->dev = this;
    f->ticket = engine_.Post(tlb_);
    *finish = f;
    return true;
  }
  void Complete(FlushFinish* f) {
    tlb_.WaitFor(f->ticket);
    pool_.Free(f);
  }

 private:
  FlushEngine& engine_;
  const bool two_pass_;
  Mutex mu_;
  Tlb tlb_;
  MmuIntervalFinishPool<FlushFinish, 4> pool_;
};

void FlushFinish::Finish(const NotifierRange&, uint64_t) { dev->Complete(this); }

void RunDevices(benchmark::State& state, bool two_pass) {
  const int n = static_cast<int>(state.range(0));
  FlushEngine engine;
  MmuNotifierSubscriptions hub(nullptr);
  std::vector<std::unique_ptr<DeviceOps>> devs;
  std::vector<std::unique_ptr<MmuIntervalNotifier>> subs;
  for (int i = 0; i < n; ++i) {
    devs.push_back(std::make_unique<DeviceOps>(engine, two_pass));
    subs.push_back(std::make_unique<MmuIntervalNotifier>());
    (void)hub.Insert(subs.back().get(), 0, 512 * kPage, devs.back().get());
  }
  const NotifierRange r = Range(0, 512 * kPage);
  for (auto _ : state) {
    benchmark::DoNotOptimize(hub.InvalidateRangeStart(r));
    hub.InvalidateRangeEnd(r);
  }
  for (auto& s : subs) (void)hub.Remove(s.get());
}

void BM_SinglePass(benchmark::State& state) { RunDevices(state, false); }
void BM_TwoPass(benchmark::State& state) { RunDevices(state, true); }
BENCHMARK(BM_SinglePass)->Name("SinglePass")->Arg(1)->Arg(2)->Arg(4)->Arg(8)->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TwoPass)->Name("TwoPass")->Arg(1)->Arg(2)->Arg(4)->Arg(8)->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace usvm::mm

BENCHMARK_MAIN();
