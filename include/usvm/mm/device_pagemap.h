// DevicePagemap: device memory registered with the mm as page frames (the
// kernel's struct dev_pagemap from devm_memremap_pages, seed 004).
//
// Device frames live in their own frame space: a DevicePfn names one page
// of one pagemap, distinct from system Pfns. Each device page has a
// reference count (one per CPU mapping, one per migrator or pin) and a
// driver cookie (zone_device_data). The driver owns the actual bytes (in
// its VRAM); the mm only moves device page numbers in and out of CPU page
// tables.
//
// Kinds:
// - kPrivate (MEMORY_DEVICE_PRIVATE): the CPU cannot access it. CPU page
//   tables hold device-private entries; a CPU touch calls
//   Ops::MigrateToRam, which must move the page back (MigrateVma with
//   kMigrateSelectDevicePrivate and this owner). Range fault reports such
//   pages without faulting only to the owner (dev_private_owner).
// - kCoherent (MEMORY_DEVICE_COHERENT): CPU-accessible device memory. CPU
//   page tables map it with ordinary present entries and CPU accesses
//   reach its bytes directly (CoherentData, a lazily committed arena the
//   pagemap owns, shared with the device). Long-term pins migrate it to
//   system memory first (through MigrateToRam), as the kernel does.
//
// Lifecycle: a driver hands out a free page with InitPage (refcount 1,
// as zone_device_page_init), maps it through MigrateVma, and gets
// Ops::PageFree when the last reference goes. Destroying the pagemap
// (memunmap_pages) evicts every mapped page to system memory by device
// frame (migrate_device.h, with Ops::CopyToRam), in every address space
// that maps it, and waits until every reference is gone, so PageFree runs
// for every page that was in use.
//
// Reverse map: the mm records every CPU page-table entry that names one of
// our pages (a device-private entry, a present entry of coherent memory,
// or a migration entry whose source is the page) as (address space,
// address), so device-frame migration finds every mapper, forked children
// included, without the mmap lock. The mm changes an entry and its record
// under the entry's page table lock; rmap_lock_ nests inside it:
//   mmap lock -> page table lock -> rmap_lock_.
// Records hold raw AddressSpace pointers: an address space drops its
// records (zap) before it is destroyed, and RmapSnapshot turns them into
// strong references under rmap_lock_ (skipping spaces being destroyed).
//
// Thread-safety: reference counts and page flags are atomics; the rmap is
// guarded by rmap_lock_.
#ifndef USVM_MM_DEVICE_PAGEMAP_H_
#define USVM_MM_DEVICE_PAGEMAP_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

class AddressSpace;
class DevicePagemap;
class Mm;

using DevicePfn = uint64_t;

enum class DeviceMemoryKind : uint8_t { kPrivate, kCoherent };

class DevicePagemapOps {
 public:
  virtual ~DevicePagemapOps() = default;
  // The last reference to device page `index` dropped: the driver may
  // reuse its memory.
  virtual void PageFree(DevicePagemap& pgmap, uint64_t index) {}
  // The CPU touched device-private page `index`, mapped at `addr` of `mm`
  // (dev_pagemap_ops.migrate_to_ram). Called with the mmap read lock held
  // and no page table lock. As do_swap_page, the fault path has rechecked
  // the entry under its page table lock, holds a reference on the page and
  // holds its page lock (TryLockPage) for the whole call: pass the page as
  // MigrateVma::fault_page (PfnOf(index)), which Setup then treats as
  // locked by the caller. Must migrate at least that page to system
  // memory; an error fails the CPU access with it (VM_FAULT_SIGBUS).
  // (Long-term pins of device-coherent pages come here too, with the page
  // locked the same way.)
  virtual Result<void> MigrateToRam(Mm& mm, uint64_t addr, DevicePagemap& pgmap,
                                    uint64_t index) = 0;
  // Device-frame eviction (EvictDevicePages, pagemap teardown): copy the
  // 4 KiB of device page `index` to `to`, a system page (drm_pagemap's
  // copy_to_ram). Called with no mm lock held, the page locked and
  // unmapped (migration entries). An error leaves the page on the device.
  // The default copies device-coherent pages (the mm can read them) and
  // fails with ENOSYS for device-private ones; such a driver's pages then
  // stay on the device, and pagemap teardown brings them home through
  // MigrateToRam instead (with each mapper's mmap lock).
  virtual Result<void> CopyToRam(DevicePagemap& pgmap, uint64_t index, std::byte* to);
};

class DevicePagemap {
 public:
  // `npages` device pages; `owner` is the driver cookie compared with
  // dev_private_owner / pgmap_owner; `ops` must outlive the pagemap.
  // EINVAL: zero pages, null ops or null owner (memremap_pages: "Missing
  // owner"); ENOMEM: no room in the device frame
  // space, or (kCoherent) the arena cannot be reserved.
  static Result<std::unique_ptr<DevicePagemap>> TryCreate(
      uint64_t npages, const void* owner, DevicePagemapOps* ops,
      DeviceMemoryKind kind = DeviceMemoryKind::kPrivate);
  // memunmap_pages: evicts every mapped page to system memory (by device
  // frame, in every address space), then waits until every page's last
  // reference is gone (each calls Ops::PageFree), then unregisters.
  // A driver that keeps a reference forever makes this wait forever, as
  // in the kernel.
  ~DevicePagemap();
  DevicePagemap(const DevicePagemap&) = delete;
  DevicePagemap& operator=(const DevicePagemap&) = delete;

