#include "usvm/base/mutex.h"

namespace usvm {

namespace {
constexpr int kSpins = 64;
}

// Sleepers wait on state_ changing; every release that could let a waiter
// in calls Wake(), which only pays for a futex wake when someone sleeps.
void RwSemaphore::LockSharedSlow() {
  for (int i = 0;; ++i) {
    uint32_t s = state_.load(std::memory_order_relaxed);
    if ((s & (kWriter | kWriterWaiting)) == 0) {
      if (state_.compare_exchange_weak(s, s + kReader, std::memory_order_acquire,
                                       std::memory_order_relaxed))
        return;
      continue;
    }
    if (i < kSpins) {
      CpuRelax();
      continue;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    // Re-check after announcing ourselves, then sleep while unchanged.
    if (state_.load(std::memory_order_seq_cst) == s) state_.wait(s, std::memory_order_relaxed);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void RwSemaphore::LockSlow() {
  for (int i = 0;; ++i) {
    uint32_t s = state_.load(std::memory_order_relaxed);
    if ((s & (kWriter | kReaderMask)) == 0) {
      // Take it; clear the waiting bit (other waiting writers set it again).
      if (state_.compare_exchange_weak(s, (s | kWriter) & ~kWriterWaiting,
                                       std::memory_order_acquire, std::memory_order_relaxed))
        return;
      continue;
    }
    if (!(s & kWriterWaiting)) {
      // Block new readers so a writer is not starved.
      if (!state_.compare_exchange_weak(s, s | kWriterWaiting, std::memory_order_relaxed))
        continue;
      s |= kWriterWaiting;
    }
    if (i < kSpins) {
      CpuRelax();
      continue;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    if (state_.load(std::memory_order_seq_cst) == s) state_.wait(s, std::memory_order_relaxed);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void RwSemaphore::Wake() {
  // Pairs with the waiter's sleepers_ increment then state_ re-check: one
  // of the two sides sees the other's write.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) != 0) state_.notify_all();
}

}  // namespace usvm
