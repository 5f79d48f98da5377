// FaultUnit: the GPU's replayable page-fault queue.
//
// A translated access that finds no valid PTE, or one without the needed
// permission, raises a fault here and its execution thread blocks until
// the driver answers. Faults are per 4 KiB page: a second fault on a page
// that already has one outstanding (queued or fetched, not yet answered)
// is coalesced into it (its access kind is merged; the raiser waits on the
// same answer), so the driver services each page once.
//
// Driver side, the fault-handling loop (xe_svm_handle_pagefault's caller):
//
//   for (;;) {
//     auto batch = fu.Fetch(64, timeout_ns);   // >= 1 fault, or ETIME
//     for (const Fault& f : *batch) {
//       if (Service(f)) fu.Replay(f.id);       // bound the page: retry
//       else fu.Cancel(f.id, Error(Errc::kFault, "bad address"));
//     }
//   }
//
// Replay wakes every thread waiting on the fault; each retries its access
// (and faults again if the page is still not mapped as needed). Cancel
// ends the kernels of those threads with the given error; other kernels
// are untouched.
//
// State of a fault: 1. queued (raised, not fetched) -> 2. fetched ->
// 3. answered (replayed or cancelled; removed from the unit). Shutdown()
// cancels everything outstanding with ECANCELED and fails later raises.
//
// A bounded fault buffer (capacity > 0) holds at most `capacity` queued
// faults, as a hardware fault buffer does. A new fault that finds it full
// is dropped (counted in FaultStats::dropped): it gets no entry, and its
// raiser waits for the driver's next answer (Replay or Cancel of any
// fault), then returns success so the access is retried and, if the page
// is still not mapped, faults again -- the re-raise after replay of real
// GPUs. Coalescing into an outstanding fault needs no entry.
//
// Locking: one Mutex guards the queue and the page index; raisers sleep
// on their fault's answer atomic (atomic wait/notify: a futex each), the
// raisers of dropped faults on a WaitQueue.
#ifndef USVM_GPU_FAULT_UNIT_H_
#define USVM_GPU_FAULT_UNIT_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/base/wait_queue.h"
#include "usvm/gpu/phys_addr.h"

namespace usvm::gpu {

struct Fault {
  uint64_t id = 0;
  uint64_t va = 0;        // page aligned
  uint8_t access = 0;     // Access bits, merged over coalesced raisers
  uint32_t engine = 0;    // execution thread that raised it first
  uint64_t launch = 0;    // launch id of the first raiser
  uint32_t raisers = 0;   // threads waiting on it when fetched
};

struct FaultStats {
  uint64_t raised = 0;     // every Raise call
  uint64_t coalesced = 0;  // raises folded into an outstanding fault
  uint64_t fetched = 0;
  uint64_t replayed = 0;
  uint64_t cancelled = 0;
  uint64_t dropped = 0;    // raises that found the bounded buffer full
};

class FaultUnit {
 public:
  // `env` is accepted for symmetry with the other units; the unit keeps
  // no modelled time of its own (see LatencyModel::fault_service_ns).
  // `capacity`: queued faults the buffer holds (0: unbounded).
  explicit FaultUnit(Env& env, size_t capacity = 0);
  ~FaultUnit();
  FaultUnit(const FaultUnit&) = delete;
  FaultUnit& operator=(const FaultUnit&) = delete;

  // Device side: raises (or joins) the fault for va's page and blocks
  // until it is answered. Success: replayed (or dropped from a full buffer
  // and released by the next answer), retry the access. Error: the Cancel
  // error, or ECANCELED after Shutdown. EINVAL for a bad access kind or va
  // beyond 48 bits.
  Result<void> Raise(uint64_t va, uint8_t access, uint32_t engine, uint64_t launch);

  // Driver side. Up to `max` queued faults in raise order, waiting up to
  // timeout_ns of real time for the first one. EINVAL for max == 0; ETIME
  // if none came; ECANCELED after Shutdown. An empty batch when the
  // doorbell rang (Ring) and no fault is queued.
  Result<std::vector<Fault>> Fetch(size_t max, uint64_t timeout_ns);
  // Non-blocking: queued faults now (possibly none).
  std::vector<Fault> TryFetch(size_t max);
  // Answers a fetched fault. ENOENT if `id` is not outstanding; EINVAL
  // if Cancel is given a success code.
  Result<void> Replay(uint64_t id);
  Result<void> Cancel(uint64_t id, Error error);

  // The GPU's interrupt for its other units (the access counters' buffer
  // has notifications): wakes a Fetch in progress, or makes the next one
  // return at once, with the queued faults or an empty batch. Rings
  // before the Fetch are remembered (once).
  void Ring();

  // Cancels every outstanding fault with ECANCELED; later Raise/Fetch
  // fail with ECANCELED. Idempotent.
  void Shutdown();

  FaultStats Stats() const;
  // Faults raised but not answered.
  size_t outstanding() const;
  size_t capacity() const { return capacity_; }

 private:
  struct Pending;

  Result<void> AnswerLocked(uint64_t id, Errc code, const char* what) USVM_REQUIRES(lock_);

  const size_t capacity_;  // 0: unbounded
  mutable Mutex lock_;
  std::deque<std::shared_ptr<Pending>> queue_ USVM_GUARDED_BY(lock_);
  // Bumped by every answer (and Shutdown): dropped raisers wait for it to
  // move. Atomic: written under lock_, read by their wait condition.
  std::atomic<uint64_t> answer_gen_{0};
  // Mirrors of queue_.size() and shutdown_ for the spinning waiters
  // (written under lock_, read without it).
  std::atomic<size_t> queued_{0};
  std::atomic<bool> stopped_{false};
  // Set by Ring, taken by Fetch. Atomic: written by any thread without
  // lock_ (a flag, nothing else is published through it).
  std::atomic<bool> rung_{false};
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> by_page_ USVM_GUARDED_BY(lock_);
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> by_id_ USVM_GUARDED_BY(lock_);
  uint64_t next_id_ USVM_GUARDED_BY(lock_) = 1;
  bool shutdown_ USVM_GUARDED_BY(lock_) = false;
  FaultStats stats_ USVM_GUARDED_BY(lock_);
  // Raisers of dropped faults (no entry) wait here for the next answer;
  // raisers with an entry wait on their fault's own answer atomic (one
  // futex per fault, so an answer wakes only its raisers). The driver
  // waits on arrivals_ for faults.
  WaitQueue answers_;
  WaitQueue arrivals_;
  // Dropped raisers between registering (under lock_) and waking: answers
  // wake answers_ only when there are some.
  std::atomic<uint32_t> dropped_waiting_{0};
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_FAULT_UNIT_H_
