#include "usvm/mm/frame_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstring>

namespace usvm::mm {

namespace {

void* ReserveZeroed(uint64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// The byte arena: 2 MiB aligned and MADV_HUGEPAGE, so that the host backs
// each 2 MiB block the pool hands out (THP, 2 MiB device pages) with one
// huge page where it can, and a 2 MiB copy does not walk 512 host TLB
// entries. Lazily committed as before.
void* ReserveArena(uint64_t bytes) {
  const uint64_t slack = kHugePageSize;
  void* p = mmap(nullptr, bytes + slack, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  const auto base = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (base + slack - 1) & ~(uintptr_t{slack} - 1);
  if (aligned > base) munmap(p, aligned - base);
  if (const uintptr_t tail = base + bytes + slack - (aligned + bytes); tail > 0)
    munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  (void)madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // a hint only
  return reinterpret_cast<void*>(aligned);
}

uint32_t& Ref(const void* f) { return *const_cast<uint32_t*>(static_cast<const uint32_t*>(f)); }

}  // namespace

Result<std::unique_ptr<FramePool>> FramePool::TryCreate(uint64_t bytes, Env& env) {
  if (bytes < 2 * kHugePageSize || bytes % kHugePageSize != 0)
    return Err(Errc::kInval, "pool size must be a multiple of 2 MiB, at least 4 MiB");
  if (bytes > (uint64_t{1} << 46)) return Err(Errc::kInval, "pool size above 64 TiB");
  const uint64_t nframes = bytes >> kPageShift;
  const uint64_t nblocks = nframes / kPagesPerHuge;
  auto* arena = static_cast<std::byte*>(ReserveArena(bytes));
  auto* frames = static_cast<Frame*>(ReserveZeroed(nframes * sizeof(Frame)));
  auto* blocks = static_cast<Block*>(ReserveZeroed(nblocks * sizeof(Block)));
  if (!arena || !frames || !blocks) {
    if (arena) munmap(arena, bytes);
    if (frames) munmap(frames, nframes * sizeof(Frame));
    if (blocks) munmap(blocks, nblocks * sizeof(Block));
    return Err(Errc::kNoMem, "cannot reserve the frame arena");
  }
  return std::unique_ptr<FramePool>(new FramePool(env, arena, frames, blocks, nframes));
}

FramePool::FramePool(Env& env, std::byte* arena, Frame* frames, Block* blocks, uint64_t nframes)
    : env_(env),
      arena_(arena),
      frames_(frames),
      blocks_(blocks),
      nframes_(nframes),
      nblocks_(nframes / kPagesPerHuge),
      bump_(0),
      free_frames_(nframes) {
  // Frame 0 is the zero page: allocated forever, never written.
  MutexLock l(lock_);
  Block* b = TakeFreeBlockLocked();
  b->next_fresh = 1;
  b->nfree = kPagesPerHuge - 1;
  partial_.push_back(b);
  --free_frames_;
  frames_[kZeroPfn].refcount = 1;
}

FramePool::~FramePool() {
  munmap(arena_, nframes_ << kPageShift);
  munmap(frames_, nframes_ * sizeof(Frame));
  munmap(blocks_, nblocks_ * sizeof(Block));
}

FramePool::Block* FramePool::TakeFreeBlockLocked() {
  if (Block* b = free_blocks_.pop_front()) return b;
  if (bump_ == nblocks_) return nullptr;
  Block* b = &blocks_[bump_++];
  b->nfree = kPagesPerHuge;
  b->free_head = 0;
  b->next_fresh = 0;
  return b;
}

void FramePool::PrepareFrame(Pfn pfn, Zero zero) {
  Frame& f = frames_[pfn];
  if ((f.flags & kUsed) && zero == Zero::kYes) std::memset(Data(pfn), 0, kPageSize);
  f.flags |= kUsed;
  std::atomic_ref<uint32_t>(f.refcount).store(1, std::memory_order_relaxed);
}

Result<Pfn> FramePool::AllocPage(Zero zero) {
  if (env_.ShouldFail("frame_pool.alloc")) return Err(Errc::kNoMem, "injected: frame_pool.alloc");
  Pfn pfn;
  {
    MutexLock l(lock_);
    Block* b = partial_.front();
    if (!b) {
      b = TakeFreeBlockLocked();
      if (!b) return Err(Errc::kNoMem, "out of system frames");
      partial_.push_back(b);
    }
    const uint64_t base = static_cast<uint64_t>(b - blocks_) * kPagesPerHuge;
    if (b->free_head != 0) {
      pfn = base + b->free_head - 1;
      b->free_head = frames_[pfn].next_free;
    } else {
      assert(b->next_fresh < kPagesPerHuge);
      pfn = base + b->next_fresh++;
    }
    if (--b->nfree == 0) partial_.erase(b);
    --free_frames_;
    ++allocs_;
  }
  PrepareFrame(pfn, zero);
  return pfn;
}

Result<Pfn> FramePool::AllocHuge(Zero zero) {
  if (env_.ShouldFail("frame_pool.alloc_huge"))
    return Err(Errc::kNoMem, "injected: frame_pool.alloc_huge");
  Pfn base;
  {
    MutexLock l(lock_);
    Block* b = TakeFreeBlockLocked();
    if (!b) return Err(Errc::kNoMem, "no free 2 MiB block");
    b->nfree = 0;
    b->free_head = 0;
    b->next_fresh = kPagesPerHuge;
    base = static_cast<uint64_t>(b - blocks_) * kPagesPerHuge;
    free_frames_ -= kPagesPerHuge;
    ++huge_allocs_;
  }
  for (uint64_t i = 0; i < kPagesPerHuge; ++i) PrepareFrame(base + i, zero);
  return base;
}

void FramePool::Get(Pfn pfn, uint32_t n) {
  assert(pfn < nframes_);
  [[maybe_unused]] uint32_t old =
      std::atomic_ref<uint32_t>(frames_[pfn].refcount).fetch_add(n, std::memory_order_relaxed);
  assert(old > 0);
}

void FramePool::Put(Pfn pfn) {
  assert(pfn < nframes_ && pfn != kZeroPfn);
  uint32_t old = std::atomic_ref<uint32_t>(frames_[pfn].refcount).fetch_sub(1, std::memory_order_acq_rel);
  assert(old > 0);
  if (old == 1) FreeFrame(pfn);
}

uint32_t FramePool::RefCount(Pfn pfn) const {
  // Acquire: a caller that sees the count drop to 1 (copy-on-write reuse)
  // must also see every access the other user made before its Put.
  return std::atomic_ref<uint32_t>(Ref(&frames_[pfn].refcount)).load(std::memory_order_acquire);
}

void FramePool::Pin(Pfn pfn) {
  Get(pfn);
  std::atomic_ref<uint32_t>(frames_[pfn].pincount).fetch_add(1, std::memory_order_relaxed);
}

void FramePool::Unpin(Pfn pfn) {
  [[maybe_unused]] uint32_t old =
      std::atomic_ref<uint32_t>(frames_[pfn].pincount).fetch_sub(1, std::memory_order_relaxed);
  assert(old > 0);
  Put(pfn);
}

uint32_t FramePool::PinCount(Pfn pfn) const {
  return std::atomic_ref<uint32_t>(Ref(&frames_[pfn].pincount)).load(std::memory_order_acquire);
}

void FramePool::FreeFrame(Pfn pfn) {
  MutexLock l(lock_);
  Block* b = &blocks_[pfn / kPagesPerHuge];
  const uint64_t base = (pfn / kPagesPerHuge) * kPagesPerHuge;
  if (b->hugetlb) {
    // A hugetlb page goes back whole, once all its frames are free.
    ++frees_;
    if (++b->nfree < kPagesPerHuge) return;
    if (hugetlb_total_ > hugetlb_target_) {
      // The pool was shrunk while this page was in use: a surplus page.
      b->hugetlb = 0;
      b->free_head = 0;
      b->next_fresh = 0;
      --hugetlb_total_;
      free_frames_ += kPagesPerHuge;
      free_blocks_.push_back(b);
    } else {
      hugetlb_free_.push_back(b);
    }
    return;
  }
  frames_[pfn].next_free = b->free_head;
  b->free_head = static_cast<uint32_t>(pfn - base + 1);
  ++b->nfree;
  ++free_frames_;
  ++frees_;
  if (b->nfree == 1) partial_.push_back(b);
  if (b->nfree == kPagesPerHuge) {
    partial_.erase(b);
    free_blocks_.push_back(b);
  }
}

FramePool::Stats FramePool::GetStats() const {
  MutexLock l(lock_);
  Stats s;
  s.total_frames = nframes_;
  s.free_frames = free_frames_;
  s.free_huge_blocks = free_blocks_.size() + (nblocks_ - bump_);
  s.allocs = allocs_;
  s.huge_allocs = huge_allocs_;
  s.frees = frees_;
  return s;
}

// ---- hugetlb pool ---------------------------------------------------------------

uint64_t FramePool::SetHugetlbPages(uint64_t n) {
  MutexLock l(lock_);
  hugetlb_target_ = n;
  while (hugetlb_total_ < n) {
    Block* b = TakeFreeBlockLocked();
    if (!b) break;
    b->hugetlb = 1;
    b->nfree = kPagesPerHuge;
    free_frames_ -= kPagesPerHuge;
    ++hugetlb_total_;
    hugetlb_free_.push_back(b);
  }
  // Shrink: only free pages that no reservation still counts on.
  while (hugetlb_total_ > n && hugetlb_free_.size() > hugetlb_resv_) {
    Block* b = hugetlb_free_.pop_front();
    b->hugetlb = 0;
    b->free_head = 0;
    b->next_fresh = 0;  // PrepareFrame zeroes frames that were used
    --hugetlb_total_;
    free_frames_ += kPagesPerHuge;
    free_blocks_.push_back(b);
  }
  return hugetlb_total_;
}

FramePool::HugetlbStats FramePool::GetHugetlbStats() const {
  MutexLock l(lock_);
  return {hugetlb_total_, hugetlb_free_.size(), hugetlb_resv_, hugetlb_target_};
}

Result<void> FramePool::HugetlbReserve(uint64_t n) {
  MutexLock l(lock_);
  if (n > hugetlb_free_.size() - hugetlb_resv_)
    return Err(Errc::kNoMem, "hugetlb: not enough free huge pages to reserve");
  hugetlb_resv_ += n;
  return {};
}

void FramePool::HugetlbUnreserve(uint64_t n) {
  MutexLock l(lock_);
  assert(n <= hugetlb_resv_);
  hugetlb_resv_ -= std::min(n, hugetlb_resv_);
}

Result<Pfn> FramePool::HugetlbAlloc(bool reserved) {
  if (env_.ShouldFail("frame_pool.alloc_hugetlb"))
    return Err(Errc::kNoMem, "injected: frame_pool.alloc_hugetlb");
  Pfn base;
  {
    MutexLock l(lock_);
    if (reserved && hugetlb_resv_ == 0) reserved = false;
    if (!reserved && hugetlb_free_.size() <= hugetlb_resv_)
      return Err(Errc::kNoSpc, "hugetlb: no free huge page");
    Block* b = hugetlb_free_.pop_front();
    if (reserved) --hugetlb_resv_;
    b->nfree = 0;
    base = static_cast<uint64_t>(b - blocks_) * kPagesPerHuge;
    ++huge_allocs_;
  }
  for (uint64_t i = 0; i < kPagesPerHuge; ++i) PrepareFrame(base + i, Zero::kYes);
  return base;
}

bool FramePool::IsHugetlbFrame(Pfn pfn) const {
  if (pfn >= nframes_) return false;
  MutexLock l(lock_);
  return blocks_[pfn / kPagesPerHuge].hugetlb != 0;
}

}  // namespace usvm::mm
