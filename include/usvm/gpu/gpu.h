// Gpu: one simulated GPU: VRAM, page table, TLB, fault unit, copy engines
// and execution engine, plus peer access to other GPUs' VRAM.
//
// The driver's view (../../docs/gpu.md has the full picture):
//   - map:        page_table().Bind(ops)        (system frames, VRAM, peer)
//   - invalidate: page_table().Zap(range); fence = InvalidateTlb(range);
//                 ... on every GPU first, then Fence::WaitAll(fences)
//   - faults:     fault_unit().Fetch / Replay / Cancel
//   - counters:   access_counters().TryFetch / Clear (when
//                 GpuConfig::access_counters.enabled; a notification
//                 rings the fault unit, whose Fetch returns early)
//   - migrate:    vram().Alloc, Copy(engine, src, dst).Wait()
//   - run:        LaunchKernel(kernel) / LaunchPattern(params)
//
// Physical memory is named by PhysAddr; system frames are reached through
// the SystemMemory given at creation (may be null: VRAM only), VRAM of a
// peer only after EnablePeerAccess. A PTE naming this GPU's VRAM is local,
// another GPU's VRAM is peer.
//
// Lifetime: GPUs that are peers must be destroyed only when neither runs
// kernels or copies touching the other; the destructor of each removes it
// from its peers' tables. The destructor shuts the fault unit down (blocked
// kernels end with ECANCELED), then stops the engines.
//
// Thread-safety: every method is safe for concurrent use; each component
// documents its own locking. peers_ entries are atomics written under
// peer_lock_.
#ifndef USVM_GPU_GPU_H_
#define USVM_GPU_GPU_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpu/access_counters.h"
#include "usvm/gpu/copy_engine.h"
#include "usvm/gpu/execution_engine.h"
#include "usvm/gpu/fault_unit.h"
#include "usvm/gpu/fence.h"
#include "usvm/gpu/latency_model.h"
#include "usvm/gpu/page_table.h"
#include "usvm/gpu/phys_addr.h"
#include "usvm/gpu/system_memory.h"
#include "usvm/gpu/tlb.h"
#include "usvm/gpu/vram.h"

namespace usvm::gpu {

struct GpuConfig {
  uint64_t vram_bytes = uint64_t{256} << 20;
  uint32_t exec_threads = 2;   // [1, 64]
  uint32_t copy_engines = 1;   // [1, 8]
  uint64_t max_table_pages = 0;  // 0: unlimited
  // Entries of the replayable fault buffer (0: unbounded). When it is full
  // further faults are dropped and re-raised after the next replay.
  uint32_t fault_buffer_entries = 0;
  // Access counters of remote accesses, per context (access_counters.h);
  // off by default.
  AccessCounterConfig access_counters;
  TlbConfig tlb;
  LatencyModel latency;        // Zero() by default
};

class Gpu;

// GpuContext: one GPU address space (an ASID): its own page table, TLB,
// replayable fault unit and execution engine, sharing the GPU's VRAM,
// copy engines and peer links. A GPU has a default context (its
// page_table(), tlb(), fault_unit() ...); CreateContext makes more, so one
// GPU can run several processes' address spaces, each faulting and being
// invalidated on its own. A context must be destroyed before its GPU.
class GpuContext {
 public:
  ~GpuContext();
  GpuContext(const GpuContext&) = delete;
  GpuContext& operator=(const GpuContext&) = delete;

  Gpu& gpu() const { return gpu_; }
  uint32_t asid() const { return asid_; }
  PageTable& page_table() { return *pt_; }
  Tlb& tlb() { return *tlb_; }
  FaultUnit& fault_unit() { return *faults_; }
  AccessCounters& access_counters() { return *counters_; }
  ExecutionEngine& execution_engine() { return *exec_; }
  Result<Fence> InvalidateTlb(uint64_t va, uint64_t size) { return tlb_->Invalidate(va, size); }
  Result<Launch> LaunchKernel(KernelFn fn, const LaunchParams& params = {}) {
    return exec_->Submit(std::move(fn), params);
  }
  Result<Launch> LaunchPattern(const PatternParams& params) { return exec_->SubmitPattern(params); }

