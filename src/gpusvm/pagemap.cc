// Pagemap and Devmem (see pagemap.h). Written from drm_pagemap.c's
// documented behaviour; the migration loops are our own.
#include "usvm/gpusvm/pagemap.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/migrate.h"
#include "usvm/mm/migrate_device.h"
#include "usvm/mm/mm.h"

namespace usvm::gpusvm {

const char* AddrProtoName(AddrProto p) {
  switch (p) {
    case AddrProto::kNone: return "none";
    case AddrProto::kSystem: return "system";
    case AddrProto::kLocal: return "local";
    case AddrProto::kPeer: return "peer";
  }
  return "?";
}

// The allocation record (drm_pagemap_zdd): one per MigrateToDevmem call,
// in the zone data of every device page that migration initialised, one
// reference per page plus the migration's own while it runs. The last Put
// detaches the Devmem and calls its Release op, then frees the record
// (which drops the record's reference on the Devmem).
struct DevmemRecord {
  std::atomic<uint64_t> refs{1};
  std::shared_ptr<Devmem> devmem;  // owning
  Pagemap* pm;                     // non-owning: the pagemap outlives its pages

  DevmemRecord(std::shared_ptr<Devmem> d, Pagemap* p) : devmem(std::move(d)), pm(p) {}

  void Get() { refs.fetch_add(1, std::memory_order_relaxed); }
  void Put() {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    Devmem& d = *devmem;
    d.record_.store(nullptr, std::memory_order_release);
    d.detached_.store(true, std::memory_order_release);
    d.ops_->Release(d);
    pm->counters_.releases.fetch_add(1, std::memory_order_relaxed);
    pm->live_records_.fetch_sub(1, std::memory_order_relaxed);
    delete this;
  }
  uint64_t PagesInUse() const {
    const uint64_t r = refs.load(std::memory_order_relaxed);
    return r;  // includes a running migration's own reference
  }
};

namespace {

constexpr uint64_t kPage = mm::kPageSize;

bool IsDevice(uint64_t word) { return word & mm::kMigratePfnDevice; }
bool HasPage(uint64_t word) { return word & mm::kMigratePfnValid; }
bool Collected(uint64_t word) { return word & mm::kMigratePfnMigrate; }

// A range check shared by the entry points: non-empty, page aligned, no
// wrap.
bool BadRange(uint64_t start, uint64_t end) {
  return start >= end || !mm::IsPageAligned(start) || !mm::IsPageAligned(end);
}

// The word of page k of a 2 MiB src word (compound flag dropped; a hole
// stays a hole).
uint64_t SubWord(uint64_t w, uint64_t k) {
  w &= ~mm::kMigratePfnCompound;
  return HasPage(w) ? w + (k << mm::kMigratePfnShift) : w;
}

}  // namespace

// ---- PagemapOps / DevmemOps defaults ----

Result<void> PagemapOps::PopulateMm(Pagemap&, uint64_t, uint64_t, const std::shared_ptr<mm::Mm>&,
                                    uint64_t) {
  return Err(Errc::kOpNotSupp, "pagemap: no populate_mm op");
}

Result<void> DevmemOps::CopyFromPeer(Devmem&, const mm::DevicePfn*, Pagemap&,
                                     const mm::DevicePfn*, uint64_t) {
  return Err(Errc::kOpNotSupp, "devmem: no direct device-to-device path");
}

// ---- Devmem ----

Devmem::Devmem(Pagemap& pm, DevmemOps* ops, std::shared_ptr<mm::Mm> mm, uint64_t size)
    : pm_(pm), ops_(ops), mm_(std::move(mm)), size_(size) {}

Devmem::~Devmem() = default;

uint64_t Devmem::DebugPagesInUse() const {
  DevmemRecord* r = record_.load(std::memory_order_acquire);
  return r ? r->PagesInUse() : 0;
}

// ---- Pagemap ----

Result<std::unique_ptr<Pagemap>> Pagemap::TryCreate(const PagemapConfig& config) {
  if (config.npages == 0 || !config.owner || !config.device || !config.ops)
    return Err(Errc::kInval, "pagemap: zero pages, or no owner, device or ops");
  std::unique_ptr<Pagemap> pm(new (std::nothrow) Pagemap(config));
  if (!pm) return Err(Errc::kNoMem, "pagemap: no memory");
  pm->pgmap_ = USVM_TRY(mm::DevicePagemap::TryCreate(config.npages, config.owner, pm.get(),
                                                      config.kind));
  pm->pgmap_->set_layer_data(pm.get());
  return pm;
}

Pagemap::Pagemap(const PagemapConfig& config)
    : config_(config), env_(config.env ? config.env : &Env::Default()) {}

Pagemap::~Pagemap() {
  if (!pgmap_) return;
  (void)Unbind();
  // The mm's teardown evicts what is left and waits for every page's last
  // reference; our callbacks (PageFree, so every Release; CopyToRam;
  // MigrateToRam) run meanwhile and use pgmap_: keep it set until the
  // pagemap is gone (unique_ptr::reset would clear it first).
  delete pgmap_.get();
  (void)pgmap_.release();
}

Pagemap* Pagemap::FromPage(mm::DevicePfn pfn) {
  mm::DevicePagemap* dp = mm::DevicePagemap::Lookup(pfn);
  if (!dp) return nullptr;
  // Only pagemaps made by TryCreate carry a Pagemap; any other device
  // memory (another driver's) is foreign.
  auto* pm = static_cast<Pagemap*>(dp->layer_data());
  return pm && pm->pgmap_.get() == dp ? pm : nullptr;
}

bool Pagemap::Owns(mm::DevicePfn pfn) const {
  return pfn >= pgmap_->base() && pfn - pgmap_->base() < pgmap_->npages();
}

DevmemRecord* Pagemap::RecordOf(mm::DevicePfn pfn) const {
  if (!Owns(pfn)) return nullptr;
  return static_cast<DevmemRecord*>(pgmap_->zone_data(pgmap_->IndexOf(pfn)));
}

const void* Pagemap::AllocationOf(mm::DevicePfn pfn) const { return RecordOf(pfn); }

Devmem* Pagemap::DevmemOf(mm::DevicePfn pfn) const {
  DevmemRecord* r = RecordOf(pfn);
  return r ? r->devmem.get() : nullptr;
}

Result<DeviceAddr> Pagemap::DeviceMap(const void* device, mm::DevicePfn pfn, unsigned order) {
  return config_.ops->DeviceMap(*this, device, pfn, order);
}

void Pagemap::DeviceUnmap(const void* device, const DeviceAddr& addr) {
  config_.ops->DeviceUnmap(*this, device, addr);
}

Pagemap::Stats Pagemap::stats() const {
  Stats s;
  s.migrations_to_devmem = counters_.migrations_to_devmem.load(std::memory_order_relaxed);
  s.migrations_to_ram = counters_.migrations_to_ram.load(std::memory_order_relaxed);
  s.evictions = counters_.evictions.load(std::memory_order_relaxed);
  s.pages_to_devmem = counters_.pages_to_devmem.load(std::memory_order_relaxed);
  s.pages_to_ram = counters_.pages_to_ram.load(std::memory_order_relaxed);
  s.peer_pages_direct = counters_.peer_pages_direct.load(std::memory_order_relaxed);
  s.peer_pages_bounced = counters_.peer_pages_bounced.load(std::memory_order_relaxed);
  s.timeslice_waits = counters_.timeslice_waits.load(std::memory_order_relaxed);
  s.releases = counters_.releases.load(std::memory_order_relaxed);
  s.huge_pages_to_devmem = counters_.huge_pages_to_devmem.load(std::memory_order_relaxed);
  return s;
}

void Pagemap::ReleaseUnused(Devmem& devmem) {
  devmem.detached_.store(true, std::memory_order_release);
  if (devmem.ops_) devmem.ops_->Release(devmem);
  counters_.releases.fetch_add(1, std::memory_order_relaxed);
}

// ---- populate ----

Result<void> Pagemap::PopulateMm(uint64_t start, uint64_t end, const std::shared_ptr<mm::Mm>& mm,
                                 uint64_t timeslice_ms) {
  if (!mm || BadRange(start, end)) return Err(Errc::kInval, "populate_mm: bad range or no mm");
  if (unbound()) return Err(Errc::kNoDev, "populate_mm: pagemap unbound");
  if (!mm->Alive()) return Err(Errc::kFault, "populate_mm: address space gone");
  return config_.ops->PopulateMm(*this, start, end, mm, timeslice_ms);
}

// ---- migrate to device memory ----

Result<void> Pagemap::MigrateToDevmem(std::shared_ptr<Devmem> devmem, mm::Mm& mm, uint64_t start,
                                      uint64_t end, const MigrateDetails& details) {
  if (!devmem) return Err(Errc::kInval, "migrate_to_devmem: no devmem");
  if (&devmem->pm_ != this) {
    // Not ours to release through our counters, but the reference is
    // consumed all the same: its own pagemap releases it.
    Pagemap& other = devmem->pm_;
    if (!devmem->used_.exchange(true)) other.ReleaseUnused(*devmem);
    return Err(Errc::kInval, "migrate_to_devmem: devmem of another pagemap");
  }
  if (devmem->used_.exchange(true, std::memory_order_acq_rel))
    return Err(Errc::kInval, "migrate_to_devmem: devmem already used");
  // From here on every early return releases the allocation.
  auto fail = [&](Errc code, const char* what) -> Result<void> {
    ReleaseUnused(*devmem);
    return Err(code, what);
  };
  if (!devmem->ops_) return fail(Errc::kOpNotSupp, "migrate_to_devmem: devmem has no ops");
  if (devmem->mm_.get() != &mm) return fail(Errc::kInval, "migrate_to_devmem: devmem of another mm");
  const uint64_t size = devmem->size_;
  if (size == 0 || size % kPage != 0)
    return fail(Errc::kInval, "migrate_to_devmem: devmem size not a multiple of 4 KiB");
  if (BadRange(start, end) || end - start > size)
    return fail(Errc::kInval, "migrate_to_devmem: bad range");
  if (unbound()) return fail(Errc::kNoDev, "migrate_to_devmem: pagemap unbound");

  const uint64_t npages = (end - start) / kPage;
  std::vector<uint64_t> src(npages, 0), dst(npages, 0);
  std::vector<mm::DevicePfn> frames(npages, 0);

  // mmget_not_zero. A space that dies after this has no VMA left (ENOENT)
  // or fails Setup (EFAULT).
  if (!mm.Alive()) return fail(Errc::kFault, "migrate_to_devmem: address space gone");
  ReadLock mmap(mm.mmap_lock());
  const std::optional<mm::VmaInfo> vma = mm.VmaLookupLocked(start);
  if (!vma) return fail(Errc::kNoEnt, "migrate_to_devmem: no VMA");
  if (end > vma->end || start < vma->start)
    return fail(Errc::kInval, "migrate_to_devmem: range beyond its VMA");
  if (!vma->anonymous_private())
    return fail(Errc::kBusy, "migrate_to_devmem: not private anonymous memory");

  auto* record = new (std::nothrow) DevmemRecord(devmem, this);
  if (!record) return fail(Errc::kNoMem, "migrate_to_devmem: no memory for the record");
  live_records_.fetch_add(1, std::memory_order_relaxed);
  devmem->record_.store(record, std::memory_order_release);
  // From here on the record owns the allocation: dropping its last
  // reference releases it.

  mm::MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src.data();
  m.dst = dst.data();
  m.pgmap_owner = config_.owner;
  // Device pages of our owner are collected too: ours (already here, or
  // movable with can_migrate_same_pagemap) and our peers'. Pages of other
  // owners are not, which fails the call below, as in the kernel.
  m.flags = mm::kMigrateSelectSystem | mm::kMigrateSelectDevicePrivate |
            mm::kMigrateSelectDeviceCoherent;
  // 2 MiB-aligned parts may move as 2 MiB pages (see Setup's compound
  // units); they fall back to 4 KiB pages unless the driver's frames for
  // such a unit are one aligned 2 MiB block.
  if (mm::HugeAlignUp(start) + mm::kHugePageSize <= (end & mm::kHugeMask))
    m.flags |= mm::kMigrateSelectCompound;
  m.vma = &*vma;

  Result<void> result;
  if (auto r = mm.MigrateVmaSetup(m); !r) {
    record->Put();
    return Err(r.error());
  }

  // A per-page view of what was collected: a 2 MiB unit (its first word
  // compound, the other 511 zero) as its 512 pages.
  std::vector<uint64_t> vsrc(src);
  for (uint64_t i = 0; i < npages; ++i) {
    if (!(src[i] & mm::kMigratePfnCompound)) continue;
    for (uint64_t k = 0; k < mm::kPagesPerHuge && i + k < npages; ++k) vsrc[i + k] = SubWord(src[i], k);
    i += mm::kPagesPerHuge - 1;
  }
  // What was collected: our own pages, peers' pages, system pages / holes.
  uint64_t own = 0, peer = 0;
  for (uint64_t i = 0; i < npages; ++i) {
    if (!Collected(vsrc[i]) || !HasPage(vsrc[i]) || !IsDevice(vsrc[i])) continue;
    Pagemap* from = Owns(mm::MigratePfnOf(vsrc[i])) ? this : FromPage(mm::MigratePfnOf(vsrc[i]));
    if (from == this)
      ++own;
    else
      ++peer;
  }
  auto abort = [&](Error e) -> Result<void> {
    mm.mmap_lock().AssertReaderHeld();  // held by our caller's scope
    std::fill(dst.begin(), dst.end(), 0);
    mm.MigrateVmaPages(m);
    mm.MigrateVmaFinalize(m);
    record->Put();
    return Unexpected(e);
  };
  if (m.cpages == 0) return abort(Error(Errc::kBusy, "migrate_to_devmem: nothing collected"));
  if (m.cpages != npages)
    return abort(Error(Errc::kBusy, "migrate_to_devmem: not every page could be collected"));
  if (own == npages) {
    // Already there: nothing to copy (the new allocation goes unused).
    std::fill(dst.begin(), dst.end(), 0);
    mm.MigrateVmaPages(m);
    mm.MigrateVmaFinalize(m);
    record->Put();
    return {};
  }
  if (own && !details.can_migrate_same_pagemap)
    return abort(Error(Errc::kBusy, "migrate_to_devmem: pages already in this pagemap"));
  if (peer && !details.source_peer_migrates)
    return abort(Error(Errc::kBusy, "migrate_to_devmem: pages of a peer pagemap"));

  if (auto r = devmem->ops_->PopulateDevmemPfn(*devmem, npages, frames.data()); !r)
    return abort(r.error());
  for (uint64_t i = 0; i < npages; ++i) {
    const mm::DevicePfn f = frames[i];
    if (f < pgmap_->base() || f - pgmap_->base() >= pgmap_->npages())
      return abort(Error(Errc::kInval, "migrate_to_devmem: populate gave a frame not ours"));
  }
  // Initialise the destination pages, each with a record reference.
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t idx = pgmap_->IndexOf(frames[i]);
    record->Get();
    if (auto r = pgmap_->InitPage(idx, record); !r) {
      record->Put();
      // Drop the pages initialised so far (their PageFree puts the record).
      for (uint64_t j = 0; j < i; ++j) pgmap_->Put(pgmap_->IndexOf(frames[j]));
      return abort(Error(Errc::kBusy, "migrate_to_devmem: populate gave a frame in use"));
    }
    dst[i] = mm::MigratePfn(frames[i], true);
  }
  // A 2 MiB unit whose frames are one aligned block moves as one 2 MiB
  // device page (each frame keeps its own reference).
  uint64_t huge_units = 0;
  for (uint64_t i = 0; i < npages; ++i) {
    if (!(src[i] & mm::kMigratePfnCompound)) continue;
    bool block = i + mm::kPagesPerHuge <= npages &&
                 pgmap_->IndexOf(frames[i]) % mm::kPagesPerHuge == 0;
    for (uint64_t k = 1; block && k < mm::kPagesPerHuge; ++k) block = frames[i + k] == frames[i] + k;
    if (block) {
      dst[i] |= mm::kMigratePfnCompound;
      std::fill(dst.begin() + static_cast<ptrdiff_t>(i + 1),
                dst.begin() + static_cast<ptrdiff_t>(i + mm::kPagesPerHuge), 0);
      ++huge_units;
    }
    i += mm::kPagesPerHuge - 1;
  }
  auto drop_dst = [&] {  // every frame was initialised above
    for (uint64_t i = 0; i < npages; ++i) pgmap_->Put(pgmap_->IndexOf(frames[i]));
    std::fill(dst.begin(), dst.end(), 0);
  };

