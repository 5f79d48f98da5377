// A test GPU driver on GpuSvm (the role xe plays in the kernel), used only
// by tests: a software "GPU page table" (one DeviceAddr per 4 KiB page),
// the xe fault flow (collect garbage, FindOrInsert, GetPages, commit only
// if PagesValid under the notifier lock), an invalidation callback that
// zaps, unmaps pages and queues UNMAPped ranges to a garbage collector,
// and GPU reads and writes through its page table with real bytes.
//
// Checks built in (counted, the tests assert them zero):
//   - stale_after_invalidate: after the callback, a range it was given is
//     still valid or still has a GPU PTE;
//   - bad_unmap: a range freed with device mappings that were never
//     invalidated (FreePages' backstop had to unmap).
//
// Thread-safety: every method may be called from several threads.
#ifndef USVM_TESTS_GPUSVM_TEST_DRIVER_H_
#define USVM_TESTS_GPUSVM_TEST_DRIVER_H_

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/gpusvm/gpusvm.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/address_space.h"

namespace usvm::gpusvm::testing {

using mm::kPageSize;

// The driver's range: the framework's range with the pages it owns.
struct TestRange final : Range {
  Pages pages;
  bool queued = false;  // on the GC list (TestDriver::gc_lock_)
};

class TestDriver : public GpuSvmOps {
 public:
  struct Options {
    std::vector<uint64_t> chunks{kSize2M, kSize64K, kSize4K};
    uint64_t notifier_size = uint64_t{512} << 20;
    NotifierMode mode = NotifierMode::kWindow;
    const void* device = nullptr;  // the device that maps pages (null: the driver)
    // On EOPNOTSUPP from GetPages (pages of several allocations or
    // pagemaps), evict the range and fault again, as xe does; off: return
    // the error (tests of GetPages' refusals).
    bool evict_on_eopnotsupp = false;
    uint64_t mm_start = 0;
    uint64_t mm_range = uint64_t{1} << 47;
    Env* env = nullptr;
  };

  static std::unique_ptr<TestDriver> Create(std::shared_ptr<mm::AddressSpace> as, Options o) {
    auto d = std::unique_ptr<TestDriver>(new TestDriver(as));
    d->evict_on_eopnotsupp_ = o.evict_on_eopnotsupp;
    GpuSvmConfig c;
    c.name = "test";
    c.mm = as;
    c.mm_start = o.mm_start;
    c.mm_range = o.mm_range;
    c.notifier_size = o.notifier_size;
    c.ops = d.get();
    c.chunk_sizes = o.chunks;
    c.notifier_mode = o.mode;
    c.device = o.device ? o.device : d.get();
    c.env = o.env;
    auto svm = GpuSvm::TryCreate(std::move(c));
    if (!svm) return nullptr;
    d->svm_ = std::move(*svm);
    return d;
  }
  static std::unique_ptr<TestDriver> Create(std::shared_ptr<mm::AddressSpace> as) {
    return Create(std::move(as), Options{});
  }

  ~TestDriver() override { svm_.reset(); }

  GpuSvm& svm() { return *svm_; }
  mm::AddressSpace& as() { return *as_; }
  void DestroySvm() { svm_.reset(); }

  // ---- GpuSvmOps ------------------------------------------------------------

  Range* RangeAlloc() override {
    live_ranges_.fetch_add(1);
    return new TestRange;
  }
  void RangeFree(Range* r) override {
    auto* t = static_cast<TestRange*>(r);
    // The GpuSvm may be in its destructor (Fini): reach it through the range.
    GpuSvm& svm = *r->gpusvm();
    const uint64_t before = svm.GetStats().backstop_unmaps;
    svm.FreePages(&t->pages);
    const GpuSvm::Stats after = svm.GetStats();
    if (after.backstop_unmaps != before) backstop_frees_.fetch_add(1);
    // What the GpuSvm had mapped and unmapped when this range went (after
    // Fini's last range: the totals of its whole life).
    last_maps_.store(after.maps);
    last_unmaps_.store(after.unmaps);
    live_ranges_.fetch_sub(1);
    delete t;
  }
  void Invalidate(GpuSvm& svm, Notifier& n, const mm::NotifierRange& range) override {
    invalidations_.fetch_add(1);
    if (range.event == mm::NotifyEvent::kUnmap) unmap_events_.fetch_add(1);
    Ctx ctx;
    ctx.in_notifier = true;
    GpuSvm::ForEachRangeSafe(&n, range.start, range.end, [&](Range* r) {
      Zap(r->start(), r->end());
      if (r->pages()) svm.UnmapPages(r->pages(), ctx);
      if (range.event == mm::NotifyEvent::kUnmap) {
        svm.RangeSetUnmapped(r, range);
        auto* t = static_cast<TestRange*>(r);
        MutexLock l(gc_lock_);
        if (!t->queued) {
          t->queued = true;
          gc_.push_back(t);
        }
      }
      // The security rule, checked: nothing of r is usable any more.
      if ((r->pages() && svm.PagesValid(*r->pages())) || HasPte(r->start(), r->end()))
        stale_after_invalidate_.fetch_add(1);
    });
  }

