// Pagemap and Devmem: device memory for GPU SVM (the kernel's drm_pagemap
// and drm_pagemap_devmem, seed 004).
//
// Vocabulary:
//   - Pagemap: one device-memory region (a GPU's VRAM) registered with the
//     mm as device pages (an mm::DevicePagemap with an owner). It answers
//     how a device addresses one of its pages (DeviceMap / DeviceUnmap: its
//     own VRAM, kLocal, or a peer's VRAM over an interconnect, kPeer), can
//     fill a range of an address space with device memory (PopulateMm,
//     through the driver's op), and is the mm's DevicePagemapOps for its
//     pages (page free, CPU touch, device-frame copy home).
//   - Devmem: one allocation of device memory made for one migration (the
//     driver's buffer object embeds it, drm_pagemap_devmem). The driver
//     gives its frames (DevmemOps::PopulateDevmemPfn) and copies bytes in
//     and out of them (CopyToDevmem, CopyToRam, optionally CopyFromPeer).
//   - The allocation record (the kernel's zdd): made by MigrateToDevmem and
//     put in the zone data of every device page of that migration, with
//     one reference per page. The last page freed (the mm's PageFree) drops
//     the last reference: the Devmem is "detached" and DevmemOps::Release
//     runs, exactly once per Devmem handed to MigrateToDevmem. Pages that
//     migrated together share the record (AllocationOf), so GetPages can
//     refuse to mix allocations.
//
// Migration (all-or-nothing per range, as drm_pagemap):
//   - to device: PopulateMm -> driver's PagemapOps::PopulateMm -> allocate a
//     Devmem -> MigrateToDevmem (mmap read lock, MigrateVma of system pages,
//     and of device pages of this owner: peers and, with
//     can_migrate_same_pagemap, our own).
//   - CPU touch of a device page (mm fault -> Pagemap's MigrateToRam): the
//     whole allocation around the fault comes back to system memory (its
//     migrated range, or the size-aligned window of the kernel, clamped to
//     the faulting VMA). Before the allocation's timeslice expires the
//     kernel returns and lets the CPU refault until it has; here the fault
//     sleeps on the Pagemap's Env clock until the expiry and then migrates,
//     which is the same outcome and makes tests with a ManualClock
//     deterministic (the sleep advances that clock at once).
//   - eviction (EvictToRam): by device frame, with no mmap lock
//     (mm::Mm::MigrateDevicePfns), retried twice; EBUSY if pages stay.
//   - 2 MiB: a 2 MiB-aligned part of the range that the mm collects whole
//     (a THP, an untouched 2 MiB of anonymous memory, a 2 MiB device page)
//     moves as one 2 MiB device page when the driver's frames for it are
//     512 consecutive frames starting at an index that is a multiple of
//     512; otherwise as 512 pages (the mm splits the source). Coming home
//     by a CPU touch a 2 MiB device page becomes one 2 MiB system page
//     (Mm::AllocSystemHugePage) when one can be had, else 512 small ones;
//     eviction by frame splits it into 4 KiB system pages.
//
// CPU touch and passing references: the mm does not collect a page that
// someone else holds a reference on at that instant (an evictor between
// its get and its trylock, another fault between unlock and put). The
// kernel then returns and lets the CPU refault, forever if need be; the
// mm here backs off and bounds its refaults in time; MigrateToRam also
// retries collecting its fault page itself, for up to ~1 s.
//
// Device-to-device (beyond the kernel, whose drm_pagemap bounces such
// moves through system memory, a FIXME there): with
// MigrateDetails::source_peer_migrates, device pages of a peer pagemap
// (one sharing our owner, so the mm lets our migration collect them) are
// copied straight into our frames through DevmemOps::CopyFromPeer when the
// driver has a path between the two memories, else bounced through a
// system-memory buffer inside the same migration (the source allocation's
// CopyToRam, then our CopyToDevmem). Without the flag such pages make the
// migration fail with EBUSY (the kernel's result): the caller evicts them
// first (EvictToRam) and retries, bouncing through system memory.
//
// Locking: this file has no lock of its own (state is atomics and the
// mm's page locks). Order: mmap lock (read) -> device page locks (taken by
// the mm's migrate calls) -> the driver's copy ops. MigrateToDevmem takes
// the mmap read lock itself (so PopulateMm, which calls it through the
// driver, must be called without it); EvictToRam takes no mmap lock;
// MigrateToRam runs under the read lock the fault path holds, with the
// faulting page locked, and may sleep there (timeslice, back-off).
// DevmemOps::Release runs wherever the mm drops the last reference to one
// of the allocation's pages (inside mm calls, with mm locks held): it must
// not call back into the mm.
//
// Thread-safety: every public function may be called concurrently; the
// counters are atomics (Stats is a racy snapshot, exact when quiescent).
#ifndef USVM_GPUSVM_PAGEMAP_H_
#define USVM_GPUSVM_PAGEMAP_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "usvm/base/env.h"
#include "usvm/base/result.h"
#include "usvm/gpusvm/device_addr.h"
#include "usvm/mm/device_pagemap.h"