  // Copy, in runs by source kind: system pages and holes through
  // CopyToDevmem; device pages (a peer's, or ours) device-to-device.
  Error copy_error(Errc::kOk);
  std::vector<mm::DevicePfn> run_dst;
  std::vector<std::byte*> run_src;
  run_dst.reserve(npages);
  run_src.reserve(npages);
  for (uint64_t i = 0; i < npages && copy_error.code() == Errc::kOk; ++i) {
    if (HasPage(vsrc[i]) && IsDevice(vsrc[i])) continue;
    run_dst.push_back(frames[i]);
    run_src.push_back(HasPage(vsrc[i]) ? mm.SystemPageData(mm::MigratePfnOf(vsrc[i])) : nullptr);
  }
  if (!run_dst.empty()) {
    if (auto r = devmem->ops_->CopyToDevmem(*devmem, run_dst.data(), run_src.data(), run_dst.size());
        !r)
      copy_error = r.error();
  }
  uint64_t direct = 0, bounced = 0;
  if (copy_error.code() == Errc::kOk && (own || peer)) {
    // Device-to-device, grouped by source pagemap.
    std::vector<bool> done(npages, false);
    std::unique_ptr<std::byte[]> bounce;
    for (uint64_t i = 0; i < npages && copy_error.code() == Errc::kOk; ++i) {
      if (done[i] || !HasPage(vsrc[i]) || !IsDevice(vsrc[i])) continue;
      Pagemap* from = Owns(mm::MigratePfnOf(vsrc[i])) ? this : FromPage(mm::MigratePfnOf(vsrc[i]));
      if (!from) {
        copy_error = Error(Errc::kBusy, "migrate_to_devmem: foreign device page");
        break;
      }
      std::vector<mm::DevicePfn> d, s;
      for (uint64_t j = i; j < npages; ++j) {
        if (done[j] || !HasPage(vsrc[j]) || !IsDevice(vsrc[j])) continue;
        const mm::DevicePfn sp = mm::MigratePfnOf(vsrc[j]);
        if ((Owns(sp) ? this : FromPage(sp)) != from) continue;
        d.push_back(frames[j]);
        s.push_back(sp);
        done[j] = true;
      }
      auto r = devmem->ops_->CopyFromPeer(*devmem, d.data(), *from, s.data(), d.size());
      if (r) {
        direct += d.size();
        continue;
      }
      if (r.error().code() != Errc::kOpNotSupp) {
        copy_error = r.error();
        break;
      }
      // No direct path: bounce through system memory, one source
      // allocation at a time (each has its own CopyToRam).
      bounce.reset(new (std::nothrow) std::byte[d.size() * kPage]);
      if (!bounce) {
        copy_error = Error(Errc::kNoMem, "migrate_to_devmem: no bounce buffer");
        break;
      }
      std::vector<std::byte*> bufs(d.size());
      for (uint64_t k = 0; k < d.size(); ++k) bufs[k] = bounce.get() + k * kPage;
      for (uint64_t k = 0; k < s.size() && copy_error.code() == Errc::kOk;) {
        Devmem* sd = from->DevmemOf(s[k]);
        uint64_t n = 1;
        while (k + n < s.size() && from->DevmemOf(s[k + n]) == sd) ++n;
        if (!sd || !sd->ops_) {
          copy_error = Error(Errc::kBusy, "migrate_to_devmem: peer page without allocation");
          break;
        }
        if (auto rr = sd->ops_->CopyToRam(*sd, &s[k], &bufs[k], n); !rr) copy_error = rr.error();
        k += n;
      }
      if (copy_error.code() != Errc::kOk) break;
      if (auto rr = devmem->ops_->CopyToDevmem(*devmem, d.data(), bufs.data(), d.size()); !rr) {
        copy_error = rr.error();
        break;
      }
      bounced += d.size();
    }
  }
  if (copy_error.code() != Errc::kOk) {
    drop_dst();
    return abort(copy_error);
  }