  // ---- the driver's side ----------------------------------------------------

  // The garbage collector (seed 000: a worker, never the callback): every
  // range an UNMAP queued is removed, with its notifier when it was the
  // last. Partially unmapped ranges first go back to system memory.
  void CollectGarbage() {
    DriverLockGuard g(svm_->driver_lock());
    CollectGarbageLocked();
  }
  // REQUIRES: the driver lock (so no other thread holds queued ranges
  // outside it while a fault waits for them to go).
  void CollectGarbageLocked() USVM_REQUIRES(svm_->driver_lock()) {
    std::vector<TestRange*> work;
    {
      MutexLock l(gc_lock_);
      work.swap(gc_);
    }
    for (TestRange* r : work) {
      bool partial;
      {
        ReadLock l(svm_->notifier_lock());
        partial = r->partial_unmap();
      }
      if (partial && r->migrate_devmem()) (void)svm_->RangeEvict(r);
      auto res = svm_->RangeRemove(r);
      if (!res) gc_failures_.fetch_add(1);
      else collected_.fetch_add(1);
    }
  }

  // The xe fault flow for one GPU access at addr. Returns the range it
  // mapped (valid at commit time).
  Result<Range*> Fault(uint64_t addr, Ctx ctx, uint64_t gpuva_start = 0,
                       uint64_t gpuva_end = ~uint64_t{0}) {
    for (int tries = 0; tries < 1000; ++tries) {
      // As xe holds its VM lock across the whole fault, the driver lock is
      // held here: the garbage collector cannot remove the range under us.
      DriverLockGuard g(svm_->driver_lock());
      CollectGarbageLocked();
      Range* r = USVM_TRY(svm_->FindOrInsert(addr, gpuva_start, gpuva_end, ctx));
      auto* t = static_cast<TestRange*>(r);
      if (!r->pages()) svm_->InitPages(&t->pages, r);
      auto res = svm_->GetPages(r, ctx);
      if (!res) {
        // Unmapped under us: the collector removes it, then fault again.
        bool unmapped;
        {
          ReadLock l(svm_->notifier_lock());
          unmapped = r->unmapped();
        }
        if (res.error() == Errc::kFault && unmapped) continue;
        if (res.error() == Errc::kOpNotSupp && evict_on_eopnotsupp_ && !ctx.devmem_only) {
          // Pages of several allocations or pagemaps (xe: evict, retry).
          evict_retries_.fetch_add(1);
          USVM_TRY(svm_->RangeEvict(r));
          continue;
        }
        return Err(res.error());
      }
      ReadLock l(svm_->notifier_lock());
      if (!svm_->PagesValid(t->pages)) {
        commit_retries_.fetch_add(1);
        continue;
      }
      Commit(r, !ctx.read_only);
      return r;
    }
    return Err(Errc::kAgain, "test driver: fault kept racing");
  }

  // GPU accesses through the GPU page table, faulting as needed. Bytes of
  // system pages come from the frame pool; device pages from `vram` (set
  // by tests that migrate).
  Result<void> GpuRead(uint64_t addr, void* out, uint64_t len, Ctx ctx = {}) {
    return GpuAccess(addr, out, len, false, ctx);
  }
  Result<void> GpuWrite(uint64_t addr, const void* in, uint64_t len, Ctx ctx = {}) {
    return GpuAccess(addr, const_cast<void*>(in), len, true, ctx);
  }

  // Resolves a device page to its bytes (tests with device memory).
  using DeviceBytes = std::byte* (*)(void* cookie, const DeviceAddr& a);
  void SetDeviceBytes(DeviceBytes fn, void* cookie) {
    device_bytes_ = fn;
    device_cookie_ = cookie;
  }

  bool HasPte(uint64_t start, uint64_t end) {
    MutexLock l(pt_lock_);
    auto it = pt_.lower_bound(start);
    return it != pt_.end() && it->first < end;
  }
  size_t PteCount() {
    MutexLock l(pt_lock_);
    return pt_.size();
  }
  // The entry mapping addr's page, if any.
  std::optional<DeviceAddr> Pte(uint64_t addr) {
    MutexLock l(pt_lock_);
    auto it = pt_.find(addr & ~(kPageSize - 1));
    if (it == pt_.end()) return std::nullopt;
    return it->second.addr;
  }
  bool PteWritable(uint64_t addr) {
    MutexLock l(pt_lock_);
    auto it = pt_.find(addr & ~(kPageSize - 1));
    return it != pt_.end() && it->second.writable;
  }

