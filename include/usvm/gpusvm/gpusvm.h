// GpuSvm: the GPU shared-virtual-memory framework (the kernel's drm_gpusvm).
//
// Key components:
//   - GpuSvm: one per (device, address space). It tracks the CPU address
//     space through MMU interval notifiers and turns GPU fault addresses
//     into ranges.
//   - Notifier: an MMU interval notifier over an aligned `notifier_size`
//     window of the address space, created on the first fault inside it
//     and removed with its last range (NotifierMode::kWindow); or, the
//     design of seed 000, one notifier per range (NotifierMode::kPerRange).
//     A notifier holds its ranges in an interval tree and an address-
//     ordered list, so iteration survives the removal of the current range.
//   - Range: a chunk of the address space the GPU maps as one unit, sized
//     by FindOrInsert to the largest configured chunk (e.g. 2 MiB, 64 KiB,
//     4 KiB) whose aligned window fits the VMA, the notifier and the GPU VA
//     window and overlaps no other range. Ranges are never split.
//   - Pages: the device's view of a range's (or a userptr's) pages -- one
//     DeviceAddr per page -- owned by the driver (seed 003): InitPages
//     before use, GetPages to fault and map, UnmapPages on invalidation,
//     FreePages when the owner dies.
//
// What the driver provides (GpuSvmOps): allocation of notifiers and ranges
// (to embed them in its own structures) and the invalidation callback,
// which must zap the GPU page tables of the ranges it is given and
// UnmapPages them (ctx.in_notifier) before it returns -- no device mapping
// survives an invalidation.
//
// Locking (outer to inner):
//   1. the driver lock (DriverLock, the driver's; drm_gpusvm_driver_set_lock)
//      -- required by FindOrInsert, RangeRemove and the notifier/range
//      lookups; it guards the notifier tree and is one of the two locks a
//      range-tree writer holds;
//   2. the address space's mmap lock (read), taken inside;
//   3. the notifier lock (an RwSemaphore): the interval callback takes it
//      for write, sets the sequence, then calls GpuSvmOps::Invalidate;
//      GetPages maps pages under it for read, and a driver checks
//      PagesValid under it (read) before committing a GPU mapping. It
//      guards every Pages' state and flags and, with the driver lock, the
//      range trees. It is never held across a range fault, an allocation
//      or a notifier insert/remove.
// The interval callback runs with the mmap lock held (by whoever changes
// the address space), so it must never take the driver lock.
//
// A driver's GPU fault handler (the shape xe_svm_handle_pagefault has):
//
//   retry:
//     collect garbage (ranges queued by UNMAP invalidations);
//     MutexLock-style: driver_lock.Lock();
//     Range* r = USVM_TRY(svm.FindOrInsert(addr, gpuva_start, gpuva_end, ctx));
//     driver_lock.Unlock();
//     maybe migrate the range to device memory (pagemap.h);
//     err = svm.GetPages(r, ctx);      // EOPNOTSUPP: evict, retry
//     bind: build GPU PTEs from r->pages()->addrs();
//     { ReadLock l(svm.notifier_lock());
//       if (!svm.PagesValid(*r->pages())) goto retry;   // raced: again
//       commit the PTEs; }
//
// Thread-safety: every public method is safe to call concurrently, under
// the locks it states.
#ifndef USVM_GPUSVM_GPUSVM_H_
#define USVM_GPUSVM_GPUSVM_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/interval_tree.h"
#include "usvm/base/intrusive_list.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpusvm/device_addr.h"
#include "usvm/mm/mmu_interval_notifier.h"
#include "usvm/mm/mmu_notifier_range.h"

namespace usvm::mm {
class Mm;
class DevicePagemap;
}  // namespace usvm::mm

namespace usvm::gpusvm {

class GpuSvm;
class Notifier;
class Pagemap;
class Range;

inline constexpr uint64_t kSize4K = uint64_t{1} << 12;
inline constexpr uint64_t kSize64K = uint64_t{1} << 16;
inline constexpr uint64_t kSize2M = uint64_t{1} << 21;

// The lock a driver protects its GPU VA state with (the lock given to
// drm_gpusvm_driver_set_lock). It remembers its holder, so the framework
// can check it is held where the kernel asserts it (lockdep).
class USVM_CAPABILITY("mutex") DriverLock {
 public:
  DriverLock() = default;
  DriverLock(const DriverLock&) = delete;
  DriverLock& operator=(const DriverLock&) = delete;
  void Lock() USVM_ACQUIRE() {
    mu_.Lock();
    holder_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  }
  void Unlock() USVM_RELEASE() {
    holder_.store(std::thread::id(), std::memory_order_relaxed);
    mu_.Unlock();
  }
  bool HeldByCurrentThread() const {
    return holder_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }
  void AssertHeld() const USVM_ASSERT_CAPABILITY(this) {}