  // The pagemap a device frame belongs to (nullptr if none).
  static DevicePagemap* Lookup(DevicePfn dpfn);

  DeviceMemoryKind kind() const { return kind_; }
  bool coherent() const { return kind_ == DeviceMemoryKind::kCoherent; }
  const void* owner() const { return owner_; }
  DevicePagemapOps& ops() const { return *ops_; }
  uint64_t npages() const { return npages_; }
  DevicePfn base() const { return base_; }
  DevicePfn PfnOf(uint64_t index) const { return base_ + index; }
  uint64_t IndexOf(DevicePfn dpfn) const { return dpfn - base_; }

  // zone_device_page_init: a free page becomes allocated with refcount 1.
  // EINVAL: index out of range; EBUSY: the page is in use.
  Result<void> InitPage(uint64_t index, void* zone_data = nullptr);
  void Get(uint64_t index);
  // get_page_unless_zero: a reference on an allocated page; false if the
  // page is free.
  bool TryGet(uint64_t index);
  // Drops a reference; the last one calls Ops::PageFree.
  void Put(uint64_t index);
  uint32_t RefCount(uint64_t index) const;
  // The page lock (PG_locked): taken by the CPU fault path around
  // MigrateToRam and by migrators for every device page they collect, so
  // one page is migrated by one thread at a time. Never waited for: a
  // loser skips the page (migrators) or retries (faults).
  // REQUIRES for all three: the page is allocated and stays so (the caller
  // holds a reference, or a page table lock of an entry mapping it).
  bool TryLockPage(uint64_t index);
  void UnlockPage(uint64_t index);
  bool PageLocked(uint64_t index) const;
  // A pointer for the layer that created the pagemap (gpusvm's Pagemap
  // puts itself here, so a device frame leads back to it). Set once,
  // before any page is handed out; read without a lock afterwards.
  void set_layer_data(void* p) { layer_data_ = p; }
  void* layer_data() const { return layer_data_; }
  void* zone_data(uint64_t index) const { return pages_[index].zone_data; }
  void set_zone_data(uint64_t index, void* d) { pages_[index].zone_data = d; }

  // kCoherent: the page's 4 KiB (CPU and device both access them). nullptr
  // for device-private memory.
  std::byte* CoherentData(uint64_t index) const {
    return arena_ ? arena_ + (index << kPageShift) : nullptr;
  }

  // ---- reverse map (maintained by the mm; see the top of this file) ----
  // REQUIRES for Add/Remove/Move: the page table lock of the entry, held
  // exclusively. Remove of a record that is not there is a no-op.
  // n > 1: pages index..index+n-1 mapped at addr, addr + 4 KiB, ... (a
  // 2 MiB entry), under one acquisition of the lock.
  void RmapAdd(uint64_t index, AddressSpace* as, uint64_t addr, uint64_t n = 1)
      USVM_EXCLUDES(rmap_lock_);
  void RmapRemove(uint64_t index, AddressSpace* as, uint64_t addr, uint64_t n = 1)
      USVM_EXCLUDES(rmap_lock_);
  void RmapMove(uint64_t index, AddressSpace* as, uint64_t from, uint64_t to)
      USVM_EXCLUDES(rmap_lock_);
  // Appends the mappers of page `index` to `out` as (space, address), and
  // a strong reference to `keep` for each space not already there; spaces
  // being destroyed are left out. The raw pointers in `out` stay valid
  // while `keep` holds them.
  void RmapSnapshot(uint64_t index, std::vector<std::pair<AddressSpace*, uint64_t>>& out,
                    std::vector<std::shared_ptr<AddressSpace>>& keep) const USVM_EXCLUDES(rmap_lock_);
  // Number of records of page `index` (racy, for tests).
  size_t DebugRmapCount(uint64_t index) const USVM_EXCLUDES(rmap_lock_);

 private:
  // Teardown's fallback when eviction by frame makes no progress: a CPU
  // read of every mapping of pfns (MigrateToRam through the fault path).
  void FaultHomeMappedPages(const std::vector<DevicePfn>& pfns) USVM_EXCLUDES(rmap_lock_);

 public:

  // Pages currently allocated (refcount > 0); racy, for tests.
  uint64_t DebugPagesInUse() const;

 private:
  static constexpr uint32_t kPageLockedBit = 1u << 0;
  struct Page {
    std::atomic<uint32_t> refcount{0};
    std::atomic<uint32_t> flags{0};  // kPageLockedBit
    void* zone_data = nullptr;  // written by the driver while it owns the page
  };
  DevicePagemap(uint64_t npages, const void* owner, DevicePagemapOps* ops, DevicePfn base,
                DeviceMemoryKind kind, std::byte* arena);

  const DeviceMemoryKind kind_;
  std::byte* const arena_;  // kCoherent only, MAP_NORESERVE
  const uint64_t npages_;
  const void* const owner_;
  DevicePagemapOps* const ops_;
  const DevicePfn base_;
  std::unique_ptr<Page[]> pages_;
  void* layer_data_ = nullptr;  // see set_layer_data
  struct RmapRecord {
    AddressSpace* as;  // non-owning: the space removes its records first
    uint64_t addr;
  };
  mutable Mutex rmap_lock_;
  // One list per page (sized at construction).
  std::vector<std::vector<RmapRecord>> rmap_ USVM_GUARDED_BY(rmap_lock_);
};

}  // namespace usvm::mm

#endif  // USVM_MM_DEVICE_PAGEMAP_H_
