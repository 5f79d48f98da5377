#include "usvm/gpu/arena_system_memory.h"

#include <sys/mman.h>

namespace usvm::gpu {

Result<std::unique_ptr<ArenaSystemMemory>> ArenaSystemMemory::TryCreate(uint64_t frame_count) {
  if (frame_count == 0) return Err(Errc::kInval, "zero frames");
  if (frame_count > (uint64_t{1} << 36)) return Err(Errc::kInval, "too many frames");
  void* p = mmap(nullptr, frame_count << 12, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return Err(Errc::kNoMem, "cannot reserve system memory arena");
  return std::unique_ptr<ArenaSystemMemory>(
      new ArenaSystemMemory(static_cast<std::byte*>(p), frame_count));
}

ArenaSystemMemory::~ArenaSystemMemory() { munmap(base_, frames_ << 12); }

}  // namespace usvm::gpu
