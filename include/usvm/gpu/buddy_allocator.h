// BuddyAllocator: power-of-two blocks of a contiguous space (VRAM), the
// drm_buddy of this world.
//
// The space [0, size) is cut into 4 KiB pages. A block of order k is
// 4 KiB << k bytes, naturally aligned; orders run from 0 (4 KiB) to
// max_order (>= 9, 2 MiB; up to 30). Alloc(bytes) rounds up to a power of
// two, takes the smallest free block that fits and splits it; Free(offset)
// merges the block with its free buddy for as long as it can, so freeing
// everything restores the initial maximal blocks.
//
// Invariants (checked by DebugCheck): free blocks never overlap each
// other or an allocated block; a free block's buddy is never free at the
// same order (fully coalesced); free_bytes + allocated_bytes == size.
//
// Per-page metadata is a small array (12 bytes per 4 KiB page), free lists
// are intrusive and index-based, so Alloc and Free are O(max_order) and
// never allocate.
//
// Thread-safety: safe for concurrent use (one internal spinlock; critical
// sections are short and never sleep).
#ifndef USVM_GPU_BUDDY_ALLOCATOR_H_
#define USVM_GPU_BUDDY_ALLOCATOR_H_

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"

namespace usvm::gpu {

struct BuddyStats {
  uint64_t size = 0;
  uint64_t free_bytes = 0;
  uint64_t allocated_bytes = 0;
  uint64_t allocated_blocks = 0;
  uint64_t largest_free_block = 0;
  // 1 - largest_free_block / free_bytes: 0 when all free space is one
  // block, near 1 when it is shattered. 0 when nothing is free.
  double fragmentation = 0;
  std::array<uint64_t, 31> free_blocks_per_order{};
};

class BuddyAllocator {
 public:
  static constexpr uint32_t kMaxOrderLimit = 30;

  // size: a non-zero multiple of 4 KiB below 2^44; max_order in [9, 30].
  // EINVAL otherwise.
  static Result<std::unique_ptr<BuddyAllocator>> TryCreate(uint64_t size, uint32_t max_order = 18);
  BuddyAllocator(const BuddyAllocator&) = delete;
  BuddyAllocator& operator=(const BuddyAllocator&) = delete;

  // A block of at least `bytes` (rounded up to a power of two >= 4 KiB);
  // returns its offset. EINVAL for 0 or more than the largest order;
  // ENOMEM when no free block of that order or larger exists.
  Result<uint64_t> Alloc(uint64_t bytes);
  // Frees the block that starts at `offset`. EINVAL if no allocated block
  // starts there (double free, wrong offset); nothing changes then.
  Result<void> Free(uint64_t offset);
  // Bytes of the allocated block starting at `offset`; EINVAL if none.
  Result<uint64_t> BlockSize(uint64_t offset) const;

  uint64_t size() const { return size_; }
  uint32_t max_order() const { return max_order_; }
  BuddyStats Stats() const;
  // Walks every structure and checks the invariants above; EIO on a
  // violation. For tests.
  Result<void> DebugCheck() const;

 private:
  static constexpr uint32_t kNil = UINT32_MAX;
  struct PageMeta {
    uint32_t prev = kNil;     // free-list links, valid while free_order >= 0
    uint32_t next = kNil;
    int8_t free_order = -1;   // head page of a free block: its order
    int8_t alloc_order = -1;  // head page of an allocated block: its order
  };

  BuddyAllocator(uint64_t size, uint32_t max_order);
  void PushFreeLocked(uint32_t page, uint32_t order) USVM_REQUIRES(lock_);
  void RemoveFreeLocked(uint32_t page) USVM_REQUIRES(lock_);

  // Constant after construction.
  const uint64_t size_;
  const uint64_t pages_;
  const uint32_t max_order_;

  mutable SpinLock lock_;
  std::vector<PageMeta> meta_ USVM_GUARDED_BY(lock_);
  std::array<uint32_t, kMaxOrderLimit + 1> free_head_ USVM_GUARDED_BY(lock_);
  std::array<uint64_t, kMaxOrderLimit + 1> free_count_ USVM_GUARDED_BY(lock_){};
  uint64_t free_bytes_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t allocated_blocks_ USVM_GUARDED_BY(lock_) = 0;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_BUDDY_ALLOCATOR_H_
