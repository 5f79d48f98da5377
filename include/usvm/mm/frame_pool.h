// FramePool: the simulated machine's system memory (the kernel's page
// allocator plus struct page).
//
// Bytes live in one large arena reserved with mmap(MAP_NORESERVE): a 64 GiB
// pool costs only the pages that are touched. Frame metadata lives in a
// second lazily committed array, so an untouched frame costs nothing.
//
// Frames are always 4 KiB units with their own reference count. A "huge"
// allocation is 512 contiguous frames aligned to 2 MiB, each with its own
// count of 1; a huge mapping holds one reference on each. Splitting a huge
// mapping into 4 KiB entries therefore changes no count, and each frame goes
// back to the pool on its own when its last reference drops.
//
// Allocation works in 2 MiB blocks: 4 KiB frames come from a partially used
// block (or a fresh one); a huge allocation takes a wholly free block. A
// block whose every frame is free becomes available for huge allocations
// again (full coalescing at 2 MiB granularity).
//
// Frame 0 is the shared zero page: never handed out, never written.
//
// The hugetlb pool (the kernel's hstate for 2 MiB pages, nr_hugepages):
// SetHugetlbPages moves wholly free 2 MiB blocks into a separate pool that
// only MAP_HUGETLB mappings use; it starts empty, as on a fresh machine.
// Mappings reserve pool pages at mmap time (HugetlbReserve, ENOMEM when
// free - reserved is too small) and take them at fault time
// (HugetlbAlloc). A pool page is 512 frames with their own counts like a
// huge allocation; when the last frame's count drops it goes back to the
// pool (or to the page allocator if the pool was shrunk meanwhile). The
// pool is shared by every address space of this FramePool.
//
// Reference counts are atomics and may be changed without the pool lock;
// the block lists and free stacks are guarded by lock_.
//
// Fault points: "frame_pool.alloc", "frame_pool.alloc_huge",
// "frame_pool.alloc_hugetlb".
#ifndef USVM_MM_FRAME_POOL_H_
#define USVM_MM_FRAME_POOL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "usvm/base/env.h"
#include "usvm/base/intrusive_list.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

class FramePool {
 public:
  // Whether a new frame's bytes must read as zero.
  enum class Zero { kYes, kNo };

  // `bytes`: the pool size, a multiple of 2 MiB, at least 4 MiB. EINVAL on
  // a bad size; ENOMEM if the arena cannot be reserved.
  static Result<std::unique_ptr<FramePool>> TryCreate(uint64_t bytes, Env& env = Env::Default());
  ~FramePool();
  FramePool(const FramePool&) = delete;
  FramePool& operator=(const FramePool&) = delete;

  // One 4 KiB frame with refcount 1. ENOMEM when none is free.
  Result<Pfn> AllocPage(Zero zero = Zero::kYes) USVM_EXCLUDES(lock_);
  // 512 contiguous frames at a 2 MiB-aligned frame number, each with
  // refcount 1; returns the first. ENOMEM when no whole block is free.
  Result<Pfn> AllocHuge(Zero zero = Zero::kYes) USVM_EXCLUDES(lock_);

  // Reference counting. Put frees the frame when the count reaches zero.
  // REQUIRES: pfn is allocated (refcount > 0); not the zero page.
  void Get(Pfn pfn, uint32_t n = 1);
  void Put(Pfn pfn) USVM_EXCLUDES(lock_);
  uint32_t RefCount(Pfn pfn) const;
  // Long-term pins (FOLL_PIN): a pin is also a reference. Pinned pages are
  // never migrated and are copied, not shared, at fork.
  void Pin(Pfn pfn);
  void Unpin(Pfn pfn) USVM_EXCLUDES(lock_);
  uint32_t PinCount(Pfn pfn) const;

  // The frame's 4096 bytes. Valid for any pfn < frames().
  std::byte* Data(Pfn pfn) const { return arena_ + (pfn << kPageShift); }
  // The frame number behind a pointer into the arena.
  Pfn PfnOf(const void* p) const {
    return static_cast<Pfn>((static_cast<const std::byte*>(p) - arena_) >> kPageShift);
  }
  static constexpr Pfn kZeroPfn = 0;

  uint64_t frames() const { return nframes_; }
  uint64_t bytes() const { return nframes_ << kPageShift; }

  struct Stats {
    uint64_t total_frames = 0;
    uint64_t free_frames = 0;
    uint64_t free_huge_blocks = 0;  // wholly free 2 MiB blocks
    uint64_t allocs = 0;
    uint64_t huge_allocs = 0;
    uint64_t frees = 0;
  };
  Stats GetStats() const USVM_EXCLUDES(lock_);

