// DeviceAddr: how one device reaches one page (the kernel's dma_addr_t for
// a system page, struct drm_pagemap_addr for a device page).
#ifndef USVM_GPUSVM_DEVICE_ADDR_H_
#define USVM_GPUSVM_DEVICE_ADDR_H_

#include <cstdint>

namespace usvm::gpusvm {

// Which path a device takes to the page (drm_interconnect_protocol).
enum class AddrProto : uint8_t {
  kNone = 0,  // not mapped
  kSystem,    // a system page, through the device's DMA mapping
  kLocal,     // the device's own memory (its VRAM)
  kPeer,      // another device's memory, over a fast interconnect
};

const char* AddrProtoName(AddrProto p);

// One mapping: the device address of the first byte, the protocol, and the
// mapping's size as a page order (0: 4 KiB, 4: 64 KiB, 9: 2 MiB). A Pages
// array holds one DeviceAddr per 4 KiB page; a mapping of order k fills the
// entry of its first page and leaves the next 2^k - 1 entries unused, as
// drm_gpusvm does.
// A trivial type, so page arrays are allocated without being cleared:
// write DeviceAddr{} for an unmapped entry.
struct DeviceAddr {
  uint64_t addr;
  AddrProto proto;
  uint8_t order;

  bool mapped() const { return proto != AddrProto::kNone; }
  friend bool operator==(const DeviceAddr&, const DeviceAddr&) = default;
};

}  // namespace usvm::gpusvm

#endif  // USVM_GPUSVM_DEVICE_ADDR_H_