 private:
  Mutex mu_;
  std::atomic<std::thread::id> holder_{};
};

class USVM_SCOPED_CAPABILITY DriverLockGuard {
 public:
  explicit DriverLockGuard(DriverLock& l) USVM_ACQUIRE(l) : l_(l) { l_.Lock(); }
  ~DriverLockGuard() USVM_RELEASE() { l_.Unlock(); }
  DriverLockGuard(const DriverLockGuard&) = delete;
  DriverLockGuard& operator=(const DriverLockGuard&) = delete;

 private:
  DriverLock& l_;
};

// struct drm_gpusvm_ctx: how one operation should behave.
struct Ctx {
  // Device-private pages of this owner are used where they are (range
  // fault reports them); any other device-private page is migrated home.
  const void* device_private_page_owner = nullptr;
  // Chunks of at most this many bytes are only created over pages the CPU
  // has already faulted in (an HMM snapshot finds them all present).
  uint64_t check_pages_threshold = 0;
  // Device memory the range is migrated to stays there at least this long
  // against CPU touches (pagemap.h).
  uint64_t timeslice_ms = 0;
  // Called from the invalidation callback, with the notifier lock held for
  // write (UnmapPages then does not take it).
  bool in_notifier = false;
  // The device only reads: do not require or fault writable pages.
  bool read_only = false;
  // Ranges may be migrated to device memory (sets Range::migrate_devmem on
  // anonymous private VMAs).
  bool devmem_possible = false;
  // Every page must be in device memory: GetPages fails with EFAULT on a
  // system page (the caller migrates and retries).
  bool devmem_only = false;
  // System pages and pages of several allocations of one pagemap may be
  // mixed in one range.
  bool allow_mixed = false;
};

// The device's view of a set of pages (struct drm_gpusvm_pages). Owned by
// the driver, which embeds it where it likes (in its range, in a userptr):
// GpuSvm::InitPages before first use, GpuSvm::FreePages before it is
// destroyed. All state is guarded by the owning GpuSvm's notifier lock.
class Pages {
 public:
  Pages() = default;
  Pages(const Pages&) = delete;
  Pages& operator=(const Pages&) = delete;
  // REQUIRES: freed (GpuSvm::FreePages) or never mapped.
  ~Pages();

  // The flags of struct drm_gpusvm_pages_flags. REQUIRES: the notifier lock
  // (read) for a stable answer.
  bool unmapped() const { return unmapped_; }
  bool partial_unmap() const { return partial_unmap_; }
  bool has_devmem_pages() const { return has_devmem_pages_; }
  bool has_device_mapping() const { return has_device_mapping_; }
  // Mapped for reading only (the GetPages had ctx.read_only).
  bool read_only() const { return read_only_; }
  // Range fault sequence of the last successful GetPages.
  uint64_t notifier_seq() const { return notifier_seq_; }
  // One entry per 4 KiB page from the start GetPages was given; a mapping
  // of order k fills its first entry only. REQUIRES: the notifier lock
  // (read) and has_device_mapping().
  const DeviceAddr* addrs() const { return addrs_.get(); }
  uint64_t npages() const { return npages_; }
  // The pagemap of the device pages mapped (has_devmem_pages), else null.
  Pagemap* dpagemap() const { return dpagemap_; }
  GpuSvm* gpusvm() const { return gpusvm_; }

