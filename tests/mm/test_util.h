// Helpers shared by the mm tests.
#ifndef USVM_TESTS_MM_TEST_UTIL_H_
#define USVM_TESTS_MM_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::mm::testing {

// A pool of `mib` MiB (lazily committed).
inline std::unique_ptr<FramePool> MakePool(uint64_t mib = 256, Env& env = Env::Default()) {
  auto p = FramePool::TryCreate(mib << 20, env);
  EXPECT_TRUE(p.has_value());
  return std::move(*p);
}

inline std::shared_ptr<AddressSpace> MakeSpace(FramePool& pool, Env& env = Env::Default()) {
  auto as = AddressSpace::TryCreate(pool, {}, env);
  EXPECT_TRUE(as.has_value());
  return *as;
}

// The recording stub behind the invalidation hook: every start/end with
// its range and event, in order.
class RecordingNotifier : public MmuNotifier {
 public:
  struct Call {
    bool start;
    uint64_t s, e;
    NotifyEvent ev;
    bool operator==(const Call&) const = default;
  };
  bool InvalidateRangeStart(const NotifierRange& r) override {
    MutexLock l(mu_);
    calls_.push_back({true, r.start, r.end, r.event});
    return true;
  }
  void InvalidateRangeEnd(const NotifierRange& r) override {
    MutexLock l(mu_);
    calls_.push_back({false, r.start, r.end, r.event});
  }
  void Release(AddressSpace&) override {
    MutexLock l(mu_);
    ++releases_;
  }
  std::vector<Call> Take() {
    MutexLock l(mu_);
    return std::exchange(calls_, {});
  }
  // Only the starts, as (start, end, event).
  std::vector<Call> Starts() {
    std::vector<Call> out;
    for (auto& c : Take())
      if (c.start) out.push_back(c);
    return out;
  }
  int releases() {
    MutexLock l(mu_);
    return releases_;
  }

 private:
  Mutex mu_;
  std::vector<Call> calls_ USVM_GUARDED_BY(mu_);
  int releases_ USVM_GUARDED_BY(mu_) = 0;
};

inline std::vector<uint8_t> Bytes(size_t n, uint8_t v) { return std::vector<uint8_t>(n, v); }

// len bytes of a pattern with seed `seed` that differs from page to page.
inline std::vector<uint8_t> Pattern(uint64_t len, uint8_t seed) {
  std::vector<uint8_t> v(len);
  for (uint64_t i = 0; i < len; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 12));
  return v;
}

// Whether this build runs under ThreadSanitizer (stress tests scale down).
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool kTsan = true;
#else
inline constexpr bool kTsan = false;
#endif
#else
inline constexpr bool kTsan = false;
#endif

}  // namespace usvm::mm::testing

#endif  // USVM_TESTS_MM_TEST_UTIL_H_
