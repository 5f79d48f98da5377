// PhysAddr and the small value types of the software GPU: page sizes,
// memory kinds and access kinds.
//
// The gpu layer never sees the mm layer. It names memory by *physical*
// address only: a system page frame number (reached through SystemMemory)
// or a byte offset into some GPU's VRAM. A PhysAddr is a plain value; it
// is checked against the machine (frame count, VRAM size, peer access)
// by every public call that takes one.
#ifndef USVM_GPU_PHYS_ADDR_H_
#define USVM_GPU_PHYS_ADDR_H_

#include <cstdint>

namespace usvm::gpu {

inline constexpr uint64_t kPageShift = 12;
inline constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;  // 4 KiB
inline constexpr uint64_t k64K = uint64_t{64} << 10;
inline constexpr uint64_t k2M = uint64_t{2} << 20;
// GPU virtual addresses are 48 bits wide.
inline constexpr uint64_t kVaBits = 48;
inline constexpr uint64_t kVaLimit = uint64_t{1} << kVaBits;
// GPU ids are small integers; peer VRAM is named by id in a PTE.
inline constexpr uint32_t kMaxGpus = 16;

// Leaf sizes of the GPU page table.
enum class PageSize : uint8_t { k4K = 0, k64K = 1, k2M = 2 };

constexpr uint64_t PageBytes(PageSize s) {
  return s == PageSize::k4K ? kPageSize : s == PageSize::k64K ? k64K : k2M;
}

// Where a physical address lives.
enum class MemKind : uint8_t {
  kSystem = 0,  // a system page frame; addr = pfn << 12
  kVram = 1,    // a byte offset into VRAM of GPU `gpu`
};

struct PhysAddr {
  MemKind kind = MemKind::kSystem;
  uint8_t gpu = 0;    // owner of the VRAM when kind == kVram
  uint64_t addr = 0;  // byte address (4 KiB aligned for page-granular use)

  static constexpr PhysAddr System(uint64_t pfn) { return {MemKind::kSystem, 0, pfn << kPageShift}; }
  static constexpr PhysAddr Vram(uint32_t gpu, uint64_t offset) {
    return {MemKind::kVram, static_cast<uint8_t>(gpu), offset};
  }
  constexpr uint64_t pfn() const { return addr >> kPageShift; }
  constexpr PhysAddr operator+(uint64_t off) const { return {kind, gpu, addr + off}; }
  friend constexpr bool operator==(const PhysAddr&, const PhysAddr&) = default;
};

// Access kinds, also used as permission bits. An atomic access needs the
// atomic permission and, because it writes, the write permission.
enum Access : uint8_t {
  kAccessRead = 1,
  kAccessWrite = 2,
  kAccessAtomic = 4,
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_PHYS_ADDR_H_