 private:
  friend class GpuSvm;
  GpuSvm* gpusvm_ = nullptr;  // set by InitPages; non-owning
  // Guarded by gpusvm_->notifier_lock(): written under it for write, or
  // for read by GetPages (which owns the mapping step of its pages: one
  // GetPages per Pages at a time, see GetPages).
  std::unique_ptr<DeviceAddr[]> addrs_;
  // 32 bits each (GetPages refuses more than 2^32 - 1 pages): metadata per
  // range is counted in bytes at a million ranges.
  uint32_t npages_ = 0;      // entries in addrs_
  uint32_t mapped_ = 0;      // entries mapped (a prefix), for unmapping
  uint32_t entries_ = 0;     // mappings made in that prefix (one per order step)
  uint64_t notifier_seq_ = 0;
  Pagemap* dpagemap_ = nullptr;
  bool unmapped_ = false;
  bool partial_unmap_ = false;
  bool has_devmem_pages_ = false;
  bool has_device_mapping_ = false;
  bool read_only_ = false;
  std::atomic<bool> busy_{false};  // a GetPages is mapping these pages
};

// One interval of the address space the GPU maps as a unit (struct
// drm_gpusvm_range). Allocated through GpuSvmOps::RangeAlloc so a driver
// can embed it; reference counted (RangeGet / RangePut); freed through
// GpuSvmOps::RangeFree after RangeRemove dropped the last reference.
class Range {
 public:
  Range() = default;
  virtual ~Range() = default;
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;

  uint64_t start() const { return node_.start; }
  uint64_t end() const { return node_.last + 1; }
  uint64_t size() const { return end() - start(); }
  Notifier* notifier() const { return notifier_; }
  GpuSvm* gpusvm() const { return gpusvm_; }
  // The driver's pages of this range (GpuSvm::InitPages(pages, this)), or
  // null before that.
  Pages* pages() const { return pages_; }
  // Constant after FindOrInsert: the range may go to device memory
  // (ctx.devmem_possible and an anonymous private VMA).
  bool migrate_devmem() const { return migrate_devmem_; }
  // UNMAP seen (RangeSetUnmapped), whole or partial. REQUIRES: the
  // notifier lock (read) for a stable answer.
  bool unmapped() const { return unmapped_; }
  bool partial_unmap() const { return partial_unmap_; }
  // Still in its notifier's tree (RangeRemove not yet done).
  bool in_tree() const { return node_.in_tree; }

 private:
  friend class GpuSvm;
  friend class Notifier;
  IntervalTreeNode node_;  // in notifier_->ranges_: driver lock + notifier lock (write)
  ListNode link_;          // in notifier_->range_list_: same
  GpuSvm* gpusvm_ = nullptr;
  Notifier* notifier_ = nullptr;
  Pages* pages_ = nullptr;  // set once under the notifier lock (InitPages)
  std::atomic<uint32_t> refcount_{1};
  bool migrate_devmem_ = false;
  bool unmapped_ = false;       // notifier lock
  bool partial_unmap_ = false;  // notifier lock
};

// An MMU interval notifier of a GpuSvm with the ranges inside it (struct
// drm_gpusvm_notifier). Allocated through GpuSvmOps::NotifierAlloc.
class Notifier {
 public:
  Notifier() = default;
  virtual ~Notifier() = default;
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  uint64_t start() const { return node_.start; }
  uint64_t end() const { return node_.last + 1; }
  mm::MmuIntervalNotifier& interval() { return sub_; }
  // False once the interval notifier was removed (RangeRemove of the
  // last range). REQUIRES: the driver lock.
  bool removed() const { return sub_.hub() == nullptr; }
  GpuSvm* gpusvm() const { return gpusvm_; }
  // Ranges in the tree (racy unless the driver lock or the notifier lock
  // is held).
  size_t range_count() const { return ranges_.size(); }

 private:
  friend class GpuSvm;
  // Laid out so the 32-byte-aligned subscription leaves no hole: 256
  // bytes in all (memory per range counts at a million ranges).
  GpuSvm* gpusvm_ = nullptr;
  // The ranges: driver lock + notifier lock (write) to change, either to
  // read.
  IntrusiveIntervalTree<Range, &Range::node_> ranges_;
  // The interval subscription; the callback finds us from it (OwnerOf).
  // Inserted from NotifierCreate until removed (hub() null again).
  mm::MmuIntervalNotifier sub_;
  IntervalTreeNode node_;  // in gpusvm_->notifiers_: driver lock
  ListNode link_;          // in gpusvm_->notifier_list_: driver lock
  IntrusiveList<Range, &Range::link_> range_list_;  // as ranges_

