#include "usvm/base/env.h"

#include <thread>

namespace usvm {

uint64_t RealClock::NowNs() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

void RealClock::SleepNs(uint64_t ns) {
  if (ns == 0) return;
  // Short waits spin: a modelled 2 us latency must not cost a 60 us wake-up.
  if (ns < 50'000) {
    const uint64_t end = NowNs() + ns;
    while (NowNs() < end) CpuRelax();
    return;
  }
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

void FaultInjector::FailNth(std::string_view site, uint64_t n) {
  MutexLock l(mu_);
  auto& s = sites_[std::string(site)];
  s.calls = 0;
  s.nth = n;
  UpdateArmedLocked();
}

void FaultInjector::FailEvery(std::string_view site, uint64_t n) {
  MutexLock l(mu_);
  auto& s = sites_[std::string(site)];
  s.calls = 0;
  s.every = n;
  UpdateArmedLocked();
}

void FaultInjector::FailWithProbability(std::string_view site, double p) {
  MutexLock l(mu_);
  sites_[std::string(site)].p = p;
  UpdateArmedLocked();
}

void FaultInjector::Clear(std::string_view site) {
  MutexLock l(mu_);
  auto it = sites_.find(site);
  if (it != sites_.end()) {
    it->second.nth = it->second.every = 0;
    it->second.p = 0;
  }
  UpdateArmedLocked();
}

void FaultInjector::ClearAll() {
  MutexLock l(mu_);
  for (auto& [name, s] : sites_) {
    s.nth = s.every = 0;
    s.p = 0;
  }
  UpdateArmedLocked();
}

uint64_t FaultInjector::Failures(std::string_view site) const {
  MutexLock l(mu_);
  auto it = sites_.find(site);
  return it == sites_.end() ? 0 : it->second.failures;
}

void FaultInjector::UpdateArmedLocked() {
  bool any = false;
  for (auto& [name, s] : sites_) any |= s.nth != 0 || s.every != 0 || s.p > 0;
  armed_.store(any, std::memory_order_relaxed);
}

bool FaultInjector::ShouldFailSlow(std::string_view site) {
  MutexLock l(mu_);
  auto it = sites_.find(site);
  if (it == sites_.end()) return false;
  Site& s = it->second;
  ++s.calls;
  bool fail = false;
  if (s.nth != 0 && s.calls == s.nth) {
    fail = true;
    s.nth = 0;
    UpdateArmedLocked();
  }
  if (s.every != 0 && s.calls % s.every == 0) fail = true;
  if (s.p > 0 && rng_.NextDouble() < s.p) fail = true;
  if (fail) ++s.failures;
  return fail;
}

Env::Env() : Env(std::make_unique<RealClock>(), 1) {}

Env::Env(std::unique_ptr<Clock> clock, uint64_t seed)
    : clock_(std::move(clock)), seed_(seed), faults_(seed) {}

Env& Env::Default() {
  static Env* env = new Env();
  return *env;
}

}  // namespace usvm