namespace usvm::mm {
class Mm;
struct VmaInfo;
}  // namespace usvm::mm

namespace usvm::gpusvm {

class Pagemap;
class Devmem;
struct DevmemRecord;  // the zdd (pagemap.cc)

// drm_pagemap_ops: how devices reach this memory, and how a range gets
// populated with it.
class PagemapOps {
 public:
  virtual ~PagemapOps() = default;
  // drm_pagemap_ops.device_map: the address through which `device` reaches
  // the 2^order pages starting at device frame `pfn` of this pagemap (kLocal
  // when `device` is the pagemap's own, kPeer otherwise when reachable).
  // An error fails the GetPages that asked (EFAULT in the kernel's terms).
  virtual Result<DeviceAddr> DeviceMap(Pagemap& pm, const void* device, mm::DevicePfn pfn,
                                       unsigned order) = 0;
  // drm_pagemap_ops.device_unmap.
  virtual void DeviceUnmap(Pagemap& pm, const void* device, const DeviceAddr& addr) = 0;
  // drm_pagemap_ops.populate_mm: allocate a Devmem for [start, end) of `mm`
  // and call Pagemap::MigrateToDevmem with timeslice_ms. Called by
  // Pagemap::PopulateMm with no lock held (unlike the kernel, which holds
  // the mmap read lock here: MigrateToDevmem takes it itself). The default
  // fails with EOPNOTSUPP (a pagemap that cannot be populated).
  virtual Result<void> PopulateMm(Pagemap& pm, uint64_t start, uint64_t end,
                                  const std::shared_ptr<mm::Mm>& mm, uint64_t timeslice_ms);
};

// drm_pagemap_devmem_ops: the driver's side of one allocation. Pointers to
// bytes are 4 KiB system pages (mm::Mm::SystemPageData) or bounce buffers;
// drivers need no Mm. Ops are called with no lock of this file held; the
// copy ops may run under the mmap read lock (migrations) or under none
// (eviction), always with the device pages involved locked.
class DevmemOps {
 public:
  virtual ~DevmemOps() = default;
  // devmem_release: the allocation's last device page was freed (or the
  // migration that was handed the Devmem failed before using it). Called
  // exactly once per Devmem handed to MigrateToDevmem, possibly from inside
  // an mm call (see the file comment): return the frames, do not call the
  // mm. The Devmem object itself lives on while shared_ptrs hold it.
  virtual void Release(Devmem& devmem) {}
  // populate_devmem_pfn: the `npages` device frames of this allocation, in
  // address order, frames of devmem.pagemap(). Called by MigrateToDevmem
  // (the frames it then initialises; they must be free) and by EvictToRam
  // (the same frames again). An error aborts the call that asked.
  virtual Result<void> PopulateDevmemPfn(Devmem& devmem, uint64_t npages, mm::DevicePfn* pfns) = 0;
  // copy_to_devmem: src[i] (4 KiB, or nullptr for a hole: the page must
  // read as zeros) into device frame dst[i], for i < n.
  virtual Result<void> CopyToDevmem(Devmem& devmem, const mm::DevicePfn* dst,
                                    std::byte* const* src, uint64_t n) = 0;
  // copy_to_ram: device frame src[i] of this allocation into dst[i] (4 KiB),
  // for i < n.
  virtual Result<void> CopyToRam(Devmem& devmem, const mm::DevicePfn* src,
                                 std::byte* const* dst, uint64_t n) = 0;
  // Direct device-to-device copy (not in the kernel): device frames src[i]
  // of pagemap `from` (a peer, or devmem.pagemap() itself) into our frames
  // dst[i], for i < n. EOPNOTSUPP (the default): no direct path between
  // the two memories; the migration then bounces the bytes through system
  // memory. Any other error fails the migration.
  virtual Result<void> CopyFromPeer(Devmem& devmem, const mm::DevicePfn* dst, Pagemap& from,
                                    const mm::DevicePfn* src, uint64_t n);
};

// drm_pagemap_devmem: one allocation. The driver makes it (embedding it in
// its own object by deriving, if it likes) and hands it to MigrateToDevmem
// as a shared_ptr, which that call consumes; the allocation record keeps a
// reference while any page uses it. A driver may keep its own reference
// (for EvictToRam) past Release.
//
// Lifecycle: kNew (made) -> kMigrating (handed to MigrateToDevmem) ->
// kDetached (Release ran). One Devmem serves one migration.
class Devmem {
 public:
  // drm_pagemap_devmem_init. `pm` must outlive the Devmem's use (not its
  // destruction); `ops` must outlive the Devmem; `mm` is the address space
  // the allocation is for (the structure is kept, mmgrab); size in bytes,
  // a non-zero multiple of 4 KiB (checked by MigrateToDevmem: EINVAL).
  Devmem(Pagemap& pm, DevmemOps* ops, std::shared_ptr<mm::Mm> mm, uint64_t size);
  virtual ~Devmem();
  Devmem(const Devmem&) = delete;
  Devmem& operator=(const Devmem&) = delete;

