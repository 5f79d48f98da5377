// Device: one GPU, its VRAM as device-private pages with an LRU-evicting
// VRAM manager, and its fault-servicing thread.
#include <algorithm>
#include <bit>
#include <vector>

#include "internal.h"

namespace usvm::driver {

// ---- creation ---------------------------------------------------------------

Result<std::unique_ptr<Device>> Device::TryCreate(uint32_t id, const DeviceConfig& config,
                                                  gpu::SystemMemory* sysmem, Env& env) {
  if (config.fault_batch == 0) return Err(Errc::kInval, "driver: fault_batch must be > 0");
  if (config.gpu.vram_bytes < k2M || config.gpu.vram_bytes % k2M)
    return Err(Errc::kInval, "driver: VRAM must be a non-zero multiple of 2 MiB");
  auto impl = std::make_unique<Impl>(id, config, env);
  impl->eviction = USVM_TRY(MakeEvictionPolicy(config.eviction));
  impl->gpu = USVM_TRY(gpu::Gpu::TryCreate(id, config.gpu, sysmem, env));
  gpusvm::PagemapConfig pc;
  pc.npages = config.gpu.vram_bytes >> 12;
  pc.owner = config.owner ? config.owner : impl.get();
  pc.device = impl.get();
  pc.ops = impl.get();
  pc.env = &env;
  impl->pagemap = USVM_TRY(gpusvm::Pagemap::TryCreate(pc));
  Impl* raw = impl.get();
  std::unique_ptr<Device> dev(new Device(std::move(impl)));
  raw->pub = dev.get();
  if (config.fault_thread) raw->fault_thread_ = std::thread([raw] { raw->FaultLoop(); });
  return dev;
}

Device::Device(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Device::~Device() {
  Impl& d = *impl_;
  // Still attached somewhere: detach (as Svm::Detach would).
  for (;;) {
    Vm::Impl* vi = nullptr;
    {
      ReadLock l(d.attach_lock_);
      if (!d.attached_.empty()) vi = d.attached_.front();
    }
    if (!vi) break;
    vi->svm.DetachVm(vi);
  }
  d.stop_.store(true, std::memory_order_release);
  // Wakes the fault thread (its Fetch fails with ECANCELED); kernels still
  // blocked on faults end with ECANCELED.
  d.gpu->default_context().fault_unit().Shutdown();
  if (d.fault_thread_.joinable()) d.fault_thread_.join();
  // No device page survives: evict everything, then unregister the pages
  // (the pagemap's destructor waits for the last ones), then the GPU.
  (void)EvictAll(nullptr);
  d.pagemap.reset();
  d.gpu.reset();
}

uint32_t Device::id() const { return impl_->id; }
gpu::Gpu& Device::gpu() { return *impl_->gpu; }
gpusvm::Pagemap& Device::pagemap() { return *impl_->pagemap; }
const void* Device::owner() const { return impl_->pagemap->owner(); }
const DeviceConfig& Device::config() const { return impl_->config; }

Result<void> Device::EnablePeerAccess(Device& other) { return impl_->gpu->EnablePeerAccess(*other.impl_->gpu); }

bool Device::CanMapVramOf(const Device& other) const {
  if (&other == this) return true;
  return other.owner() == owner() && impl_->gpu->HasPeerAccess(other.impl_->id);
}

Result<size_t> Device::ServiceFaults(uint64_t timeout_ns) { return impl_->ServiceBatch(timeout_ns); }

Result<void> Device::EvictFor(uint64_t bytes) {
  const uint64_t off = USVM_TRY(impl_->AllocVram(bytes));
  (void)impl_->gpu->vram().Free(off);
  return {};
}

uint64_t Device::EvictAll(const mm::Mm* mm) {
  std::vector<std::shared_ptr<VramBo>> all;
  {
    MutexLock l(impl_->lock_);
    for (auto& bo : impl_->lru_)
      if (!mm || bo->mm() == mm) all.push_back(bo);
  }
  uint64_t stayed = 0;
  MigrationReasonScope why(MigrateReason::kEviction);
  for (auto& bo : all) {
    auto r = impl_->pagemap->EvictToRam(bo);
    if (!r) ++stayed;
    else Bump(impl_->evictions), Bump(impl_->bytes_evicted, bo->size());
  }
  return stayed;
}

VramStats Device::vram_stats() const {
  VramStats s;
  const gpu::BuddyStats b = impl_->gpu->vram().Stats();
  s.bytes_total = impl_->gpu->vram().size();
  s.bytes_used = b.allocated_bytes;
  {
    MutexLock l(impl_->lock_);
    s.allocations = impl_->live_;
  }
  s.evictions = Load(impl_->evictions);
  s.evict_failures = Load(impl_->evict_failures);
  s.bytes_evicted = Load(impl_->bytes_evicted);
  s.bytes_to_vram = Load(impl_->bytes_to_vram);
  s.bytes_to_ram = Load(impl_->bytes_to_ram);
  return s;
}

// ---- the VRAM manager -------------------------------------------------------

Result<uint64_t> Device::Impl::AllocVram(uint64_t size) {
  if (size == 0 || !std::has_single_bit(size)) return Err(Errc::kInval, "driver: size not a power of two");
  uint64_t failures = 0;
  for (;;) {
    auto off = gpu->vram().Alloc(size);
    if (off || off.error() != Errc::kNoMem) return off;
    // VRAM full: the least recently used allocation goes home. Busy ones
    // go to the tail; give up once every allocation was tried and failed.
    const Evict e = EvictOne(nullptr);
    if (e == Evict::kNone) return Err(Errc::kNoMem, "driver: VRAM full and nothing to evict");
    if (e == Evict::kFailed) {
      MutexLock l(lock_);
      if (++failures > lru_.size() + 1) return Err(Errc::kNoMem, "driver: VRAM full and every allocation busy");
    }
  }
}

Result<std::shared_ptr<VramBo>> Device::Impl::AllocBo(const std::shared_ptr<mm::Mm>& mm, uint64_t size) {
  const uint64_t off = USVM_TRY(AllocVram(size));
  auto bo = std::make_shared<VramBo>(*pagemap, this, mm, size, off);
  MutexLock l(lock_);
  ++live_;
  return bo;
}

void Device::Impl::LruAdd(const std::shared_ptr<VramBo>& bo) {
  MutexLock l(lock_);
  if (bo->freed || bo->in_lru) return;
  bo->lru_it = lru_.insert(lru_.end(), bo);
  bo->in_lru = true;
  if (bo->populated == 0) bo->populated = bo->last_use = ++seq_;  // not again for a busy victim
}

void Device::Impl::LruTouch(gpusvm::Devmem* dm) {
  if (!dm || &dm->pagemap() != pagemap.get()) return;
  auto* bo = static_cast<VramBo*>(dm);
  MutexLock l(lock_);
  if (!bo->in_lru) return;
  lru_.splice(lru_.end(), lru_, bo->lru_it);
  bo->last_use = ++seq_;
  ++bo->uses;
}

Device::Impl::Evict Device::Impl::EvictOne(const mm::Mm* mm) {
  std::shared_ptr<VramBo> victim;
  {
    MutexLock l(lock_);
    // The candidates in list order (least recently used first); the
    // policy picks one (lru: the first, as before policies).
    thread_local std::vector<EvictCandidate> cand;
    thread_local std::vector<std::list<std::shared_ptr<VramBo>>::iterator> its;
    cand.clear();
    its.clear();
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (mm && (*it)->mm() != mm) continue;
      const VramBo& b = **it;
      cand.push_back({b.offset, b.size(), b.populated, b.last_use, b.uses});
      its.push_back(it);
      if (!eviction->looks_past_first()) break;  // lru: the first one it is
    }
    if (!cand.empty()) {
      size_t pick = eviction->PickVictim(cand);
      if (pick >= cand.size()) pick = 0;
      auto it = its[pick];
      victim = *it;
      // Out of the LRU while it is evicted: another evictor picks the next.
      lru_.erase(it);
      victim->in_lru = false;
    }
  }
  if (!victim) return Evict::kNone;
  MigrationReasonScope why(MigrateReason::kEviction, eviction->name());
  EventSpan ev(env, {.kind = EventKind::kEviction, .gpu = id, .va = victim->va, .len = victim->size(),
                     .policy = eviction->name()});
  auto r = pagemap->EvictToRam(victim);
  if (!r) {
    // Busy (pages in use): back at the tail, the others are tried first.
    Bump(evict_failures);
    LruAdd(victim);
    return Evict::kFailed;
  }
  Bump(evictions);
  Bump(bytes_evicted, victim->size());
  return Evict::kEvicted;
}

// ---- PagemapOps / DevmemOps -------------------------------------------------

Result<gpusvm::DeviceAddr> Device::Impl::DeviceMap(gpusvm::Pagemap& pm, const void* device,
                                                   mm::DevicePfn pfn, unsigned order) {
  const uint64_t index = pfn - pm.pgmap().base();
  if (index >= pm.pgmap().npages()) return Err(Errc::kFault, "driver: device frame not ours");
  return gpusvm::DeviceAddr{EncodeVram(id, index << 12), gpusvm::AddrProto::kLocal,
                            static_cast<uint8_t>(order)};
}

Result<void> Device::Impl::PopulateMm(gpusvm::Pagemap& pm, uint64_t start, uint64_t end,
                                      const std::shared_ptr<mm::Mm>& mm, uint64_t timeslice_ms) {
  const uint64_t size = std::bit_ceil(end - start);
  auto bo = USVM_TRY(AllocBo(mm, size));
  bo->va = start;
  gpusvm::MigrateDetails d;
  d.timeslice_ms = timeslice_ms;
  d.source_peer_migrates = true;
  std::shared_ptr<VramBo> keep = bo;
  auto r = pm.MigrateToDevmem(std::move(bo), *mm, start, end, d);
  if (!keep->detached()) LruAdd(keep);
  return r;
}

void Device::Impl::Release(gpusvm::Devmem& devmem) {
  auto& bo = static_cast<VramBo&>(devmem);
  {
    MutexLock l(lock_);
    if (bo.freed) return;
    bo.freed = true;
    --live_;
    if (bo.in_lru) {
      bo.in_lru = false;
      // The list holds a reference: erasing it may drop the last one but
      // `devmem` is still referenced by the caller (the allocation record).
      lru_.erase(bo.lru_it);
    }
  }
  (void)gpu->vram().Free(bo.offset);
}

Result<void> Device::Impl::PopulateDevmemPfn(gpusvm::Devmem& devmem, uint64_t npages, mm::DevicePfn* pfns) {
  auto& bo = static_cast<VramBo&>(devmem);
  if (npages > (bo.size() >> 12)) return Err(Errc::kInval, "driver: more pages than the allocation");
  const mm::DevicePfn base = PfnOfOffset(bo.offset);
  for (uint64_t i = 0; i < npages; ++i) pfns[i] = base + i;
  return {};
}

Result<void> Device::Impl::CopyToDevmem(gpusvm::Devmem& devmem, const mm::DevicePfn* dst,
                                        std::byte* const* src, uint64_t n) {
  std::vector<gpu::PhysAddr> d(n);
  const mm::DevicePfn base = pagemap->pgmap().base();
  for (uint64_t i = 0; i < n; ++i) d[i] = gpu::PhysAddr::Vram(id, (dst[i] - base) << 12);
  EventSpan ev(env, {.kind = EventKind::kMigrateToVram, .reason = MigrateReasonOr(MigrateReason::kGpuFault),
                     .gpu = id, .va = static_cast<VramBo&>(devmem).va, .len = n << 12,
                     .policy = CurrentMigratePolicy()});
  auto f = USVM_TRY(gpu->CopyHost(0, gpu::CopyEngine::HostDir::kToDevice, {src, n}, d));
  USVM_TRY(f.Wait());
  Bump(bytes_to_vram, n << 12);
  return {};
}

Result<void> Device::Impl::CopyToRam(gpusvm::Devmem& devmem, const mm::DevicePfn* src, std::byte* const* dst,
                                     uint64_t n) {
  std::vector<gpu::PhysAddr> s(n);
  const mm::DevicePfn base = pagemap->pgmap().base();
  for (uint64_t i = 0; i < n; ++i) s[i] = gpu::PhysAddr::Vram(id, (src[i] - base) << 12);
  EventSpan ev(env, {.kind = EventKind::kMigrateToRam, .reason = MigrateReasonOr(MigrateReason::kCpuFault),
                     .gpu = id, .va = static_cast<VramBo&>(devmem).va, .len = n << 12,
                     .policy = CurrentMigratePolicy()});
  auto f = USVM_TRY(gpu->CopyHost(0, gpu::CopyEngine::HostDir::kToHost, {dst, n}, s));
  USVM_TRY(f.Wait());
  Bump(bytes_to_ram, n << 12);
  return {};
}

Result<void> Device::Impl::CopyFromPeer(gpusvm::Devmem& devmem, const mm::DevicePfn* dst,
                                        gpusvm::Pagemap& from, const mm::DevicePfn* src, uint64_t n) {
  // The peer is another Device of ours (its pagemap's device is its Impl).
  auto* peer = static_cast<const Device::Impl*>(from.device());
  if (&from != peer->pagemap.get()) return Err(Errc::kOpNotSupp, "driver: not a device pagemap");
  if (peer != this && !gpu->HasPeerAccess(peer->id))
    return Err(Errc::kOpNotSupp, "driver: no peer link to that GPU");
  std::vector<gpu::PhysAddr> s(n), d(n);
  const mm::DevicePfn base = pagemap->pgmap().base();
  const mm::DevicePfn pbase = from.pgmap().base();
  for (uint64_t i = 0; i < n; ++i) {
    s[i] = gpu::PhysAddr::Vram(peer->id, (src[i] - pbase) << 12);
    d[i] = gpu::PhysAddr::Vram(id, (dst[i] - base) << 12);
  }
  EventSpan ev(env, {.kind = EventKind::kMigrateToVram, .reason = MigrateReasonOr(MigrateReason::kPeer),
                     .gpu = id, .va = static_cast<VramBo&>(devmem).va, .len = n << 12,
                     .policy = CurrentMigratePolicy()});
  auto f = USVM_TRY(gpu->Copy(0, s, d));
  USVM_TRY(f.Wait());
  Bump(bytes_to_vram, n << 12);
  return {};
}

}  // namespace usvm::driver
