// Env: the environment injected into every layer (LevelDB's Env): a clock,
// randomness and named fault-injection points.
//
// Tests build their own Env (a manual clock, a fixed seed, armed fault
// points) so runs are deterministic; production code uses Env::Default().
//
// Fault injection: code that can fail calls `env.ShouldFail("frame_pool.alloc")`
// at a named site before doing the real work, and fails with its usual
// error if that returns true. Tests arm a site:
//   env.faults().FailNth("frame_pool.alloc", 3);      // the 3rd call fails
//   env.faults().FailEvery("copy_engine.copy", 10);   // every 10th call
//   env.faults().FailWithProbability("x", 0.01);      // seeded, deterministic
// When nothing is armed ShouldFail is one relaxed atomic load.
//
// Thread-safety: all methods are safe for concurrent use.
#ifndef USVM_BASE_ENV_H_
#define USVM_BASE_ENV_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "usvm/base/mutex.h"
#include "usvm/base/thread_annotations.h"

namespace usvm {

// Monotonic time in nanoseconds.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual uint64_t NowNs() const = 0;
  // Blocks the calling thread for `ns` of this clock's time.
  virtual void SleepNs(uint64_t ns) = 0;
};

// std::chrono::steady_clock.
class RealClock final : public Clock {
 public:
  uint64_t NowNs() const override;
  void SleepNs(uint64_t ns) override;
};

// A clock that moves only when told to. SleepNs(ns) advances it by ns and
// returns at once, so code that waits on modelled latencies runs in zero
// real time and deterministically.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(uint64_t start_ns = 0) : now_(start_ns) {}
  uint64_t NowNs() const override { return now_.load(std::memory_order_acquire); }
  void SleepNs(uint64_t ns) override { Advance(ns); }
  void Advance(uint64_t ns) { now_.fetch_add(ns, std::memory_order_acq_rel); }

 private:
  std::atomic<uint64_t> now_;
};

// splitmix64: small, fast, good enough for workloads and fault injection.
// Not thread-safe: give each thread its own (Env::NewRng).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n); n > 0.
  uint64_t Uniform(uint64_t n) { return static_cast<uint64_t>((static_cast<__uint128_t>(Next()) * n) >> 64); }
  // Uniform in [0, 1).
  double NextDouble() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  bool OneIn(uint64_t n) { return Uniform(n) == 0; }

 private:
  uint64_t s_;
};

class FaultInjector {
 public:
  explicit FaultInjector(uint64_t seed = 1) : rng_(seed) {}

  // The n-th call (1-based) at `site` from now on fails, once.
  void FailNth(std::string_view site, uint64_t n);
  // Every n-th call at `site` fails (n >= 1; 1 means always).
  void FailEvery(std::string_view site, uint64_t n);
  // Each call fails with probability p, drawn from the seeded generator.
  void FailWithProbability(std::string_view site, double p);
  // Disarms `site`, or every site.
  void Clear(std::string_view site);
  void ClearAll();

  bool ShouldFail(std::string_view site) {
    if (!armed_.load(std::memory_order_relaxed)) return false;
    return ShouldFailSlow(site);
  }
  // How many times `site` has reported a failure so far.
  uint64_t Failures(std::string_view site) const;

 private:
  struct Site {
    uint64_t calls = 0;
    uint64_t nth = 0;    // fail when calls == nth (then disarm nth)
    uint64_t every = 0;  // fail when calls % every == 0
    double p = 0;
    uint64_t failures = 0;
  };
  bool ShouldFailSlow(std::string_view site);
  void UpdateArmedLocked() USVM_REQUIRES(mu_);

  mutable Mutex mu_;
  std::map<std::string, Site, std::less<>> sites_ USVM_GUARDED_BY(mu_);
  Rng rng_ USVM_GUARDED_BY(mu_);
  std::atomic<bool> armed_{false};
};

class Env {
 public:
  // A real clock and seed 1.
  Env();
  // Takes ownership of clock.
  Env(std::unique_ptr<Clock> clock, uint64_t seed);
  Env(const Env&) = delete;
  Env& operator=(const Env&) = delete;

  // The process-wide default environment (real clock, no faults armed).
  static Env& Default();

  Clock& clock() { return *clock_; }
  uint64_t NowNs() const { return clock_->NowNs(); }
  void SleepNs(uint64_t ns) { clock_->SleepNs(ns); }

  uint64_t seed() const { return seed_; }
  // A fresh generator derived from the seed and a stream number, so every
  // thread of a deterministic run draws its own reproducible sequence.
  Rng NewRng(uint64_t stream) const { return Rng(seed_ * 0x9E3779B97F4A7C15ull + stream); }

  FaultInjector& faults() { return faults_; }
  bool ShouldFail(std::string_view site) { return faults_.ShouldFail(site); }

 private:
  std::unique_ptr<Clock> clock_;
  uint64_t seed_;
  FaultInjector faults_;
};

}  // namespace usvm

#endif  // USVM_BASE_ENV_H_