  static Notifier* OwnerOf(mm::MmuIntervalNotifier* sub) {
    // container_of, computed on a suitably aligned fake address (never
    // dereferenced), as IntrusiveList does.
    constexpr size_t kFake = 4096;
    const auto off = reinterpret_cast<size_t>(&reinterpret_cast<Notifier*>(kFake)->sub_) - kFake;
    return reinterpret_cast<Notifier*>(reinterpret_cast<char*>(sub) - off);
  }
};

// struct drm_gpusvm_ops.
class GpuSvmOps {
 public:
  virtual ~GpuSvmOps() = default;
  // Allocation of the driver's embedding structures. nullptr: ENOMEM.
  virtual Notifier* NotifierAlloc() { return new Notifier; }
  virtual void NotifierFree(Notifier* n) { delete n; }
  virtual Range* RangeAlloc() { return new Range; }
  // The last reference went (RangePut). The driver frees its Pages here
  // (FreePages, the backstop) and then the range.
  virtual void RangeFree(Range* r) { delete r; }
  // The interval callback, with the notifier lock held for write and the
  // notifier's sequence already set. Must zap every GPU mapping of the
  // ranges of `n` that intersect `range`, UnmapPages them (in_notifier),
  // and on kUnmap mark them unmapped (RangeSetUnmapped) and queue them
  // for the driver's garbage collector. Must not take the driver lock,
  // remove ranges or notifiers, or allocate.
  virtual void Invalidate(GpuSvm& svm, Notifier& n, const mm::NotifierRange& range) = 0;
  // Two-pass form (seed 002): may leave a wait (TLB flushes of several
  // GPUs) to *finish, which runs after every first pass of the
  // invalidation, without the notifier lock. The default runs Invalidate.
  virtual void InvalidateStart(GpuSvm& svm, Notifier& n, const mm::NotifierRange& range,
                               mm::MmuIntervalFinish** finish) {
    *finish = nullptr;
    Invalidate(svm, n, range);
  }
};

enum class NotifierMode : uint8_t {
  kWindow,    // one notifier per aligned notifier_size window (drm_gpusvm)
  kPerRange,  // one notifier per range (seed 000's xe design)
};

struct GpuSvmConfig {
  std::string name;
  // The address space; null for the pages-only mode (userptr), where ops,
  // chunk_sizes, mm_start, mm_range and notifier_size must all be empty.
  std::shared_ptr<mm::Mm> mm;
  uint64_t mm_start = 0;  // the GPU-visible window of the address space
  uint64_t mm_range = 0;
  uint64_t notifier_size = 0;  // a power of two, >= the largest chunk
  GpuSvmOps* ops = nullptr;    // must outlive the GpuSvm
  // Descending powers of two, the last 4 KiB (xe: 2M, 64K, 4K).
  std::vector<uint64_t> chunk_sizes;
  NotifierMode notifier_mode = NotifierMode::kWindow;
  // The device that maps pages (drm->dev): passed to the pagemaps'
  // DeviceMap, tells local VRAM from a peer's.
  const void* device = nullptr;
  // The driver's lock; null: the GpuSvm's own (driver_lock()).
  DriverLock* driver_lock = nullptr;
  Env* env = nullptr;  // null: Env::Default()
};

// drm_gpusvm_scan_mm's answer.
enum class ScanResult : uint8_t {
  kUnpopulated,  // a page is absent or inaccessible
  kEqual,        // every page is a device page of the pagemap asked about
  kOther,        // every page is a device page of one other pagemap
  kSystem,       // every page is a present system page
  kMixedDevice,  // device pages of two or more pagemaps
  kMixed,        // system pages and device pages
};
const char* ScanResultName(ScanResult r);

class GpuSvm {
 public:
  // drm_gpusvm_init. EINVAL: (with mm) null ops, no or bad chunk sizes
  // (not descending powers of two ending in 4 KiB), a notifier size that
  // is not a power of two at least the largest chunk, an empty, unaligned
  // or overflowing window; (without mm) any of ops, chunk sizes, window
  // or notifier size given.
  static Result<std::unique_ptr<GpuSvm>> TryCreate(GpuSvmConfig config);
  // drm_gpusvm_fini: unmaps the pages of and removes every range (the
  // driver's RangeFree runs for each), removes every notifier. Idempotent;
  // the destructor calls it. Takes the driver lock: the caller must not
  // hold it. REQUIRES: no other call in progress.
  void Fini();
  ~GpuSvm();
  GpuSvm(const GpuSvm&) = delete;
  GpuSvm& operator=(const GpuSvm&) = delete;

