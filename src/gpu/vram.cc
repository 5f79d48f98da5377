#include "usvm/gpu/vram.h"

#include <sys/mman.h>

namespace usvm::gpu {

Result<std::unique_ptr<Vram>> Vram::TryCreate(uint64_t size, Env& env) {
  if (size == 0 || size % 4096 != 0) return Err(Errc::kInval, "VRAM size not a multiple of 4 KiB");
  auto buddy = USVM_TRY(BuddyAllocator::TryCreate(size, 18));
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) return Err(Errc::kNoMem, "cannot reserve VRAM arena");
  return std::unique_ptr<Vram>(new Vram(static_cast<std::byte*>(p), size, std::move(buddy), env));
}

Vram::~Vram() { munmap(base_, size_); }

Result<uint64_t> Vram::Alloc(uint64_t bytes) {
  if (bytes == 0) return Err(Errc::kInval, "zero-sized allocation");
  if (env_.ShouldFail("gpu.vram_alloc")) return Err(Errc::kNoMem, "injected VRAM allocation failure");
  return buddy_->Alloc(bytes);
}

Result<void> Vram::Free(uint64_t offset) { return buddy_->Free(offset); }

}  // namespace usvm::gpu