  Pagemap& pagemap() const { return pm_; }
  DevmemOps* ops() const { return ops_; }
  mm::Mm* mm() const { return mm_.get(); }
  const std::shared_ptr<mm::Mm>& mm_ref() const { return mm_; }
  uint64_t size() const { return size_; }
  uint64_t npages() const { return size_ >> 12; }
  // The Env time (ns) before which a CPU touch waits (set by a successful
  // MigrateToDevmem: now + timeslice_ms).
  uint64_t timeslice_expiry_ns() const { return expiry_ns_.load(std::memory_order_acquire); }
  // The range the allocation was migrated to (0, 0 before).
  uint64_t range_start() const { return range_start_.load(std::memory_order_acquire); }
  uint64_t range_end() const { return range_end_.load(std::memory_order_acquire); }
  // Release ran (the kernel's `detached` completion).
  bool detached() const { return detached_.load(std::memory_order_acquire); }
  // Device pages still holding the allocation record, plus one while its
  // migration runs; 0 before the migration and once detached. For tests,
  // when no page of the allocation can be freed concurrently.
  uint64_t DebugPagesInUse() const;

 private:
  friend class Pagemap;
  friend struct DevmemRecord;

  // Constant after construction.
  Pagemap& pm_;  // non-owning: the pagemap outlives every use
  DevmemOps* const ops_;
  const std::shared_ptr<mm::Mm> mm_;
  const uint64_t size_;

  std::atomic<uint64_t> expiry_ns_{0};
  std::atomic<uint64_t> range_start_{0};
  std::atomic<uint64_t> range_end_{0};
  std::atomic<bool> used_{false};      // handed to MigrateToDevmem once
  std::atomic<bool> detached_{false};  // Release ran
  // The allocation record while pages may use it (set by MigrateToDevmem,
  // cleared by the record's last put). Non-owning.
  std::atomic<DevmemRecord*> record_{nullptr};
};

// drm_pagemap_migrate_details.
struct MigrateDetails {
  // How long (ms) the pages must stay in device memory before a CPU touch
  // may take them back (the ping-pong guard).
  uint64_t timeslice_ms = 0;
  // Pages already in this pagemap (of other allocations) are migrated into
  // the new allocation too; without it they make the call fail with EBUSY
  // unless every page is already here (success, nothing copied).
  bool can_migrate_same_pagemap = false;
  // Device pages of peer pagemaps (sharing our owner) are collected and
  // copied device-to-device (see the file comment); without it they make
  // the call fail with EBUSY (the caller evicts them first).
  bool source_peer_migrates = false;
};

struct PagemapConfig {
  uint64_t npages = 0;            // device pages (4 KiB each)
  const void* owner = nullptr;    // device_private_page_owner; peers share one
  const void* device = nullptr;   // the device whose memory this is
  PagemapOps* ops = nullptr;      // must outlive the pagemap
  mm::DeviceMemoryKind kind = mm::DeviceMemoryKind::kPrivate;
  // The clock of the timeslice (null: Env::Default()); must outlive the
  // pagemap.
  Env* env = nullptr;
};

class Pagemap : private mm::DevicePagemapOps {
 public:
  // EINVAL: zero pages, null owner, device or ops; ENOMEM as
  // mm::DevicePagemap::TryCreate.
  static Result<std::unique_ptr<Pagemap>> TryCreate(const PagemapConfig& config);
  // Unbinds (see Unbind), then unregisters the device pages (evicting what
  // is still mapped and waiting for every page's last reference, see
  // mm::DevicePagemap's destructor): every allocation is released first.
  ~Pagemap() override;
  Pagemap(const Pagemap&) = delete;
  Pagemap& operator=(const Pagemap&) = delete;

