// Basic mm vocabulary: page sizes, protection bits, mmap/madvise/mremap
// flags with Linux's values, and the page frame number type.
#ifndef USVM_MM_TYPES_H_
#define USVM_MM_TYPES_H_

#include <cstdint>

namespace usvm::mm {

inline constexpr uint64_t kPageShift = 12;
inline constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;
inline constexpr uint64_t kPageMask = ~(kPageSize - 1);
inline constexpr uint64_t kHugeShift = 21;  // PMD-sized transparent huge page
inline constexpr uint64_t kHugePageSize = uint64_t{1} << kHugeShift;
inline constexpr uint64_t kHugeMask = ~(kHugePageSize - 1);
inline constexpr uint64_t kPagesPerHuge = kHugePageSize / kPageSize;  // 512

// A system page frame number: frame i holds bytes [i * 4096, (i+1) * 4096)
// of the FramePool's arena.
using Pfn = uint64_t;
inline constexpr Pfn kInvalidPfn = ~Pfn{0};

inline constexpr uint64_t PageAlignDown(uint64_t a) { return a & kPageMask; }
inline constexpr uint64_t PageAlignUp(uint64_t a) { return (a + kPageSize - 1) & kPageMask; }
inline constexpr bool IsPageAligned(uint64_t a) { return (a & (kPageSize - 1)) == 0; }
inline constexpr bool IsHugeAligned(uint64_t a) { return (a & (kHugePageSize - 1)) == 0; }

// mmap/mprotect protection (PROT_*).
enum : uint32_t {
  kProtNone = 0x0,
  kProtRead = 0x1,
  kProtWrite = 0x2,
  kProtExec = 0x4,
  kProtAll = kProtRead | kProtWrite | kProtExec,
  kProtSem = 0x8,  // accepted by mprotect and ignored (x86)
  // mprotect only: extend the change to the start (end) of a VMA that grows
  // down (up). No VMA here can grow: EINVAL where one is found.
  kProtGrowsDown = 0x01000000,
  kProtGrowsUp = 0x02000000,
};

// mmap flags (MAP_*), Linux values.
enum : uint32_t {
  kMapShared = 0x01,
  kMapPrivate = 0x02,
  kMapFixed = 0x10,
  kMapAnonymous = 0x20,
  kMapNoReserve = 0x4000,  // hugetlb: no reservation at mmap (faults may fail)
  kMapPopulate = 0x8000,
  kMapHugetlb = 0x40000,   // 2 MiB pages from the hugetlb pool (FramePool)
  kMapFixedNoReplace = 0x100000,
};
// MAP_HUGE_SHIFT / MAP_HUGE_MASK: the log2 of the huge page size in the top
// flag bits, with MAP_HUGETLB. 0 means the default size; only 2 MiB exists.
inline constexpr unsigned kMapHugeShift = 26;
inline constexpr uint32_t kMapHugeMask = 0x3fu << kMapHugeShift;
inline constexpr uint32_t kMapHuge2MB = 21u << kMapHugeShift;
inline constexpr uint64_t HugeAlignUp(uint64_t a) { return (a + kHugePageSize - 1) & kHugeMask; }

// madvise advice (MADV_*), Linux values.
enum : int {
  kMadvNormal = 0,
  kMadvDontNeed = 4,
  kMadvFree = 8,
  kMadvHugePage = 14,
  kMadvNoHugePage = 15,
  kMadvCollapse = 25,
};

// mremap flags (MREMAP_*), Linux values.
enum : uint32_t {
  kMremapMayMove = 1,
  kMremapFixed = 2,
  kMremapDontUnmap = 4,
};

}  // namespace usvm::mm

#endif  // USVM_MM_TYPES_H_
