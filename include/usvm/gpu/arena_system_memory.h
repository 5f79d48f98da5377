// ArenaSystemMemory: system frames in one lazily committed arena.
//
// An anonymous MAP_NORESERVE mapping of frame_count * 4 KiB: only frames
// that are touched cost memory. Frames are not allocated or tracked here;
// callers pick frame numbers (tests, benchmarks, tools without mm).
//
// Thread-safety: immutable after creation; FrameData is a pure function.
#ifndef USVM_GPU_ARENA_SYSTEM_MEMORY_H_
#define USVM_GPU_ARENA_SYSTEM_MEMORY_H_

#include <memory>

#include "usvm/base/result.h"
#include "usvm/gpu/system_memory.h"

namespace usvm::gpu {

class ArenaSystemMemory final : public SystemMemory {
 public:
  // EINVAL for zero frames or a size that overflows; ENOMEM if the arena
  // cannot be reserved.
  static Result<std::unique_ptr<ArenaSystemMemory>> TryCreate(uint64_t frame_count);
  ~ArenaSystemMemory() override;
  ArenaSystemMemory(const ArenaSystemMemory&) = delete;
  ArenaSystemMemory& operator=(const ArenaSystemMemory&) = delete;

  uint64_t frame_count() const override { return frames_; }
  std::byte* FrameData(uint64_t pfn) override { return base_ + (pfn << 12); }

 private:
  ArenaSystemMemory(std::byte* base, uint64_t frames) : base_(base), frames_(frames) {}
  std::byte* const base_;
  const uint64_t frames_;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_ARENA_SYSTEM_MEMORY_H_