  devmem->range_start_.store(start, std::memory_order_release);
  devmem->range_end_.store(end, std::memory_order_release);
  devmem->expiry_ns_.store(env_->NowNs() + details.timeslice_ms * 1'000'000,
                           std::memory_order_release);
  mm.MigrateVmaPages(m);
  uint64_t migrated = 0;
  for (uint64_t i = 0; i < npages; ++i) {
    if (src[i] & mm::kMigratePfnCompound) {  // still whole: moved whole or not at all
      if (Collected(src[i])) migrated += mm::kPagesPerHuge;
      i += mm::kPagesPerHuge - 1;
    } else if (Collected(src[i])) {
      ++migrated;
    }
  }
  if (migrated < npages) result = Err(Errc::kBusy, "migrate_to_devmem: raced while committing");
  mm.MigrateVmaFinalize(m);  // frees the unused destination pages
  counters_.pages_to_devmem.fetch_add(migrated, std::memory_order_relaxed);
  counters_.peer_pages_direct.fetch_add(direct, std::memory_order_relaxed);
  counters_.peer_pages_bounced.fetch_add(bounced, std::memory_order_relaxed);
  if (result) counters_.huge_pages_to_devmem.fetch_add(huge_units, std::memory_order_relaxed);
  if (result) counters_.migrations_to_devmem.fetch_add(1, std::memory_order_relaxed);
  record->Put();
  return result;
}

