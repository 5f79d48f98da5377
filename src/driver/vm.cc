// Vm: one GPU in one address space -- the fault handler (xe's flow),
// PTE building with the largest leaves (seed 001's build_sg), prefetch,
// explicit binds and userptrs, and the device's fault-servicing loop.
#include <algorithm>
#include <bit>
#include <chrono>
#include <thread>

#include "internal.h"

namespace usvm::driver {

namespace {

constexpr uint64_t kFetchTimeoutNs = 20'000'000;  // the fault thread rechecks stop
constexpr int kMaxFaultPasses = 64;               // EAGAIN after this many retries

struct Run {
  uint64_t va = 0;
  gpu::PhysAddr pa;
  uint64_t bytes = 0;
  bool valid = false;
};

// Emits the leaves of one physically contiguous run: the largest page
// size that VA and PA alignment and the remaining length allow.
void EmitRun(const Run& run, uint32_t prot, std::vector<gpu::BindOp>* ops, uint64_t* leaves) {
  uint64_t off = 0;
  while (off < run.bytes) {
    const uint64_t va = run.va + off;
    const uint64_t pa = run.pa.addr + off;
    const uint64_t left = run.bytes - off;
    gpu::PageSize sz = gpu::PageSize::k4K;
    if (((va | pa) & (k2M - 1)) == 0 && left >= k2M)
      sz = gpu::PageSize::k2M;
    else if (((va | pa) & (k64K - 1)) == 0 && left >= k64K)
      sz = gpu::PageSize::k64K;
    ops->push_back({va, sz, run.pa + off, prot});
    ++leaves[static_cast<int>(sz)];
    off += gpu::PageBytes(sz);
  }
}

// Appends the leaves that map `p` (its first page at `start`): physically
// contiguous runs of pages with one permission (prot_of(pa)), each emitted
// with the largest leaves alignment allows (seed 001's build_sg). Pages
// inside `cuts` (sorted, disjoint spans) are left out.
template <typename ProtOf>
void BuildLeaves(const gpusvm::Pages& p, uint64_t start, ProtOf prot_of,
                 const std::vector<std::pair<uint64_t, uint64_t>>& cuts, std::vector<gpu::BindOp>* ops,
                 uint64_t* leaves) {
  Run run;
  uint32_t run_prot = 0;
  auto flush = [&] {
    if (run.valid) EmitRun(run, run_prot, ops, leaves);
    run.valid = false;
  };
  size_t ci = 0;
  const gpusvm::DeviceAddr* a = p.addrs();
  for (uint64_t i = 0; i < p.npages();) {
    const gpusvm::DeviceAddr d = a[i];
    const uint64_t n = uint64_t{1} << d.order;
    const gpu::PhysAddr pa = d.proto == gpusvm::AddrProto::kSystem
                                 ? gpu::PhysAddr::System(d.addr >> 12)
                                 : gpu::PhysAddr::Vram(VramGpu(d.addr), VramOffset(d.addr));
    const uint32_t prot = prot_of(pa);
    for (uint64_t k = 0; k < n; ++k) {
      const uint64_t va = start + (i + k) * k4K;
      while (ci < cuts.size() && cuts[ci].second <= va) ++ci;
      if (ci < cuts.size() && va >= cuts[ci].first) {
        flush();
        continue;
      }
      const gpu::PhysAddr pk = pa + k * k4K;
      if (run.valid && prot == run_prot && pk.kind == run.pa.kind && pk.gpu == run.pa.gpu &&
          pk.addr == run.pa.addr + run.bytes && va == run.va + run.bytes) {
        run.bytes += k4K;
      } else {
        flush();
        run = {va, pk, k4K, true};
        run_prot = prot;
      }
    }
    i += n;
  }
  flush();
}

}  // namespace

// ---- Vm ---------------------------------------------------------------------

Vm::Vm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Vm::~Vm() = default;

Device& Vm::device() const { return *impl_->dev.pub; }
Svm& Vm::svm() const { return *impl_->svm.pub; }
uint32_t Vm::gpu_id() const { return impl_->dev.id; }

Result<void> Vm::HandleFault(uint64_t va, uint8_t access) {
  Impl& v = *impl_;
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  (void)v.svm.CollectLocked();
  return v.HandleFaultLocked(va, access);
}

Result<void> Vm::Prefetch(uint64_t start, uint64_t len, Location where) {
  Impl& v = *impl_;
  const uint64_t end = start + len;
  if (len == 0 || (start | len) & (k4K - 1) || end < start)
    return Err(Errc::kInval, "driver: prefetch range empty or not page aligned");
  if (where.kind == Location::Kind::kDevice &&
      (where.gpu >= kMaxGpus || !v.svm.vms[where.gpu].load()))
    return Err(Errc::kInval, "driver: prefetch to a GPU not attached");
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  // Again under the lock (attach and detach take it): the target GPU may
  // have gone since, and a prefetch to it must not land in system memory.
  if (where.kind == Location::Kind::kDevice && !v.svm.vms[where.gpu].load())
    return Err(Errc::kInval, "driver: prefetch to a GPU not attached");
  (void)v.svm.CollectLocked();
  return v.PrefetchLocked(start, end, where);
}

VmStats Vm::stats() const {
  const CounterSet& c = impl_->c;
  VmStats s;
  for (int i = 0; i < 3; ++i) {
    const auto& b = c.by_size[i];
    s.by_size[i] = {Load(b[kFaults]), Load(b[kValidFaults]), Load(b[kMigrations]), Load(b[kGetPages]),
                    Load(b[kBinds]), Load(b[kBytesCopied]), Load(b[kTlbInvals])};
  }
  s.faults = Load(c.faults);
  s.faults_cancelled = Load(c.faults_cancelled);
  s.commit_retries = Load(c.commit_retries);
  s.race_replays = Load(c.race_replays);
  s.evict_retries = Load(c.evict_retries);
  s.migrate_failures = Load(c.migrate_failures);
  s.leaves_4k = Load(c.leaves_4k);
  s.leaves_64k = Load(c.leaves_64k);
  s.leaves_2m = Load(c.leaves_2m);
  s.peer_maps = Load(c.peer_maps);
  s.prefetches = Load(c.prefetches);
  s.binds = Load(c.binds);
  s.unbinds = Load(c.unbinds);
  s.rebinds = Load(c.rebinds);
  s.commit_flushes = Load(c.commit_flushes);
  s.bind_invalidations = Load(c.bind_invalidations);
  s.policy_prefetches = Load(c.policy_prefetches);
  s.policy_prefetch_bytes = Load(c.policy_prefetch_bytes);
  s.throttles = Load(c.throttles);
  s.pins = Load(c.pins);
  s.pinned_faults = Load(c.pinned_faults);
  s.ac_notifications = Load(c.ac_notifications);
  s.ac_migrations = Load(c.ac_migrations);
  s.ac_migrated_bytes = Load(c.ac_migrated_bytes);
  s.ac_thrashing_skips = Load(c.ac_thrashing_skips);
  return s;
}

// ---- PTE commit ---------------------------------------------------------------

Result<void> Vm::Impl::CommitRange(DrvRange* r, bool allow_atomic) {
  const gpusvm::Pages& p = r->rpages;
  const uint32_t g = dev.id;
  // This GPU's binds inside the range cut it: those pages are theirs.
  std::vector<std::pair<uint64_t, uint64_t>> cuts;
  auto first = binds_.upper_bound(r->start());
  if (first != binds_.begin()) --first;
  for (auto it = first; it != binds_.end(); ++it) {
    const Binding* b = it->second.get();
    if (b->start >= r->end()) break;
    if (b->end > r->start()) cuts.emplace_back(std::max(b->start, r->start()), std::min(b->end, r->end()));
  }
  const bool writable = !p.read_only();
  // Reused per thread: most commits are a handful of leaves.
  thread_local std::vector<gpu::BindOp> ops;
  ops.clear();
  uint64_t leaves[3] = {0, 0, 0};
  bool peer = false;
  BuildLeaves(
      p, r->start(),
      [&](const gpu::PhysAddr& pa) -> uint32_t {
        uint32_t prot = gpu::kProtRead;
        if (writable) prot |= gpu::kProtWrite;
        if (pa.kind == gpu::MemKind::kVram && pa.gpu != g) peer = true;
        // Atomics only in local VRAM (system and peer memory: migrate
        // first), and never where the atomic attribute is "cpu".
        if (allow_atomic && writable && pa.kind == gpu::MemKind::kVram && pa.gpu == g) prot |= gpu::kProtAtomic;
        return prot;
      },
      cuts, &ops, leaves);
  gpu::PageTable& pt = ctx->page_table();
  // A mapping of the range left by an earlier commit may use other leaf
  // sizes and other pages: clear it first (binds never split a larger
  // leaf), and flush it out of the TLB before the new one goes in, so no
  // access through the old translation lands after this commit (xe
  // invalidates the TLB when a bind overwrites valid PTEs).
  if (r->present.load() & (1u << g)) {
    uint64_t lo = r->start(), hi = r->end();
    if (r->cut && !(*r->cut)[g].empty()) {
      lo = UINT64_MAX;
      hi = 0;
      for (const gpu::VaRange& v : (*r->cut)[g]) {
        (void)pt.Zap(v.start, v.size);
        lo = std::min(lo, v.start);
        hi = std::max(hi, v.start + v.size);
      }
    } else {
      (void)pt.Zap(r->start(), r->size());
    }
    if (auto f = ctx->InvalidateTlb(lo, hi - lo)) (void)f->Wait();
    Bump(c.commit_flushes);
  }
  if (!ops.empty()) USVM_TRY(pt.Bind(ops, gpu::BindMode::kReplace));
  if (!cuts.empty()) {
    if (!r->cut) r->cut = std::make_unique<std::array<std::vector<gpu::VaRange>, kMaxGpus>>();
    auto& spans = (*r->cut)[g];
    spans.clear();
    for (const gpu::BindOp& op : ops) {
      const uint64_t sz = gpu::PageBytes(op.size);
      if (!spans.empty() && spans.back().start + spans.back().size == op.va)
        spans.back().size += sz;
      else
        spans.push_back({op.va, sz});
    }
  } else if (r->cut) {
    (*r->cut)[g].clear();
  }
  r->present.fetch_or(1u << g);
  r->invalidated.fetch_and(~(1u << g));
  Bump(c.leaves_4k, leaves[0]);
  Bump(c.leaves_64k, leaves[1]);
  Bump(c.leaves_2m, leaves[2]);
  Bump(c.by_size[SizeIndex(r->size())][kBinds]);
  if (peer) Bump(c.peer_maps);
  return {};
}

// ---- the fault handler ------------------------------------------------------

Result<void> Vm::Impl::HandleFaultLocked(uint64_t va, uint8_t access) {
  Bump(c.faults);
  bool was_valid = false;
  auto r = ServiceLocked(va, access, nullptr, true, /*prefetch=*/false, 0, UINT64_MAX, &was_valid);
  if (!r) {
    if (r.error() != Errc::kAgain) Bump(c.faults_cancelled);
  }
  // A fault that found its page mapped already was not serviced: nothing
  // to expand (UVM computes prefetches for serviced faults only).
  else if (!was_valid && svm.migration->expands()) ExpandLocked(va);
  return r;
}

void Vm::Impl::ExpandLocked(uint64_t va) {
  va &= ~(k4K - 1);
  BlockState b;
  b.start = va & ~(kBlockBytes - 1);
  b.fault_va = va;
  // Where a range may go: the VMA, the attribute span, the SVM window and
  // this GPU's binds, inside the block.
  uint64_t lo = b.start, hi = b.start + kBlockBytes;
  {
    ReadLock l(svm.mm->mmap_lock());
    auto vma = svm.mm->VmaLookupLocked(va);
    if (!vma || vma->start > va) return;
    lo = std::max(lo, vma->start);
    hi = std::min(hi, vma->end);
  }
  uint64_t alo, ahi;
  const Attributes attrs = svm.AttrsAt(va, &alo, &ahi);
  if (attrs.preferred.kind != Location::Kind::kDefault) return;  // the attribute places it
  lo = std::max({lo, alo, svm.config.va_start});
  hi = std::min({hi, ahi, svm.config.va_start + svm.config.va_size});
  {
    auto it = binds_.upper_bound(va);
    if (it != binds_.end()) hi = std::min(hi, it->second->start);
    if (it != binds_.begin()) lo = std::max(lo, std::prev(it)->second->end);
  }
  if (lo >= hi) return;
  b.lo = lo;
  b.hi = hi;
  // Which pages of the block are in this GPU's VRAM and mapped here.
  bool fault_resident = false;
  {
    ReadLock nl(svm.svm->notifier_lock());
    svm.svm->ForEachNotifierSafe(b.start, b.start + kBlockBytes, [&](gpusvm::Notifier* n) {
      gpusvm::GpuSvm::ForEachRangeSafe(n, b.start, b.start + kBlockBytes, [&](gpusvm::Range* gr) {
        auto* r = static_cast<DrvRange*>(gr);
        svm.svm->notifier_lock().AssertReaderHeld();  // nl, above (the analysis does not follow lambdas)
        if (!(r->present.load() & (1u << dev.id)) || !r->rpages.has_devmem_pages() ||
            r->rpages.dpagemap() != dev.pagemap.get() || !svm.svm->PagesValid(r->rpages))
          return;
        const uint64_t s = std::max(r->start(), b.start), e = std::min(r->end(), b.start + kBlockBytes);
        for (uint64_t p = s; p < e; p += k4K) b.resident.set((p - b.start) / k4K);
        if (r->start() <= va && va < r->end()) fault_resident = true;
      });
    });
  }
  // Only a fault served from this GPU's VRAM brings its neighbours there.
  if (!fault_resident) return;
  VaSpan want = svm.migration->Expand(b);
  want.start = std::max(want.start, lo);
  want.end = std::min(want.end, hi);
  if (want.empty()) return;
  MigrationReasonScope why(MigrateReason::kPolicyPrefetch, svm.migration->name());
  const Location here = Location::Device(dev.id);
  for (uint64_t p = want.start; p < want.end;) {
    if (b.resident[(p - b.start) / k4K]) {
      p += k4K;
      continue;
    }
    const uint64_t copied = Load(c.by_size[0][kBytesCopied]) + Load(c.by_size[1][kBytesCopied]) +
                            Load(c.by_size[2][kBytesCopied]);
    auto r = ServiceLocked(p, gpu::kAccessRead, &here, /*map_here=*/true, /*prefetch=*/true, want.start, want.end);
    if (!r) return;  // best effort: the fault itself was served
    auto* n = svm.svm->NotifierFind(p, p + 1);
    gpusvm::Range* gr = n ? gpusvm::GpuSvm::RangeFind(n, p, p + 1) : nullptr;
    const uint64_t moved = Load(c.by_size[0][kBytesCopied]) + Load(c.by_size[1][kBytesCopied]) +
                           Load(c.by_size[2][kBytesCopied]) - copied;
    if (moved) {
      Bump(c.policy_prefetches);
      Bump(c.policy_prefetch_bytes, moved);
      if (gr) {
        const uint64_t s = std::max(gr->start(), b.start), e = std::min(gr->end(), b.start + kBlockBytes);
        svm.thrashing->NoteMigrated(b.start, uint32_t((s - b.start) / k4K), uint32_t((e - s) / k4K),
                                    svm.env.NowNs());
      }
    }
    p = gr && gr->end() > p ? gr->end() : p + k4K;
  }
}

void Vm::Impl::ServiceAccessCounterLocked(const gpu::AccessCounterNotification& n) {
  Bump(c.ac_notifications);
  const uint64_t win_lo = svm.config.va_start, win_hi = svm.config.va_start + svm.config.va_size;
  RegionState rs;
  rs.start = std::max(n.va, win_lo);
  rs.end = std::min(n.va + n.size, win_hi);
  rs.gpu = dev.id;
  // The ranges of the region this GPU maps remotely now (UVM skips
  // notifications for pages that moved since: stale), and whether the
  // user placed them (a preferred location: the attribute decides, as it
  // does for faults).
  std::vector<std::pair<uint64_t, uint64_t>> remote;
  if (rs.start < rs.end) {
    ReadLock nl(svm.svm->notifier_lock());
    svm.svm->ForEachNotifierSafe(rs.start, rs.end, [&](gpusvm::Notifier* nt) {
      gpusvm::GpuSvm::ForEachRangeSafe(nt, rs.start, rs.end, [&](gpusvm::Range* gr) {
        auto* r = static_cast<DrvRange*>(gr);
        svm.svm->notifier_lock().AssertReaderHeld();  // nl, above (the analysis does not follow lambdas)
        if (!(r->present.load() & (1u << dev.id)) || !svm.svm->PagesValid(r->rpages)) return;
        const uint64_t s = std::max(r->start(), rs.start), e = std::min(r->end(), rs.end);
        if (r->rpages.has_devmem_pages() && r->rpages.dpagemap() == dev.pagemap.get()) {
          rs.local_bytes += e - s;
          return;
        }
        if (!r->migrate_devmem()) return;  // shared or file-backed: stays
        remote.emplace_back(r->start(), r->end());
        rs.remote_bytes += e - s;
      });
    });
  }
  // Ranges the user placed elsewhere stay there.
  std::erase_if(remote, [&](const std::pair<uint64_t, uint64_t>& r) {
    uint64_t alo, ahi;
    if (svm.AttrsAt(r.first, &alo, &ahi).preferred.kind == Location::Kind::kDefault) return false;
    rs.remote_bytes -= std::min(r.second, rs.end) - std::max(r.first, rs.start);
    return true;
  });
  rs.thrashing = svm.thrashing->Hint(n.va & ~(kBlockBytes - 1), svm.env.NowNs());
  const bool migrate = svm.access_counters->Migrate(rs);
  if (!migrate && rs.remote_bytes && rs.thrashing != ThrashAction::kNone) Bump(c.ac_thrashing_skips);
  if (EventsEnabled()) {
    const uint64_t now = svm.env.NowNs();
    EmitEvent({.kind = EventKind::kAccessCounter, .gpu = dev.id, .detail = migrate ? 1u : 0u, .va = n.va,
               .len = n.size, .begin_ns = now, .end_ns = now, .policy = svm.access_counters->name()});
  }
  if (!migrate) return;
  MigrationReasonScope why(MigrateReason::kAccessCounter, svm.access_counters->name());
  const Location here = Location::Device(dev.id);
  for (const auto& [start, end] : remote) {
    const uint64_t copied = Load(c.by_size[0][kBytesCopied]) + Load(c.by_size[1][kBytesCopied]) +
                            Load(c.by_size[2][kBytesCopied]);
    // The range as it is (clamped to itself): migrated whole, mapped here.
    auto r = ServiceLocked(start, gpu::kAccessRead, &here, /*map_here=*/true, /*prefetch=*/true, start, end);
    if (!r) continue;  // best effort: it stays mapped remotely (or faults again)
    const uint64_t moved = Load(c.by_size[0][kBytesCopied]) + Load(c.by_size[1][kBytesCopied]) +
                           Load(c.by_size[2][kBytesCopied]) - copied;
    if (!moved) continue;
    Bump(c.ac_migrations);
    Bump(c.ac_migrated_bytes, moved);
    // The thrashing policy remembers it (as a prefetch: never throttled).
    const uint64_t blk = start & ~(kBlockBytes - 1);
    const uint64_t e = std::min(end, blk + kBlockBytes);
    svm.thrashing->NoteMigrated(blk, uint32_t((start - blk) / k4K), uint32_t((e - start) / k4K), svm.env.NowNs());
  }
}

bool Vm::Impl::FitsVma(const DrvRange* r) const {
  ReadLock l(svm.mm->mmap_lock());
  auto vma = svm.mm->VmaLookupLocked(r->start());
  return vma && vma->start <= r->start() && vma->end >= r->end();
}

Device::Impl* Vm::Impl::DeviceAt(const Location& loc) const {
  if (loc.kind != Location::Kind::kDevice || loc.gpu >= kMaxGpus) return nullptr;
  Vm::Impl* pv = svm.vms[loc.gpu].load();
  return pv ? &pv->dev : nullptr;
}

bool Vm::Impl::CanReach(const Device::Impl* owner) const {
  return owner && (owner == &dev || (owner->pagemap->owner() == dev.pagemap->owner() &&
                                     dev.gpu->HasPeerAccess(owner->id)));
}

Result<void> Vm::Impl::ServiceLocked(uint64_t va, uint8_t access, const Location* force, bool map_here,
                                     bool prefetch, uint64_t clamp_lo, uint64_t clamp_hi, bool* was_valid) {
  if (detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  if (svm.has_error.load(std::memory_order_acquire)) {
    MutexLock l(svm.error_lock);
    return Err(svm.error_);
  }
  va &= ~(k4K - 1);
  const uint64_t win_lo = svm.config.va_start, win_hi = svm.config.va_start + svm.config.va_size;
  if (va < win_lo || va >= win_hi) return Err(Errc::kInval, "driver: GPU VA outside the SVM window");
  const bool write = access & (gpu::kAccessWrite | gpu::kAccessAtomic);
  const bool atomic = access & gpu::kAccessAtomic;

  // A bind of this GPU covers it: revalidate the bind.
  if (Binding* b = FindBinding(va, va + k4K)) {
    if (write && b->flags.read_only) return Err(Errc::kPerm, "driver: write to a read-only bind");
    // A bind maps system memory, never with atomic permission (that is
    // for this GPU's VRAM): revalidating it would not let the access
    // through, and the GPU would fault again forever.
    if (atomic) return Err(Errc::kAcces, "driver: GPU atomics in a bind (system memory)");
    const bool was_valid = b->valid.load();
    USVM_TRY(ValidateBinding(b, write));
    if (!was_valid) Bump(c.rebinds);
    return {};
  }

  uint64_t alo, ahi;
  const Attributes attrs = svm.AttrsAt(va, &alo, &ahi);
  if (atomic && attrs.atomic == AtomicMode::kCpu)
    return Err(Errc::kAcces, "driver: GPU atomics refused by the range's atomic attribute (cpu)");
  // The range's window: inside the SVM window, one attribute span, and
  // between this GPU's binds.
  uint64_t lo = std::max({win_lo, alo, clamp_lo}), hi = std::min({win_hi, ahi, clamp_hi});
  {
    auto it = binds_.upper_bound(va);
    if (it != binds_.end()) hi = std::min(hi, it->second->start);
    if (it != binds_.begin()) lo = std::max(lo, std::prev(it)->second->end);
  }

  // Where the range should live: atomics need this GPU's memory; a
  // prefetch names its place; else the preferred location; else the
  // placement policy. A device this GPU cannot reach is no place to map
  // from: system memory is (xe refuses such a preference with ENOLINK).
  Device::Impl* target = nullptr;  // null: system memory
  if (atomic) {
    target = &dev;
  } else {
    const Location loc = force && force->kind != Location::Kind::kDefault ? *force : attrs.preferred;
    if (loc.kind == Location::Kind::kDevice) target = DeviceAt(loc);
    else if (loc.kind == Location::Kind::kDefault)
      target = svm.config.placement == Placement::kFaultingGpu ? &dev : nullptr;
    if (target && map_here && !CanReach(target)) target = nullptr;
  }

  gpusvm::Ctx ctx;
  ctx.device_private_page_owner = dev.pagemap->owner();
  ctx.check_pages_threshold = svm.config.check_pages_threshold;
  ctx.devmem_possible = true;
  ctx.read_only = false;
  ctx.devmem_only = atomic;
  uint32_t budget = svm.config.fault_retry_budget;
  uint32_t atomic_try = 0;
  bool evicted_for_busy = false;
  bool counted = false;
  bool thrash_checked = false;
  // Read-only device pages met under a write (COW-shared after fork, or
  // migrated from read-only system pages): once, the range is served from
  // system memory so the write range fault breaks the COW, then migrated.
  int cow_breaks = 0;
  bool system_this_pass = false;
  for (int pass = 0; pass < kMaxFaultPasses; ++pass) {
    auto found = svm.svm->FindOrInsert(va, lo, hi, ctx);
    if (!found && found.error() == Errc::kPerm && !write && !ctx.read_only) {
      // A read of a read-only mapping: map it read-only.
      ctx.read_only = true;
      found = svm.svm->FindOrInsert(va, lo, hi, ctx);
    }
    if (!found) return Err(found.error());
    auto* r = static_cast<DrvRange*>(*found);
    if (!r->pages()) svm.svm->InitPages(&r->rpages, r);
    const int si = SizeIndex(r->size());
    if (!counted && !prefetch) Bump(c.by_size[si][kFaults]);
    if (target && !r->migrate_devmem()) {
      // Shared, file-backed or hugetlb memory stays in system memory.
      if (atomic) return Err(Errc::kAcces, "driver: GPU atomic on memory that cannot move to device memory");
      target = nullptr;
    }

    // Already valid for this GPU as this access (or prefetch) needs: done.
    {
      ReadLock nl(svm.svm->notifier_lock());
      if (map_here && (r->present.load() & (1u << dev.id)) && svm.svm->PagesValid(r->rpages) &&
          (!write || !r->rpages.read_only())) {
        const gpusvm::Pagemap* pm = r->rpages.has_devmem_pages() ? r->rpages.dpagemap() : nullptr;
        bool ok = !atomic || pm == dev.pagemap.get();
        if (force && force->kind != Location::Kind::kDefault)
          ok = ok && pm == (target ? target->pagemap.get() : nullptr);
        if (ok) {
          if (!counted && !prefetch) Bump(c.by_size[si][kValidFaults]);
          if (was_valid) *was_valid = true;
          return {};
        }
      }
    }
    counted = true;

    Device::Impl* const planned = target;
    if (system_this_pass) target = nullptr;
    // Where the pages are now, as this GPU's owner sees them.
    const gpusvm::ScanResult scan =
        target ? svm.svm->ScanMm(r, target->pagemap->owner(), &target->pagemap->pgmap())
               : gpusvm::ScanResult::kUnpopulated;
    // Every page in one other pagemap of the target's owner (a peer of
    // ours): mapped where it is when the policy or the attribute says so
    // and this GPU reaches it (known after get-pages).
    const bool remote_ok = !atomic && !force &&
                           (attrs.access_in_place || svm.config.peer_policy == PeerPolicy::kMapRemote);
    bool keep_remote = false;
    if (target == &dev && scan == gpusvm::ScanResult::kOther && !atomic && !force) {
      // A peer's device pages: the peer policy decides.
      if (remote_ok) {
        keep_remote = true;
      } else if (svm.config.peer_policy == PeerPolicy::kSystem) {
        (void)svm.svm->RangeEvict(r);
        target = nullptr;
      }
    }
    if (target && !keep_remote && scan != gpusvm::ScanResult::kEqual && !atomic && !force && !thrash_checked) {
      // The thrashing policy sees every fault that would migrate (once).
      thrash_checked = true;
      const uint64_t blk = r->start() & ~(kBlockBytes - 1);
      const uint64_t e = std::min(r->end(), blk + kBlockBytes);
      const ThrashDecision d = svm.thrashing->OnMigrate(blk, uint32_t((r->start() - blk) / k4K),
                                                        uint32_t((e - r->start()) / k4K), dev.id, svm.env.NowNs());
      if (d.action == ThrashAction::kThrottle) {
        // The faulting GPU waits (UVM's nap) so the other side gets on.
        Bump(c.throttles);
        EventSpan ev(svm.env, {.kind = EventKind::kThrottle, .gpu = dev.id, .va = r->start(), .len = r->size(),
                               .policy = svm.thrashing->name()});
        svm.env.SleepNs(d.nap_ns);
      } else if (d.action == ThrashAction::kPin) {
        // Pinned: stays in system memory, mapped from here.
        Bump(c.pinned_faults);
        if (d.pin_started) {
          Bump(c.pins);
          if (EventsEnabled()) {
            const uint64_t now = svm.env.NowNs();
            EmitEvent({.kind = EventKind::kPin, .gpu = dev.id, .va = blk, .len = kBlockBytes, .begin_ns = now,
                       .end_ns = now, .policy = svm.thrashing->name()});
          }
        }
        // Device pages found there are evicted home by the commit check.
        target = nullptr;
      }
    }
    if (target && !keep_remote && scan != gpusvm::ScanResult::kEqual) {
      // Migrate the whole range (all or nothing) to the target's VRAM. Our
      // own invalidation first: the MIGRATE event it causes is skipped.
      svm.InvalidateRangeNow(r);
      auto bo = target->AllocBo(svm.mm, std::bit_ceil(r->size()));
      if (bo) (*bo)->va = r->start();
      Result<void> m;
      if (!bo) {
        m = Err(bo.error());
      } else {
        std::shared_ptr<VramBo> keep = *bo;
        gpusvm::MigrateDetails md;
        md.timeslice_ms = atomic ? svm.config.atomic_timeslice_ms << atomic_try : 0;
        md.source_peer_migrates = true;
        tls_self_migration = {&svm, r->start(), r->end()};
        m = target->pagemap->MigrateToDevmem(std::move(*bo), *svm.mm, r->start(), r->end(), md);
        tls_self_migration = {};
        // Even a failed migration may leave pages in the allocation (a race
        // at commit): while any is there it is evictable.
        if (!keep->detached()) target->LruAdd(keep);
        if (m) {
          Bump(c.by_size[si][kMigrations]);
          Bump(c.by_size[si][kBytesCopied], r->size());
        } else if (m.error() == Errc::kBusy && !evicted_for_busy) {
          // Pages of another owner, or busy: home first, then once more.
          evicted_for_busy = true;
          Bump(c.migrate_failures);
          MutexLock ml(svm.migrate_lock);
          (void)svm.svm->RangeEvict(r);
          // Another owner's device pages went home: the peer policies
          // "system" and "map-remote" (which cannot map another owner's
          // memory) keep them there.
          if (target == &dev && !atomic && !force && svm.config.peer_policy != PeerPolicy::kMigrate)
            target = nullptr;
          continue;
        }
      }
      if (!m) {
        Bump(c.migrate_failures);
        if (atomic) {
          if (++atomic_try >= svm.config.atomic_tries)
            return Err(Errc::kAcces, "driver: no device memory for a GPU atomic");
          continue;
        }
        // Not an atomic: served from where the pages are.
      }
    }
    if (!map_here) return {};

    ctx.timeslice_ms = atomic ? svm.config.atomic_timeslice_ms << atomic_try : 0;
    auto gp = svm.svm->GetPages(r, ctx);
    if (system_this_pass) {
      // The COW is broken (or it failed): the placement applies again.
      system_this_pass = false;
      target = planned;
      if (gp && planned && !atomic) continue;
    }
    if (!gp) {
      const Errc e = gp.error().code();
      if (e == Errc::kOpNotSupp) {
        // Pages of several allocations or pagemaps, or read-only device
        // pages under a write: home, then again (from system memory first,
        // once, so the COW is broken).
        Bump(c.evict_retries);
        (void)svm.svm->RangeEvict(r);
        if (!ctx.read_only && cow_breaks++ == 0) system_this_pass = true;
        else if (!ctx.read_only && !atomic) target = nullptr;
        continue;
      }
      if ((e == Errc::kFault || e == Errc::kPerm) && budget > 0) {
        --budget;
        bool unmapped;
        {
          ReadLock nl(svm.svm->notifier_lock());
          unmapped = r->unmapped();
        }
        if (unmapped) {
          // Unmapped under us: the collector removes it (evicting what is
          // left of a partially unmapped one), then fault again.
          (void)svm.CollectLocked();
          continue;
        }
        if (!FitsVma(r)) {
          // The range outlived its VMA's shape (mprotect or madvise split
          // it: no UNMAP, so it was never queued): it goes, and a range
          // inside the new VMA is made.
          svm.InvalidateRangeNow(r);
          (void)svm.svm->RangeRemove(r);
          continue;
        }
        if (atomic && e == Errc::kFault) {
          // devmem_only met a system page (the CPU took it back): migrate
          // again, with a longer timeslice.
          if (++atomic_try >= svm.config.atomic_tries)
            return Err(Errc::kAcces, "driver: GPU atomic could not keep device memory");
          continue;
        }
        (void)svm.CollectLocked();
        continue;
      }
      if (e == Errc::kBusy) continue;
      return Err(gp.error());
    }
    Bump(c.by_size[si][kGetPages]);
    if (svm.config.commit_window_every != 0 &&
        svm.commit_window_count.fetch_add(1, std::memory_order_relaxed) % svm.config.commit_window_every == 0)
      std::this_thread::sleep_for(std::chrono::nanoseconds(svm.config.commit_window_ns));

    // Commit, if the pages are still valid and may be used from here.
    bool evict = false;
    {
      ReadLock nl(svm.svm->notifier_lock());
      if (!svm.svm->PagesValid(r->rpages)) {
        Bump(c.commit_retries);
        continue;
      }
      Device::Impl* owner_dev = nullptr;
      if (r->rpages.has_devmem_pages()) owner_dev = svm.DeviceOfPagemap(r->rpages.dpagemap());
      if (r->rpages.has_devmem_pages()) {
        // Device pages: used in place if this GPU reaches them and they are
        // where they should be (the target, or a peer kept remote).
        const bool placed = owner_dev == target || (owner_dev != &dev && remote_ok);
        evict = !CanReach(owner_dev) || (atomic && owner_dev != &dev) || !placed;
      } else {
        evict = atomic;  // devmem_only: cannot happen; be safe
      }
      if (!evict) {
        USVM_TRY(CommitRange(r, attrs.atomic != AtomicMode::kCpu));
        if (owner_dev) {
          const gpusvm::DeviceAddr d0 = r->rpages.addrs()[0];
          owner_dev->LruTouch(owner_dev->pagemap->DevmemOf(owner_dev->PfnOfOffset(VramOffset(d0.addr))));
        }
        return {};
      }
    }
    // Device pages this GPU may not use from here: home, then again. A
    // peer's pages this GPU cannot reach under "map-remote" stay home.
    Bump(c.evict_retries);
    (void)svm.svm->RangeEvict(r);
    if (remote_ok && target == &dev && !atomic) target = nullptr;
    if (atomic && ++atomic_try >= svm.config.atomic_tries)
      return Err(Errc::kAcces, "driver: GPU atomic could not get device memory");
  }
  return Err(Errc::kAgain, "driver: the fault kept racing");
}

Result<void> Vm::Impl::PrefetchLocked(uint64_t start, uint64_t end, Location where) {
  // Each chunk of the span: the range is found or made, moved to `where`
  // and, when this GPU can reach it there, mapped here; ranges already
  // valid there are skipped.
  uint64_t va = start;
  MigrationReasonScope why(MigrateReason::kPrefetch);
  while (va < end) {
    Device::Impl* target = DeviceAt(where);
    const bool map_here = where.kind != Location::Kind::kDevice || CanReach(target);
    USVM_TRY(ServiceLocked(va, gpu::kAccessRead, &where, map_here, /*prefetch=*/true));
    Bump(c.prefetches);
    // The next range: the one that now holds va ends where the next starts.
    auto* n = svm.svm->NotifierFind(va, va + 1);
    gpusvm::Range* r = n ? gpusvm::GpuSvm::RangeFind(n, va, va + 1) : nullptr;
    va = r ? r->end() : va + k4K;
  }
  return {};
}

// ---- binds and userptrs -----------------------------------------------------

Binding* Vm::Impl::FindBinding(uint64_t start, uint64_t end) const {
  auto it = binds_.upper_bound(start);
  if (it != binds_.begin()) {
    auto p = std::prev(it);
    if (p->second->end > start) return p->second.get();
  }
  if (it != binds_.end() && it->second->start < end) return it->second.get();
  return nullptr;
}

void Vm::Impl::ZapAndFlush(uint64_t start, uint64_t end) {
  (void)ctx->page_table().Zap(start, end - start);
  auto f = ctx->InvalidateTlb(start, end - start);
  if (f) (void)f->Wait();
}

bool Binding::Invalidate(mm::MmuIntervalNotifier* s, const mm::NotifierRange& range, uint64_t cur_seq) {
  if (!range.blockable) return false;
  gpusvm::GpuSvm& bs = *vm->svm.bind_svm;
  WriteLock l(bs.notifier_lock());
  s->SetSeq(cur_seq);
  if (mapped.exchange(false)) vm->ZapAndFlush(start, end);
  gpusvm::Ctx ctx;
  ctx.in_notifier = true;
  bs.UnmapPages(&pages, ctx);
  valid.store(false);
  Bump(vm->c.bind_invalidations);
  return true;
}

Result<void> Vm::Impl::ValidateBinding(Binding* b, bool need_write) {
  gpusvm::GpuSvm& bs = *svm.bind_svm;
  gpusvm::Ctx gctx;
  gctx.read_only = b->flags.read_only;
  // No device owner: device pages are brought home (binds map system memory).
  for (int pass = 0; pass < kMaxFaultPasses; ++pass) {
    auto gp = bs.GetPages(&b->pages, *svm.mm, &b->sub, b->start, b->end, gctx);
    if (!gp && gp.error() == Errc::kPerm && !gctx.read_only && !need_write) {
      // A writable bind of a mapping made read-only: map it for reading;
      // a GPU write then fails with EPERM.
      gctx.read_only = true;
      continue;
    }
    USVM_TRY(std::move(gp));
    ReadLock nl(bs.notifier_lock());
    if (!bs.PagesValid(b->pages)) continue;
    if (need_write && b->pages.read_only()) return Err(Errc::kPerm, "driver: write to a read-only mapping");
    if (b->valid.load() && (!need_write || b->writable.load())) return {};
    // Binds map system memory only (no device owner: device pages came home).
    if (b->pages.has_devmem_pages()) return Err(Errc::kFault, "driver: bind found a device page");
    std::vector<gpu::BindOp> ops;
    uint64_t leaves[3] = {0, 0, 0};
    const uint32_t prot = b->flags.read_only || b->pages.read_only() ? gpu::kProtRead
                                                                      : uint32_t(gpu::kProtRead | gpu::kProtWrite);
    BuildLeaves(b->pages, b->start, [prot](const gpu::PhysAddr&) { return prot; }, {}, &ops, leaves);
    gpu::PageTable& pt = ctx->page_table();
    if (b->mapped.load()) (void)pt.Zap(b->start, b->end - b->start);
    USVM_TRY(pt.Bind(ops, gpu::BindMode::kReplace));
    b->mapped.store(true);
    b->writable.store(prot & gpu::kProtWrite);
    b->valid.store(true);
    Bump(c.leaves_4k, leaves[0]);
    Bump(c.leaves_64k, leaves[1]);
    Bump(c.leaves_2m, leaves[2]);
    return {};
  }
  return Err(Errc::kAgain, "driver: the bind kept being invalidated");
}

void Vm::Impl::DestroyBinding(Binding* b) {
  (void)b->sub.Remove();
  {
    WriteLock l(svm.bind_svm->notifier_lock());
    if (b->mapped.exchange(false)) ZapAndFlush(b->start, b->end);
    b->valid.store(false);
  }
  svm.bind_svm->FreePages(&b->pages);
  const uint64_t start = b->start, end = b->end;
  by_handle_.erase(b->handle);
  binds_.erase(b->start);
  // SVM ranges this GPU committed while the bind was there have its pages
  // cut out, yet count as valid here: invalidate them, so the next fault
  // in the span maps it (else it is replayed as valid and faults again,
  // forever; found by usvm fuzz, seed 11 op 13631).
  svm.svm->driver_lock().AssertHeld();  // every caller holds it (Unbind, Detach, the userptr path)
  svm.svm->ForEachNotifierSafe(start, end, [&](gpusvm::Notifier* n) {
    gpusvm::GpuSvm::ForEachRangeSafe(n, start, end, [&](gpusvm::Range* gr) {
      auto* r = static_cast<DrvRange*>(gr);
      if (r->present.load() & (1u << dev.id)) svm.InvalidateRangeNow(r, 1u << dev.id);
    });
  });
}

Result<uint64_t> Vm::Bind(uint64_t start, uint64_t len, BindFlags flags) {
  Impl& v = *impl_;
  const uint64_t end = start + len;
  if (len == 0 || (start | len) & (k4K - 1) || end < start)
    return Err(Errc::kInval, "driver: bind range empty or not page aligned");
  if (start < v.svm.config.va_start || end > v.svm.config.va_start + v.svm.config.va_size)
    return Err(Errc::kInval, "driver: bind range outside the GPU VA window");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  if (v.FindBinding(start, end)) return Err(Errc::kExist, "driver: overlaps another bind");
  auto b = std::make_unique<Binding>();
  b->vm = &v;
  b->start = start;
  b->end = end;
  b->flags = flags;
  b->handle = v.next_handle_++;
  v.svm.bind_svm->InitPages(&b->pages);
  USVM_TRY(v.svm.mm->InsertIntervalNotifier(&b->sub, start, len, b.get()));
  Binding* raw = b.get();
  v.binds_.emplace(start, std::move(b));
  v.by_handle_.emplace(raw->handle, raw);
  // SVM ranges this GPU maps there give way to the bind.
  v.svm.svm->ForEachNotifierSafe(start, end, [&](gpusvm::Notifier* n) {
    gpusvm::GpuSvm::ForEachRangeSafe(n, start, end, [&](gpusvm::Range* gr) {
      auto* r = static_cast<DrvRange*>(gr);
      if (r->present.load() & (1u << v.dev.id)) v.svm.InvalidateRangeNow(r, 1u << v.dev.id);
    });
  });
  auto r = v.ValidateBinding(raw, !flags.read_only);
  if (!r) {
    v.DestroyBinding(raw);
    return Err(r.error());
  }
  Bump(v.c.binds);
  return raw->handle;
}

Result<void> Vm::Unbind(uint64_t handle) {
  Impl& v = *impl_;
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  auto it = v.by_handle_.find(handle);
  if (it == v.by_handle_.end()) return Err(Errc::kNoEnt, "driver: no such bind");
  v.DestroyBinding(it->second);
  Bump(v.c.unbinds);
  return {};
}

Result<bool> Vm::BindValid(uint64_t handle) const {
  Impl& v = *impl_;
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  auto it = v.by_handle_.find(handle);
  if (it == v.by_handle_.end()) return Err(Errc::kNoEnt, "driver: no such bind");
  return it->second->valid.load();
}

Result<void> Vm::Impl::RevalidateUserptrsLocked() {
  if (detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  for (auto& [s, b] : binds_) {
    if (!b->flags.userptr || b->valid.load()) continue;
    USVM_TRY(ValidateBinding(b.get(), false));
    Bump(c.rebinds);
  }
  return {};
}

Result<void> Vm::RevalidateUserptrs() {
  Impl& v = *impl_;
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  return v.RevalidateUserptrsLocked();
}

// The launch goes in under the driver lock: a detach (which swaps the
// context under it) is either before -- ENODEV -- or after.
Result<gpu::Launch> Vm::LaunchKernel(gpu::KernelFn fn, const gpu::LaunchParams& params) {
  Impl& v = *impl_;
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  USVM_TRY(v.RevalidateUserptrsLocked());
  return v.ctx->LaunchKernel(std::move(fn), params);
}

Result<gpu::Launch> Vm::LaunchPattern(const gpu::PatternParams& params) {
  Impl& v = *impl_;
  if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
  gpusvm::DriverLockGuard g(v.svm.svm->driver_lock());
  USVM_TRY(v.RevalidateUserptrsLocked());
  return v.ctx->LaunchPattern(params);
}

// ---- the device's fault loop ------------------------------------------------

namespace {

// Serves one fetched batch on `vm` (null: no address space, cancel them).
void ServeBatch(Vm::Impl* vm, gpu::FaultUnit& fu, std::vector<gpu::Fault>& batch) {
  // Coalesce: in address order, so faults of one range are served together
  // and the later ones find it valid.
  std::sort(batch.begin(), batch.end(), [](const gpu::Fault& a, const gpu::Fault& b) { return a.va < b.va; });
  std::vector<std::pair<uint64_t, Error>> failed;
  std::vector<uint64_t> ok;
  ok.reserve(batch.size());
  if (!vm || vm->detached_.load()) {
    for (const gpu::Fault& f : batch)
      failed.emplace_back(f.id, Error(Errc::kNoDev, "driver: the GPU context runs no address space"));
  } else {
    gpusvm::DriverLockGuard g(vm->svm.svm->driver_lock());
    // The collector runs first (xe: garbage collection before faults).
    (void)vm->svm.CollectLocked();
    const uint64_t t0 = EventsEnabled() ? vm->svm.env.NowNs() : 0;
    for (const gpu::Fault& f : batch) {
      MigrationReasonScope why(f.access & gpu::kAccessAtomic ? MigrateReason::kGpuAtomic : MigrateReason::kGpuFault);
      auto r = vm->HandleFaultLocked(f.va, f.access);
      if (EventsEnabled())
        EmitEvent({.kind = EventKind::kGpuFault, .gpu = vm->dev.id, .detail = f.access,
                   .result = r ? 0 : r.error().errnum(), .va = f.va, .len = k4K, .begin_ns = t0,
                   .end_ns = vm->svm.env.NowNs()});
      if (r) {
        ok.push_back(f.id);
      } else if (r.error() == Errc::kAgain) {
        // The range kept being invalidated under the handler (EAGAIN):
        // replay, and the access faults again if it still misses, as xe
        // retries a fault whose bind raced (-EAGAIN never fails a fault).
        // The driver lock is dropped between batches, so what raced moves on.
        Bump(vm->c.race_replays);
        ok.push_back(f.id);
      } else {
        failed.emplace_back(f.id, r.error());
      }
    }
  }
  // Replay after the batch (UVM's BATCH_FLUSH); a cancel ends only the
  // kernels waiting on that fault.
  for (uint64_t id : ok) (void)fu.Replay(id);
  for (auto& [id, e] : failed) (void)fu.Cancel(id, e);
}

// Services the access counter notifications queued on `ac` (after the
// faults, in the same service path: the doorbell woke the fault loop), on
// `vm` (null: no address space; they are only cleared). UVM clears the
// counters of each serviced batch.
void ServeNotifications(Vm::Impl* vm, gpu::AccessCounters& ac, size_t max) {
  if (!ac.enabled()) return;
  for (;;) {
    std::vector<gpu::AccessCounterNotification> batch = ac.TryFetch(max);
    if (batch.empty()) return;
    if (vm && !vm->detached_.load()) {
      gpusvm::DriverLockGuard g(vm->svm.svm->driver_lock());
      (void)vm->svm.CollectLocked();
      for (const gpu::AccessCounterNotification& n : batch) vm->ServiceAccessCounterLocked(n);
    }
    for (const gpu::AccessCounterNotification& n : batch) (void)ac.Clear(n.va);
  }
}

}  // namespace

Result<size_t> Device::Impl::ServiceBatch(uint64_t timeout_ns) {
  gpu::GpuContext& ctx = gpu->default_context();
  gpu::FaultUnit& fu = ctx.fault_unit();
  // An empty batch: the doorbell (access counter notifications).
  std::vector<gpu::Fault> batch = USVM_TRY(fu.Fetch(config.fault_batch, timeout_ns));
  ReadLock al(attach_lock_);
  if (!batch.empty()) ServeBatch(vm_, fu, batch);
  ServeNotifications(vm_, ctx.access_counters(), config.fault_batch);
  return batch.size();
}

void Device::Impl::FaultLoop() {
  while (!stop_.load(std::memory_order_acquire)) {
    auto r = ServiceBatch(kFetchTimeoutNs);
    if (!r && r.error() == Errc::kCanceled) return;
  }
}

Result<size_t> Vm::Impl::ServiceBatch(uint64_t timeout_ns) {
  gpu::FaultUnit& fu = ctx->fault_unit();
  std::vector<gpu::Fault> batch = USVM_TRY(fu.Fetch(dev.config.fault_batch, timeout_ns));
  if (!batch.empty()) ServeBatch(this, fu, batch);
  ServeNotifications(this, ctx->access_counters(), dev.config.fault_batch);
  return batch.size();
}

void Vm::Impl::FaultLoop() {
  while (!fault_stop.load(std::memory_order_acquire)) {
    auto r = ServiceBatch(kFetchTimeoutNs);
    if (!r && r.error() == Errc::kCanceled) return;
  }
}

Result<size_t> Vm::ServiceFaults(uint64_t timeout_ns) {
  Impl& v = *impl_;
  {
    // A detach waits for this (it shuts the fault unit of a context of
    // our own down first, which ends a Fetch in progress).
    ReadLock al(v.dev.attach_lock_);
    if (v.detached_.load()) return Err(Errc::kNoDev, "driver: the VM was detached");
    if (v.ctx != &v.dev.gpu->default_context()) return v.ServiceBatch(timeout_ns);
  }
  return v.dev.ServiceBatch(timeout_ns);
}

gpu::GpuContext& Vm::context() const {
  ReadLock al(impl_->dev.attach_lock_);
  return *impl_->ctx;
}

}  // namespace usvm::driver
