#include "usvm/gpu/fence.h"

#include <atomic>
#include <chrono>
#include <thread>

#include "usvm/base/wait_queue.h"

namespace usvm::gpu {

namespace detail {

struct FenceState {
  FenceState(Env& e, uint64_t d, std::function<bool()> p) : env(e), deadline_ns(d), poll(std::move(p)) {}

  // True once the work is done (by Signal or by poll). Atomic: written
  // once (release) after `error`, read lock-free.
  bool WorkDone() {
    if (done.load(std::memory_order_acquire)) return true;
    if (poll && poll()) {
      done.store(true, std::memory_order_release);
      return true;
    }
    return false;
  }

  Env& env;
  const uint64_t deadline_ns;
  const std::function<bool()> poll;  // empty for CreatePending fences
  // Written once, by the first Signal, before `done` is published.
  Error error{Errc::kOk};
  std::atomic<bool> claimed{false};  // a Signal call has won
  std::atomic<bool> done{false};
  WaitQueue wq;
};

}  // namespace detail

Fence Fence::CreatePending(Env& env, uint64_t deadline_ns) {
  return Fence(std::make_shared<detail::FenceState>(env, deadline_ns, nullptr));
}

Fence Fence::CreatePolled(Env& env, uint64_t deadline_ns, std::function<bool()> poll) {
  return Fence(std::make_shared<detail::FenceState>(env, deadline_ns, std::move(poll)));
}

void Fence::Signal(Result<void> result) const {
  if (!s_ || s_->claimed.exchange(true, std::memory_order_acq_rel)) return;
  if (!result) s_->error = result.error();
  s_->done.store(true, std::memory_order_release);
  s_->wq.WakeAll();
}

bool Fence::IsSignalled() const {
  if (!s_) return true;
  return s_->WorkDone() && (s_->deadline_ns == 0 || s_->env.NowNs() >= s_->deadline_ns);
}

uint64_t Fence::deadline_ns() const { return s_ ? s_->deadline_ns : 0; }

Result<void> Fence::Wait() const {
  if (!s_) return {};
  detail::FenceState& s = *s_;
  if (s.poll) {
    // Completion is a condition on device state: spin briefly, then back
    // off to short sleeps (a drain takes one access of every busy thread).
    for (uint32_t i = 0; !s.WorkDone(); ++i) {
      if (i < 64) {
        CpuRelax();
      } else if (i < 256) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  } else {
    s.wq.Wait([&] { return s.done.load(std::memory_order_acquire); });
  }
  // A fence without a deadline (a kernel launch) never reads the clock, so
  // it may be waited on after the Env that created it is gone.
  if (s.deadline_ns != 0) {
    const uint64_t now = s.env.NowNs();
    if (now < s.deadline_ns) s.env.SleepNs(s.deadline_ns - now);
  }
  if (s.error.code() != Errc::kOk) return Err(s.error);
  return {};
}

Result<void> Fence::WaitAll(std::span<const Fence> fences) {
  Result<void> first;
  for (const Fence& f : fences) {
    Result<void> r = f.Wait();
    if (!r && first) first = r;
  }
  return first;
}

}  // namespace usvm::gpu
