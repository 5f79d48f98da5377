#include "usvm/gpu/gpu.h"

namespace usvm::gpu {

Result<std::unique_ptr<Gpu>> Gpu::TryCreate(uint32_t id, const GpuConfig& config, SystemMemory* sysmem,
                                            Env& env) {
  if (id >= kMaxGpus) return Err(Errc::kInval, "GPU id out of range");
  if (config.exec_threads == 0 || config.exec_threads > 64) return Err(Errc::kInval, "exec_threads out of [1, 64]");
  if (config.copy_engines == 0 || config.copy_engines > 8) return Err(Errc::kInval, "copy_engines out of [1, 8]");
  USVM_TRY(AccessCounters::TryCreate(config.access_counters));  // checks its config before any allocation
  std::unique_ptr<Gpu> gpu(new Gpu(id, config, sysmem, env));
  gpu->vram_ = USVM_TRY(Vram::TryCreate(config.vram_bytes, env));
  Gpu* g = gpu.get();
  for (uint32_t i = 0; i < config.copy_engines; ++i)
    gpu->copy_engines_.push_back(std::make_unique<CopyEngine>(
        id, i, [g](const PhysAddr& pa, uint64_t bytes) { return g->ResolvePhys(pa, bytes); },
        config.latency, env));
  gpu->default_.reset(new GpuContext(*g, 0));
  USVM_TRY(gpu->InitContext(*gpu->default_));
  return gpu;
}

Result<void> Gpu::InitContext(GpuContext& c) {
  c.tlb_ = USVM_TRY(Tlb::TryCreate(config_.tlb, config_.exec_threads, config_.latency, env_));
  c.pt_ = std::make_unique<PageTable>(
      id_, env_, [this](const PhysAddr& pa, uint64_t bytes) -> Result<void> {
        USVM_TRY(ResolvePhys(pa, bytes));
        return {};
      },
      config_.max_table_pages);
  c.faults_ = std::make_unique<FaultUnit>(env_, config_.fault_buffer_entries);
  c.counters_ = USVM_TRY(AccessCounters::TryCreate(config_.access_counters));
  FaultUnit* fu = c.faults_.get();
  c.counters_->SetDoorbell([fu] { fu->Ring(); });  // before any engine thread counts
  c.exec_ = std::make_unique<ExecutionEngine>(
      config_.exec_threads, *c.pt_, *c.tlb_, *c.faults_,
      [this](const Mapping& m, uint64_t va) { return ResolveLeaf(m, va); }, config_.latency, env_,
      c.counters_.get());
  return {};
}

Result<std::unique_ptr<GpuContext>> Gpu::CreateContext() {
  std::unique_ptr<GpuContext> c(new GpuContext(*this, next_asid_.fetch_add(1)));
  USVM_TRY(InitContext(*c));
  return c;
}

GpuContext::~GpuContext() {
  // Blocked kernel threads return (ECANCELED), then the engine stops.
  if (faults_) faults_->Shutdown();
  exec_.reset();
}

Gpu::Gpu(uint32_t id, const GpuConfig& config, SystemMemory* sysmem, Env& env)
    : id_(id), config_(config), sysmem_(sysmem), env_(env) {}

Gpu::~Gpu() {
  // Blocked kernel threads return (ECANCELED), then the engines stop.
  default_.reset();
  copy_engines_.clear();
  for (uint32_t i = 0; i < kMaxGpus; ++i)
    if (Gpu* p = peers_[i].load(std::memory_order_acquire)) (void)DisablePeerAccess(*p);
}

Result<Fence> Gpu::Copy(uint32_t engine, std::span<const PhysAddr> src, std::span<const PhysAddr> dst) {
  if (engine >= copy_engines_.size()) return Err(Errc::kInval, "no such copy engine");
  return copy_engines_[engine]->Copy(src, dst);
}

Result<Fence> Gpu::CopyHost(uint32_t engine, CopyEngine::HostDir dir, std::span<std::byte* const> host,
                            std::span<const PhysAddr> dev) {
  if (engine >= copy_engines_.size()) return Err(Errc::kInval, "no such copy engine");
  return copy_engines_[engine]->CopyHost(dir, host, dev);
}

Result<void> Gpu::EnablePeerAccess(Gpu& peer) {
  if (&peer == this || peer.id_ == id_) return Err(Errc::kInval, "a GPU is not its own peer");
  Gpu* first = id_ < peer.id_ ? this : &peer;
  Gpu* second = first == this ? &peer : this;
  MutexLock l1(first->peer_lock_);
  MutexLock l2(second->peer_lock_);
  if (peers_[peer.id_].load(std::memory_order_relaxed)) return Err(Errc::kExist, "peer access already enabled");
  peers_[peer.id_].store(&peer, std::memory_order_release);
  peer.peers_[id_].store(this, std::memory_order_release);
  return {};
}

Result<void> Gpu::DisablePeerAccess(Gpu& peer) {
  if (&peer == this || peer.id_ == id_) return Err(Errc::kInval, "a GPU is not its own peer");
  Gpu* first = id_ < peer.id_ ? this : &peer;
  Gpu* second = first == this ? &peer : this;
  MutexLock l1(first->peer_lock_);
  MutexLock l2(second->peer_lock_);
  if (peers_[peer.id_].load(std::memory_order_relaxed) != &peer) return Err(Errc::kNoEnt, "peer access not enabled");
  peers_[peer.id_].store(nullptr, std::memory_order_release);
  peer.peers_[id_].store(nullptr, std::memory_order_release);
  return {};
}

bool Gpu::HasPeerAccess(uint32_t peer_id) const {
  return peer_id < kMaxGpus && peers_[peer_id].load(std::memory_order_acquire) != nullptr;
}

Result<std::byte*> Gpu::ResolvePhys(const PhysAddr& pa, uint64_t bytes) {
  if (bytes == 0 || (bytes & (kPageSize - 1)) || (pa.addr & (kPageSize - 1)))
    return Err(Errc::kInval, "physical range not page aligned");
  if (pa.addr > UINT64_MAX - bytes) return Err(Errc::kInval, "physical range overflows");
  if (pa.kind == MemKind::kSystem) {
    if (!sysmem_) return Err(Errc::kInval, "no system memory attached");
    const uint64_t frames = sysmem_->frame_count();
    if (pa.pfn() >= frames || bytes / kPageSize > frames - pa.pfn())
      return Err(Errc::kInval, "system frame out of range");
    return sysmem_->FrameData(pa.pfn());
  }
  if (pa.kind != MemKind::kVram) return Err(Errc::kInval, "bad memory kind");
  Vram* v = nullptr;
  if (pa.gpu == id_) {
    v = vram_.get();
  } else if (pa.gpu < kMaxGpus) {
    Gpu* p = peers_[pa.gpu].load(std::memory_order_acquire);
    if (!p) return Err(Errc::kInval, "no peer access to that GPU");
    v = p->vram_.get();
  } else {
    return Err(Errc::kInval, "bad GPU id");
  }
  if (pa.addr >= v->size() || bytes > v->size() - pa.addr) return Err(Errc::kInval, "beyond VRAM");
  return v->Data(pa.addr);
}

std::byte* Gpu::ResolveLeaf(const Mapping& m, uint64_t va) {
  const uint64_t phys = m.pte.phys() + (va - m.va);
  switch (m.pte.kind()) {
    case PteKind::kSystem:
      if (!sysmem_ || (phys >> kPageShift) >= sysmem_->frame_count()) return nullptr;
      return sysmem_->FrameData(phys >> kPageShift);
    case PteKind::kLocalVram:
      return phys < vram_->size() ? vram_->Data(phys) : nullptr;
    case PteKind::kPeerVram: {
      Gpu* p = peers_[m.pte.peer()].load(std::memory_order_acquire);
      if (!p || phys >= p->vram_->size()) return nullptr;
      return p->vram_->Data(phys);
    }
  }
  return nullptr;
}

}  // namespace usvm::gpu
