// Svm: one address space's SVM -- the GpuSvm, the invalidation callbacks
// (two-pass across GPUs), the garbage collector, attributes, VM close.
#include <algorithm>

#include "internal.h"

namespace usvm::driver {

thread_local SelfMigration tls_self_migration;

const char* InvalidationModeName(InvalidationMode m) {
  return m == InvalidationMode::kTwoPass ? "two-pass" : "single-pass";
}
const char* PlacementName(Placement p) { return p == Placement::kFaultingGpu ? "faulting-gpu" : "system"; }
const char* PeerPolicyName(PeerPolicy p) {
  switch (p) {
    case PeerPolicy::kMapRemote: return "map-remote";
    case PeerPolicy::kMigrate: return "migrate";
    case PeerPolicy::kSystem: return "system";
  }
  return "?";
}
const char* AtomicModeName(AtomicMode m) {
  switch (m) {
    case AtomicMode::kUndefined: return "undefined";
    case AtomicMode::kDevice: return "device";
    case AtomicMode::kGlobal: return "global";
    case AtomicMode::kCpu: return "cpu";
  }
  return "?";
}

// ---- creation and teardown --------------------------------------------------

Result<std::unique_ptr<Svm>> Svm::TryCreate(std::shared_ptr<mm::Mm> mm, const SvmConfig& config) {
  if (!mm) return Err(Errc::kInval, "driver: no address space");
  if (config.va_size == 0 || config.va_start + config.va_size < config.va_start ||
      config.va_start + config.va_size > gpu::kVaLimit)
    return Err(Errc::kInval, "driver: GPU VA window empty or beyond 48 bits");
  if (config.atomic_tries == 0) return Err(Errc::kInval, "driver: atomic_tries must be > 0");
  auto impl = std::make_unique<Impl>(mm, config);
  impl->migration = USVM_TRY(MakeMigrationPolicy(config.migration, config.policy));
  impl->thrashing = USVM_TRY(MakeThrashingPolicy(config.thrashing, config.policy));
  impl->access_counters = USVM_TRY(MakeAccessCounterPolicy(config.access_counters));
  gpusvm::GpuSvmConfig c;
  c.name = config.name;
  c.mm = mm;
  c.mm_start = config.va_start;
  c.mm_range = config.va_size;
  c.notifier_size = config.notifier_size;
  c.ops = impl.get();
  c.chunk_sizes = config.chunk_sizes;
  c.device = impl.get();
  c.env = &impl->env;
  impl->svm = USVM_TRY(gpusvm::GpuSvm::TryCreate(std::move(c)));
  gpusvm::GpuSvmConfig b;
  b.name = config.name + ".binds";
  b.device = impl.get();
  b.env = &impl->env;
  impl->bind_svm = USVM_TRY(gpusvm::GpuSvm::TryCreate(std::move(b)));
  Impl* raw = impl.get();
  std::unique_ptr<Svm> s(new Svm(std::move(impl)));
  raw->pub = s.get();
  if (config.gc_worker) raw->gc_thread = std::thread([raw] { raw->GcLoop(); });
  return s;
}

Svm::Svm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Svm::~Svm() { Close(); }

const SvmConfig& Svm::config() const { return impl_->config; }
mm::Mm& Svm::mm() const { return *impl_->mm; }

Result<Vm*> Svm::Attach(Device& dev) {
  Impl& s = *impl_;
  if (s.closed.load()) return Err(Errc::kInval, "driver: the SVM is closed");
  Device::Impl& d = dev.impl();
  if (d.id >= kMaxGpus) return Err(Errc::kInval, "driver: GPU id out of range");
  WriteLock al(d.attach_lock_);
  gpusvm::DriverLockGuard g(s.svm->driver_lock());
  if (s.vms[d.id].load()) return Err(Errc::kExist, "driver: a GPU with this id is attached");
  auto vm = std::unique_ptr<Vm>(new Vm(std::make_unique<Vm::Impl>(s, d)));
  Vm::Impl* vi = &vm->impl();
  vi->pub = vm.get();
  if (!d.vm_) {
    // The GPU's default context runs this address space; the device's
    // fault thread serves it.
    vi->ctx = &d.gpu->default_context();
    d.vm_ = vi;
  } else {
    // The GPU already runs another address space: a context of its own,
    // with its own fault thread.
    vi->own_ctx = USVM_TRY(d.gpu->CreateContext());
    vi->ctx = vi->own_ctx.get();
    if (d.config.fault_thread) vi->fault_thread = std::thread([vi] { vi->FaultLoop(); });
  }
  {
    WriteLock nl(s.svm->notifier_lock());
    s.vms[d.id].store(vi);
  }
  d.attached_.push_back(vi);
  s.vm_objs.push_back(std::move(vm));
  return s.vm_objs.back().get();
}

Result<void> Svm::Detach(Device& dev) {
  Impl& s = *impl_;
  Device::Impl& d = dev.impl();
  if (d.id >= kMaxGpus) return Err(Errc::kNoEnt, "driver: device not attached here");
  Vm::Impl* vi = s.vms[d.id].load();
  if (!vi || &vi->dev != &d) return Err(Errc::kNoEnt, "driver: device not attached here");
  s.DetachVm(vi);
  return {};
}

void Svm::Impl::DetachVm(Vm::Impl* vi) {
  Device::Impl& d = vi->dev;
  // The Vm's fault thread stops first (a context of its own), or the
  // device's thread leaves its batch (the default context).
  vi->fault_stop.store(true, std::memory_order_release);
  if (vi->own_ctx) vi->own_ctx->fault_unit().Shutdown();  // wakes its thread
  if (vi->fault_thread.joinable()) vi->fault_thread.join();
  WriteLock al(d.attach_lock_);
  {
    gpusvm::DriverLockGuard g(svm->driver_lock());
    // Binds and userptrs go (their notifiers removed, PTEs zapped).
    while (!vi->binds_.empty()) vi->DestroyBinding(vi->binds_.begin()->second.get());
    vi->by_handle_.clear();
    {
      WriteLock nl(svm->notifier_lock());
      // No range is mapped on this GPU any more.
      svm->ForEachNotifierSafe(0, UINT64_MAX, [&](gpusvm::Notifier* n) {
        gpusvm::GpuSvm::ForEachRangeSafe(n, 0, UINT64_MAX, [&](gpusvm::Range* r) {
          svm->notifier_lock().AssertHeld();
          auto* dr = static_cast<DrvRange*>(r);
          if (dr->present.load() & (1u << d.id)) {
            uint64_t lo = UINT64_MAX, hi = 0;
            ZapRangeOn(dr, d.id, &lo, &hi);
            dr->present.fetch_and(~(1u << d.id));
          }
        });
      });
      vms[d.id].store(nullptr);
    }
    (void)vi->ctx->page_table().Unbind(0, gpu::kVaLimit);
    auto f = vi->ctx->tlb().InvalidateAll();
    (void)f.Wait();
    vi->detached_.store(true);
    // A context of its own goes now (kernels still blocked in it end with
    // ECANCELED); the Vm object stays until the Svm goes (a caller may
    // still hold it: its calls then fail with ENODEV). Under the driver
    // lock and the attach lock: every user of ctx holds one of them and
    // checks detached_ under it first.
    vi->ctx = &d.gpu->default_context();
    vi->own_ctx.reset();
  }
  if (d.vm_ == vi) d.vm_ = nullptr;
  std::erase(d.attached_, vi);
}

Vm* Svm::vm(uint32_t gpu_id) const {
  if (gpu_id >= kMaxGpus) return nullptr;
  gpusvm::DriverLockGuard g(impl_->svm->driver_lock());
  Vm::Impl* vi = impl_->vms[gpu_id].load();
  if (!vi) return nullptr;
  for (auto& v : impl_->vm_objs)
    if (&v->impl() == vi) return v.get();
  return nullptr;
}

void Svm::Close() {
  Impl& s = *impl_;
  if (s.closed.exchange(true)) return;
  s.gc_stop.store(true);
  s.gc_wake.WakeAll();
  if (s.gc_thread.joinable()) s.gc_thread.join();
  // Every GPU detached (binds gone, page tables zapped and flushed).
  std::vector<Device::Impl*> devs;
  for (uint32_t g = 0; g < kMaxGpus; ++g)
    if (Vm::Impl* vi = s.vms[g].load()) {
      devs.push_back(&vi->dev);
      s.DetachVm(vi);
    }
  // Queued ranges drop the queue's reference.
  {
    std::vector<DrvRange*> q;
    {
      MutexLock l(s.gc_lock);
      while (DrvRange* r = s.gc_queue.pop_front()) q.push_back(r);
    }
    for (DrvRange* r : q) s.svm->RangePut(r);
  }
  // drm_gpusvm_fini: every range's pages unmapped, every range and
  // notifier removed.
  s.svm->Fini();
  // No device page of this address space stays in any VRAM.
  for (Device::Impl* d : devs) (void)d->pub->EvictAll(s.mm.get());
  s.bind_svm->Fini();
}

Result<void> Svm::CollectGarbage() {
  Impl& s = *impl_;
  gpusvm::DriverLockGuard g(s.svm->driver_lock());
  return s.CollectLocked();
}

Result<void> Svm::error() const {
  if (!impl_->has_error.load(std::memory_order_acquire)) return {};
  MutexLock l(impl_->error_lock);
  return Err(impl_->error_);
}

SvmStats Svm::stats() const {
  const Impl& s = *impl_;
  SvmStats o;
  o.invalidations = Load(s.invalidations);
  o.ranges_zapped = Load(s.ranges_zapped);
  o.tlb_flushes = Load(s.tlb_flushes);
  o.two_pass_finishes = Load(s.two_pass_finishes);
  o.single_pass_fallbacks = Load(s.single_pass_fallbacks);
  o.own_migrate_ignored = Load(s.own_migrate_ignored);
  o.pending_flush_waits = Load(s.pending_flush_waits);
  o.tlb_flush_ns = Load(s.tlb_flush_ns);
  o.tlb_wait_ns = Load(s.tlb_wait_ns);
  o.unmap_events = Load(s.unmap_events);
  o.gc_runs = Load(s.gc_runs);
  o.ranges_collected = Load(s.ranges_collected);
  o.gc_evictions = Load(s.gc_evictions);
  o.attribute_invalidations = Load(s.attribute_invalidations);
  const auto gs = s.svm->GetStats();
  o.ranges = gs.ranges;
  o.notifiers = gs.notifiers;
  return o;
}

// ---- ranges -----------------------------------------------------------------

void Svm::Impl::RangeFree(gpusvm::Range* r) {
  auto* dr = static_cast<DrvRange*>(r);
  r->gpusvm()->FreePages(&dr->rpages);
  delete dr;
}

Device::Impl* Svm::Impl::DeviceOfPagemap(const gpusvm::Pagemap* pm) const {
  if (!pm) return nullptr;
  for (uint32_t g = 0; g < kMaxGpus; ++g) {
    Vm::Impl* vi = vms[g].load(std::memory_order_acquire);
    if (vi && vi->dev.pagemap.get() == pm) return &vi->dev;
  }
  return nullptr;
}

void Svm::Impl::ZapRangeOn(DrvRange* r, uint32_t g, uint64_t* lo, uint64_t* hi) {
  Vm::Impl* vi = vms[g].load(std::memory_order_acquire);
  if (!vi) return;
  gpu::PageTable& pt = vi->ctx->page_table();
  if (r->cut && !(*r->cut)[g].empty()) {
    for (const gpu::VaRange& v : (*r->cut)[g]) {
      (void)pt.Zap(v.start, v.size);
      *lo = std::min(*lo, v.start);
      *hi = std::max(*hi, v.start + v.size);
    }
    (*r->cut)[g].clear();
  } else {
    (void)pt.Zap(r->start(), r->size());
    *lo = std::min(*lo, r->start());
    *hi = std::max(*hi, r->end());
  }
  Bump(ranges_zapped);
}

void InvalFinish::Finish(const mm::NotifierRange& range, uint64_t cur_seq) {
  Svm::Impl* s = svm;
  {
    EventSpan ev(s->env, {.kind = EventKind::kTlbWait, .va = range.start, .len = range.end - range.start});
    s->WaitFlushes(fences.data(), nfences);
  }
  for (uint32_t i = 0; i < nfences; ++i) fences[i] = gpu::Fence();
  nfences = 0;
  Bump(s->two_pass_finishes);
  s->finish_pool.Free(this);
}

void Svm::Impl::WaitFlushes(const gpu::Fence* f, uint32_t n) {
  if (n == 0) return;
  const uint64_t t0 = env.NowNs();
  (void)gpu::Fence::WaitAll({f, n});
  Bump(tlb_wait_ns, env.NowNs() - t0);
}

void Svm::Impl::CountFlush(const gpu::Fence& f, uint64_t started_ns) {
  const uint64_t d = f.deadline_ns();
  if (d > started_ns) Bump(tlb_flush_ns, d - started_ns);
}

void Svm::Impl::CollectPendingFlushes(uint64_t a, uint64_t b, gpu::Fence* out, uint32_t* n, uint32_t cap) {
  for (size_t i = 0; i < pending_flushes.size();) {
    PendingFlush& p = pending_flushes[i];
    if (p.fence.IsSignalled()) {
      p = std::move(pending_flushes.back());
      pending_flushes.pop_back();
      continue;
    }
    if (p.lo < b && a < p.hi) {
      Bump(pending_flush_waits);
      if (*n < cap)
        out[(*n)++] = p.fence;
      else
        (void)p.fence.Wait();
    }
    ++i;
  }
}

void Svm::Impl::DoInvalidate(gpusvm::Notifier& n, const mm::NotifierRange& range,
                             mm::MmuIntervalFinish** finish) {
  if (config.ignore_own_migrate && range.event == mm::NotifyEvent::kMigrate &&
      tls_self_migration.svm == this && range.start >= tls_self_migration.start &&
      range.end <= tls_self_migration.end) {
    // Our own migration: the driver invalidated the range on every GPU
    // before starting it (InvalidateRangeNow, which also waited for the
    // flushes of other invalidations then in flight). Waiting for any
    // still pending here costs nothing when there are none.
    std::array<gpu::Fence, InvalFinish::kCap> pend{};
    uint32_t np = 0;
    CollectPendingFlushes(range.start, range.end, pend.data(), &np, InvalFinish::kCap);
    (void)gpu::Fence::WaitAll({pend.data(), np});
    Bump(own_migrate_ignored);
    return;
  }
  Bump(invalidations);
  EventSpan ev(env, {.kind = EventKind::kInvalidate, .detail = static_cast<uint32_t>(range.event),
                     .va = range.start, .len = range.end - range.start});
  const bool unmap = range.event == mm::NotifyEvent::kUnmap;
  if (unmap) Bump(unmap_events);
  // Per GPU: the span its TLB must forget.
  std::array<uint64_t, kMaxGpus> lo, hi;
  lo.fill(UINT64_MAX);
  hi.fill(0);
  uint32_t gpus = 0;
  // First: which (range, GPU) pairs are mapped. Zapping happens per GPU
  // below so single-pass can answer one GPU at a time.
  struct Hit {
    DrvRange* r;
    uint32_t mask;
  };
  // Small on-stack batch; more ranges are handled in chunks.
  constexpr size_t kBatch = 64;
  Hit hits[kBatch];
  size_t nhits = 0;
  gpusvm::Ctx ctx;
  ctx.in_notifier = true;
  auto flush_hits = [&]() {
    svm->notifier_lock().AssertHeld();
    if (finish == nullptr) {
      // Single pass: each GPU in turn -- zap, flush, wait.
      for (uint32_t g = 0; g < kMaxGpus; ++g) {
        uint64_t l = UINT64_MAX, h = 0;
        for (size_t i = 0; i < nhits; ++i)
          if (hits[i].mask & (1u << g)) ZapRangeOn(hits[i].r, g, &l, &h);
        if (l >= h) continue;
        Vm::Impl* vi = vms[g].load(std::memory_order_acquire);
        if (!vi) continue;
        const uint64_t t0 = env.NowNs();
        auto f = vi->ctx->InvalidateTlb(l, h - l);
        Bump(tlb_flushes);
        EmitTlbFlush(env, g, l, h);
        if (f) {
          CountFlush(*f, t0);
          // Counted from the start: one GPU at a time, all of it is waited.
          (void)f->Wait();
          Bump(tlb_wait_ns, env.NowNs() - t0);
        }
      }
    } else {
      for (size_t i = 0; i < nhits; ++i)
        for (uint32_t m = hits[i].mask; m; m &= m - 1) {
          const uint32_t g = std::countr_zero(m);
          ZapRangeOn(hits[i].r, g, &lo[g], &hi[g]);
          gpus |= 1u << g;
        }
    }
    for (size_t i = 0; i < nhits; ++i)
      for (uint32_t m = hits[i].mask; m; m &= m - 1) {
        Vm::Impl* vi = vms[std::countr_zero(m)].load(std::memory_order_acquire);
        if (vi) Bump(vi->c.by_size[SizeIndex(hits[i].r->size())][kTlbInvals]);
      }
    nhits = 0;
  };
  gpusvm::GpuSvm::ForEachRangeSafe(&n, range.start, range.end, [&](gpusvm::Range* gr) {
    auto* r = static_cast<DrvRange*>(gr);
    const uint32_t mask = r->present.exchange(0);
    if (mask) {
      r->invalidated.fetch_or(mask);
      hits[nhits++] = {r, mask};
      if (nhits == kBatch) flush_hits();
    }
  });
  flush_hits();
  // Flushes other invalidations started over these pages and wait for only
  // in their finish pass: the ranges they zapped look unmapped to us, but
  // the pages may not change before those flushes drain either.
  std::array<gpu::Fence, InvalFinish::kCap> fences{};
  uint32_t nf = 0;
  CollectPendingFlushes(range.start, range.end, fences.data(), &nf, InvalFinish::kCap);
  if (finish == nullptr) {
    WaitFlushes(fences.data(), nf);
  } else {
    // Two-pass: every GPU's flush is started before any is waited for.
    for (uint32_t m = gpus; m; m &= m - 1) {
      const uint32_t g = std::countr_zero(m);
      Vm::Impl* vi = vms[g].load(std::memory_order_acquire);
      if (!vi) continue;
      const uint64_t t0 = env.NowNs();
      auto fe = vi->ctx->InvalidateTlb(lo[g], hi[g] - lo[g]);
      Bump(tlb_flushes);
      EmitTlbFlush(env, g, lo[g], hi[g]);
      if (!fe) continue;
      CountFlush(*fe, t0);
      pending_flushes.push_back({lo[g], hi[g], *fe});
      if (nf < InvalFinish::kCap)
        fences[nf++] = *fe;
      else
        WaitFlushes(&*fe, 1);
    }
    if (nf) {
      if (InvalFinish* f = finish_pool.TryAlloc()) {
        f->svm = this;
        f->fences = fences;
        f->nfences = nf;
        *finish = f;
      } else {
        // No finish object: wait here (the seed's fallback to single pass).
        Bump(single_pass_fallbacks);
        WaitFlushes(fences.data(), nf);
      }
    }
  }
  // No device mapping survives the invalidation: the pages are unmapped
  // now (their frames are not freed before the whole invalidation --
  // finish pass included -- has returned to the mm).
  gpusvm::GpuSvm::ForEachRangeSafe(&n, range.start, range.end, [&](gpusvm::Range* gr) {
    svm->notifier_lock().AssertHeld();
    auto* r = static_cast<DrvRange*>(gr);
    if (r->pages()) svm->UnmapPages(&r->rpages, ctx);
    if (unmap) {
      svm->RangeSetUnmapped(r, range);
      r->unmap_lo = std::min(r->unmap_lo, std::max(range.start, r->start()));
      r->unmap_hi = std::max(r->unmap_hi, std::min(range.end, r->end()));
      QueueGc(r);
    }
  });
}

void Svm::Impl::InvalidateRangeNow(DrvRange* r, uint32_t gpus) {
  std::array<gpu::Fence, InvalFinish::kCap> fences{};
  uint32_t nf = 0;
  {
    WriteLock nl(svm->notifier_lock());
    // Flushes of two-pass invalidations still in flight over this range:
    // our caller is about to move its pages.
    CollectPendingFlushes(r->start(), r->end(), fences.data(), &nf, InvalFinish::kCap - kMaxGpus);
    const uint32_t mask = r->present.fetch_and(~gpus) & gpus;
    r->invalidated.fetch_or(mask);
    for (uint32_t m = mask; m; m &= m - 1) {
      const uint32_t g = std::countr_zero(m);
      uint64_t lo = UINT64_MAX, hi = 0;
      ZapRangeOn(r, g, &lo, &hi);
      Vm::Impl* vi = vms[g].load(std::memory_order_acquire);
      if (!vi || lo >= hi) continue;
      auto f = vi->ctx->InvalidateTlb(lo, hi - lo);
      Bump(tlb_flushes);
      EmitTlbFlush(env, g, lo, hi);
      Bump(vi->c.by_size[SizeIndex(r->size())][kTlbInvals]);
      if (f) fences[nf++] = *f;
    }
    (void)gpu::Fence::WaitAll({fences.data(), nf});
    if (r->pages() && r->present.load() == 0) {
      gpusvm::Ctx ctx;
      ctx.in_notifier = true;
      svm->UnmapPages(&r->rpages, ctx);
    }
  }
}

// ---- garbage collector --------------------------------------------------------

void Svm::Impl::QueueGc(DrvRange* r) {
  {
    MutexLock l(gc_lock);
    if (r->gc_link.linked()) return;
    svm->RangeGet(r);
    gc_queue.push_back(r);
  }
  gc_pending.fetch_add(1, std::memory_order_release);
  gc_wake.WakeAll();
}

Result<void> Svm::Impl::CollectLocked() {
  // Nothing queued (the common case on a fault): no lock taken. A range
  // queued concurrently is seen by the next call (a fault that meets it
  // unmapped calls again).
  if (gc_pending.load(std::memory_order_acquire) == 0) return {};
  std::vector<DrvRange*> work;
  {
    MutexLock l(gc_lock);
    while (DrvRange* r = gc_queue.pop_front()) work.push_back(r);
    gc_pending.store(0, std::memory_order_relaxed);
  }
  if (work.empty()) return {};
  Bump(gc_runs);
  Result<void> out;
  for (DrvRange* r : work) {
    bool partial;
    uint64_t lo, hi;
    {
      ReadLock l(svm->notifier_lock());
      partial = r->partial_unmap();
      lo = r->unmap_lo;
      hi = r->unmap_hi;
    }
    // Device pages of the part still mapped go home (ranges are never
    // split: the range goes, what is left is faulted again as new ranges).
    if (partial && r->migrate_devmem() && r->in_tree()) {
      MigrationReasonScope why(MigrateReason::kPartialUnmap);
      (void)svm->RangeEvict(r);
      Bump(gc_evictions);
    }
    // Unbind: an UNMAP invalidation zapped every GPU already; a range
    // still marked present here would be a bug, zap it anyway.
    if (r->present.load()) InvalidateRangeNow(r);
    if (lo < hi) ResetAttributes(lo, hi);
    if (r->in_tree()) {
      // Fault site "driver.gc": the collector fails to remove the range.
      auto res = env.ShouldFail("driver.gc") ? Result<void>(Err(Errc::kIo, "injected"))
                                            : svm->RangeRemove(r);
      if (!res) {
        MutexLock l(error_lock);
        if (!has_error.load()) {
          error_ = Error(res.error().code(), "driver: garbage collector failed to remove a range");
          has_error.store(true, std::memory_order_release);
        }
        out = Err(error_);
      } else {
        Bump(ranges_collected);
      }
    }
    svm->RangePut(r);
  }
  return out;
}

void Svm::Impl::GcLoop() {
  while (!gc_stop.load(std::memory_order_acquire)) {
    (void)gc_wake.WaitFor(
        [this] { return gc_pending.load(std::memory_order_acquire) != 0 || gc_stop.load(); },
        std::chrono::milliseconds(100));
    if (gc_stop.load()) break;
    if (gc_pending.load(std::memory_order_acquire) == 0) continue;
    gpusvm::DriverLockGuard g(svm->driver_lock());
    (void)CollectLocked();
  }
}

// ---- attributes -------------------------------------------------------------

Attributes Svm::Impl::AttrsAt(uint64_t va, uint64_t* lo, uint64_t* hi) const {
  if (attr_spans.load(std::memory_order_acquire) == 0) {
    // No attribute set anywhere (the common case): defaults, no lock.
    *lo = 0;
    *hi = UINT64_MAX;
    return {};
  }
  MutexLock l(attr_lock);
  auto it = attrs.upper_bound(va);
  uint64_t next = it == attrs.end() ? UINT64_MAX : it->first;
  if (it != attrs.begin()) {
    auto p = std::prev(it);
    if (va < p->second.first) {
      *lo = p->first;
      *hi = p->second.first;
      return p->second.second;
    }
    *lo = p->second.first;
  } else {
    *lo = 0;
  }
  *hi = next;
  return {};
}

namespace {
// Splits the span map at `at` (a span containing it becomes two).
template <typename Map>
void SplitAt(Map& m, uint64_t at) {
  auto it = m.upper_bound(at);
  if (it == m.begin()) return;
  auto p = std::prev(it);
  if (p->first < at && at < p->second.first) {
    const uint64_t end = p->second.first;
    const Attributes a = p->second.second;
    p->second.first = at;
    m.emplace(at, std::make_pair(end, a));
  }
}
}  // namespace

void Svm::Impl::ResetAttributes(uint64_t start, uint64_t end) {
  MutexLock l(attr_lock);
  SplitAt(attrs, start);
  SplitAt(attrs, end);
  attrs.erase(attrs.lower_bound(start), attrs.lower_bound(end));
  attr_spans.store(attrs.size(), std::memory_order_release);
}

Result<void> Svm::SetAttributes(uint64_t start, uint64_t len, const AttributeUpdate& update) {
  Impl& s = *impl_;
  const uint64_t end = start + len;
  if (len == 0 || (start | len) & (k4K - 1) || end < start)
    return Err(Errc::kInval, "driver: madvise range empty or not page aligned");
  if (start < s.config.va_start || end > s.config.va_start + s.config.va_size)
    return Err(Errc::kInval, "driver: madvise range outside the GPU VA window");
  if (update.preferred && update.preferred->kind == Location::Kind::kDevice &&
      (update.preferred->gpu >= kMaxGpus || !s.vms[update.preferred->gpu].load()))
    return Err(Errc::kInval, "driver: preferred location names a GPU not attached");
  if (s.closed.load()) return Err(Errc::kInval, "driver: the SVM is closed");
  gpusvm::DriverLockGuard g(s.svm->driver_lock());
  // The spans whose attributes change.
  std::vector<std::pair<uint64_t, uint64_t>> changed;
  {
    MutexLock l(s.attr_lock);
    SplitAt(s.attrs, start);
    SplitAt(s.attrs, end);
    // Every piece of [start, end): existing spans and the gaps.
    std::vector<std::tuple<uint64_t, uint64_t, Attributes>> pieces;
    uint64_t at = start;
    for (auto it = s.attrs.lower_bound(start); it != s.attrs.end() && it->first < end; ++it) {
      if (it->first > at) pieces.emplace_back(at, it->first, Attributes{});
      pieces.emplace_back(it->first, it->second.first, it->second.second);
      at = it->second.first;
    }
    if (at < end) pieces.emplace_back(at, end, Attributes{});
    s.attrs.erase(s.attrs.lower_bound(start), s.attrs.lower_bound(end));
    for (auto& [a, b, old] : pieces) {
      Attributes nw = old;
      if (update.preferred) nw.preferred = *update.preferred;
      if (update.atomic) nw.atomic = *update.atomic;
      if (update.access_in_place) nw.access_in_place = *update.access_in_place;
      if (!(nw == old)) changed.emplace_back(a, b);
      if (!(nw == Attributes{})) s.attrs.emplace(a, std::make_pair(b, nw));
    }
    // Merge equal neighbours (keeps lookups and the range window simple).
    for (auto it = s.attrs.begin(); it != s.attrs.end();) {
      auto nx = std::next(it);
      if (nx != s.attrs.end() && it->second.first == nx->first && it->second.second == nx->second.second) {
        it->second.first = nx->second.first;
        s.attrs.erase(nx);
        continue;
      }
      it = nx;
    }
    s.attr_spans.store(s.attrs.size(), std::memory_order_release);
  }
  // Ranges over changed spans: placement is decided again on the next
  // fault. A range straddling a changed span's edge goes (ranges never
  // cross attribute boundaries, as xe's never cross GPU VMAs).
  for (const auto& span : changed) {
    const uint64_t a = span.first, b = span.second;
    s.svm->ForEachNotifierSafe(a, b, [&](gpusvm::Notifier* n) {
      gpusvm::GpuSvm::ForEachRangeSafe(n, a, b, [&](gpusvm::Range* gr) {
        s.svm->driver_lock().AssertHeld();
        auto* r = static_cast<DrvRange*>(gr);
        s.InvalidateRangeNow(r);
        Bump(s.attribute_invalidations);
        if (r->start() < a || r->end() > b) (void)s.svm->RangeRemove(r);
      });
    });
  }
  return {};
}

Result<std::vector<AttributeSpan>> Svm::QueryAttributes(uint64_t start, uint64_t len) const {
  const Impl& s = *impl_;
  const uint64_t end = start + len;
  if (len == 0 || (start | len) & (k4K - 1) || end < start)
    return Err(Errc::kInval, "driver: query range empty or not page aligned");
  if (start < s.config.va_start || end > s.config.va_start + s.config.va_size)
    return Err(Errc::kInval, "driver: query range outside the GPU VA window");
  std::vector<AttributeSpan> out;
  uint64_t at = start;
  while (at < end) {
    uint64_t lo, hi;
    const Attributes a = s.AttrsAt(at, &lo, &hi);
    const uint64_t e = std::min(hi, end);
    out.push_back({at, e, a});
    at = e;
  }
  return out;
}

}  // namespace usvm::driver