// ---- CPU touch ----

Result<void> Pagemap::MigrateToRam(mm::Mm& mm, uint64_t addr, mm::DevicePagemap& pgmap,
                                   uint64_t index) {
  mm.mmap_lock().AssertReaderHeld();
  auto* record = static_cast<DevmemRecord*>(pgmap.zone_data(index));
  if (!record) return Err(Errc::kFault, "migrate_to_ram: device page without allocation");
  // The fault path holds a reference and the page lock: the record (and
  // so the Devmem) stays while we run.
  Devmem& devmem = *record->devmem;

  // The ping-pong guard (see pagemap.h: we wait instead of refaulting).
  const uint64_t expiry = devmem.timeslice_expiry_ns();
  const uint64_t now = env_->NowNs();
  if (now < expiry) {
    counters_.timeslice_waits.fetch_add(1, std::memory_order_relaxed);
    env_->SleepNs(expiry - now);
  }

  const std::optional<mm::VmaInfo> vma = mm.VmaLookupLocked(addr);
  if (!vma) return Err(Errc::kFault, "migrate_to_ram: no VMA");
  uint64_t start, end;
  const uint64_t moved_start = devmem.range_start(), moved_end = devmem.range_end();
  if (addr >= moved_start && addr < moved_end) {
    start = moved_start;
    end = moved_end;
  } else {  // moved since (mremap): the kernel's size-aligned window
    start = addr - addr % devmem.size();
    end = start + devmem.size();
  }
  start = std::max(start, vma->start);
  end = std::min(end, vma->end);
  const uint64_t npages = (end - start) / kPage;
  std::vector<uint64_t> src(npages, 0), dst(npages, 0);

  mm::MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src.data();
  m.dst = dst.data();
  m.pgmap_owner = config_.owner;
  // 2 MiB device pages come home whole when a 2 MiB system page can be had.
  m.flags = mm::kMigrateSelectDevicePrivate | mm::kMigrateSelectDeviceCoherent |
            mm::kMigrateSelectCompound;
  m.vma = &*vma;
  m.fault_page = pgmap.PfnOf(index);
  // The fault page is not collected while another thread holds a passing
  // reference on it (an evictor between get and trylock, a fault between
  // unlock and put). The kernel returns and lets the CPU refault; the mm's
  // fault loop here backs off and gives up (EIO) after a bounded time, so
  // on a loaded machine we wait here instead, backing off in real time
  // (as the mm's own fault path does), until the page is collected.
  // Nobody waits for our page lock while holding a reference, so this
  // ends. Bounded all the same (~1 s): then the CPU refaults.
  const uint64_t fi = (mm::PageAlignDown(addr) - start) / kPage;
  // The fault page was collected alone, or inside a 2 MiB unit whose first
  // word carries it.
  const uint64_t fault_unit = mm::PageAlignDown(addr) & mm::kHugeMask;
  const uint64_t hi = fault_unit >= start ? (fault_unit - start) / kPage : fi;
  auto fault_collected = [&] {
    return Collected(src[fi]) ||
           (hi < npages && Collected(src[hi]) && (src[hi] & mm::kMigratePfnCompound));
  };
  for (int tries = 0;; ++tries) {
    USVM_TRY(mm.MigrateVmaSetup(m));
    if (fault_collected() || tries == 2000) break;
    std::fill(dst.begin(), dst.end(), 0);
    mm.MigrateVmaPages(m);
    mm.MigrateVmaFinalize(m);
    if (tries < 16)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  if (m.cpages == 0) return {};  // raced: the CPU refaults

  // Only the pages of this allocation (peers' pages of our owner and other
  // allocations' pages are collected too, and left where they are).
  std::vector<mm::DevicePfn> from;
  std::vector<std::byte*> to;
  Error error(Errc::kOk);
  for (uint64_t i = 0; i < npages; ++i) {
    if (!Collected(src[i]) || !HasPage(src[i]) || !IsDevice(src[i])) continue;
    const mm::DevicePfn dpfn = mm::MigratePfnOf(src[i]);
    const bool unit = src[i] & mm::kMigratePfnCompound;
    if (Pagemap* p = Owns(dpfn) ? this : FromPage(dpfn); !p || p->RecordOf(dpfn) != record) {
      if (unit) i += mm::kPagesPerHuge - 1;
      continue;
    }
    if (unit) {
      // A 2 MiB device page: one 2 MiB system page, else 512 small ones
      // (the mm splits the unit).
      if (auto huge = mm.AllocSystemHugePage()) {
        dst[i] = mm::MigratePfn(*huge, false) | mm::kMigratePfnCompound;
        for (uint64_t k = 0; k < mm::kPagesPerHuge; ++k) {
          from.push_back(dpfn + k);
          to.push_back(mm.SystemPageData(*huge + k));
        }
      } else {
        for (uint64_t k = 0; k < mm::kPagesPerHuge && error.code() == Errc::kOk; ++k) {
          auto pfn = mm.AllocSystemPage();
          if (!pfn) {
            error = pfn.error();
            break;
          }
          dst[i + k] = mm::MigratePfn(*pfn, false);
          from.push_back(dpfn + k);
          to.push_back(mm.SystemPageData(*pfn));
        }
        if (error.code() != Errc::kOk) break;
      }
      i += mm::kPagesPerHuge - 1;
      continue;
    }
    auto pfn = mm.AllocSystemPage();
    if (!pfn) {
      error = pfn.error();
      break;
    }
    dst[i] = mm::MigratePfn(*pfn, false);
    from.push_back(dpfn);
    to.push_back(mm.SystemPageData(*pfn));
  }
  if (error.code() == Errc::kOk && !from.empty()) {
    if (auto r = devmem.ops_->CopyToRam(devmem, from.data(), to.data(), from.size()); !r)
      error = r.error();
  }
  if (error.code() != Errc::kOk) {
    for (uint64_t i = 0; i < npages; ++i) {
      if (!dst[i]) continue;
      const uint64_t n = (dst[i] & mm::kMigratePfnCompound) ? mm::kPagesPerHuge : 1;
      for (uint64_t k = 0; k < n; ++k) mm.PutSystemPage(mm::MigratePfnOf(dst[i]) + k);
    }
    std::fill(dst.begin(), dst.end(), 0);
  }
  mm.MigrateVmaPages(m);
  uint64_t moved = 0;
  for (uint64_t i = 0; i < npages; ++i) {
    if (!dst[i]) continue;
    if (src[i] & mm::kMigratePfnCompound) {
      // Moved whole (compound dst) or split into 4 KiB destinations.
      if (Collected(src[i]))
        moved += (dst[i] & mm::kMigratePfnCompound) ? mm::kPagesPerHuge : 1;
    } else if (Collected(src[i])) {
      ++moved;
    }
  }
  mm.MigrateVmaFinalize(m);
  if (error.code() != Errc::kOk) return Unexpected(error);
  counters_.migrations_to_ram.fetch_add(1, std::memory_order_relaxed);
  counters_.pages_to_ram.fetch_add(moved, std::memory_order_relaxed);
  return {};
}

// ---- eviction ----

Result<void> Pagemap::EvictToRam(const std::shared_ptr<Devmem>& devmem) {
  if (!devmem || &devmem->pm_ != this)
    return Err(Errc::kInval, "evict_to_ram: no devmem, or one of another pagemap");
  if (!devmem->ops_) return Err(Errc::kOpNotSupp, "evict_to_ram: devmem has no ops");
  mm::Mm* mm = devmem->mm_.get();
  const uint64_t npages = devmem->npages();
  if (!mm || npages == 0) return Err(Errc::kInval, "evict_to_ram: devmem without mm or size");
  if (!devmem->used_.load(std::memory_order_acquire))
    return Err(Errc::kInval, "evict_to_ram: devmem never migrated");
  std::vector<mm::DevicePfn> pfns(npages);
  std::vector<uint64_t> src(npages), dst(npages);
  Error error(Errc::kOk);
  for (int attempt = 0; attempt < 3; ++attempt) {
    // No Alive() check: eviction by frame does not need the space. If it is
    // gone, its pages went with it (detached: success), or live on in a
    // fork child and move there.
    if (devmem->detached()) break;
    if (auto r = devmem->ops_->PopulateDevmemPfn(*devmem, npages, pfns.data()); !r) {
      error = r.error();
      continue;
    }
    bool ours = true;
    for (mm::DevicePfn f : pfns)
      if (f < pgmap_->base() || f - pgmap_->base() >= pgmap_->npages()) ours = false;
    if (!ours) return Err(Errc::kInval, "evict_to_ram: populate gave a frame not ours");
    if (auto r = mm->MigrateDevicePfns(*pgmap_, pfns.data(), npages, src.data(), dst.data()); !r) {
      error = r.error();
      continue;
    }
    std::vector<mm::DevicePfn> from;
    std::vector<std::byte*> to;
    error = Error(Errc::kOk);
    for (uint64_t i = 0; i < npages; ++i) {
      dst[i] = 0;
      if (!Collected(src[i])) continue;
      const mm::DevicePfn dpfn = mm::MigratePfnOf(src[i]);
      // The frames may have been released and reused since we looked:
      // only pages still of this allocation move.
      // (Compared by Devmem, which our reference keeps from being reused.)
      DevmemRecord* rec = RecordOf(dpfn);
      if (!rec || rec->devmem.get() != devmem.get()) continue;
      auto pfn = mm->AllocSystemPage();
      if (!pfn) {
        error = pfn.error();
        break;
      }
      dst[i] = mm::MigratePfn(*pfn, false);
      from.push_back(dpfn);
      to.push_back(mm->SystemPageData(*pfn));
    }
    if (error.code() == Errc::kOk && !from.empty()) {
      if (auto r = devmem->ops_->CopyToRam(*devmem, from.data(), to.data(), from.size()); !r)
        error = r.error();
    }
    if (error.code() != Errc::kOk) {
      for (uint64_t i = 0; i < npages; ++i)
        if (dst[i]) mm->PutSystemPage(mm::MigratePfnOf(dst[i]));
      std::fill(dst.begin(), dst.end(), 0);
    }
    mm->MigrateDevicePages(*pgmap_, src.data(), dst.data(), npages);
    uint64_t moved = 0;
    for (uint64_t i = 0; i < npages; ++i)
      if (dst[i] && Collected(src[i])) ++moved;
    mm->MigrateDeviceFinalize(*pgmap_, src.data(), dst.data(), npages);
    counters_.pages_to_ram.fetch_add(moved, std::memory_order_relaxed);
    if (devmem->detached()) break;
  }
  if (devmem->detached()) {
    counters_.evictions.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  if (error.code() != Errc::kOk) return Unexpected(error);
  return Err(Errc::kBusy, "evict_to_ram: pages stayed on the device");
}

uint64_t Pagemap::Unbind() {
  unbound_.store(true, std::memory_order_release);
  std::vector<mm::DevicePfn> pfns;
  for (uint64_t i = 0; i < pgmap_->npages(); ++i)
    if (pgmap_->RefCount(i) != 0) pfns.push_back(pgmap_->PfnOf(i));
  if (pfns.empty()) return 0;
  (void)mm::EvictDevicePages(*pgmap_, pfns.data(), pfns.size());
  uint64_t left = 0;
  for (mm::DevicePfn f : pfns)
    if (pgmap_->RefCount(pgmap_->IndexOf(f)) != 0) ++left;
  return left;
}

// ---- the mm's callbacks ----

void Pagemap::PageFree(mm::DevicePagemap& pgmap, uint64_t index) {
  auto* record = static_cast<DevmemRecord*>(pgmap.zone_data(index));
  pgmap.set_zone_data(index, nullptr);
  if (record) record->Put();
}

Result<void> Pagemap::CopyToRam(mm::DevicePagemap& pgmap, uint64_t index, std::byte* to) {
  auto* record = static_cast<DevmemRecord*>(pgmap.zone_data(index));
  if (!record) return Err(Errc::kNoSys, "pagemap: device page without allocation");
  Devmem& d = *record->devmem;
  const mm::DevicePfn pfn = pgmap.PfnOf(index);
  USVM_TRY(d.ops_->CopyToRam(d, &pfn, &to, 1));
  counters_.pages_to_ram.fetch_add(1, std::memory_order_relaxed);
  return {};
}

}  // namespace usvm::gpusvm
