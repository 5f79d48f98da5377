// Races on the base primitives; run under TSan in CI (label concurrency).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/wait_queue.h"

namespace usvm {
namespace {

// Writers keep two fields equal; readers must never see them differ.
TEST(RwSemaphoreTest, ReadersNeverSeeAHalfWrite) {
  RwSemaphore sem;
  uint64_t a = 0, b = 0;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> torn{0}, reads{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 3; ++i)
    ts.emplace_back([&] {
      while (!stop.load()) {
        ReadLock l(sem);
        if (a != b) torn++;
        reads++;
      }
    });
  for (int w = 0; w < 2; ++w)
    ts.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        WriteLock l(sem);
        ++a;
        ++b;
      }
    });
  for (int i = 3; i < 5; ++i) ts[i].join();
  stop = true;
  for (int i = 0; i < 3; ++i) ts[i].join();
  EXPECT_EQ(torn.load(), 0u);
  EXPECT_EQ(a, 40000u);
  EXPECT_GT(reads.load(), 0u);
}

TEST(RwSemaphoreTest, DowngradeKeepsWritersOut) {
  RwSemaphore sem;
  int v = 0;
  sem.Lock();
  v = 1;
  sem.Downgrade();
  std::atomic<bool> writer_done{false};
  std::thread w([&] {
    WriteLock l(sem);
    v = 2;
    writer_done = true;
  });
  // Other readers may not enter past the waiting writer, but we still hold
  // the read side: the writer cannot have run.
  for (int i = 0; i < 1000; ++i) std::this_thread::yield();
  EXPECT_FALSE(writer_done.load());
  EXPECT_EQ(v, 1);
  sem.UnlockShared();
  w.join();
  EXPECT_EQ(v, 2);
}

TEST(RwSemaphoreTest, TryLockFailsWhileHeld) {
  RwSemaphore sem;
  sem.LockShared();
  EXPECT_FALSE(sem.TryLock());
  EXPECT_TRUE(sem.TryLockShared());
  sem.UnlockShared();
  sem.UnlockShared();
  EXPECT_TRUE(sem.TryLock());
  EXPECT_FALSE(sem.TryLockShared());
  sem.Unlock();
}

TEST(SpinLockTest, CountsUnderContention) {
  SpinLock l;
  uint64_t n = 0;
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i)
    ts.emplace_back([&] {
      for (int k = 0; k < 20000; ++k) {
        SpinLockGuard g(l);
        ++n;
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(n, 80000u);
}

TEST(WaitQueueTest, NoLostWakeups) {
  WaitQueue wq;
  std::atomic<int> stage{0};
  std::vector<std::thread> ts;
  std::atomic<int> woke{0};
  for (int i = 0; i < 4; ++i)
    ts.emplace_back([&] {
      for (int round = 1; round <= 200; ++round) {
        wq.Wait([&] { return stage.load() >= round; });
        woke++;
      }
    });
  for (int round = 1; round <= 200; ++round) {
    stage.store(round);
    wq.WakeAll();
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(woke.load(), 800);
}

TEST(WaitQueueTest, WaitForTimesOut) {
  WaitQueue wq;
  auto r = wq.WaitFor([] { return false; }, std::chrono::milliseconds(5));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kTime);
}

}  // namespace
}  // namespace usvm