  // ---- hugetlb pool ----
  // nr_hugepages: grows the pool to n pages with wholly free 2 MiB blocks,
  // or shrinks it by giving free, unreserved pool pages back (pages in use
  // go back to the page allocator when they are freed). Returns the pool
  // size now, which may be short of n when memory is short (as the sysctl).
  uint64_t SetHugetlbPages(uint64_t n) USVM_EXCLUDES(lock_);
  struct HugetlbStats {
    uint64_t total = 0;     // HugePages_Total: pages in the pool
    uint64_t free = 0;      // HugePages_Free: not in use (reserved ones included)
    uint64_t reserved = 0;  // HugePages_Rsvd: promised to mappings, not yet faulted
    uint64_t target = 0;    // the last SetHugetlbPages request
  };
  HugetlbStats GetHugetlbStats() const USVM_EXCLUDES(lock_);
  // Reserves n pool pages (hugetlb_acct_memory). ENOMEM: fewer than n free
  // pages are unreserved. Unreserve gives unused reservations back.
  Result<void> HugetlbReserve(uint64_t n) USVM_EXCLUDES(lock_);
  void HugetlbUnreserve(uint64_t n) USVM_EXCLUDES(lock_);
  // Takes a free pool page: 512 zeroed frames with refcount 1 each; returns
  // the first. `reserved`: consumes a reservation made earlier; otherwise
  // only an unreserved free page may be taken. ENOSPC when there is none
  // (alloc_hugetlb_folio); ENOMEM only from fault injection.
  Result<Pfn> HugetlbAlloc(bool reserved) USVM_EXCLUDES(lock_);
  // Whether pfn lies in a block of the hugetlb pool.
  bool IsHugetlbFrame(Pfn pfn) const USVM_EXCLUDES(lock_);

 private:
  // Metadata of one frame. Lives in zero-filled lazily committed memory, so
  // an all-zero Frame must be valid: fields are plain integers, accessed
  // through std::atomic_ref where they are shared.
  struct Frame {
    uint32_t refcount;   // atomic_ref; 0 = free
    uint32_t next_free;  // free stack link (1-based index in block), lock_
    uint32_t flags;      // kUsed; owned by whoever holds the frame
    uint32_t pincount;   // atomic_ref
  };
  static constexpr uint32_t kUsed = 1;  // bytes may be non-zero
  // Metadata of one 2 MiB block.
  struct Block {
    ListNode link;        // partial_ or free_blocks_, lock_
    uint32_t nfree;       // free frames in this block, lock_
    uint32_t free_head;   // 1-based index of the top of the free stack, lock_
    uint32_t next_fresh;  // frames [next_fresh, 512) were never handed out
    uint32_t hugetlb;     // 1: the block belongs to the hugetlb pool, lock_
  };
  FramePool(Env& env, std::byte* arena, Frame* frames, Block* blocks, uint64_t nframes);
  void FreeFrame(Pfn pfn) USVM_EXCLUDES(lock_);
  Block* TakeFreeBlockLocked() USVM_REQUIRES(lock_);
  void PrepareFrame(Pfn pfn, Zero zero);

  Env& env_;
  std::byte* const arena_;  // nframes_ * 4 KiB, MAP_NORESERVE
  Frame* const frames_;     // nframes_ entries, MAP_NORESERVE
  Block* const blocks_;     // nblocks_ entries
  const uint64_t nframes_;
  const uint64_t nblocks_;

  mutable Mutex lock_;
  // Blocks with some but not all frames free; each has a free stack.
  IntrusiveList<Block, &Block::link> partial_ USVM_GUARDED_BY(lock_);
  // Wholly free blocks that were used before.
  IntrusiveList<Block, &Block::link> free_blocks_ USVM_GUARDED_BY(lock_);
  // Blocks [bump_, nblocks_) were never used (bytes and metadata zero).
  uint64_t bump_ USVM_GUARDED_BY(lock_);
  uint64_t free_frames_ USVM_GUARDED_BY(lock_);
  uint64_t allocs_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t huge_allocs_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t frees_ USVM_GUARDED_BY(lock_) = 0;
  // The hugetlb pool: free pool pages (whole blocks, nfree == 512) and the
  // counters of HugetlbStats. Blocks of the pool that are in use are on no
  // list; their nfree counts frames whose count dropped to zero.
  IntrusiveList<Block, &Block::link> hugetlb_free_ USVM_GUARDED_BY(lock_);
  uint64_t hugetlb_total_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t hugetlb_resv_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t hugetlb_target_ USVM_GUARDED_BY(lock_) = 0;
};

}  // namespace usvm::mm

#endif  // USVM_MM_FRAME_POOL_H_
