// SimFile: a simulated file with a page cache (the kernel's inode +
// address_space), mapped by MAP_SHARED and MAP_PRIVATE file mappings. Also
// the object behind shared anonymous memory (shmem), as in Linux.
//
// Pages are created on first use (zero-filled) and stay in the page cache
// until the file dies; the cache holds one reference on each frame and every
// mapping of a page holds another. Pwrite/Pread go straight to the cached
// frames, so they are coherent with shared mappings.
//
// Thread-safety: safe for concurrent use; lock_ guards the page index.
// Lifetime: the FramePool must outlive every SimFile made from it.
#ifndef USVM_MM_SIM_FILE_H_
#define USVM_MM_SIM_FILE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::mm {

class SimFile {
 public:
  // A file of `size` bytes reading as zeros. `shmem` marks the object
  // behind a shared anonymous mapping. EFBIG above kMaxSize.
  static Result<std::shared_ptr<SimFile>> TryCreate(FramePool& pool, uint64_t size,
                                                    std::string name = "file",
                                                    bool shmem = false);
  ~SimFile();
  SimFile(const SimFile&) = delete;
  SimFile& operator=(const SimFile&) = delete;

  // The largest file size (1 PiB).
  static constexpr uint64_t kMaxSize = uint64_t{1} << 50;

  // pwrite: extends the file if needed; all or nothing. ENOMEM if pages
  // cannot be made (nothing changes), EFBIG beyond kMaxSize.
  Result<void> Pwrite(uint64_t offset, const void* src, uint64_t len) USVM_EXCLUDES(lock_);
  // pread: returns the bytes read (short at end of file).
  Result<uint64_t> Pread(uint64_t offset, void* dst, uint64_t len) const USVM_EXCLUDES(lock_);

  uint64_t size() const USVM_EXCLUDES(lock_);
  const std::string& name() const { return name_; }
  bool is_shmem() const { return shmem_; }
  // Pages currently in the page cache.
  uint64_t cached_pages() const USVM_EXCLUDES(lock_);

  // The page at page index `pgoff`, created if absent, with one extra
  // reference for the caller (a mapping). EFAULT ("SIGBUS") if pgoff is at
  // or beyond the end of the file; ENOMEM if no frame is free.
  Result<Pfn> GetPage(uint64_t pgoff) USVM_EXCLUDES(lock_);

  FramePool& pool() const { return pool_; }

 private:
  SimFile(FramePool& pool, uint64_t size, std::string name, bool shmem)
      : pool_(pool), name_(std::move(name)), shmem_(shmem), size_(size) {}
  Result<Pfn> FindOrCreateLocked(uint64_t pgoff) USVM_REQUIRES(lock_);

  FramePool& pool_;
  const std::string name_;
  const bool shmem_;
  mutable Mutex lock_;
  uint64_t size_ USVM_GUARDED_BY(lock_);
  std::unordered_map<uint64_t, Pfn> pages_ USVM_GUARDED_BY(lock_);
};

}  // namespace usvm::mm

#endif  // USVM_MM_SIM_FILE_H_
