// Fence: completion of asynchronous device work (a copy, a TLB
// invalidation, a kernel launch), the dma_fence of this world.
//
// A fence signals when both
//   1. its work is done (the producer called Signal, or the fence's poll
//      function reports completion), and
//   2. the Env's clock has reached the fence's deadline (the modelled
//      latency of the work; see LatencyModel).
// Wait() blocks until then, advancing a ManualClock to the deadline rather
// than sleeping. The work's outcome is an Error or success, returned by
// Wait(); a failed copy or a cancelled kernel still signals.
//
// Fence is a cheap, copyable handle on shared state; a default-constructed
// Fence is already signalled. The state outlives the device that created
// it, so a fence may be waited on after the device is gone (it will have
// been signalled with ECANCELED by the device's teardown, or completed).
// A fence with a deadline reads the Env's clock, so the Env must outlive
// it; a fence with deadline 0 (kernel launches) never touches the Env.
//
// Thread-safety: all methods are safe for concurrent use.
#ifndef USVM_GPU_FENCE_H_
#define USVM_GPU_FENCE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "usvm/base/env.h"
#include "usvm/base/result.h"

namespace usvm::gpu {

namespace detail {
struct FenceState;
}

class Fence {
 public:
  // A signalled fence with no work.
  Fence() = default;

  // Producer side. A pending fence whose work completes when Signal() is
  // called; it signals once `deadline_ns` has also been reached.
  static Fence CreatePending(Env& env, uint64_t deadline_ns);
  // A fence whose work completes when `poll` first returns true; poll is
  // called by IsSignalled/Wait (from any thread) and must be cheap and
  // thread-safe. Used where completion is a condition on device state
  // (a TLB shootdown draining) rather than an event.
  static Fence CreatePolled(Env& env, uint64_t deadline_ns, std::function<bool()> poll);

  // Marks the work done with `result` (first call wins). REQUIRES: a
  // pending fence from CreatePending.
  void Signal(Result<void> result) const;

  // Non-blocking: has the fence signalled?
  bool IsSignalled() const;
  // Blocks until the fence signals; the work's result.
  Result<void> Wait() const;
  // Waits for every fence; the first error among them, if any.
  static Result<void> WaitAll(std::span<const Fence> fences);

  uint64_t deadline_ns() const;

 private:
  explicit Fence(std::shared_ptr<detail::FenceState> s) : s_(std::move(s)) {}
  std::shared_ptr<detail::FenceState> s_;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_FENCE_H_