  DriverLock& driver_lock() const USVM_RETURN_CAPABILITY(*driver_lock_) { return *driver_lock_; }
  RwSemaphore& notifier_lock() const USVM_RETURN_CAPABILITY(notifier_lock_) {
    return notifier_lock_;
  }
  const std::string& name() const { return config_.name; }
  mm::Mm* mm() const { return config_.mm.get(); }
  const void* device() const { return config_.device; }
  uint64_t mm_start() const { return config_.mm_start; }
  uint64_t mm_end() const { return config_.mm_start + config_.mm_range; }
  Env& env() const { return *env_; }

  // ---- ranges -------------------------------------------------------------

  // drm_gpusvm_range_find_or_insert: the range containing fault_addr, or a
  // new one of the largest fitting chunk (see the file comment), with its
  // notifier created and inserted if needed. The returned range is owned
  // by its notifier (no reference is taken for the caller).
  // REQUIRES: the driver lock (EINVAL if not held); not the mmap lock.
  // Errors: EINVAL fault_addr outside the window, or no chunk fits;
  // EFAULT the address space is gone; ENOENT no VMA at fault_addr; EPERM
  // a write is needed (!ctx.read_only) on a VMA without write permission;
  // ENOMEM allocation; the interval notifier insert's error.
  Result<Range*> FindOrInsert(uint64_t fault_addr, uint64_t gpuva_start, uint64_t gpuva_end,
                              const Ctx& ctx) USVM_REQUIRES(driver_lock());

  // drm_gpusvm_range_remove: takes the range out of its notifier, drops the
  // tree's reference (RangeFree when it was the last), and removes the
  // notifier when it was its last range. Never unmaps or frees pages (the
  // driver's RangeFree does): seed 003's contract is enforced -- a range
  // whose pages are still device-mapped (has_device_mapping or
  // has_devmem_pages) stays in the tree and the call fails with EBUSY
  // (counted in Stats::remove_refused). EINVAL: not in a tree of this
  // GpuSvm, or the driver lock not held. EDEADLK: called from this
  // GpuSvm's invalidation callback (it holds the notifier lock, and
  // removing the notifier would wait for the callback itself).
  // REQUIRES: the driver lock.
  Result<void> RangeRemove(Range* range) USVM_REQUIRES(driver_lock());

  // drm_gpusvm_range_get / _put.
  Range* RangeGet(Range* range);
  void RangePut(Range* range);

  // The first range of `n` overlapping [start, end), and the next one
  // after `r` in address order that starts before `end`. REQUIRES: the
  // driver lock or the notifier lock.
  static Range* RangeFind(Notifier* n, uint64_t start, uint64_t end);
  static Range* RangeNext(Range* r, uint64_t end);
  // The notifier containing [start, end)'s first byte, and the next.
  // REQUIRES: the driver lock.
  Notifier* NotifierFind(uint64_t start, uint64_t end) const USVM_REQUIRES(driver_lock());
  Notifier* NotifierNext(Notifier* n, uint64_t end) const USVM_REQUIRES(driver_lock());

  // drm_gpusvm_for_each_range_safe: fn(Range*) for each range of `n`
  // overlapping [start, end), fetching the next one first, so fn may
  // remove the current range.
  template <typename F>
  static void ForEachRangeSafe(Notifier* n, uint64_t start, uint64_t end, F&& fn) {
    for (Range* r = RangeFind(n, start, end); r;) {
      Range* next = RangeNext(r, end);
      fn(r);
      r = next;
    }
  }
  // Every notifier overlapping [start, end), safe against removal of the
  // current one. REQUIRES: the driver lock.
  template <typename F>
  void ForEachNotifierSafe(uint64_t start, uint64_t end, F&& fn) USVM_REQUIRES(driver_lock()) {
    for (Notifier* n = NotifierFind(start, end); n;) {
      Notifier* next = NotifierNext(n, end);
      fn(n);
      n = next;
    }
  }