  // The Pagemap a device frame belongs to, or nullptr when the frame is
  // not device memory of any Pagemap (a foreign device page). No lock
  // needed (takes the mm's pagemap registry lock briefly).
  static Pagemap* FromPage(mm::DevicePfn pfn);

  // The allocation record (zdd) of an allocated device page of this
  // pagemap: pages migrated together share it. nullptr for a free page or
  // a frame outside this pagemap. Stable while the caller holds the page
  // (a reference, a page-table lock of an entry mapping it, or a notifier
  // sequence it rechecks).
  const void* AllocationOf(mm::DevicePfn pfn) const;
  // The Devmem of such a page (nullptr as above). Same stability rule.
  Devmem* DevmemOf(mm::DevicePfn pfn) const;

  // drm_pagemap_ops.device_map / device_unmap through the driver's ops,
  // with no lock of ours held; the caller keeps the page from being freed
  // as for AllocationOf. Errors: the driver's (the device cannot reach the
  // page; EFAULT by convention).
  Result<DeviceAddr> DeviceMap(const void* device, mm::DevicePfn pfn, unsigned order);
  void DeviceUnmap(const void* device, const DeviceAddr& addr);

  // drm_pagemap_populate_mm: fill [start, end) of `mm` with device memory
  // of this pagemap through PagemapOps::PopulateMm (which allocates a
  // Devmem and calls MigrateToDevmem). Must be called without the mmap
  // lock. EINVAL: null mm, empty, unaligned or wrapping range; EFAULT: the
  // address space is gone (!mm->Alive()); ENODEV: the pagemap was
  // unbound; otherwise the op's result (EOPNOTSUPP if it has none).
  Result<void> PopulateMm(uint64_t start, uint64_t end, const std::shared_ptr<mm::Mm>& mm,
                          uint64_t timeslice_ms);

  // drm_pagemap_migrate_to_devmem: moves every page of [start, end) of
  // `mm` into `devmem`'s frames, all or nothing. Consumes the reference
  // passed in, even on error: DevmemOps::Release runs once the allocation's
  // last page is freed, or before returning if no page used it. Takes the
  // mmap read lock itself: the caller must not hold it.
  // Errors (nothing migrated unless stated):
  //   EINVAL  null devmem, a devmem of another pagemap, already used, with
  //           another mm, size not a non-zero multiple of 4 KiB, range
  //           empty, unaligned, wrapping or longer than the allocation, or
  //           the range reaches beyond its VMA; a frame from
  //           PopulateDevmemPfn that is not ours;
  //   EOPNOTSUPP the Devmem has no ops;
  //   ENODEV  the pagemap was unbound;
  //   EFAULT  the address space is gone;
  //   ENOENT  no VMA at start;
  //   EBUSY   not private anonymous memory; not every page could be
  //           collected (pages of another owner, busy, pinned, shared);
  //           pages of this pagemap without can_migrate_same_pagemap, or
  //           of a peer without source_peer_migrates; a race while
  //           committing (the pages that moved stay moved, as the kernel);
  //           a frame from PopulateDevmemPfn that is still in use;
  //   ENOMEM  no memory for the bookkeeping or a bounce buffer;
  //   the driver's error from PopulateDevmemPfn or a copy op.
  // Success with nothing copied when every page already is a page of this
  // pagemap.
  Result<void> MigrateToDevmem(std::shared_ptr<Devmem> devmem, mm::Mm& mm, uint64_t start,
                               uint64_t end, const MigrateDetails& details);

