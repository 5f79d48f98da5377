#include "usvm/gpusvm/pagemap.h"

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

Result<std::unique_ptr<Pagemap>> Pagemap::TryCreate(const PagemapConfig& config) {
  if (config.npages == 0 || !config.owner || !config.device || !config.ops)
    return Err(Errc::kInval, "pagemap: zero pages, or no owner, device or ops");
  std::unique_ptr<Pagemap> pm(new Pagemap(config));
  pm->pgmap_ = USVM_TRY(mm::DevicePagemap::TryCreate(config.npages, config.owner, pm.get(),
                                                      config.kind));
  pm->pgmap_->set_layer_data(pm.get());
  return pm;
}

Pagemap::Pagemap(const PagemapConfig& config) : config_(config) {}

Pagemap::~Pagemap() { pgmap_.reset(); }

Pagemap* Pagemap::FromPage(mm::DevicePfn pfn) {
  mm::DevicePagemap* dp = mm::DevicePagemap::Lookup(pfn);
  if (!dp) return nullptr;
  // Only pagemaps made by TryCreate carry a Pagemap; any other device
  // memory (another driver's) is foreign.
  auto* pm = static_cast<Pagemap*>(dp->layer_data());
  return pm && pm->pgmap_.get() == dp ? pm : nullptr;
}

const void* Pagemap::AllocationOf(mm::DevicePfn pfn) const {
  return pgmap_->zone_data(pgmap_->IndexOf(pfn));
}

Result<DeviceAddr> Pagemap::DeviceMap(const void* device, mm::DevicePfn pfn, unsigned order) {
  return config_.ops->DeviceMap(*this, device, pfn, order);
}

void Pagemap::DeviceUnmap(const void* device, const DeviceAddr& addr) {
  config_.ops->DeviceUnmap(*this, device, addr);
}

void Pagemap::PageFree(mm::DevicePagemap&, uint64_t) {}

Result<void> Pagemap::MigrateToRam(mm::Mm&, uint64_t, mm::DevicePagemap&, uint64_t) {
  // Filled in by the device-memory migration work (Devmem).
  return Err(Errc::kNoSys, "pagemap: migrate_to_ram not implemented yet");
}

Result<void> Pagemap::CopyToRam(mm::DevicePagemap& pgmap, uint64_t index, std::byte* to) {
  return mm::DevicePagemapOps::CopyToRam(pgmap, index, to);
}

}  // namespace usvm::gpusvm