 private:
  friend class Gpu;
  GpuContext(Gpu& gpu, uint32_t asid) : gpu_(gpu), asid_(asid) {}

  // Constant after creation.
  Gpu& gpu_;
  const uint32_t asid_;
  std::unique_ptr<PageTable> pt_;
  std::unique_ptr<Tlb> tlb_;
  std::unique_ptr<FaultUnit> faults_;
  std::unique_ptr<AccessCounters> counters_;  // rings faults_
  std::unique_ptr<ExecutionEngine> exec_;
};

class Gpu {
 public:
  // EINVAL: id >= kMaxGpus, bad config; ENOMEM: VRAM arena.
  static Result<std::unique_ptr<Gpu>> TryCreate(uint32_t id, const GpuConfig& config,
                                                SystemMemory* sysmem, Env& env);
  ~Gpu();
  Gpu(const Gpu&) = delete;
  Gpu& operator=(const Gpu&) = delete;

  uint32_t id() const { return id_; }
  const GpuConfig& config() const { return config_; }
  Env& env() { return env_; }
  Vram& vram() { return *vram_; }
  // The default context's units.
  GpuContext& default_context() { return *default_; }
  PageTable& page_table() { return default_->page_table(); }
  Tlb& tlb() { return default_->tlb(); }
  FaultUnit& fault_unit() { return default_->fault_unit(); }
  AccessCounters& access_counters() { return default_->access_counters(); }
  ExecutionEngine& execution_engine() { return default_->execution_engine(); }
  // Another address space on this GPU (ASIDs count up from 1). EINVAL /
  // ENOMEM as TryCreate for its units.
  Result<std::unique_ptr<GpuContext>> CreateContext();
  uint32_t copy_engine_count() const { return static_cast<uint32_t>(copy_engines_.size()); }

  // Starts a TLB invalidation of [va, va + size) (Tlb::Invalidate).
  Result<Fence> InvalidateTlb(uint64_t va, uint64_t size) { return default_->InvalidateTlb(va, size); }
  // Queues a copy on engine `engine` (CopyEngine::Copy); EINVAL for a bad
  // engine index.
  Result<Fence> Copy(uint32_t engine, std::span<const PhysAddr> src, std::span<const PhysAddr> dst);
  // Host <-> device DMA on engine `engine` (CopyEngine::CopyHost).
  Result<Fence> CopyHost(uint32_t engine, CopyEngine::HostDir dir, std::span<std::byte* const> host,
                         std::span<const PhysAddr> dev);
  Result<Launch> LaunchKernel(KernelFn fn, const LaunchParams& params = {}) {
    return default_->LaunchKernel(std::move(fn), params);
  }
  Result<Launch> LaunchPattern(const PatternParams& params) { return default_->LaunchPattern(params); }

  // Lets each GPU map and copy the other's VRAM. EINVAL for itself,
  // EEXIST if already enabled.
  Result<void> EnablePeerAccess(Gpu& peer);
  Result<void> DisablePeerAccess(Gpu& peer);
  bool HasPeerAccess(uint32_t peer_id) const;

  // Host bytes of [pa, pa + bytes), checked: EINVAL for a bad frame or
  // offset, an unaligned/zero length, or a peer without access.
  Result<std::byte*> ResolvePhys(const PhysAddr& pa, uint64_t bytes);

 private:
  Gpu(uint32_t id, const GpuConfig& config, SystemMemory* sysmem, Env& env);
  std::byte* ResolveLeaf(const Mapping& m, uint64_t va);
  Result<void> InitContext(GpuContext& c);

  // Constant after construction.
  const uint32_t id_;
  const GpuConfig config_;
  SystemMemory* const sysmem_;  // not owned; may be null
  Env& env_;
  std::unique_ptr<Vram> vram_;
  std::vector<std::unique_ptr<CopyEngine>> copy_engines_;
  std::unique_ptr<GpuContext> default_;
  std::atomic<uint32_t> next_asid_{1};

  // Serialises peer enable/disable (taken in GPU id order for two GPUs).
  Mutex peer_lock_;
  // Atomic: peer GPUs by id (non-owning), read lock-free by translations
  // and copies; written under peer_lock_ of both GPUs.
  std::array<std::atomic<Gpu*>, kMaxGpus> peers_{};
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_GPU_H_
