// GpuSvm (drm_gpusvm): notifiers, ranges and driver-owned pages.
// The design and the locking are described in include/usvm/gpusvm/gpusvm.h.
#include "usvm/gpusvm/gpusvm.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <memory>

#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/mm.h"
#include "usvm/mm/types.h"

namespace usvm::gpusvm {

namespace {

// HMM_RANGE_DEFAULT_TIMEOUT: how long range faults may keep racing with
// invalidations before GetPages gives up.
constexpr uint64_t kHmmTimeoutNs = 1'000'000'000;

constexpr uint64_t AlignDown(uint64_t a, uint64_t size) { return a & ~(size - 1); }

// How many 4 KiB entries starting at entry i of a range at `start` the CPU
// mapping behind hmm word `w` covers, rounded down to a power of two
// (drm_gpusvm_hmm_pfn_to_order): the rest of a huge mapping from this
// page, clamped to the range.
uint64_t PfnStep(uint64_t w, uint64_t start, uint64_t i, uint64_t npages) {
  uint64_t size = uint64_t{1} << mm::HmmOrder(w);
  size -= ((start >> mm::kPageShift) + i) & (size - 1);
  if (i + size > npages) size = npages - i;
  return std::bit_floor(size);
}

unsigned Log2(uint64_t v) { return static_cast<unsigned>(std::countr_zero(v)); }

// The GpuSvm whose invalidation callback this thread is running, if any.
thread_local const GpuSvm* tls_in_callback = nullptr;

}  // namespace

const char* ScanResultName(ScanResult r) {
  switch (r) {
    case ScanResult::kUnpopulated: return "unpopulated";
    case ScanResult::kEqual: return "equal";
    case ScanResult::kOther: return "other";
    case ScanResult::kSystem: return "system";
    case ScanResult::kMixedDevice: return "mixed-device";
    case ScanResult::kMixed: return "mixed";
  }
  return "?";
}

Pages::~Pages() {
  // The owner must FreePages (or never have mapped them): a device mapping
  // must not outlive the object that records it.
  assert(mapped_ == 0 && "Pages destroyed with device mappings; call FreePages");
}

// The interval callback (drm_gpusvm_notifier_invalidate), shared by every
// notifier of one GpuSvm.
class GpuSvm::IntervalOps final : public mm::MmuIntervalNotifierOps {
 public:
  explicit IntervalOps(GpuSvm& svm) : svm_(svm) {}

  bool Invalidate(mm::MmuIntervalNotifier* sub, const mm::NotifierRange& range,
                  uint64_t cur_seq) override {
    return Run(sub, range, cur_seq, nullptr);
  }
  bool InvalidateStart(mm::MmuIntervalNotifier* sub, const mm::NotifierRange& range,
                       uint64_t cur_seq, mm::MmuIntervalFinish** finish) override {
    *finish = nullptr;
    return Run(sub, range, cur_seq, finish);
  }

 private:
  bool Run(mm::MmuIntervalNotifier* sub, const mm::NotifierRange& range, uint64_t cur_seq,
           mm::MmuIntervalFinish** finish) {
    // Taking the notifier lock may sleep.
    if (!range.blockable) return false;
    Notifier* n = Notifier::OwnerOf(sub);
    WriteLock l(svm_.notifier_lock_);
    const GpuSvm* outer = tls_in_callback;
    tls_in_callback = &svm_;
    struct Restore {
      const GpuSvm* o;
      ~Restore() { tls_in_callback = o; }
    } restore{outer};
    sub->SetSeq(cur_seq);
    svm_.stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
    if (finish)
      svm_.config_.ops->InvalidateStart(svm_, *n, range, finish);
    else
      svm_.config_.ops->Invalidate(svm_, *n, range);
    return true;
  }

