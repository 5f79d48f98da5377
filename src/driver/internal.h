// The driver layer's private structures (driver.h has the public API).
#ifndef USVM_SRC_DRIVER_INTERNAL_H_
#define USVM_SRC_DRIVER_INTERNAL_H_

#include <array>
#include <atomic>
#include <list>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "usvm/base/intrusive_list.h"
#include "usvm/base/mutex.h"
#include "usvm/base/wait_queue.h"
#include "usvm/driver/driver.h"
#include "usvm/driver/events.h"
#include "usvm/driver/policy.h"
#include "usvm/gpusvm/gpusvm.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/mm.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::driver {

using gpu::kMaxGpus;

// A counter bumped from many threads, read as a racy snapshot.
using Counter = std::atomic<uint64_t>;
inline void Bump(Counter& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
inline uint64_t Load(const Counter& c) { return c.load(std::memory_order_relaxed); }

// Size class of a range for the per-size counters.
inline int SizeIndex(uint64_t size) { return size >= k2M ? 2 : size >= k64K ? 1 : 0; }

// How the driver encodes a VRAM page in a gpusvm::DeviceAddr: the owning
// GPU id in the top byte, the VRAM byte offset below.
inline uint64_t EncodeVram(uint32_t gpu, uint64_t offset) { return (uint64_t(gpu) << 56) | offset; }
inline uint32_t VramGpu(uint64_t addr) { return uint32_t(addr >> 56); }
inline uint64_t VramOffset(uint64_t addr) { return addr & ((uint64_t{1} << 56) - 1); }

// One VRAM allocation (a buffer object embedding the drm_pagemap_devmem).
struct VramBo final : gpusvm::Devmem {
  VramBo(gpusvm::Pagemap& pm, gpusvm::DevmemOps* ops, std::shared_ptr<mm::Mm> mm, uint64_t size,
         uint64_t offset)
      : Devmem(pm, ops, std::move(mm), size), offset(offset) {}
  const uint64_t offset;  // VRAM byte offset of the block
  // Start of the range it holds, for events (0: unknown). Written once by
  // the allocating thread before the allocation is published (before its
  // migration starts); read-only after, so no lock.
  uint64_t va = 0;
  // Guarded by the owning Device::Impl::lock_.
  std::list<std::shared_ptr<VramBo>>::iterator lru_it;
  bool in_lru = false;
  // For the eviction policy (EvictCandidate), in the manager's sequence.
  uint64_t populated = 0, last_use = 0, uses = 0;
  bool freed = false;  // the VRAM block went back (Release)
};

struct CounterSet {
  std::array<std::array<Counter, 7>, 3> by_size{};  // SizeCounters fields, in order
  Counter faults{0}, faults_cancelled{0}, commit_retries{0}, evict_retries{0}, migrate_failures{0},
      leaves_4k{0}, leaves_64k{0}, leaves_2m{0}, peer_maps{0}, prefetches{0}, binds{0}, unbinds{0},
      rebinds{0}, bind_invalidations{0}, commit_flushes{0}, race_replays{0}, policy_prefetches{0}, policy_prefetch_bytes{0},
      throttles{0}, pins{0}, pinned_faults{0}, ac_notifications{0}, ac_migrations{0}, ac_migrated_bytes{0},
      ac_thrashing_skips{0};
};
enum SizeField { kFaults, kValidFaults, kMigrations, kGetPages, kBinds, kBytesCopied, kTlbInvals };

class Device::Impl final : public gpusvm::PagemapOps, public gpusvm::DevmemOps {
 public:
  Impl(uint32_t id, const DeviceConfig& config, Env& env) : id(id), config(config), env(env) {}

  // A VRAM allocation of `size` bytes (a power of two) for `mm`, evicting
  // least recently used allocations while VRAM is full. ENOMEM when
  // nothing is left to evict.
  Result<std::shared_ptr<VramBo>> AllocBo(const std::shared_ptr<mm::Mm>& mm, uint64_t size);
  // A VRAM block of `size` bytes (a power of two), evicting as AllocBo.
  Result<uint64_t> AllocVram(uint64_t size);
  // After a successful migration: the allocation joins the LRU (as most
  // recently used).
  void LruAdd(const std::shared_ptr<VramBo>& bo);
  // A GPU used the allocation: most recently used.
  void LruTouch(gpusvm::Devmem* dm);
  // Evicts the least recently used allocation (of `mm` if not null).
  enum class Evict { kEvicted, kFailed, kNone };
  Evict EvictOne(const mm::Mm* mm);
  mm::DevicePfn PfnOfOffset(uint64_t offset) const {
    return pagemap->pgmap().base() + (offset >> 12);
  }

  // gpusvm::PagemapOps.
  Result<gpusvm::DeviceAddr> DeviceMap(gpusvm::Pagemap& pm, const void* device, mm::DevicePfn pfn,
                                       unsigned order) override;
  void DeviceUnmap(gpusvm::Pagemap& pm, const void* device, const gpusvm::DeviceAddr& addr) override {}
  Result<void> PopulateMm(gpusvm::Pagemap& pm, uint64_t start, uint64_t end,
                          const std::shared_ptr<mm::Mm>& mm, uint64_t timeslice_ms) override;
  // gpusvm::DevmemOps.
  void Release(gpusvm::Devmem& devmem) override;
  Result<void> PopulateDevmemPfn(gpusvm::Devmem& devmem, uint64_t npages, mm::DevicePfn* pfns) override;
  Result<void> CopyToDevmem(gpusvm::Devmem& devmem, const mm::DevicePfn* dst, std::byte* const* src,
                            uint64_t n) override;
  Result<void> CopyToRam(gpusvm::Devmem& devmem, const mm::DevicePfn* src, std::byte* const* dst,
                         uint64_t n) override;
  Result<void> CopyFromPeer(gpusvm::Devmem& devmem, const mm::DevicePfn* dst, gpusvm::Pagemap& from,
                            const mm::DevicePfn* src, uint64_t n) override;

  // The fault loop of the device's thread (the default context).
  void FaultLoop();
  Result<size_t> ServiceBatch(uint64_t timeout_ns);

  // Constant after TryCreate.
  Device* pub = nullptr;  // the public object owning this
  const uint32_t id;
  const DeviceConfig config;
  Env& env;
  std::unique_ptr<gpu::Gpu> gpu;
  std::unique_ptr<gpusvm::Pagemap> pagemap;
  std::unique_ptr<EvictionPolicy> eviction;  // picks EvictOne's victim

  // The Vm on the default context: written under attach_lock_ for write,
  // read by the fault thread under it for read. (Vms of other address
  // spaces have contexts and fault threads of their own.)
  RwSemaphore attach_lock_;
  Vm::Impl* vm_ USVM_GUARDED_BY(attach_lock_) = nullptr;
  // Every Vm of this device (default context or not), so the device's
  // destructor can detach those still attached.
  std::vector<Vm::Impl*> attached_ USVM_GUARDED_BY(attach_lock_);

  // The VRAM manager.
  mutable Mutex lock_;
  std::list<std::shared_ptr<VramBo>> lru_ USVM_GUARDED_BY(lock_);  // front: least recent
  uint64_t live_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t seq_ USVM_GUARDED_BY(lock_) = 0;  // orders VramBo::populated / last_use
  Counter evictions{0}, evict_failures{0}, bytes_evicted{0}, bytes_to_vram{0}, bytes_to_ram{0};

  std::atomic<bool> stop_{false};
  std::thread fault_thread_;
};

// The driver's range: the framework's range with the pages it owns and
// the per-GPU masks.
struct DrvRange final : gpusvm::Range {
  gpusvm::Pages rpages;  // the range's pages (Range::pages() once initialised)
  // GPUs whose page table maps the range (bit per GPU id), and GPUs whose
  // mapping an invalidation removed. Written under the GpuSvm notifier lock
  // (read by commits, which the driver lock serialises; write by
  // invalidations); atomics so stats may read them.
  std::atomic<uint32_t> present{0};
  std::atomic<uint32_t> invalidated{0};
  // The spans a GPU mapped when one of its binds cut the range (rare):
  // null when every mapping covers the whole range. Guarded by the
  // notifier lock (written by commits, read by invalidations).
  std::unique_ptr<std::array<std::vector<gpu::VaRange>, kMaxGpus>> cut;
  // The collector's queue (Svm::Impl::gc_lock_); the queue holds a
  // reference (RangeGet) while linked.
  ListNode gc_link;
  // The union of UNMAP events seen (notifier lock, write), for the
  // collector's attribute reset.
  uint64_t unmap_lo = UINT64_MAX, unmap_hi = 0;
};

// The second pass of a two-pass invalidation: waits for the TLB fences
// the first pass started.
struct InvalFinish final : mm::MmuIntervalFinish {
  // Room for this invalidation's own flushes (one per GPU) and as many of
  // other invalidations still in flight; more are waited for at once.
  static constexpr uint32_t kCap = 2 * kMaxGpus;
  void Finish(const mm::NotifierRange& range, uint64_t cur_seq) override;
  Svm::Impl* svm = nullptr;
  std::array<gpu::Fence, kCap> fences{};
  uint32_t nfences = 0;
};

// A TLB flush that a two-pass invalidation started and waits for only in
// its finish pass, with the span it covers on its GPU.
struct PendingFlush {
  uint64_t lo = 0, hi = 0;
  gpu::Fence fence;
};

// An explicit bind or userptr of one Vm: its own interval notifier, pages
// of the Svm's pages-only GpuSvm.
struct Binding final : mm::MmuIntervalNotifierOps {
  bool Invalidate(mm::MmuIntervalNotifier* sub, const mm::NotifierRange& range,
                  uint64_t cur_seq) override;
  Vm::Impl* vm = nullptr;
  uint64_t handle = 0, start = 0, end = 0;
  BindFlags flags;
  mm::MmuIntervalNotifier sub;
  gpusvm::Pages pages;
  // Mapped on the GPU and not invalidated since: written under the bind
  // GpuSvm's notifier lock.
  std::atomic<bool> valid{false};
  std::atomic<bool> mapped{false};    // PTEs present (to zap)
  std::atomic<bool> writable{false};  // ... and writable
};

// Set around a migration this driver starts, on the migrating thread, so
// the MIGRATE invalidation it causes is recognised as our own.
struct SelfMigration {
  const Svm::Impl* svm = nullptr;
  uint64_t start = 0, end = 0;
};
extern thread_local SelfMigration tls_self_migration;

class Svm::Impl final : public gpusvm::GpuSvmOps {
 public:
  Impl(std::shared_ptr<mm::Mm> mm, const SvmConfig& config)
      : mm(std::move(mm)), config(config), env(config.env ? *config.env : Env::Default()),
        finish_pool(env) {}

  // gpusvm::GpuSvmOps.
  gpusvm::Range* RangeAlloc() override { return new DrvRange; }
  void RangeFree(gpusvm::Range* r) override;
  void Invalidate(gpusvm::GpuSvm& s, gpusvm::Notifier& n, const mm::NotifierRange& range) override {
    svm->notifier_lock().AssertHeld();  // the GpuSvm's callback holds it for write
    DoInvalidate(n, range, nullptr);
  }
  void InvalidateStart(gpusvm::GpuSvm& s, gpusvm::Notifier& n, const mm::NotifierRange& range,
                       mm::MmuIntervalFinish** finish) override {
    *finish = nullptr;
    svm->notifier_lock().AssertHeld();
    DoInvalidate(n, range, config.invalidation == InvalidationMode::kTwoPass ? finish : nullptr);
  }
  // The callback body. finish == null: single pass (each GPU in turn).
  void DoInvalidate(gpusvm::Notifier& n, const mm::NotifierRange& range, mm::MmuIntervalFinish** finish)
      USVM_REQUIRES(svm->notifier_lock());

  // Zaps `r` on every GPU of `gpus` mapping it, flushes their TLBs and
  // waits, then -- once no GPU maps it -- unmaps its pages: the driver's own
  // invalidation (before a migration it starts, on an attribute change;
  // one GPU's before a bind of that GPU). REQUIRES: the driver lock; not
  // the notifier lock.
  void InvalidateRangeNow(DrvRange* r, uint32_t gpus = ~0u);
  // Adds to out[*n] (at most `cap`) the fences of flushes still in flight
  // that other invalidations started over spans meeting [a, b); those that
  // do not fit are waited for here. Drops the signalled ones.
  void CollectPendingFlushes(uint64_t a, uint64_t b, gpu::Fence* out, uint32_t* n, uint32_t cap)
      USVM_REQUIRES(svm->notifier_lock());
  // Waits for an invalidation's TLB flushes, adding the time to tlb_wait_ns.
  void WaitFlushes(const gpu::Fence* f, uint32_t n);
  // Adds the modelled latency of a flush started at `started_ns` to
  // tlb_flush_ns.
  void CountFlush(const gpu::Fence& f, uint64_t started_ns);
  // Zaps r on GPU `g` (under the notifier lock for write); the span zapped.
  void ZapRangeOn(DrvRange* r, uint32_t g, uint64_t* lo, uint64_t* hi) USVM_REQUIRES(svm->notifier_lock());

  // Detaches a Vm: stops its fault thread, removes its binds, zaps its
  // page table. REQUIRES: neither the driver lock nor the notifier lock.
  void DetachVm(Vm::Impl* vi);

  // The collector. REQUIRES: the driver lock.
  Result<void> CollectLocked() USVM_REQUIRES(svm->driver_lock());
  void GcLoop();
  void QueueGc(DrvRange* r);

  // Attributes at va and the span [lo, hi) around va where they are equal.
  Attributes AttrsAt(uint64_t va, uint64_t* lo, uint64_t* hi) const;
  void ResetAttributes(uint64_t start, uint64_t end);

  // The device whose pagemap is `pm`, among the attached ones (null if none).
  Device::Impl* DeviceOfPagemap(const gpusvm::Pagemap* pm) const;

  Svm* pub = nullptr;  // the public object owning this
  const std::shared_ptr<mm::Mm> mm;
  const SvmConfig config;
  Env& env;
  std::unique_ptr<gpusvm::GpuSvm> svm;       // the ranges
  std::unique_ptr<gpusvm::GpuSvm> bind_svm;  // pages-only: binds and userptrs
  // The policies (policy.h), constant after TryCreate. The migration
  // policy is stateless; the thrashing policy guards its state with its
  // own leaf lock. Both are called under the driver lock.
  std::unique_ptr<MigrationPolicy> migration;
  std::unique_ptr<ThrashingPolicy> thrashing;
  std::unique_ptr<AccessCounterPolicy> access_counters;  // stateless

  // Attached VMs by GPU id: written under the driver lock and the notifier
  // lock (write); read by callbacks under the notifier lock and by the
  // driver under the driver lock.
  std::array<std::atomic<Vm::Impl*>, kMaxGpus> vms{};
  std::vector<std::unique_ptr<Vm>> vm_objs;  // driver lock

  // Taken around "EBUSY -> evict -> migrate again" (xe's migrate lock).
  Mutex migrate_lock;

  // madvise attributes: non-default spans by start (value: end, attrs).
  mutable Mutex attr_lock;
  std::map<uint64_t, std::pair<uint64_t, Attributes>> attrs USVM_GUARDED_BY(attr_lock);
  // attrs.size(), written under attr_lock: lookups skip the lock when 0.
  std::atomic<size_t> attr_spans{0};
  // Faults counted for SvmConfig::commit_window_every (atomic: a counter
  // only, read by no decision but the testing sleep).
  std::atomic<uint64_t> commit_window_count{0};

  // Garbage collector queue and worker.
  Mutex gc_lock;
  IntrusiveList<DrvRange, &DrvRange::gc_link> gc_queue USVM_GUARDED_BY(gc_lock);
  std::atomic<uint64_t> gc_pending{0};
  WaitQueue gc_wake;
  std::atomic<bool> gc_stop{false};
  std::thread gc_thread;

  // The VM error state (a collector failure): set once.
  mutable Mutex error_lock;
  Error error_ USVM_GUARDED_BY(error_lock){Errc::kOk};
  std::atomic<bool> has_error{false};
  std::atomic<bool> closed{false};

  mm::MmuIntervalFinishPool<InvalFinish, 64> finish_pool;
  // Two-pass flushes whose finish pass may not have run yet. A second
  // invalidation of the same pages finds the ranges zapped already (their
  // present masks are clear), yet a GPU access through the old translation
  // may still land until that flush drains: before it lets the mm change
  // the pages, it waits for these too (its own finish pass does). Written
  // and read under the GpuSvm notifier lock (write); signalled entries are
  // dropped lazily.
  std::vector<PendingFlush> pending_flushes USVM_GUARDED_BY(svm->notifier_lock());

  Counter invalidations{0}, ranges_zapped{0}, tlb_flushes{0}, two_pass_finishes{0},
      single_pass_fallbacks{0}, own_migrate_ignored{0}, unmap_events{0}, gc_runs{0},
      ranges_collected{0}, gc_evictions{0}, attribute_invalidations{0}, pending_flush_waits{0},
      tlb_flush_ns{0}, tlb_wait_ns{0};
};

class Vm::Impl {
 public:
  Impl(Svm::Impl& svm, Device::Impl& dev) : svm(svm), dev(dev) {}

  // REQUIRES: the driver lock.
  Result<void> HandleFaultLocked(uint64_t va, uint8_t access) USVM_REQUIRES(svm.svm->driver_lock());
  // The xe flow for one page: find or insert its range, move it where it
  // should be (`force`: a prefetch's location, else attributes and
  // policy), and with map_here get its pages and commit them on this GPU.
  // [clamp_lo, clamp_hi): a limit on a new range's window (the migration
  // policy's expansion). *was_valid (if given) is set when the range was
  // found valid as needed (nothing done).
  Result<void> ServiceLocked(uint64_t va, uint8_t access, const Location* force, bool map_here,
                             bool prefetch, uint64_t clamp_lo = 0, uint64_t clamp_hi = UINT64_MAX,
                             bool* was_valid = nullptr)
      USVM_REQUIRES(svm.svm->driver_lock());
  // After a fault at va served from this GPU's VRAM: asks the migration
  // policy what else of va's 2 MiB block to bring, and brings it.
  void ExpandLocked(uint64_t va) USVM_REQUIRES(svm.svm->driver_lock());
  // One access counter notification of this GPU: asks the access counter
  // policy, and migrates the region's remotely mapped ranges here if it
  // says so. The caller clears the region's counter afterwards.
  void ServiceAccessCounterLocked(const gpu::AccessCounterNotification& n) USVM_REQUIRES(svm.svm->driver_lock());
  // Whether one VMA still holds the whole range (takes the mmap lock).
  bool FitsVma(const DrvRange* r) const;
  // The attached device at `loc` (kDevice), or null.
  Device::Impl* DeviceAt(const Location& loc) const;
  // Whether this GPU maps `owner`'s VRAM directly (itself, or a peer of
  // the same owner with peer access).
  bool CanReach(const Device::Impl* owner) const;
  Result<void> PrefetchLocked(uint64_t start, uint64_t end, Location where)
      USVM_REQUIRES(svm.svm->driver_lock());
  // Faults a bind's pages in and maps them. REQUIRES: the driver lock.
  // need_write: the access writes (EPERM if the mapping is read-only).
  Result<void> ValidateBinding(Binding* b, bool need_write);
  // Drops a binding: removes its notifier, zaps, flushes, frees pages.
  void DestroyBinding(Binding* b);
  // Zaps [start, end) on this GPU and waits for the TLB flush.
  void ZapAndFlush(uint64_t start, uint64_t end);
  // The first bind of this Vm overlapping [start, end), if any.
  Binding* FindBinding(uint64_t start, uint64_t end) const;

  // Commits range `r`'s valid pages on this GPU. REQUIRES: the driver
  // lock and the notifier lock (read); pages valid.
  // allow_atomic: false where the atomic attribute is kCpu (no PTE gets
  // the atomic permission, so a GPU atomic faults and is refused).
  Result<void> CommitRange(DrvRange* r, bool allow_atomic);

  // Fault servicing of this Vm's context: one batch (waiting up to
  // timeout_ns for the first fault). The faults answered.
  Result<size_t> ServiceBatch(uint64_t timeout_ns);
  // The thread of a Vm with a context of its own.
  void FaultLoop();
  // Userptrs invalidated since their last use are bound again; ENODEV
  // once detached. REQUIRES: the driver lock.
  Result<void> RevalidateUserptrsLocked() USVM_REQUIRES(svm.svm->driver_lock());

  Svm::Impl& svm;
  Device::Impl& dev;
  Vm* pub = nullptr;
  // The GPU context (address space) this Vm runs in: the device's default
  // one, or own_ctx. Set at attach; reset to the default at detach, under
  // the driver lock and the device's attach lock (write). Users hold one
  // of them and check detached_ first, or are callbacks that found this
  // Vm in Svm::Impl::vms (cleared under the notifier lock before).
  gpu::GpuContext* ctx = nullptr;
  std::unique_ptr<gpu::GpuContext> own_ctx;
  std::thread fault_thread;
  std::atomic<bool> fault_stop{false};
  CounterSet c;
  // Guarded by the Svm's driver lock.
  std::map<uint64_t, std::unique_ptr<Binding>> binds_;  // by start
  std::map<uint64_t, Binding*> by_handle_;
  uint64_t next_handle_ = 1;
  std::atomic<bool> detached_{false};
};

}  // namespace usvm::driver

#endif  // USVM_SRC_DRIVER_INTERNAL_H_
