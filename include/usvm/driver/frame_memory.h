// FrameMemory: the simulated machine's system memory (the mm frame pool)
// as the software GPUs see it (gpu::SystemMemory), so GPU loads, stores
// and copies touch the very bytes the CPU side sees. One per machine,
// shared by every GPU; it must outlive them.
#ifndef USVM_DRIVER_FRAME_MEMORY_H_
#define USVM_DRIVER_FRAME_MEMORY_H_

#include "usvm/gpu/system_memory.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::driver {

class FrameMemory final : public gpu::SystemMemory {
 public:
  explicit FrameMemory(mm::FramePool& pool) : pool_(pool) {}
  uint64_t frame_count() const override { return pool_.frames(); }
  std::byte* FrameData(uint64_t pfn) override { return pool_.Data(pfn); }

 private:
  mm::FramePool& pool_;
};

}  // namespace usvm::driver

#endif  // USVM_DRIVER_FRAME_MEMORY_H_