  GpuSvm& svm_;
};

// ---- construction -----------------------------------------------------------

Result<std::unique_ptr<GpuSvm>> GpuSvm::TryCreate(GpuSvmConfig config) {
  if (!config.mm) {
    // Pages-only mode (userptr): nothing of the range machinery may be set.
    if (config.ops || !config.chunk_sizes.empty() || config.mm_start || config.mm_range ||
        config.notifier_size)
      return Err(Errc::kInval, "gpusvm: pages-only mode takes no ops, chunks, window or notifier size");
  } else {
    if (!config.ops) return Err(Errc::kInval, "gpusvm: no ops");
    const auto& c = config.chunk_sizes;
    if (c.empty() || c.back() != kSize4K)
      return Err(Errc::kInval, "gpusvm: chunk sizes must end in 4 KiB");
    for (size_t i = 0; i < c.size(); ++i) {
      if (!std::has_single_bit(c[i]) || c[i] < kSize4K)
        return Err(Errc::kInval, "gpusvm: a chunk size is not a power of two >= 4 KiB");
      if (i > 0 && c[i] >= c[i - 1]) return Err(Errc::kInval, "gpusvm: chunk sizes not descending");
    }
    if (!std::has_single_bit(config.notifier_size) || config.notifier_size < c.front())
      return Err(Errc::kInval, "gpusvm: notifier size must be a power of two >= the largest chunk");
    if (config.mm_range == 0 || !mm::IsPageAligned(config.mm_start) ||
        !mm::IsPageAligned(config.mm_range) || config.mm_start + config.mm_range < config.mm_start)
      return Err(Errc::kInval, "gpusvm: empty, unaligned or overflowing window");
  }
  return std::unique_ptr<GpuSvm>(new GpuSvm(std::move(config)));
}

GpuSvm::GpuSvm(GpuSvmConfig config)
    : config_(std::move(config)),
      env_(config_.env ? config_.env : &Env::Default()),
      interval_ops_(std::make_unique<IntervalOps>(*this)),
      own_driver_lock_(config_.driver_lock ? nullptr : std::make_unique<DriverLock>()),
      driver_lock_(config_.driver_lock ? config_.driver_lock : own_driver_lock_.get()) {}

GpuSvm::~GpuSvm() { Fini(); }

void GpuSvm::Fini() {
  // drm_gpusvm_fini: every range goes, with its pages unmapped first (the
  // driver's RangeFree then finds nothing left to unmap), then every
  // notifier with its last range.
  DriverLockGuard g(*driver_lock_);
  for (Notifier* n = notifier_list_.front(); n;) {
    Notifier* next = notifier_list_.next(n);
    for (Range* r = n->range_list_.front(); r;) {
      Range* rnext = n->range_list_.next(r);
      if (r->pages_) UnmapPages(r->pages_, Ctx{});
      auto res = RangeRemove(r);
      assert(res.has_value() && "gpusvm fini: range remove failed");
      (void)res;
      r = rnext;
    }
    n = next;
  }
  assert(notifier_list_.empty());
}

bool GpuSvm::CheckDriverLock() {
  if (driver_lock_->HeldByCurrentThread()) return true;
  stats_.driver_lock_violations.fetch_add(1, std::memory_order_relaxed);
  return false;
}

// ---- notifiers ------------------------------------------------------------

Result<Notifier*> GpuSvm::NotifierCreate(uint64_t start, uint64_t end) {
  if (env_->ShouldFail("gpusvm.notifier_alloc")) return Err(Errc::kNoMem, "gpusvm: notifier allocation");
  Notifier* n = config_.ops->NotifierAlloc();
  if (!n) return Err(Errc::kNoMem, "gpusvm: notifier allocation");
  n->gpusvm_ = this;
  n->node_.start = start;
  n->node_.last = end - 1;
  auto r = config_.mm->InsertIntervalNotifier(&n->sub_, start, end - start, interval_ops_.get());
  if (!r) {
    config_.ops->NotifierFree(n);
    return Err(r.error());
  }
  stats_.notifier_inserts.fetch_add(1, std::memory_order_relaxed);
  return n;
}

// Removes the interval notifier of `n` (if still inserted) and frees it.
// `n` is not in the notifier tree.
void GpuSvm::NotifierDestroy(Notifier* n) {
  if (n->sub_.hub()) {
    auto r = n->sub_.Remove();
    assert(r.has_value());
    (void)r;
    stats_.notifier_removes.fetch_add(1, std::memory_order_relaxed);
  }
  config_.ops->NotifierFree(n);
}

Notifier* GpuSvm::NotifierFind(uint64_t start, uint64_t end) const {
  if (end <= start) return nullptr;
  return notifiers_.IterFirst(start, end - 1);
}

Notifier* GpuSvm::NotifierNext(Notifier* n, uint64_t end) const {
  Notifier* next = notifier_list_.next(n);
  return next && next->start() < end ? next : nullptr;
}

// ---- ranges -----------------------------------------------------------------

Range* GpuSvm::RangeFind(Notifier* n, uint64_t start, uint64_t end) {
  if (!n || end <= start) return nullptr;
  return n->ranges_.IterFirst(start, end - 1);
}

Range* GpuSvm::RangeNext(Range* r, uint64_t end) {
  Range* next = r->notifier_->range_list_.next(r);
  return next && next->start() < end ? next : nullptr;
}

bool GpuSvm::Overlaps(const Notifier* n, uint64_t start, uint64_t end) const {
  if (n) return n->ranges_.IterFirst(start, end - 1) != nullptr;
  // One notifier per range: any notifier in the way is a range.
  return notifiers_.IterFirst(start, end - 1) != nullptr;
}

bool GpuSvm::CheckPages(mm::MmuIntervalNotifier* sub, uint64_t start, uint64_t end,
                        const void* owner) {
  // drm_gpusvm_check_pages: a snapshot (no fault requested) of [start, end);
  // every page must be present. The caller holds the mmap lock (read).
  mm::Mm& mmp = *config_.mm;
  const uint64_t npages = (end - start) >> mm::kPageShift;
  auto pfns = std::make_unique<uint64_t[]>(npages);
  mm::HmmRange r;
  r.notifier = sub;
  r.start = start;
  r.end = end;
  r.hmm_pfns = pfns.get();
  r.dev_private_owner = owner;
  const uint64_t deadline = env_->NowNs() + kHmmTimeoutNs;
  for (;;) {
    r.notifier_seq = sub->ReadBegin();
    for (uint64_t i = 0; i < npages; ++i) pfns[i] = 0;
    mmp.mmap_lock().AssertReaderHeld();
    auto res = mmp.RangeFault(r);
    if (res) break;
    if (res.error() != Errc::kBusy || env_->NowNs() > deadline) return false;
  }
  for (uint64_t i = 0; i < npages;) {
    if (!(pfns[i] & mm::kPfnValid)) return false;
    i += PfnStep(pfns[i], start, i, npages);
  }
  return true;
}

uint64_t GpuSvm::ChunkSize(const Notifier* n, mm::MmuIntervalNotifier* check_sub,
                           uint64_t vma_start, uint64_t vma_end,
                           uint64_t fault_addr, uint64_t gpuva_start, uint64_t gpuva_end,
                           uint64_t bound_start, uint64_t bound_end, size_t first_chunk,
                           const Ctx& ctx, size_t* index) {
  const auto& chunks = config_.chunk_sizes;
  for (size_t i = first_chunk; i < chunks.size(); ++i) {
    const uint64_t size = chunks[i];
    const uint64_t start = AlignDown(fault_addr, size);
    const uint64_t end = start + size;
    if (start < vma_start || end > vma_end || start < bound_start || end > bound_end ||
        start < gpuva_start || end > gpuva_end)
      continue;
    if (size != kSize4K) {
      // A larger chunk must not overlap another range...
      if (Overlaps(n, start, end)) continue;
      // ...and a small one only covers pages the CPU has faulted in.
      if (ctx.check_pages_threshold && size <= ctx.check_pages_threshold && check_sub &&
          !CheckPages(check_sub, start, end, ctx.device_private_page_owner))
        continue;
    }
    *index = i;
    return size;
  }
  return 0;
}

Result<Range*> GpuSvm::FindOrInsert(uint64_t fault_addr, uint64_t gpuva_start, uint64_t gpuva_end,
                                    const Ctx& ctx) {
  if (!CheckDriverLock()) return Err(Errc::kInval, "gpusvm: driver lock not held");
  if (!config_.mm) return Err(Errc::kInval, "gpusvm: pages-only mode has no ranges");
  if (fault_addr < mm_start() || fault_addr >= mm_end())
    return Err(Errc::kInval, "gpusvm: fault address outside the GPU SVM window");
  if (gpuva_start >= gpuva_end) return Err(Errc::kInval, "gpusvm: empty GPU VA window");
  mm::Mm& mmp = *config_.mm;
  if (!mmp.Alive()) return Err(Errc::kFault, "gpusvm: address space is gone");
  const uint64_t page = mm::PageAlignDown(fault_addr);

  // The VMA checks every path makes under the mmap lock.
  auto check_vma = [&](std::optional<mm::VmaInfo>& vma) -> Result<void> {
    if (!vma) return Err(Errc::kNoEnt, "gpusvm: no VMA at the fault address");
    if (!ctx.read_only && !(vma->prot & mm::kProtWrite))
      return Err(Errc::kPerm, "gpusvm: write access needed on a read-only VMA");
    return {};
  };
  auto devmem_ok = [&](const mm::VmaInfo& vma) {
    // The migrate_vma limits: only private anonymous, non-hugetlb memory.
    return ctx.devmem_possible && vma.anonymous_private() && !(vma.flags & mm::kVmaHugetlb);
  };
  auto insert_range = [&](Notifier* n, uint64_t start, uint64_t size, bool devmem) -> Result<Range*> {
    if (env_->ShouldFail("gpusvm.range_alloc")) return Err(Errc::kNoMem, "gpusvm: range allocation");
    Range* r = config_.ops->RangeAlloc();
    if (!r) return Err(Errc::kNoMem, "gpusvm: range allocation");
    r->gpusvm_ = this;
    r->notifier_ = n;
    r->node_.start = start;
    r->node_.last = start + size - 1;
    r->migrate_devmem_ = devmem;
    r->refcount_.store(1, std::memory_order_relaxed);
    {
      WriteLock l(notifier_lock_);
      n->ranges_.Insert(r);
      n->range_list_.insert_before(n->ranges_.Next(r), r);
    }
    stats_.range_inserts.fetch_add(1, std::memory_order_relaxed);
    stats_.ranges.fetch_add(1, std::memory_order_relaxed);
    return r;
  };
  auto publish_notifier = [&](Notifier* n) USVM_REQUIRES(driver_lock()) {
    notifiers_.Insert(n);
    notifier_list_.insert_before(notifiers_.Next(n), n);
    stats_.notifiers.fetch_add(1, std::memory_order_relaxed);
  };

  Notifier* n = NotifierFind(fault_addr, fault_addr + 1);
  if (config_.notifier_mode == NotifierMode::kWindow) {
    const bool notifier_alloc = n == nullptr;
    if (notifier_alloc) {
      const uint64_t ns = config_.notifier_size;
      const uint64_t nstart = AlignDown(fault_addr, ns);
      n = USVM_TRY(NotifierCreate(nstart, nstart + ns));
    }
    Result<Range*> result = Err(Errc::kInval);
    {
      ReadLock l(mmp.mmap_lock());
      auto vma = mmp.VmaLookupLocked(fault_addr);
      if (auto ok = check_vma(vma); !ok) {
        result = Err(ok.error());
      } else if (Range* r = RangeFind(n, page, page + kSize4K)) {
        result = r;
      } else {
        size_t idx = 0;
        const uint64_t size = ChunkSize(n, &n->sub_, vma->start, vma->end, fault_addr,
                                        gpuva_start, gpuva_end, n->start(), n->end(), 0, ctx,
                                        &idx);
        if (size == 0)
          result = Err(Errc::kInval, "gpusvm: no chunk size fits the fault");
        else
          result = insert_range(n, AlignDown(fault_addr, size), size, devmem_ok(*vma));
      }
    }
    if (notifier_alloc) {
      if (result)
        publish_notifier(n);
      else
        NotifierDestroy(n);
    }
    return result;
  }

  // One notifier per range (seed 000). A notifier covers exactly its range,
  // so it is inserted once the chunk is known; the threshold snapshot then
  // runs through it, and a snapshot that steps the chunk down replaces it.
  if (n) {
    ReadLock l(mmp.mmap_lock());
    auto vma = mmp.VmaLookupLocked(fault_addr);
    USVM_TRY(check_vma(vma));
    Range* r = RangeFind(n, page, page + kSize4K);
    if (!r) return Err(Errc::kInval, "gpusvm: notifier without its range");
    return r;
  }
  size_t first = 0;
  for (int tries = 0; tries < 16; ++tries) {
    uint64_t cand = 0, cstart = 0;
    {
      ReadLock l(mmp.mmap_lock());
      auto vma = mmp.VmaLookupLocked(fault_addr);
      USVM_TRY(check_vma(vma));
      Ctx no_check = ctx;
      no_check.check_pages_threshold = 0;
      size_t idx = 0;
      cand = ChunkSize(nullptr, nullptr, vma->start, vma->end, fault_addr, gpuva_start,
                       gpuva_end, 0, ~uint64_t{0}, first, no_check, &idx);
      if (cand == 0) return Err(Errc::kInval, "gpusvm: no chunk size fits the fault");
      first = idx;
      cstart = AlignDown(fault_addr, cand);
    }
    n = USVM_TRY(NotifierCreate(cstart, cstart + cand));
    Result<Range*> result = Err(Errc::kAgain);
    size_t idx = first;
    {
      ReadLock l(mmp.mmap_lock());
      auto vma = mmp.VmaLookupLocked(fault_addr);
      if (auto ok = check_vma(vma); !ok) {
        result = Err(ok.error());
      } else {
        // The snapshot looks through the new notifier, which covers every
        // smaller chunk around fault_addr too.
        const uint64_t size = ChunkSize(nullptr, &n->sub_, vma->start, vma->end, fault_addr,
                                        gpuva_start, gpuva_end, 0, ~uint64_t{0}, first, ctx,
                                        &idx);
        if (size == 0) {
          result = Err(Errc::kInval, "gpusvm: no chunk size fits the fault");
        } else if (size == cand) {
          result = insert_range(n, cstart, size, devmem_ok(*vma));
        }
      }
    }
    if (result) {
      publish_notifier(n);
      return result;
    }
    NotifierDestroy(n);
    if (result.error() != Errc::kAgain) return result;
    if (idx > first) first = idx;  // the snapshot stepped down: a smaller notifier
  }
  return Err(Errc::kAgain, "gpusvm: the address space kept changing under the fault");
}

Result<void> GpuSvm::RangeRemove(Range* range) {
  if (!CheckDriverLock()) return Err(Errc::kInval, "gpusvm: driver lock not held");
  if (!range || range->gpusvm_ != this || !range->node_.in_tree)
    return Err(Errc::kInval, "gpusvm: range not in a tree of this GPU SVM");
  if (tls_in_callback == this)
    return Err(Errc::kDeadlk, "gpusvm: range remove from the invalidation callback");
  Notifier* n = range->notifier_;
  {
    WriteLock l(notifier_lock_);
    // Seed 003's contract: the owner unmaps its pages (in the invalidation,
    // or before removing); a range is never dropped with live mappings.
    if (range->pages_ && range->pages_->mapped_ > 0) {
      stats_.remove_refused.fetch_add(1, std::memory_order_relaxed);
      return Err(Errc::kBusy, "gpusvm: range pages still device-mapped");
    }
    n->ranges_.Remove(range);
    n->range_list_.erase(range);
  }
  if (n->ranges_.empty() && n->sub_.hub()) {
    // The notifier goes with its last range. Removing it waits for its
    // callbacks, so this must not run inside one (seed 000: a worker does
    // it); put the range back and refuse.
    auto r = n->sub_.Remove();
    if (!r) {
      WriteLock l(notifier_lock_);
      n->ranges_.Insert(range);
      n->range_list_.insert_before(n->ranges_.Next(range), range);
      return Err(r.error());
    }
    stats_.notifier_removes.fetch_add(1, std::memory_order_relaxed);
    notifiers_.Remove(n);
    notifier_list_.erase(n);
    stats_.notifiers.fetch_sub(1, std::memory_order_relaxed);
    NotifierDestroy(n);
  }
  stats_.range_removes.fetch_add(1, std::memory_order_relaxed);
  stats_.ranges.fetch_sub(1, std::memory_order_relaxed);
  RangePut(range);
  return {};
}

Range* GpuSvm::RangeGet(Range* range) {
  range->refcount_.fetch_add(1, std::memory_order_relaxed);
  return range;
}

void GpuSvm::RangePut(Range* range) {
  if (range->refcount_.fetch_sub(1, std::memory_order_acq_rel) == 1) config_.ops->RangeFree(range);
}

void GpuSvm::RangeSetUnmapped(Range* range, const mm::NotifierRange& mmu_range) {
  notifier_lock_.AssertHeld();
  range->unmapped_ = true;
  if (range->start() < mmu_range.start || range->end() > mmu_range.end)
    range->partial_unmap_ = true;
  if (Pages* p = range->pages_) {
    p->unmapped_ = true;
    p->partial_unmap_ = range->partial_unmap_;
  }
}

bool GpuSvm::HasMapping(uint64_t start, uint64_t end) const {
  for (Notifier* n = NotifierFind(start, end); n; n = NotifierNext(n, end))
    if (RangeFind(n, start, end)) return true;
  return false;
}

Result<void> GpuSvm::RangeEvict(Range* range) {
  if (!range || range->gpusvm_ != this || !config_.mm)
    return Err(Errc::kInval, "gpusvm: not a range of this GPU SVM");
  // A removed range's notifier may be gone with it.
  if (!range->in_tree()) return Err(Errc::kInval, "gpusvm: range was removed");
  mm::Mm& mmp = *config_.mm;
  const uint64_t start = range->start(), end = range->end();
  if (!mmp.Alive()) return Err(Errc::kFault, "gpusvm: address space is gone");
  auto pfns = std::make_unique<uint64_t[]>((end - start) >> mm::kPageShift);
  mm::HmmRange r;
  r.notifier = &range->notifier_->sub_;
  r.hmm_pfns = pfns.get();
  // A read fault of every page with no device owner: each device-private
  // page is migrated home by its pagemap.
  r.default_flags = mm::kPfnReqFault;
  r.dev_private_owner = nullptr;
  const uint64_t deadline = env_->NowNs() + kHmmTimeoutNs;
  // Piece by piece over the VMAs still there: a partially unmapped range
  // (the reason the collector evicts) has holes, which drm_gpusvm's single
  // range fault would fail on with EFAULT before bringing anything home.
  for (uint64_t addr = start; addr < end;) {
    uint64_t ps, pe;
    {
      ReadLock l(mmp.mmap_lock());
      auto vma = mmp.FindVmaLocked(addr);
      if (!vma || vma->start >= end) break;
      ps = std::max(addr, vma->start);
      pe = std::min(end, vma->end);
      if (vma->prot == mm::kProtNone) {  // nothing a CPU could touch
        addr = pe;
        continue;
      }
    }
    r.start = ps;
    r.end = pe;
    r.hmm_pfns = pfns.get() + ((ps - start) >> mm::kPageShift);
    r.notifier_seq = r.notifier->ReadBegin();
    Result<void> res;
    {
      ReadLock l(mmp.mmap_lock());
      res = mmp.RangeFault(r);
    }
    if (res) {
      addr = pe;
      continue;
    }
    // EBUSY: raced with an invalidation; EFAULT: the layout changed since
    // the lookup. Look again, within the HMM timeout.
    if (res.error() != Errc::kBusy && res.error() != Errc::kFault) return res;
    if (env_->NowNs() > deadline) return Err(Errc::kTime, "gpusvm: evict kept racing");
  }
  return {};
}

ScanResult GpuSvm::ScanMm(Range* range, const void* owner, const mm::DevicePagemap* pagemap) {
  if (!range || range->gpusvm_ != this || !config_.mm || !range->in_tree()) return ScanResult::kUnpopulated;
  mm::Mm& mmp = *config_.mm;
  const uint64_t start = range->start(), end = range->end();
  const uint64_t npages = (end - start) >> mm::kPageShift;
  auto pfns = std::make_unique<uint64_t[]>(npages);
  mm::HmmRange r;
  r.notifier = &range->notifier_->sub_;
  r.start = start;
  r.end = end;
  r.hmm_pfns = pfns.get();
  r.dev_private_owner = owner;
  const uint64_t deadline = env_->NowNs() + kHmmTimeoutNs;
  for (;;) {
    r.notifier_seq = r.notifier->ReadBegin();
    for (uint64_t i = 0; i < npages; ++i) pfns[i] = 0;
    Result<void> res;
    {
      ReadLock l(mmp.mmap_lock());
      res = mmp.RangeFault(r);
    }
    if (!res) {
      if (res.error() == Errc::kBusy && env_->NowNs() <= deadline) continue;
      return ScanResult::kUnpopulated;
    }
    ReadLock l(notifier_lock_);
    if (r.notifier->ReadRetry(r.notifier_seq)) continue;
    ScanResult state = ScanResult::kUnpopulated;
    const mm::DevicePagemap* other = nullptr;
    for (uint64_t i = 0; i < npages;) {
      const uint64_t w = pfns[i];
      if (!(w & mm::kPfnValid)) return ScanResult::kUnpopulated;
      const mm::DevicePagemap* cur =
          (w & mm::kPfnDevice) ? mm::DevicePagemap::Lookup(mm::HmmPfn(w)) : nullptr;
      ScanResult next;
      if (cur && cur == pagemap) {
        next = ScanResult::kEqual;
      } else if (cur && (cur == other || !other)) {
        next = ScanResult::kOther;
        other = cur;
      } else if (cur) {
        next = ScanResult::kMixedDevice;
      } else {
        next = ScanResult::kSystem;
      }
      if (state == ScanResult::kUnpopulated) {
        state = next;
      } else if (state != next) {
        if (next == ScanResult::kSystem || state == ScanResult::kSystem)
          state = ScanResult::kMixed;
        else if (state != ScanResult::kMixed)
          state = ScanResult::kMixedDevice;
      }
      i += PfnStep(w, start, i, npages);
    }
    return state;
  }
}

// ---- pages --------------------------------------------------------------------

void GpuSvm::InitPages(Pages* pages, Range* range) {
  pages->gpusvm_ = this;
  if (range) {
    // The range is already in its notifier's tree, where the invalidation
    // callback looks up its pages.
    WriteLock l(notifier_lock_);
    range->pages_ = pages;
    // An UNMAP may have reached the range before it had pages: they are
    // born unmapped (GetPages: EFAULT), or a mapping could outlive it.
    pages->unmapped_ = range->unmapped_;
    pages->partial_unmap_ = range->partial_unmap_;
  }
}

bool GpuSvm::PagesValid(const Pages& pages) const {
  return pages.has_devmem_pages_ || pages.has_device_mapping_;
}

void GpuSvm::UnmapPagesLocked(Pages* pages) {
  // Entries are meaningful only while mapped (has_device_mapping): they
  // are not cleared, only unmapped.
  const DeviceAddr* a = pages->addrs_.get();
  const uint64_t mapped = pages->mapped_;
  Pagemap* const dpagemap = pages->dpagemap_;
  const void* const device = config_.device;
  // A system page's DMA mapping needs no teardown here (the address is the
  // frame's and dies with the entry), so without device pages there is
  // nothing to walk: the mapping step counted the entries.
  const uint64_t n = pages->entries_;
  if (dpagemap) {
    for (uint64_t i = 0; i < mapped;) {
      const DeviceAddr d = a[i];
      if (d.proto == AddrProto::kLocal || d.proto == AddrProto::kPeer)
        dpagemap->DeviceUnmap(device, d);
      i += uint64_t{1} << d.order;
    }
  }
  pages->entries_ = 0;
  pages->mapped_ = 0;
  pages->has_device_mapping_ = false;
  pages->has_devmem_pages_ = false;
  pages->dpagemap_ = nullptr;
  stats_.unmaps.fetch_add(n, std::memory_order_relaxed);
}

Result<void> GpuSvm::GetPages(Range* range, const Ctx& ctx) {
  if (!range || range->gpusvm_ != this || !config_.mm)
    return Err(Errc::kInval, "gpusvm: not a range of this GPU SVM");
  if (!range->pages_) return Err(Errc::kInval, "gpusvm: range pages not initialised");
  if (!range->in_tree()) return Err(Errc::kInval, "gpusvm: range was removed");
  return GetPages(range->pages_, *config_.mm, &range->notifier_->sub_, range->start(),
                  range->end(), ctx);
}

Result<void> GpuSvm::GetPages(Pages* pages, mm::Mm& mmp, mm::MmuIntervalNotifier* notifier,
                              uint64_t start, uint64_t end, const Ctx& ctx) {
  if (!pages || pages->gpusvm_ != this) return Err(Errc::kInval, "gpusvm: pages not initialised");
  if (!notifier || start >= end || !mm::IsPageAligned(start) || !mm::IsPageAligned(end))
    return Err(Errc::kInval, "gpusvm: bad range or notifier");
  if (notifier->hub() == nullptr || start < notifier->start() || end > notifier->end())
    return Err(Errc::kInval, "gpusvm: the notifier does not cover the range");
  const uint64_t npages = (end - start) >> mm::kPageShift;
  if (npages > UINT32_MAX) return Err(Errc::kInval, "gpusvm: more than 2^32 - 1 pages");

  // One GetPages maps a given Pages at a time (the mapping step writes the
  // array under the notifier lock taken for read).
  for (int spins = 0; pages->busy_.exchange(true, std::memory_order_acquire); ++spins) {
    if (spins < 64) CpuRelax(); else std::this_thread::yield();
  }
  struct BusyRelease {
    Pages* p;
    ~BusyRelease() { p->busy_.store(false, std::memory_order_release); }
  } busy_release{pages};

  const uint64_t deadline = env_->NowNs() + kHmmTimeoutNs;
  // The range fault's output: on the stack for small ranges (most GPU
  // faults), else allocated once.
  uint64_t pfns_small[16];
  std::unique_ptr<uint64_t[]> pfns_heap;
  uint64_t* pfns = nullptr;
  std::unique_ptr<DeviceAddr[]> fresh;
  for (;;) {
    uint64_t seq = notifier->ReadBegin();
    bool stale_mapping;
    {
      ReadLock l(notifier_lock_);
      if (PagesValid(*pages) && pages->npages_ == npages &&
          (ctx.read_only || !pages->read_only_)) {
        // Still mapped and no invalidation of these pages since.
        pages->notifier_seq_ = seq;
        stats_.get_pages.fetch_add(1, std::memory_order_relaxed);
        return {};
      }
      // Only this call maps these pages (busy_); an invalidation can only
      // empty them: nothing mapped now stays so.
      stale_mapping = pages->mapped_ > 0;
    }
    if (stale_mapping) {
      // Mapped, but not as this call needs (read-only, or another extent):
      // drop that mapping and map afresh.
      WriteLock l(notifier_lock_);
      if (pages->mapped_ > 0) {
        if (pages->npages_ == npages) stats_.write_upgrades.fetch_add(1, std::memory_order_relaxed);
        UnmapPagesLocked(pages);
      }
    }
    if (!mmp.Alive()) return Err(Errc::kFault, "gpusvm: address space is gone");
    if (!pfns) {
      if (npages <= std::size(pfns_small)) {
        pfns = pfns_small;
      } else {
        pfns_heap = std::make_unique<uint64_t[]>(npages);
        pfns = pfns_heap.get();
      }
    }
    mm::HmmRange r;
    r.notifier = notifier;
    r.start = start;
    r.end = end;
    r.hmm_pfns = pfns;
    r.default_flags = mm::kPfnReqFault | (ctx.read_only ? 0 : mm::kPfnReqWrite);
    r.dev_private_owner = ctx.device_private_page_owner;
    for (;;) {
      r.notifier_seq = seq;
      Result<void> res;
      {
        ReadLock l(mmp.mmap_lock());
        res = mmp.RangeFault(r);
      }
      if (res) break;
      if (res.error() != Errc::kBusy) return res;
      if (env_->NowNs() > deadline) return Err(Errc::kBusy, "gpusvm: range kept changing");
      seq = notifier->ReadBegin();
    }
    if (debug_hooks_) debug_hooks_->AfterRangeFault(pages);
    // Everything the mapping step needs is allocated before the lock.
    if (!fresh && (!pages->addrs_ || pages->npages_ != npages))
      fresh = std::make_unique_for_overwrite<DeviceAddr[]>(npages);

    ReadLock l(notifier_lock_);
    if (pages->unmapped_) return Err(Errc::kFault, "gpusvm: pages were unmapped");
    if (notifier->ReadRetry(seq)) {
      // An invalidation ran after the range fault: its pages may be gone.
      stats_.get_pages_retries.fetch_add(1, std::memory_order_relaxed);
      if (env_->NowNs() > deadline) return Err(Errc::kBusy, "gpusvm: range kept changing");
      continue;
    }
    // Not valid means not mapped (an invalidation or UnmapPages emptied
    // the array), so no reader looks at it and it may be replaced.
    assert(pages->mapped_ == 0);
    if (fresh) {
      pages->addrs_ = std::move(fresh);
      pages->npages_ = static_cast<uint32_t>(npages);
    }
    DeviceAddr* a = pages->addrs_.get();
    Pagemap* pagemap = nullptr;
    const void* alloc = nullptr;
    Error err(Errc::kOk);
    uint64_t maps = 0, devmem_maps = 0;
    uint64_t i = 0;  // entries [0, i) are mapped
    for (; i < npages;) {
      const uint64_t w = pfns[i];
      const uint64_t step = PfnStep(w, start, i, npages);
      const unsigned order = Log2(step);
      DeviceAddr d{};
      if (w & mm::kPfnDevice) {
        const mm::DevicePfn dpfn = mm::HmmPfn(w);
        if (!ctx.read_only && !(w & mm::kPfnWrite)) {
          // Our own device page, read-only (shared copy-on-write after a
          // fork): range fault reports it as it is under a write request,
          // and drm_gpusvm would map it for writing -- the child would see
          // the parent's device writes. Refused: the driver evicts (the CPU
          // path breaks the COW) and faults again.
          err = Error(Errc::kOpNotSupp, "gpusvm: read-only device page (shared copy-on-write) for a write");
          break;
        }
        // Most device pages of a range are of the pagemap of the one
        // before: skip the registry lookup then.
        Pagemap* pm = pagemap && dpfn - pagemap->pgmap().base() < pagemap->pgmap().npages()
                          ? pagemap
                          : Pagemap::FromPage(dpfn);
        if (!pm) {
          err = Error(Errc::kOpNotSupp, "gpusvm: device page of a foreign pagemap");
          break;
        }
        const void* a_of = pm->AllocationOf(dpfn);
        if (!ctx.allow_mixed && alloc != a_of && i > 0) {
          err = Error(Errc::kOpNotSupp, "gpusvm: device pages of two allocations");
          break;
        }
        alloc = a_of;
        if (pm != pagemap) {
          // One device pagemap per range. (drm_gpusvm also refuses a
          // device page after system pages even with allow_mixed; we let
          // allow_mixed mix them in either order.)
          if (pagemap || (i > 0 && !ctx.allow_mixed)) {
            err = Error(Errc::kOpNotSupp, "gpusvm: device pages of two pagemaps, or mixed");
            break;
          }
          pagemap = pm;
          // Published before mapping, so the error path unmaps it (the
          // kernel's CVE-2026-68240 leaked mappings here).
          pages->dpagemap_ = pm;
        }
        auto m = env_->ShouldFail("gpusvm.device_map")
                     ? Result<DeviceAddr>(Err(Errc::kFault, "injected"))
                     : pm->DeviceMap(config_.device, dpfn, order);
        if (!m) {
          err = Error(Errc::kFault, "gpusvm: device map failed");
          break;
        }
        d = *m;
        d.order = static_cast<uint8_t>(order);
        ++devmem_maps;
      } else {
        if (ctx.devmem_only) {
          err = Error(Errc::kFault, "gpusvm: system page with devmem_only");
          break;
        }
        if (pagemap && !ctx.allow_mixed) {
          err = Error(Errc::kOpNotSupp, "gpusvm: system page mixed with device pages");
          break;
        }
        if (env_->ShouldFail("gpusvm.dma_map")) {
          err = Error(Errc::kFault, "gpusvm: DMA mapping failed");
          break;
        }
        d.addr = mm::HmmPfn(w) << mm::kPageShift;
        d.proto = AddrProto::kSystem;
        d.order = static_cast<uint8_t>(order);
      }
      a[i] = d;
      i += step;
      ++maps;
    }
    pages->mapped_ = static_cast<uint32_t>(i);
    pages->entries_ = static_cast<uint32_t>(maps);
    stats_.maps.fetch_add(maps, std::memory_order_relaxed);
    stats_.devmem_maps.fetch_add(devmem_maps, std::memory_order_relaxed);
    if (err.code() != Errc::kOk) {
      UnmapPagesLocked(pages);
      return Err(err);
    }
    pages->has_devmem_pages_ = pagemap != nullptr;
    pages->has_device_mapping_ = true;
    pages->read_only_ = ctx.read_only;
    pages->notifier_seq_ = seq;
    stats_.get_pages.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
}

void GpuSvm::UnmapPages(Pages* pages, const Ctx& ctx) {
  if (!pages || pages->gpusvm_ != this) return;
  if (ctx.in_notifier) {
    // The invalidation callback holds the notifier lock for write.
    assert(notifier_lock_.DebugIsWriteLocked());
    notifier_lock_.AssertHeld();
    UnmapPagesLocked(pages);
    return;
  }
  WriteLock l(notifier_lock_);
  UnmapPagesLocked(pages);
}

void GpuSvm::FreePages(Pages* pages) {
  if (!pages || pages->gpusvm_ != this) return;
  WriteLock l(notifier_lock_);
  if (pages->mapped_ > 0) {
    stats_.backstop_unmaps.fetch_add(pages->entries_, std::memory_order_relaxed);
    UnmapPagesLocked(pages);
  }
  pages->addrs_.reset();
  pages->npages_ = 0;
}

GpuSvm::Stats GpuSvm::GetStats() const {
  Stats s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.notifiers = ld(stats_.notifiers);
  s.ranges = ld(stats_.ranges);
  s.notifier_inserts = ld(stats_.notifier_inserts);
  s.notifier_removes = ld(stats_.notifier_removes);
  s.range_inserts = ld(stats_.range_inserts);
  s.range_removes = ld(stats_.range_removes);
  s.remove_refused = ld(stats_.remove_refused);
  s.invalidations = ld(stats_.invalidations);
  s.get_pages = ld(stats_.get_pages);
  s.get_pages_retries = ld(stats_.get_pages_retries);
  s.write_upgrades = ld(stats_.write_upgrades);
  s.maps = ld(stats_.maps);
  s.unmaps = ld(stats_.unmaps);
  s.devmem_maps = ld(stats_.devmem_maps);
  s.backstop_unmaps = ld(stats_.backstop_unmaps);
  s.driver_lock_violations = ld(stats_.driver_lock_violations);
  return s;
}

}  // namespace usvm::gpusvm
