// Annotated locks and their scoped guards.
//
// - Mutex: a sleeping mutex (std::mutex), the kernel's `struct mutex`.
// - SpinLock: test-and-test-and-set with a pause; for short critical
//   sections that never sleep (the kernel's spinlock_t).
// - RwSemaphore: reader/writer lock with writer preference, write-to-read
//   downgrade and try-locks; spins briefly, then sleeps on a futex
//   (std::atomic::wait). The kernel's rw_semaphore (mmap_lock).
//
// Guards: MutexLock, SpinLockGuard, ReadLock, WriteLock. All types carry
// clang thread-safety attributes so `USVM_GUARDED_BY(lock_)` is checked.
#ifndef USVM_BASE_MUTEX_H_
#define USVM_BASE_MUTEX_H_

#include <atomic>
#include <cstdint>
#include <mutex>

#include "usvm/base/thread_annotations.h"

namespace usvm {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class USVM_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() USVM_ACQUIRE() { mu_.lock(); }
  void Unlock() USVM_RELEASE() { mu_.unlock(); }
  bool TryLock() USVM_TRY_ACQUIRE(true) { return mu_.try_lock(); }
  // For analysis only: tells clang the caller holds the lock.
  void AssertHeld() const USVM_ASSERT_CAPABILITY(this) {}

  // Interop with std::condition_variable_any / std::unique_lock.
  void lock() USVM_ACQUIRE() { mu_.lock(); }
  void unlock() USVM_RELEASE() { mu_.unlock(); }
  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

class USVM_CAPABILITY("spinlock") SpinLock {
 public:
  SpinLock() = default;
  SpinLock(const SpinLock&) = delete;
  SpinLock& operator=(const SpinLock&) = delete;

  void Lock() USVM_ACQUIRE() {
    for (;;) {
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) CpuRelax();
    }
  }
  bool TryLock() USVM_TRY_ACQUIRE(true) {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void Unlock() USVM_RELEASE() { locked_.store(false, std::memory_order_release); }
  void AssertHeld() const USVM_ASSERT_CAPABILITY(this) {}

 private:
  std::atomic<bool> locked_{false};
};

class USVM_CAPABILITY("rwsem") RwSemaphore {
 public:
  RwSemaphore() = default;
  RwSemaphore(const RwSemaphore&) = delete;
  RwSemaphore& operator=(const RwSemaphore&) = delete;

  void LockShared() USVM_ACQUIRE_SHARED() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    if ((s & (kWriter | kWriterWaiting)) == 0 &&
        state_.compare_exchange_weak(s, s + kReader, std::memory_order_acquire,
                                     std::memory_order_relaxed))
      return;
    LockSharedSlow();
  }
  bool TryLockShared() USVM_TRY_ACQUIRE_SHARED(true) {
    uint32_t s = state_.load(std::memory_order_relaxed);
    while ((s & (kWriter | kWriterWaiting)) == 0) {
      if (state_.compare_exchange_weak(s, s + kReader, std::memory_order_acquire,
                                       std::memory_order_relaxed))
        return true;
    }
    return false;
  }
  void UnlockShared() USVM_RELEASE_SHARED() {
    uint32_t prev = state_.fetch_sub(kReader, std::memory_order_release);
    if ((prev & kReaderMask) == kReader && (prev & kWriterWaiting)) Wake();
  }

  void Lock() USVM_ACQUIRE() {
    uint32_t expected = 0;
    if (state_.compare_exchange_strong(expected, kWriter, std::memory_order_acquire,
                                       std::memory_order_relaxed))
      return;
    LockSlow();
  }
  bool TryLock() USVM_TRY_ACQUIRE(true) {
    uint32_t s = state_.load(std::memory_order_relaxed);
    while ((s & (kWriter | kReaderMask)) == 0) {
      if (state_.compare_exchange_weak(s, (s | kWriter) & ~kWriterWaiting,
                                       std::memory_order_acquire, std::memory_order_relaxed))
        return true;
    }
    return false;
  }
  void Unlock() USVM_RELEASE() {
    state_.fetch_and(~kWriter, std::memory_order_release);
    Wake();
  }
  // Write -> read without letting another writer in (mmap_write_downgrade).
  void Downgrade() USVM_RELEASE() USVM_ACQUIRE_SHARED() {
    state_.fetch_add(kReader - kWriter, std::memory_order_release);
    Wake();
  }

  void AssertHeld() const USVM_ASSERT_CAPABILITY(this) {}
  void AssertReaderHeld() const USVM_ASSERT_SHARED_CAPABILITY(this) {}

  // Racy queries for assertions and tests.
  bool DebugIsWriteLocked() const { return state_.load(std::memory_order_relaxed) & kWriter; }
  bool DebugIsLocked() const {
    return state_.load(std::memory_order_relaxed) & (kWriter | kReaderMask);
  }

 private:
  static constexpr uint32_t kWriter = 1;
  static constexpr uint32_t kWriterWaiting = 2;
  static constexpr uint32_t kReader = 4;
  static constexpr uint32_t kReaderMask = ~uint32_t{3};

  void LockSharedSlow();
  void LockSlow();
  void Wake();

  std::atomic<uint32_t> state_{0};
  std::atomic<uint32_t> sleepers_{0};
};

class USVM_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) USVM_ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~MutexLock() USVM_RELEASE() { mu_.Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

class USVM_SCOPED_CAPABILITY SpinLockGuard {
 public:
  explicit SpinLockGuard(SpinLock& l) USVM_ACQUIRE(l) : l_(l) { l_.Lock(); }
  ~SpinLockGuard() USVM_RELEASE() { l_.Unlock(); }
  SpinLockGuard(const SpinLockGuard&) = delete;
  SpinLockGuard& operator=(const SpinLockGuard&) = delete;

 private:
  SpinLock& l_;
};

class USVM_SCOPED_CAPABILITY ReadLock {
 public:
  explicit ReadLock(RwSemaphore& s) USVM_ACQUIRE_SHARED(s) : s_(s) { s_.LockShared(); }
  ~ReadLock() USVM_RELEASE() { s_.UnlockShared(); }
  ReadLock(const ReadLock&) = delete;
  ReadLock& operator=(const ReadLock&) = delete;

 private:
  RwSemaphore& s_;
};

class USVM_SCOPED_CAPABILITY WriteLock {
 public:
  explicit WriteLock(RwSemaphore& s) USVM_ACQUIRE(s) : s_(s) { s_.Lock(); }
  ~WriteLock() USVM_RELEASE() { s_.Unlock(); }
  WriteLock(const WriteLock&) = delete;
  WriteLock& operator=(const WriteLock&) = delete;

 private:
  RwSemaphore& s_;
};

}  // namespace usvm

#endif  // USVM_BASE_MUTEX_H_
