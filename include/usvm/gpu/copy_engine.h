// CopyEngine: a DMA engine that moves pages between system memory and
// VRAM, and between the VRAM of peer GPUs.
//
// Copy(src, dst) takes two equally long lists of 4 KiB pages (PhysAddr,
// page aligned) and queues the work; the engine's thread moves the real
// bytes, page i of src to page i of dst. The returned Fence signals after
// the bytes have moved and the modelled time has passed:
//   deadline = max(now, engine busy until) + latency + bytes / bandwidth
// where the route decides the link (system<->VRAM and peer: the link;
// local VRAM<->VRAM: VRAM bandwidth). Copies on one engine complete in
// order.
//
// Failures: the fault point "gpu.copy" is consulted once per copy when it
// executes; on failure the fence signals EIO and the destination contents
// are undefined (as after a DMA error; the driver must retry or give up).
// Invalid arguments are rejected by Copy itself (EINVAL) and nothing is
// queued.
//
// Thread-safety: Copy is safe for concurrent use. Locking: a Mutex guards
// the queue; the worker takes work off it and copies without the lock.
#ifndef USVM_GPU_COPY_ENGINE_H_
#define USVM_GPU_COPY_ENGINE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <span>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/base/wait_queue.h"
#include "usvm/gpu/fence.h"
#include "usvm/gpu/latency_model.h"
#include "usvm/gpu/phys_addr.h"

namespace usvm::gpu {

struct CopyStats {
  uint64_t copies = 0;
  uint64_t pages = 0;
  uint64_t bytes = 0;
  uint64_t failures = 0;
};

class CopyEngine {
 public:
  // Resolves a page to its bytes, or an error if it is not reachable from
  // this GPU (bad frame, beyond VRAM, peer access not enabled).
  using Resolver = std::function<Result<std::byte*>(const PhysAddr&, uint64_t bytes)>;

  // `gpu_id`: the owning GPU, to tell local from peer VRAM.
  CopyEngine(uint32_t gpu_id, uint32_t index, Resolver resolve, const LatencyModel& latency,
             Env& env);
  // Finishes queued copies, then stops the thread.
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // EINVAL: empty or unequal lists, more than 1 Mi pages, an unaligned or
  // unreachable page. ECANCELED after shutdown began.
  Result<Fence> Copy(std::span<const PhysAddr> src, std::span<const PhysAddr> dst);
  // DMA between host pages and device-visible pages (the driver's system
  // page pointers, e.g. during a migration): host[i] <-> dev[i], 4 KiB
  // each, over the system link. kToDevice copies host[i] into dev[i]
  // (a null host[i] reads as zeros); kToHost copies dev[i] into host[i]
  // (which must not be null). The caller keeps the host pages alive until
  // the fence signals. Errors as Copy.
  enum class HostDir : uint8_t { kToDevice, kToHost };
  Result<Fence> CopyHost(HostDir dir, std::span<std::byte* const> host, std::span<const PhysAddr> dev);

  uint32_t index() const { return index_; }
  CopyStats Stats() const;

 private:
  struct Job {
    std::vector<std::byte*> src;
    std::vector<std::byte*> dst;
    Fence fence;
  };
  void Run();
  Result<Fence> Queue(Job job, uint64_t link_bytes, uint64_t local_bytes);

  // Constant after construction.
  const uint32_t gpu_id_;
  const uint32_t index_;
  const Resolver resolve_;
  const LatencyModel latency_;
  Env& env_;

  mutable Mutex lock_;
  std::deque<Job> queue_ USVM_GUARDED_BY(lock_);
  uint64_t busy_until_ns_ USVM_GUARDED_BY(lock_) = 0;
  bool stop_ USVM_GUARDED_BY(lock_) = false;
  CopyStats stats_ USVM_GUARDED_BY(lock_);
  // Atomic: queue length, for the worker's wait condition.
  std::atomic<uint64_t> queued_{0};
  std::atomic<bool> stopping_{false};
  WaitQueue work_;
  std::thread thread_;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_COPY_ENGINE_H_
