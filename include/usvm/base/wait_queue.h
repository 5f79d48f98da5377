// WaitQueue: sleep until a condition holds (the kernel's wait_queue_head_t
// with wait_event / wake_up_all).
//
// The condition is evaluated under the queue's internal mutex, and WakeAll
// takes that mutex, so a waker that changes state and then calls WakeAll
// can never be missed: wait_event semantics, no lost wake-ups. The
// condition must not take locks that a waker holds while calling WakeAll.
#ifndef USVM_BASE_WAIT_QUEUE_H_
#define USVM_BASE_WAIT_QUEUE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "usvm/base/result.h"

namespace usvm {

class WaitQueue {
 public:
  WaitQueue() = default;
  WaitQueue(const WaitQueue&) = delete;
  WaitQueue& operator=(const WaitQueue&) = delete;

  // Sleeps until cond() returns true.
  template <typename Cond>
  void Wait(Cond cond) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, cond);
  }

  // Sleeps until cond() or until `timeout` passes: ETIME then.
  template <typename Cond>
  Result<void> WaitFor(Cond cond, std::chrono::nanoseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, timeout, cond)) return Err(Errc::kTime, "wait timed out");
    return {};
  }

  // Wakes every sleeper; each re-evaluates its condition.
  void WakeAll() {
    { std::lock_guard<std::mutex> l(mu_); }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace usvm

#endif  // USVM_BASE_WAIT_QUEUE_H_
