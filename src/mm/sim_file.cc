#include "usvm/mm/sim_file.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace usvm::mm {

Result<std::shared_ptr<SimFile>> SimFile::TryCreate(FramePool& pool, uint64_t size,
                                                    std::string name, bool shmem) {
  if (size > kMaxSize) return Err(Errc::kFBig, "file size too large");
  return std::shared_ptr<SimFile>(new SimFile(pool, size, std::move(name), shmem));
}

SimFile::~SimFile() {
  MutexLock l(lock_);
  for (auto& [pgoff, pfn] : pages_) pool_.Put(pfn);
}

Result<Pfn> SimFile::FindOrCreateLocked(uint64_t pgoff) {
  auto it = pages_.find(pgoff);
  if (it != pages_.end()) return it->second;
  Pfn pfn = USVM_TRY(pool_.AllocPage(FramePool::Zero::kYes));
  pages_.emplace(pgoff, pfn);
  return pfn;
}

Result<Pfn> SimFile::GetPage(uint64_t pgoff) {
  MutexLock l(lock_);
  if (pgoff >= (size_ + kPageSize - 1) / kPageSize)
    return Err(Errc::kFault, "SIGBUS: page beyond end of file");
  Pfn pfn = USVM_TRY(FindOrCreateLocked(pgoff));
  pool_.Get(pfn);
  return pfn;
}

Result<void> SimFile::Pwrite(uint64_t offset, const void* src, uint64_t len) {
  if (offset + len < offset || offset + len > kMaxSize)
    return Err(Errc::kFBig, "pwrite: beyond the maximum file size");
  if (len == 0) return {};
  MutexLock l(lock_);
  // All or nothing: create every missing page first, and drop the new ones
  // again if one cannot be had.
  std::vector<uint64_t> created;
  for (uint64_t pg = offset / kPageSize; pg <= (offset + len - 1) / kPageSize; ++pg) {
    if (pages_.count(pg)) continue;
    auto pfn = pool_.AllocPage(FramePool::Zero::kYes);
    if (!pfn) {
      for (uint64_t c : created) {
        pool_.Put(pages_[c]);
        pages_.erase(c);
      }
      return Err(pfn.error());
    }
    pages_.emplace(pg, *pfn);
    created.push_back(pg);
  }
  const auto* s = static_cast<const std::byte*>(src);
  uint64_t done = 0;
  while (done < len) {
    const uint64_t off = offset + done;
    const uint64_t n = std::min(len - done, kPageSize - (off % kPageSize));
    std::memcpy(pool_.Data(pages_.at(off / kPageSize)) + off % kPageSize, s + done, n);
    done += n;
  }
  size_ = std::max(size_, offset + len);
  return {};
}

Result<uint64_t> SimFile::Pread(uint64_t offset, void* dst, uint64_t len) const {
  MutexLock l(lock_);
  if (offset >= size_) return uint64_t{0};
  len = std::min(len, size_ - offset);
  auto* d = static_cast<std::byte*>(dst);
  uint64_t done = 0;
  while (done < len) {
    const uint64_t off = offset + done;
    const uint64_t n = std::min(len - done, kPageSize - (off % kPageSize));
    auto it = pages_.find(off / kPageSize);
    if (it == pages_.end())
      std::memset(d + done, 0, n);
    else
      std::memcpy(d + done, pool_.Data(it->second) + off % kPageSize, n);
    done += n;
  }
  return len;
}

uint64_t SimFile::size() const {
  MutexLock l(lock_);
  return size_;
}

uint64_t SimFile::cached_pages() const {
  MutexLock l(lock_);
  return pages_.size();
}

}  // namespace usvm::mm