  uint64_t invalidations() const { return invalidations_.load(); }
  uint64_t unmap_events() const { return unmap_events_.load(); }
  uint64_t stale_after_invalidate() const { return stale_after_invalidate_.load(); }
  uint64_t backstop_frees() const { return backstop_frees_.load(); }
  uint64_t gc_failures() const { return gc_failures_.load(); }
  uint64_t collected() const { return collected_.load(); }
  uint64_t commit_retries() const { return commit_retries_.load(); }
  uint64_t evict_retries() const { return evict_retries_.load(); }
  uint64_t last_maps() const { return last_maps_.load(); }
  uint64_t last_unmaps() const { return last_unmaps_.load(); }
  int64_t live_ranges() const { return live_ranges_.load(); }
  size_t gc_pending() {
    MutexLock l(gc_lock_);
    return gc_.size();
  }

 private:
  explicit TestDriver(std::shared_ptr<mm::AddressSpace> as) : as_(std::move(as)) {}

  // Writes the range's page addresses into the GPU page table.
  // REQUIRES: the notifier lock (read), pages valid.
  void Commit(Range* r, bool writable) {
    const Pages& p = *r->pages();
    MutexLock l(pt_lock_);
    for (uint64_t i = 0; i < p.npages();) {
      const DeviceAddr d = p.addrs()[i];
      const uint64_t n = uint64_t{1} << d.order;
      for (uint64_t k = 0; k < n; ++k) {
        DeviceAddr e = d;
        e.addr = d.addr + k * kPageSize;
        e.order = 0;
        pt_[r->start() + (i + k) * kPageSize] = Entry{e, writable};
      }
      i += n;
    }
  }
  void Zap(uint64_t start, uint64_t end) {
    MutexLock l(pt_lock_);
    pt_.erase(pt_.lower_bound(start), pt_.lower_bound(end));
  }

  Result<void> GpuAccess(uint64_t addr, void* buf, uint64_t len, bool write, Ctx ctx) {
    auto* b = static_cast<std::byte*>(buf);
    while (len > 0) {
      const uint64_t page = addr & ~(kPageSize - 1);
      const uint64_t off = addr - page;
      const uint64_t n = std::min(len, kPageSize - off);
      bool done = false;
      {
        // The notifier lock keeps the page's frame alive while copying (an
        // invalidation waits for it, as for a GPU TLB flush).
        ReadLock l(svm_->notifier_lock());
        std::optional<DeviceAddr> e = Pte(page);
        if (e && write && !PteWritable(page)) e.reset();  // fault for writing
        if (e) {
          std::byte* p = nullptr;
          if (e->proto == AddrProto::kSystem)
            p = as_->pool().Data(e->addr >> mm::kPageShift);
          else if (device_bytes_)
            p = device_bytes_(device_cookie_, *e);
          if (!p) return Err(Errc::kFault, "test driver: no bytes behind the PTE");
          if (write)
            std::memcpy(p + off, b, n);
          else
            std::memcpy(b, p + off, n);
          done = true;
        }
      }
      if (!done) {
        Ctx c = ctx;
        c.read_only = c.read_only || !write;
        USVM_TRY(Fault(page, c));
        continue;
      }
      addr += n;
      b += n;
      len -= n;
    }
    return {};
  }

  std::shared_ptr<mm::AddressSpace> as_;
  std::unique_ptr<GpuSvm> svm_;
  struct Entry {
    DeviceAddr addr;
    bool writable;
  };
  Mutex pt_lock_;
  std::map<uint64_t, Entry> pt_ USVM_GUARDED_BY(pt_lock_);
  Mutex gc_lock_;
  std::vector<TestRange*> gc_ USVM_GUARDED_BY(gc_lock_);
  bool evict_on_eopnotsupp_ = false;
  DeviceBytes device_bytes_ = nullptr;
  void* device_cookie_ = nullptr;
  std::atomic<uint64_t> invalidations_{0}, unmap_events_{0}, stale_after_invalidate_{0},
      backstop_frees_{0}, gc_failures_{0}, collected_{0}, commit_retries_{0}, evict_retries_{0}, last_maps_{0},
      last_unmaps_{0};
  std::atomic<int64_t> live_ranges_{0};
};

}  // namespace usvm::gpusvm::testing

#endif  // USVM_TESTS_GPUSVM_TEST_DRIVER_H_
