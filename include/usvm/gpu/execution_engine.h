// ExecutionEngine: runs kernels on a GPU's execution threads.
//
// A launch is a kernel (a C++ callable taking a KernelContext&) and a
// number of kernel threads; the engine's execution threads (real
// std::threads, `threads` of them per GPU) claim kernel threads of queued
// launches in order and run them. Every memory access of a kernel goes
// through the GPU MMU (see KernelContext); a fault blocks only the
// execution thread that raised it, so other threads keep running other
// kernel threads or other launches.
//
// Built-in pattern kernels (PatternParams) split [va, va + length) among
// their kernel threads:
//   kStreamRead     load every 8-byte word (sums into stats.checksum)
//   kStreamWrite    store value + word index into every word
//   kStride         load one word every `stride` bytes
//   kRandomGather   `count` loads per thread at random words (seeded)
//   kReadModifyWrite  word += value for every word (load then store)
// Each repeats `iterations` times.
//
// A Launch is a handle on its state: its fence signals when every kernel
// thread has finished, with the cancel error if the kernel was cancelled;
// stats() are final once the fence has signalled.
//
// Locking: a Mutex guards the run queue; launches count completion with
// atomics. Shutdown (the destructor) cancels queued launches and waits for
// running kernel threads; the owner shuts the FaultUnit down first so
// threads blocked on faults return.
#ifndef USVM_GPU_EXECUTION_ENGINE_H_
#define USVM_GPU_EXECUTION_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/base/wait_queue.h"
#include "usvm/gpu/fault_unit.h"
#include "usvm/gpu/fence.h"
#include "usvm/gpu/kernel_context.h"
#include "usvm/gpu/latency_model.h"
#include "usvm/gpu/page_table.h"
#include "usvm/gpu/tlb.h"

namespace usvm::gpu {

using KernelFn = std::function<void(KernelContext&)>;

struct LaunchParams {
  uint32_t threads = 1;  // kernel threads, [1, 1 << 20]
};

enum class Pattern { kStreamRead, kStreamWrite, kStride, kRandomGather, kReadModifyWrite };

struct PatternParams {
  Pattern pattern = Pattern::kStreamRead;
  uint64_t va = 0;       // 8-byte aligned
  uint64_t length = 0;   // bytes, a non-zero multiple of 8
  uint64_t stride = 8;   // kStride: bytes between loads (multiple of 8)
  uint64_t count = 0;    // kRandomGather: loads per kernel thread
  uint64_t value = 0;    // kStreamWrite / kReadModifyWrite operand
  uint64_t seed = 1;     // kRandomGather
  uint32_t iterations = 1;
  uint32_t threads = 1;
};

struct LaunchStats {
  uint64_t accesses = 0;
  uint64_t faults = 0;    // faults raised (each retry counts)
  uint64_t stalls = 0;    // times a thread blocked on a fault
  uint64_t stall_ns = 0;  // clock time spent blocked
  uint64_t checksum = 0;  // pattern kernels: sum of loaded words
};

namespace detail {
struct LaunchState;
}

class Launch {
 public:
  Launch() = default;
  uint64_t id() const;
  const Fence& fence() const;
  Result<void> Wait() const { return fence().Wait(); }
  LaunchStats stats() const;

 private:
  friend class ExecutionEngine;
  explicit Launch(std::shared_ptr<detail::LaunchState> s) : s_(std::move(s)) {}
  std::shared_ptr<detail::LaunchState> s_;
};

class ExecutionEngine {
 public:
  // Resolves the leaf of `m` at `va` to host bytes, or nullptr if the
  // memory is unreachable (peer access gone): fatal for the kernel.
  using HostResolver = std::function<std::byte*(const Mapping& m, uint64_t va)>;

  // threads in [1, walkers of tlb]. `counters` (may be null): the
  // context's access counters, fed with accesses to remotely mapped pages
  // (PTE kind system or peer VRAM) when enabled.
  ExecutionEngine(uint32_t threads, PageTable& pt, Tlb& tlb, FaultUnit& faults,
                  HostResolver resolve, const LatencyModel& latency, Env& env,
                  AccessCounters* counters = nullptr);
  ~ExecutionEngine();
  ExecutionEngine(const ExecutionEngine&) = delete;
  ExecutionEngine& operator=(const ExecutionEngine&) = delete;

  // EINVAL: empty kernel, threads out of range; ECANCELED after shutdown.
  Result<Launch> Submit(KernelFn fn, const LaunchParams& params);
  // EINVAL for malformed parameters (see PatternParams).
  Result<Launch> SubmitPattern(const PatternParams& params);

  uint32_t threads() const { return static_cast<uint32_t>(threads_.size()); }

 private:
  friend class KernelContext;
  void Run(uint32_t index);
  std::byte* TranslateSlow(KernelContext& ctx, uint64_t va, uint8_t access, uint64_t align_mask);
  // Holds one write in flight and rearms the thread's countdown.
  void HoldInFlight(detail::MicroTlb& utlb);
  void CancelLaunch(detail::LaunchState& l, Error e);

  // Constant after construction.
  PageTable& pt_;
  Tlb& tlb_;
  FaultUnit& faults_;
  const HostResolver resolve_;
  const LatencyModel latency_;
  Env& env_;
  AccessCounters* const counters_;  // null, or enabled counters

  Mutex lock_;
  std::deque<std::shared_ptr<detail::LaunchState>> queue_ USVM_GUARDED_BY(lock_);
  uint64_t next_launch_id_ USVM_GUARDED_BY(lock_) = 1;
  bool stop_ USVM_GUARDED_BY(lock_) = false;
  // Atomic: mirrors of queue_.size() and stop_ for the wait condition.
  std::atomic<uint64_t> queued_{0};
  std::atomic<bool> stopping_{false};
  WaitQueue work_;
  std::vector<std::unique_ptr<detail::MicroTlb>> utlbs_;  // one per thread, owned by it
  std::vector<std::thread> threads_;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_EXECUTION_ENGINE_H_
