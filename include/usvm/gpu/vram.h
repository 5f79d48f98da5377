// Vram: one GPU's device memory, real bytes plus a buddy allocator.
//
// The bytes live in an anonymous MAP_NORESERVE arena of the configured
// size, so a 16 GiB VRAM costs only what is touched. Allocation is by
// BuddyAllocator (4 KiB .. max block), returning byte offsets; a PhysAddr
// of kind kVram names an offset into this arena. Alloc fails with ENOMEM
// when full: the driver above evicts and retries.
//
// Thread-safety: Alloc/Free/Stats are safe for concurrent use (the buddy
// allocator's lock). Data() is a pure function; the bytes themselves are
// shared memory, ordered by whoever hands out offsets (the driver).
#ifndef USVM_GPU_VRAM_H_
#define USVM_GPU_VRAM_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "usvm/base/env.h"
#include "usvm/base/result.h"
#include "usvm/gpu/buddy_allocator.h"

namespace usvm::gpu {

class Vram {
 public:
  // size: a non-zero multiple of 4 KiB. EINVAL otherwise; ENOMEM if the
  // arena cannot be reserved.
  static Result<std::unique_ptr<Vram>> TryCreate(uint64_t size, Env& env);
  ~Vram();
  Vram(const Vram&) = delete;
  Vram& operator=(const Vram&) = delete;

  // A block of at least `bytes` (power of two, 4 KiB .. 1 GiB); its
  // offset. Fault point "gpu.vram_alloc" fails it with ENOMEM.
  Result<uint64_t> Alloc(uint64_t bytes);
  // EINVAL if no allocated block starts at `offset`.
  Result<void> Free(uint64_t offset);

  // The byte at `offset`. REQUIRES: offset < size().
  std::byte* Data(uint64_t offset) { return base_ + offset; }
  uint64_t size() const { return size_; }
  BuddyAllocator& allocator() { return *buddy_; }
  BuddyStats Stats() const { return buddy_->Stats(); }

 private:
  Vram(std::byte* base, uint64_t size, std::unique_ptr<BuddyAllocator> buddy, Env& env)
      : base_(base), size_(size), buddy_(std::move(buddy)), env_(env) {}

  // Constant after construction.
  std::byte* const base_;
  const uint64_t size_;
  const std::unique_ptr<BuddyAllocator> buddy_;
  Env& env_;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_VRAM_H_
