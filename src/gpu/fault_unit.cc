#include "usvm/gpu/fault_unit.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

namespace usvm::gpu {

// One outstanding fault. The answer is published through `answer`
// (release) after `error`; raisers read it lock-free in their wait
// condition. Other fields are guarded by the unit's lock_.
struct FaultUnit::Pending {
  uint64_t id = 0;
  uint64_t page = 0;
  uint8_t access = 0;
  uint32_t engine = 0;
  uint64_t launch = 0;
  uint32_t raisers = 0;
  bool fetched = false;
  Error error{Errc::kOk};
  std::atomic<int> answer{0};  // 0 pending, 1 replayed, 2 cancelled
};

namespace {

// Before sleeping on a wait queue, a waiter spins this long on the atomic
// it waits for: a fault's round trip is two hand-offs between threads that
// usually run on different cores, and a futex sleep and wake-up costs
// several microseconds each (the spin keeps a serviced fault's round trip
// to a few microseconds).
constexpr auto kSpin = std::chrono::microseconds(20);

// Spinning pays only while a core is free for the thread that will answer:
// with more waiters than cores (many faulting kernel threads on a small
// machine) spinners would starve the driver's thread. So at most one
// waiter per core (process-wide, at least two: a round trip is one raiser
// and one driver thread) spins; the others sleep at once.
std::atomic<int> g_spinners{0};
const int kMaxSpinners = std::max(2, static_cast<int>(std::thread::hardware_concurrency()));

template <typename Cond>
bool SpinFor(Cond cond) {
  if (cond()) return true;
  if (g_spinners.fetch_add(1, std::memory_order_relaxed) >= kMaxSpinners) {
    g_spinners.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
  struct Leave {
    ~Leave() { g_spinners.fetch_sub(1, std::memory_order_relaxed); }
  } leave;
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int k = 0; k < 64; ++k) {
      if (cond()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= end) return cond();
  }
}

}  // namespace

FaultUnit::FaultUnit(Env&, size_t capacity) : capacity_(capacity) {}

FaultUnit::~FaultUnit() { Shutdown(); }

Result<void> FaultUnit::Raise(uint64_t va, uint8_t access, uint32_t engine, uint64_t launch) {
  if (access == 0 || (access & ~uint8_t(kAccessRead | kAccessWrite | kAccessAtomic)))
    return Err(Errc::kInval, "bad access kind");
  if (va >= kVaLimit) return Err(Errc::kInval, "va beyond 48 bits");
  const uint64_t page = va & ~(kPageSize - 1);
  std::shared_ptr<Pending> p;
  bool fresh = false;
  bool dropped = false;
  uint64_t gen = 0;
  {
    MutexLock l(lock_);
    if (shutdown_) return Err(Errc::kCanceled, "fault unit shut down");
    ++stats_.raised;
    auto it = by_page_.find(page);
    if (it != by_page_.end()) {
      p = it->second;
      p->access |= access;
      ++stats_.coalesced;
    } else if (capacity_ != 0 && queue_.size() >= capacity_) {
      // The buffer is full: no entry; wait for the next answer, then retry.
      ++stats_.dropped;
      dropped = true;
      gen = answer_gen_.load(std::memory_order_relaxed);
      // Counted under lock_, so an answer that bumps the generation after
      // this point sees it and wakes the queue.
      dropped_waiting_.fetch_add(1, std::memory_order_relaxed);
    } else {
      p = std::make_shared<Pending>();
      p->id = next_id_++;
      p->page = page;
      p->access = access;
      p->engine = engine;
      p->launch = launch;
      by_page_.emplace(page, p);
      by_id_.emplace(p->id, p);
      queue_.push_back(p);
      queued_.store(queue_.size(), std::memory_order_release);
      fresh = true;
    }
    if (!dropped) ++p->raisers;
  }
  if (dropped) {
    answers_.Wait([&] { return answer_gen_.load(std::memory_order_acquire) != gen; });
    dropped_waiting_.fetch_sub(1, std::memory_order_relaxed);
    MutexLock l(lock_);
    if (shutdown_) return Err(Errc::kCanceled, "fault unit shut down");
    return {};
  }
  if (fresh) arrivals_.WakeAll();
  // Each fault has its own wake-up (a futex on its answer): answering one
  // fault wakes only its raisers, so a batch of B answers costs B wake-ups,
  // not B^2 (a shared queue would wake every raiser on every answer).
  if (!SpinFor([&] { return p->answer.load(std::memory_order_acquire) != 0; }))
    while (p->answer.load(std::memory_order_acquire) == 0) p->answer.wait(0, std::memory_order_acquire);
  if (p->answer.load(std::memory_order_acquire) == 1) return {};
  return Err(p->error);
}

std::vector<Fault> FaultUnit::TryFetch(size_t max) {
  std::vector<Fault> out;
  MutexLock l(lock_);
  while (!queue_.empty() && out.size() < max) {
    std::shared_ptr<Pending> p = std::move(queue_.front());
    queue_.pop_front();
    queued_.store(queue_.size(), std::memory_order_relaxed);
    p->fetched = true;
    out.push_back({p->id, p->page, p->access, p->engine, p->launch, p->raisers});
    ++stats_.fetched;
  }
  return out;
}

Result<std::vector<Fault>> FaultUnit::Fetch(size_t max, uint64_t timeout_ns) {
  if (max == 0) return Err(Errc::kInval, "max is zero");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(timeout_ns);
  for (;;) {
    {
      MutexLock l(lock_);
      if (shutdown_) return Err(Errc::kCanceled, "fault unit shut down");
    }
    std::vector<Fault> out = TryFetch(max);
    if (!out.empty()) {
      // The faults' service also serves what the doorbell announced.
      rung_.store(false, std::memory_order_relaxed);
      return out;
    }
    if (rung_.exchange(false, std::memory_order_acq_rel)) return out;
    // A fault usually arrives soon after the last answer: spin a little
    // before sleeping.
    if (SpinFor([&] {
          return queued_.load(std::memory_order_acquire) != 0 ||
                 stopped_.load(std::memory_order_relaxed) || rung_.load(std::memory_order_relaxed);
        }))
      continue;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return Err(Errc::kTime, "no faults");
    // The condition takes lock_ itself; wakers never hold lock_ while
    // waking, so the order is always queue mutex -> lock_.
    (void)arrivals_.WaitFor(
        [&] {
          MutexLock l(lock_);
          return shutdown_ || !queue_.empty() || rung_.load(std::memory_order_relaxed);
        },
        deadline - now);
  }
}

Result<void> FaultUnit::AnswerLocked(uint64_t id, Errc code, const char* what) {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return Err(Errc::kNoEnt, "no such outstanding fault");
  std::shared_ptr<Pending> p = it->second;
  by_id_.erase(it);
  by_page_.erase(p->page);
  if (!p->fetched) {
    for (auto q = queue_.begin(); q != queue_.end(); ++q)
      if (*q == p) {
        queue_.erase(q);
        queued_.store(queue_.size(), std::memory_order_relaxed);
        break;
      }
  }
  answer_gen_.fetch_add(1, std::memory_order_release);
  if (code == Errc::kOk) {
    ++stats_.replayed;
    p->answer.store(1, std::memory_order_release);
  } else {
    ++stats_.cancelled;
    p->error = Error(code, what);
    p->answer.store(2, std::memory_order_release);
  }
  // The raisers hold `p` while they wait, so it outlives the wake-up.
  p->answer.notify_all();
  return {};
}

Result<void> FaultUnit::Replay(uint64_t id) {
  bool wake_dropped;
  {
    MutexLock l(lock_);
    USVM_TRY(AnswerLocked(id, Errc::kOk, nullptr));
    wake_dropped = dropped_waiting_.load(std::memory_order_relaxed) != 0;
  }
  if (wake_dropped) answers_.WakeAll();
  return {};
}

Result<void> FaultUnit::Cancel(uint64_t id, Error error) {
  if (error.code() == Errc::kOk) return Err(Errc::kInval, "cancel needs an error");
  bool wake_dropped;
  {
    MutexLock l(lock_);
    USVM_TRY(AnswerLocked(id, error.code(), error.what()));
    wake_dropped = dropped_waiting_.load(std::memory_order_relaxed) != 0;
  }
  if (wake_dropped) answers_.WakeAll();
  return {};
}

void FaultUnit::Ring() {
  rung_.store(true, std::memory_order_release);
  arrivals_.WakeAll();
}

void FaultUnit::Shutdown() {
  {
    MutexLock l(lock_);
    shutdown_ = true;
    stopped_.store(true, std::memory_order_release);
    answer_gen_.fetch_add(1, std::memory_order_release);
    std::vector<uint64_t> ids;
    for (auto& [id, p] : by_id_) ids.push_back(id);
    for (uint64_t id : ids) (void)AnswerLocked(id, Errc::kCanceled, "fault unit shut down");
  }
  answers_.WakeAll();
  arrivals_.WakeAll();
}

FaultStats FaultUnit::Stats() const {
  MutexLock l(lock_);
  return stats_;
}

size_t FaultUnit::outstanding() const {
  MutexLock l(lock_);
  return by_id_.size();
}

}  // namespace usvm::gpu
