// SystemMemory: how the GPU reaches system page frames.
//
// The gpu layer does not know the mm layer's frame pool; it sees system
// memory as numbered 4 KiB frames with real bytes behind them. The mm
// frame pool implements this interface (through the driver) so that GPU
// loads, stores and copies touch the very bytes the CPU side sees;
// ArenaSystemMemory is a standalone implementation for tests and tools.
//
// Thread-safety: implementations must allow concurrent calls. FrameData
// of a frame must stay valid while any GPU mapping or copy names it; the
// driver guarantees that by zapping and invalidating before a frame is
// freed.
#ifndef USVM_GPU_SYSTEM_MEMORY_H_
#define USVM_GPU_SYSTEM_MEMORY_H_

#include <cstddef>
#include <cstdint>

namespace usvm::gpu {

class SystemMemory {
 public:
  virtual ~SystemMemory() = default;
  // Frames are numbered [0, frame_count()).
  virtual uint64_t frame_count() const = 0;
  // The 4 KiB of frame `pfn`. REQUIRES: pfn < frame_count().
  virtual std::byte* FrameData(uint64_t pfn) = 0;
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_SYSTEM_MEMORY_H_