  // drm_pagemap_evict_to_ram: moves every page of `devmem` still on the
  // device back to system memory, by device frame, without any mmap lock
  // (none is taken: the caller may hold any, and another thread may hold
  // the mmap lock of the spaces mapping the pages meanwhile; the page
  // table locks are taken inside the mm). Succeeds once the
  // allocation is detached (every page freed, Release ran); tries three
  // times. There is no EFAULT when the address space is gone: by-frame
  // eviction does not need the space (its pages went with it, or live on
  // in a fork child and are evicted there).
  // EINVAL: null devmem, one of another pagemap, or one never handed to
  // MigrateToDevmem; ENOMEM: no system page; EBUSY: pages stayed
  // (busy, or mapped somewhere they could not be unmapped); the driver's
  // PopulateDevmemPfn / CopyToRam error.
  Result<void> EvictToRam(const std::shared_ptr<Devmem>& devmem);

  // Device unbind: PopulateMm and MigrateToDevmem fail with ENODEV from
  // now on, and every device page in use is evicted to system memory by
  // frame (mm::EvictDevicePages, through the allocations' CopyToRam; no
  // mmap lock). Returns the pages that stayed (busy; the destructor waits
  // for them). Idempotent; may be called concurrently with anything.
  uint64_t Unbind();
  bool unbound() const { return unbound_.load(std::memory_order_acquire); }

  mm::DevicePagemap& pgmap() const { return *pgmap_; }
  const void* owner() const { return config_.owner; }
  // The device whose memory this is.
  const void* device() const { return config_.device; }
  Env& env() const { return *env_; }

  // Counters (racy snapshot; exact when no call is running).
  struct Stats {
    uint64_t migrations_to_devmem = 0;  // successful MigrateToDevmem calls that copied
    uint64_t migrations_to_ram = 0;     // CPU-touch migrations (MigrateToRam)
    uint64_t evictions = 0;             // EvictToRam calls that succeeded
    uint64_t pages_to_devmem = 0;       // pages copied into this pagemap (all paths)
    uint64_t pages_to_ram = 0;          // pages copied out to system memory (all paths)
    uint64_t peer_pages_direct = 0;     // pages copied device-to-device directly
    uint64_t peer_pages_bounced = 0;    // pages bounced through system memory
    uint64_t timeslice_waits = 0;       // CPU touches that waited for a timeslice
    uint64_t releases = 0;              // DevmemOps::Release calls
    uint64_t huge_pages_to_devmem = 0;  // 2 MiB units moved as one 2 MiB device page
  };
  Stats stats() const;
  // Allocations not yet released (racy).
  uint64_t DebugLiveAllocations() const { return live_records_.load(std::memory_order_relaxed); }

 private:
  friend struct DevmemRecord;
  explicit Pagemap(const PagemapConfig& config);

  // mm::DevicePagemapOps.
  void PageFree(mm::DevicePagemap& pgmap, uint64_t index) override;
  Result<void> MigrateToRam(mm::Mm& mm, uint64_t addr, mm::DevicePagemap& pgmap,
                            uint64_t index) override;
  Result<void> CopyToRam(mm::DevicePagemap& pgmap, uint64_t index, std::byte* to) override;

  // Whether a device frame is one of ours (no registry lookup).
  bool Owns(mm::DevicePfn pfn) const;
  // Release path of a Devmem that no page uses (early errors).
  void ReleaseUnused(Devmem& devmem);
  DevmemRecord* RecordOf(mm::DevicePfn pfn) const;

  // Constant after construction.
  const PagemapConfig config_;
  Env* const env_;
  std::unique_ptr<mm::DevicePagemap> pgmap_;

  std::atomic<bool> unbound_{false};
  std::atomic<uint64_t> live_records_{0};
  struct Counters {
    std::atomic<uint64_t> migrations_to_devmem{0}, migrations_to_ram{0}, evictions{0},
        pages_to_devmem{0}, pages_to_ram{0}, peer_pages_direct{0}, peer_pages_bounced{0},
        timeslice_waits{0}, releases{0}, huge_pages_to_devmem{0};
  };
  mutable Counters counters_;
};

}  // namespace usvm::gpusvm

#endif  // USVM_GPUSVM_PAGEMAP_H_