  // drm_gpusvm_range_set_unmapped: marks the range (and its pages)
  // unmapped, and partially unmapped when `mmu_range` does not cover it.
  // GetPages then fails with EFAULT. REQUIRES: the notifier lock (write),
  // i.e. from the invalidation callback.
  void RangeSetUnmapped(Range* range, const mm::NotifierRange& mmu_range)
      USVM_REQUIRES(notifier_lock());

  // drm_gpusvm_has_mapping: whether any range overlaps [start, end).
  // REQUIRES: the driver lock.
  bool HasMapping(uint64_t start, uint64_t end) const USVM_REQUIRES(driver_lock());

  // drm_gpusvm_range_evict: every page of the range back to system memory
  // (a range fault that owns no device memory, so every device-private
  // page is migrated home by its owner). Holes and PROT_NONE parts are
  // skipped (a partially unmapped range is evicted too; drm_gpusvm fails
  // with EFAULT there). Takes the mmap lock (read); the caller must not
  // hold it or the notifier lock. EINVAL: not a range of this GpuSvm, or
  // one already removed (as for GetPages; ScanMm answers kUnpopulated);
  // EFAULT: the address space is gone; ENOMEM; ETIME: the range kept
  // changing for the HMM timeout.
  Result<void> RangeEvict(Range* range);

  // drm_gpusvm_scan_mm: an advisory snapshot of where the range's pages
  // are, relative to `pagemap` (which may be null). Pages of another owner
  // than `owner` read as absent. Takes the mmap lock (read).
  ScanResult ScanMm(Range* range, const void* owner, const mm::DevicePagemap* pagemap);

  // ---- pages (driver-owned, seed 003) -------------------------------------

  // drm_gpusvm_init_pages: binds `pages` to this GpuSvm (and to `range`,
  // whose pages it then is; null for a userptr). Before first use. Takes
  // the notifier lock when given a range (callbacks read range->pages()).
  void InitPages(Pages* pages, Range* range = nullptr);

  // drm_gpusvm_range_get_pages: GetPages over the range with its notifier.
  Result<void> GetPages(Range* range, const Ctx& ctx);
  // drm_gpusvm_get_pages: faults [start, end) of `mm` in through
  // `notifier` (which must cover it), retrying while invalidations race
  // (EBUSY after the HMM timeout), then maps each page for the device
  // under the notifier lock, only if the sequence is still current, so a
  // mapping that raced with an invalidation is never made. Nothing is
  // allocated under the notifier lock.
  // Errors: EINVAL bad arguments or pages not initialised; EFAULT the
  // address space is gone, the pages were unmapped (UNMAP seen), a
  // mapping failed, or (ctx.devmem_only) a system page was found;
  // EOPNOTSUPP device pages of two pagemaps, of a foreign pagemap, or
  // (without ctx.allow_mixed) of two allocations or mixed with system
  // pages, or (!ctx.read_only) a read-only device page of ours -- shared
  // copy-on-write after a fork, which drm_gpusvm would map writable; EBUSY: the range kept changing for the HMM timeout; EPERM /
  // ENOMEM from the range fault. On error nothing stays mapped by this
  // call (mappings made by an earlier GetPages are kept only if valid).
  // Two GetPages of one Pages at a time: the second waits for the first.
  // Valid pages are kept (no new range fault) unless they were mapped
  // read-only and this call needs write access: then they are unmapped and
  // faulted again for writing (drm_gpusvm assumes one read_only setting
  // per range and would hand the read-only pages back).
  Result<void> GetPages(Pages* pages, mm::Mm& mm, mm::MmuIntervalNotifier* notifier,
                        uint64_t start, uint64_t end, const Ctx& ctx);

  // drm_gpusvm_unmap_pages: drops every device mapping of `pages` (each
  // DeviceAddr unmapped exactly once) and clears has_device_mapping and
  // has_devmem_pages. ctx.in_notifier: the caller holds the notifier lock
  // for write (the invalidation callback); otherwise it is taken here.
  void UnmapPages(Pages* pages, const Ctx& ctx);
  // drm_gpusvm_free_pages: unmaps what is still mapped (the backstop for
  // pages never invalidated, counted in Stats::backstop_unmaps) and frees
  // the address array. Idempotent. Takes the notifier lock.
  void FreePages(Pages* pages);
  // drm_gpusvm_pages_valid: whether the pages are mapped for the device
  // and no invalidation has unmapped them since. REQUIRES: the notifier
  // lock (read or write).
  bool PagesValid(const Pages& pages) const USVM_REQUIRES_SHARED(notifier_lock());

