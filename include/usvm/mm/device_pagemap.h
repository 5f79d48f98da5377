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
// (Unregister / destructor) first migrates every page still mapped by a
// live address space back to RAM through MigrateToRam.
//
// Thread-safety: reference counts are atomics; the set of address spaces
// that may map pages is guarded by lock_.
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

using DevicePfn = uint64_t;

enum class DeviceMemoryKind : uint8_t { kPrivate, kCoherent };

class DevicePagemapOps {
 public:
  virtual ~DevicePagemapOps() = default;
  // The last reference to device page `index` dropped: the driver may
  // reuse its memory.
  virtual void PageFree(DevicePagemap& pgmap, uint64_t index) {}
  // The CPU touched device-private page `index`, mapped at `addr` of `as`
  // (dev_pagemap_ops.migrate_to_ram). Called with the mmap read lock held
  // and no page table lock. As do_swap_page, the fault path has rechecked
  // the entry under its page table lock, holds a reference on the page and
  // holds its page lock (TryLockPage) for the whole call: pass the page as
  // MigrateVma::fault_page (PfnOf(index)), which Setup then treats as
  // locked by the caller. Must migrate at least that page to system
  // memory; an error fails the CPU access with it (VM_FAULT_SIGBUS).
  // (Long-term pins of device-coherent pages come here too, with the page
  // locked the same way.)
  virtual Result<void> MigrateToRam(AddressSpace& as, uint64_t addr, DevicePagemap& pgmap,
                                    uint64_t index) = 0;
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
  // Migrates every page still mapped back to RAM, then unregisters.
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
  void* zone_data(uint64_t index) const { return pages_[index].zone_data; }
  void set_zone_data(uint64_t index, void* d) { pages_[index].zone_data = d; }

  // kCoherent: the page's 4 KiB (CPU and device both access them). nullptr
  // for device-private memory.
  std::byte* CoherentData(uint64_t index) const {
    return arena_ ? arena_ + (index << kPageShift) : nullptr;
  }

  // The mm records every address space it maps one of our pages into, so
  // destruction can find them. (Called by the mm.)
  void NoteMapper(const std::shared_ptr<AddressSpace>& as) USVM_EXCLUDES(lock_);

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
  mutable Mutex lock_;
  std::vector<std::weak_ptr<AddressSpace>> mappers_ USVM_GUARDED_BY(lock_);
};

}  // namespace usvm::mm

#endif  // USVM_MM_DEVICE_PAGEMAP_H_
