#include "usvm/gpu/buddy_allocator.h"

#include <bit>

namespace usvm::gpu {

namespace {
constexpr uint64_t kMinBlock = 4096;
}

Result<std::unique_ptr<BuddyAllocator>> BuddyAllocator::TryCreate(uint64_t size, uint32_t max_order) {
  if (size == 0 || size % kMinBlock != 0) return Err(Errc::kInval, "size not a multiple of 4 KiB");
  if (size >= (uint64_t{1} << 44)) return Err(Errc::kInval, "size too large");
  if (max_order < 9 || max_order > kMaxOrderLimit) return Err(Errc::kInval, "max_order out of [9, 30]");
  return std::unique_ptr<BuddyAllocator>(new BuddyAllocator(size, max_order));
}

BuddyAllocator::BuddyAllocator(uint64_t size, uint32_t max_order)
    : size_(size), pages_(size / kMinBlock), max_order_(max_order) {
  SpinLockGuard l(lock_);
  meta_.resize(pages_);
  free_head_.fill(kNil);
  // Carve [0, pages) into maximal naturally aligned blocks.
  uint64_t page = 0;
  while (page < pages_) {
    uint32_t order = max_order_;
    while (order > 0 && ((page & ((uint64_t{1} << order) - 1)) != 0 || page + (uint64_t{1} << order) > pages_))
      --order;
    PushFreeLocked(static_cast<uint32_t>(page), order);
    free_bytes_ += kMinBlock << order;
    page += uint64_t{1} << order;
  }
}

void BuddyAllocator::PushFreeLocked(uint32_t page, uint32_t order) {
  PageMeta& m = meta_[page];
  m.free_order = static_cast<int8_t>(order);
  m.prev = kNil;
  m.next = free_head_[order];
  if (m.next != kNil) meta_[m.next].prev = page;
  free_head_[order] = page;
  ++free_count_[order];
}

void BuddyAllocator::RemoveFreeLocked(uint32_t page) {
  PageMeta& m = meta_[page];
  const uint32_t order = static_cast<uint32_t>(m.free_order);
  if (m.prev != kNil) meta_[m.prev].next = m.next; else free_head_[order] = m.next;
  if (m.next != kNil) meta_[m.next].prev = m.prev;
  m.prev = m.next = kNil;
  m.free_order = -1;
  --free_count_[order];
}

Result<uint64_t> BuddyAllocator::Alloc(uint64_t bytes) {
  if (bytes == 0) return Err(Errc::kInval, "zero-sized allocation");
  if (bytes > (kMinBlock << max_order_)) return Err(Errc::kInval, "larger than the largest block");
  const uint32_t order = bytes <= kMinBlock ? 0 : static_cast<uint32_t>(std::bit_width((bytes - 1) / kMinBlock));
  SpinLockGuard l(lock_);
  uint32_t o = order;
  while (o <= max_order_ && free_head_[o] == kNil) ++o;
  if (o > max_order_) return Err(Errc::kNoMem, "no free block large enough");
  const uint32_t page = free_head_[o];
  RemoveFreeLocked(page);
  // Split down to the requested order, freeing the upper halves.
  while (o > order) {
    --o;
    PushFreeLocked(page + (uint32_t{1} << o), o);
  }
  meta_[page].alloc_order = static_cast<int8_t>(order);
  free_bytes_ -= kMinBlock << order;
  ++allocated_blocks_;
  return uint64_t{page} * kMinBlock;
}

Result<void> BuddyAllocator::Free(uint64_t offset) {
  if (offset % kMinBlock != 0 || offset >= size_) return Err(Errc::kInval, "offset is not a block");
  SpinLockGuard l(lock_);
  uint64_t page = offset / kMinBlock;
  if (meta_[page].alloc_order < 0) return Err(Errc::kInval, "no allocated block at offset");
  uint32_t order = static_cast<uint32_t>(meta_[page].alloc_order);
  meta_[page].alloc_order = -1;
  free_bytes_ += kMinBlock << order;
  --allocated_blocks_;
  // Merge with the buddy while it is free at the same order.
  while (order < max_order_) {
    const uint64_t buddy = page ^ (uint64_t{1} << order);
    if (buddy + (uint64_t{1} << order) > pages_) break;
    if (meta_[buddy].free_order != static_cast<int8_t>(order)) break;
    RemoveFreeLocked(static_cast<uint32_t>(buddy));
    page &= ~(uint64_t{1} << order);
    ++order;
  }
  PushFreeLocked(static_cast<uint32_t>(page), order);
  return {};
}

Result<uint64_t> BuddyAllocator::BlockSize(uint64_t offset) const {
  if (offset % kMinBlock != 0 || offset >= size_) return Err(Errc::kInval, "offset is not a block");
  SpinLockGuard l(lock_);
  const int8_t o = meta_[offset / kMinBlock].alloc_order;
  if (o < 0) return Err(Errc::kInval, "no allocated block at offset");
  return kMinBlock << o;
}

BuddyStats BuddyAllocator::Stats() const {
  BuddyStats s;
  SpinLockGuard l(lock_);
  s.size = size_;
  s.free_bytes = free_bytes_;
  s.allocated_bytes = size_ - free_bytes_;
  s.allocated_blocks = allocated_blocks_;
  for (uint32_t o = 0; o <= max_order_; ++o) {
    s.free_blocks_per_order[o] = free_count_[o];
    if (free_count_[o]) s.largest_free_block = kMinBlock << o;
  }
  s.fragmentation = s.free_bytes ? 1.0 - double(s.largest_free_block) / double(s.free_bytes) : 0.0;
  return s;
}

Result<void> BuddyAllocator::DebugCheck() const {
  SpinLockGuard l(lock_);
  // Mark every page covered by a free or allocated block; no page twice.
  std::vector<uint8_t> covered(pages_, 0);
  uint64_t free_bytes = 0, alloc_blocks = 0, alloc_bytes = 0;
  for (uint32_t o = 0; o <= max_order_; ++o) {
    uint64_t n = 0;
    uint32_t prev = kNil;
    for (uint32_t p = free_head_[o]; p != kNil; p = meta_[p].next) {
      if (meta_[p].free_order != static_cast<int8_t>(o) || meta_[p].prev != prev)
        return Err(Errc::kIo, "free list links broken");
      if (p & ((uint32_t{1} << o) - 1)) return Err(Errc::kIo, "free block misaligned");
      const uint64_t buddy = p ^ (uint64_t{1} << o);
      if (o < max_order_ && buddy + (uint64_t{1} << o) <= pages_ &&
          meta_[buddy].free_order == static_cast<int8_t>(o))
        return Err(Errc::kIo, "free buddies not coalesced");
      for (uint64_t i = p; i < p + (uint64_t{1} << o); ++i) {
        if (i >= pages_ || covered[i]) return Err(Errc::kIo, "free block overlaps");
        covered[i] = 1;
      }
      free_bytes += kMinBlock << o;
      prev = p;
      ++n;
    }
    if (n != free_count_[o]) return Err(Errc::kIo, "free count mismatch");
  }
  for (uint64_t p = 0; p < pages_; ++p) {
    const int8_t o = meta_[p].alloc_order;
    if (o < 0) continue;
    for (uint64_t i = p; i < p + (uint64_t{1} << o); ++i) {
      if (i >= pages_ || covered[i]) return Err(Errc::kIo, "allocated block overlaps");
      covered[i] = 2;
    }
    ++alloc_blocks;
    alloc_bytes += kMinBlock << o;
  }
  if (free_bytes != free_bytes_ || alloc_blocks != allocated_blocks_ || free_bytes + alloc_bytes != size_)
    return Err(Errc::kIo, "accounting mismatch");
  return {};
}

}  // namespace usvm::gpu
