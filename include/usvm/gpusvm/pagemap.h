// Pagemap and Devmem: device memory for GPU SVM (the kernel's drm_pagemap
// and drm_pagemap_devmem, seed 004).
//
// A Pagemap is one device-memory region (a GPU's VRAM) registered with the
// mm as device pages (an mm::DevicePagemap with an owner). It answers how a
// device addresses one of its pages (DeviceMap / DeviceUnmap: its own VRAM,
// or a peer's VRAM over an interconnect) and can fill a range of an address
// space with device memory (PopulateMm, through the driver's op).
//
// A Devmem is one allocation of device memory made for one migration (a
// driver buffer object): its device pages carry a shared per-allocation
// record (the kernel's zdd) in their zone data, so the allocation's
// Release op runs when its last page is freed, and a CPU touch of any page
// brings the whole allocation back to system memory (MigrateToRam),
// unless its timeslice has not yet expired.
//
// STATUS: this header holds what the gpusvm core (gpusvm.h) uses from
// device memory; the migration half (Devmem, MigrateToDevmem, EvictToRam,
// populate) is being built beside it.
#ifndef USVM_GPUSVM_PAGEMAP_H_
#define USVM_GPUSVM_PAGEMAP_H_

#include <cstdint>
#include <memory>

#include "usvm/base/result.h"
#include "usvm/gpusvm/device_addr.h"
#include "usvm/mm/device_pagemap.h"

namespace usvm::gpusvm {

class Pagemap;

// drm_pagemap_ops: how devices reach this memory.
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
};

struct PagemapConfig {
  uint64_t npages = 0;            // device pages (4 KiB each)
  const void* owner = nullptr;    // device_private_page_owner; peers share one
  const void* device = nullptr;   // the device whose memory this is
  PagemapOps* ops = nullptr;      // must outlive the pagemap
  mm::DeviceMemoryKind kind = mm::DeviceMemoryKind::kPrivate;
};

class Pagemap : private mm::DevicePagemapOps {
 public:
  // EINVAL: zero pages, null owner, device or ops; ENOMEM as
  // mm::DevicePagemap::TryCreate.
  static Result<std::unique_ptr<Pagemap>> TryCreate(const PagemapConfig& config);
  // Unregisters the device pages (evicting what is still mapped, see
  // mm::DevicePagemap's destructor).
  ~Pagemap() override;
  Pagemap(const Pagemap&) = delete;
  Pagemap& operator=(const Pagemap&) = delete;

  // The Pagemap a device frame belongs to, or nullptr when the frame is
  // not device memory of any Pagemap (a foreign device page).
  static Pagemap* FromPage(mm::DevicePfn pfn);

  // The allocation record (zdd) of an allocated device page of this
  // pagemap: pages migrated together share it. nullptr for a free page.
  const void* AllocationOf(mm::DevicePfn pfn) const;

  Result<DeviceAddr> DeviceMap(const void* device, mm::DevicePfn pfn, unsigned order);
  void DeviceUnmap(const void* device, const DeviceAddr& addr);

  mm::DevicePagemap& pgmap() const { return *pgmap_; }
  const void* owner() const { return config_.owner; }
  // The device whose memory this is.
  const void* device() const { return config_.device; }

 private:
  explicit Pagemap(const PagemapConfig& config);

  // mm::DevicePagemapOps.
  void PageFree(mm::DevicePagemap& pgmap, uint64_t index) override;
  Result<void> MigrateToRam(mm::Mm& mm, uint64_t addr, mm::DevicePagemap& pgmap,
                            uint64_t index) override;
  Result<void> CopyToRam(mm::DevicePagemap& pgmap, uint64_t index, std::byte* to) override;

  // Constant after construction.
  const PagemapConfig config_;
  std::unique_ptr<mm::DevicePagemap> pgmap_;
};

}  // namespace usvm::gpusvm

#endif  // USVM_GPUSVM_PAGEMAP_H_