  // ---- statistics (racy snapshots, for tests and benchmarks) --------------

  struct Stats {
    uint64_t notifiers = 0;          // live notifiers
    uint64_t ranges = 0;             // ranges in trees
    uint64_t notifier_inserts = 0;
    uint64_t notifier_removes = 0;
    uint64_t range_inserts = 0;
    uint64_t range_removes = 0;
    uint64_t remove_refused = 0;     // RangeRemove with pages still mapped
    uint64_t invalidations = 0;      // interval callbacks
    uint64_t get_pages = 0;          // successful GetPages
    uint64_t get_pages_retries = 0;  // sequence moved before mapping
    uint64_t write_upgrades = 0;     // read-only pages remapped for writing
    uint64_t maps = 0;               // DeviceAddr entries mapped
    uint64_t unmaps = 0;             // and unmapped
    uint64_t devmem_maps = 0;        // of which device pages
    uint64_t backstop_unmaps = 0;    // entries FreePages had to unmap
    uint64_t driver_lock_violations = 0;
  };
  Stats GetStats() const;

  // A test hook that holds GetPages where a race window opens: after the
  // range fault succeeded, before the notifier lock is taken to map. Set
  // before concurrent use; nullptr disables it.
  struct DebugHooks {
    virtual ~DebugHooks() = default;
    virtual void AfterRangeFault(Pages* pages) {}
  };
  void DebugSetHooks(DebugHooks* hooks) { debug_hooks_ = hooks; }

 private:
  class IntervalOps;
  explicit GpuSvm(GpuSvmConfig config);

  Result<Notifier*> NotifierCreate(uint64_t start, uint64_t end) USVM_REQUIRES(driver_lock());
  void NotifierDestroy(Notifier* n) USVM_REQUIRES(driver_lock());
  // The largest chunk for fault_addr (0 if none), see FindOrInsert.
  // `n`: the notifier whose ranges must not overlap (null: one notifier
  // per range, any notifier); `check_sub`: the subscription the threshold
  // snapshot reads through (null: no snapshot).
  uint64_t ChunkSize(const Notifier* n, mm::MmuIntervalNotifier* check_sub, uint64_t vma_start, uint64_t vma_end,
                     uint64_t fault_addr, uint64_t gpuva_start, uint64_t gpuva_end,
                     uint64_t bound_start, uint64_t bound_end, size_t first_chunk,
                     const Ctx& ctx, size_t* index) USVM_REQUIRES(driver_lock());
  bool CheckPages(mm::MmuIntervalNotifier* sub, uint64_t start, uint64_t end,
                  const void* owner);
  bool Overlaps(const Notifier* n, uint64_t start, uint64_t end) const
      USVM_REQUIRES(driver_lock());
  // Unmaps entries [0, pages->mapped_). REQUIRES: notifier lock (write),
  // or (for GetPages' error path) read with pages->busy_.
  void UnmapPagesLocked(Pages* pages);
  bool CheckDriverLock();

  const GpuSvmConfig config_;
  Env* const env_;
  std::unique_ptr<IntervalOps> interval_ops_;
  std::unique_ptr<DriverLock> own_driver_lock_;
  DriverLock* const driver_lock_;
  mutable RwSemaphore notifier_lock_;

  IntrusiveIntervalTree<Notifier, &Notifier::node_> notifiers_ USVM_GUARDED_BY(*driver_lock_);
  IntrusiveList<Notifier, &Notifier::link_> notifier_list_ USVM_GUARDED_BY(*driver_lock_);

  struct AtomicStats {
    std::atomic<uint64_t> notifiers{0}, ranges{0}, notifier_inserts{0}, notifier_removes{0},
        range_inserts{0}, range_removes{0}, remove_refused{0}, invalidations{0}, get_pages{0},
        get_pages_retries{0}, write_upgrades{0}, maps{0}, unmaps{0}, devmem_maps{0}, backstop_unmaps{0},
        driver_lock_violations{0};
  };
  mutable AtomicStats stats_;
  DebugHooks* debug_hooks_ = nullptr;
};

}  // namespace usvm::gpusvm

#endif  // USVM_GPUSVM_GPUSVM_H_
