// A test mirror device (the role of the kernel's lib/test_hmm.c "dmirror"),
// built only on public mm APIs and used only by tests: it reads and writes
// process memory through range fault, keeps "device memory" in a plain
// array of pages registered as a DevicePagemap, and migrates pages to and
// from it with MigrateVma.
#ifndef USVM_TESTS_MM_DMIRROR_H_
#define USVM_TESTS_MM_DMIRROR_H_

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/migrate.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm::testing {

class DMirror final : public DevicePagemapOps, public MmuIntervalNotifierOps {
 public:
  // A device with `npages` pages of device memory, mirroring `as`.
  static std::unique_ptr<DMirror> Create(std::shared_ptr<AddressSpace> as, uint64_t npages) {
    auto d = std::unique_ptr<DMirror>(new DMirror(std::move(as)));
    auto pm = DevicePagemap::TryCreate(npages, d.get(), d.get());
    if (!pm) return nullptr;
    d->pgmap_ = std::move(*pm);
    d->vram_.assign(npages, std::vector<std::byte>(kPageSize));
    d->free_.resize(npages);
    for (uint64_t i = 0; i < npages; ++i) d->free_[i] = npages - 1 - i;
    return d;
  }
  ~DMirror() override {
    // Deleting the pagemap migrates everything still mapped back first,
    // through MigrateToRam, which uses pgmap_: keep it set meanwhile.
    delete pgmap_.get();
    (void)pgmap_.release();
    if (sub_.hub()) (void)sub_.Remove();
  }

  // Mirror [start, start + len): one interval subscription.
  Result<void> Watch(uint64_t start, uint64_t len) {
    return as_->notifiers().Insert(&sub_, start, len, this);
  }

  // Device read of [addr, addr + len) through range fault (faulting pages
  // in); copies into out. Device pages of this device are read directly.
  Result<void> Read(uint64_t addr, void* out, uint64_t len) { return Access(addr, out, len, false); }
  Result<void> Write(uint64_t addr, const void* in, uint64_t len) {
    return Access(addr, const_cast<void*>(in), len, true);
  }

  // Migrates [start, end) to device memory. Returns pages migrated.
  Result<uint64_t> MigrateToDevice(uint64_t start, uint64_t end) {
    ReadLock l(as_->mmap_lock());
    const uint64_t n = (end - start) / kPageSize;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = start;
    m.end = end;
    m.src = src.data();
    m.dst = dst.data();
    m.pgmap_owner = this;
    m.flags = kMigrateSelectSystem;
    USVM_TRY(as_->MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate)) continue;
      auto idx = AllocDevicePage();
      if (!idx) continue;  // out of device memory: this page stays
      if (src[i] & kMigratePfnValid)
        std::memcpy(vram_[*idx].data(), as_->pool().Data(MigratePfnOf(src[i])), kPageSize);
      else
        std::memset(vram_[*idx].data(), 0, kPageSize);
      dst[i] = MigratePfn(pgmap_->PfnOf(*idx), true);
      ++moved;
    }
    as_->MigrateVmaPages(m);
    as_->MigrateVmaFinalize(m);
    return moved;
  }

  // Migrates the device pages of [start, end) back to system memory.
  Result<uint64_t> MigrateToSystem(uint64_t start, uint64_t end) {
    ReadLock l(as_->mmap_lock());
    return MigrateBackLocked(*as_, start, end);
  }

  // DevicePagemapOps.
  void PageFree(DevicePagemap&, uint64_t index) override {
    MutexLock l(lock_);
    free_.push_back(index);
  }
  // `as` may be a fork child of the mirrored process: device pages are
  // shared copy-on-write after fork.
  Result<void> MigrateToRam(AddressSpace& as, uint64_t addr, DevicePagemap&, uint64_t) override {
    as.mmap_lock().AssertReaderHeld();
    cpu_faults_++;
    auto r = MigrateBackLocked(as, addr, addr + kPageSize);
    if (!r) return Err(r.error());
    return {};
  }

  // MmuIntervalNotifierOps: the device "page table" is range fault's
  // snapshot; dropping it means bumping the sequence.
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    MutexLock l(lock_);
    sub->SetSeq(cur_seq);
    if (!(r.event == NotifyEvent::kMigrate && r.owner == this)) invalidations_++;
    return true;
  }

  DevicePagemap& pagemap() { return *pgmap_; }
  uint64_t device_pages_in_use() { return pgmap_->DebugPagesInUse(); }
  uint64_t cpu_faults() const { return cpu_faults_; }
  uint64_t free_pages() {
    MutexLock l(lock_);
    return free_.size();
  }
  // The device bytes of device frame dpfn.
  std::byte* DeviceData(DevicePfn dpfn) { return vram_[pgmap_->IndexOf(dpfn)].data(); }

 private:
  explicit DMirror(std::shared_ptr<AddressSpace> as) : as_(std::move(as)) {}

  Result<uint64_t> AllocDevicePage() {
    uint64_t idx;
    {
      MutexLock l(lock_);
      if (free_.empty()) return Err(Errc::kNoMem, "device memory full");
      idx = free_.back();
      free_.pop_back();
    }
    USVM_TRY(pgmap_->InitPage(idx));
    return idx;
  }

  Result<uint64_t> MigrateBackLocked(AddressSpace& as, uint64_t start, uint64_t end) {
    as.mmap_lock().AssertReaderHeld();
    const uint64_t n = (end - start) / kPageSize;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = start;
    m.end = end;
    m.src = src.data();
    m.dst = dst.data();
    m.pgmap_owner = this;
    m.flags = kMigrateSelectDevicePrivate;
    USVM_TRY(as.MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate) || !(src[i] & kMigratePfnValid)) continue;
      auto pfn = as.pool().AllocPage(FramePool::Zero::kNo);
      if (!pfn) continue;
      std::memcpy(as.pool().Data(*pfn), DeviceData(MigratePfnOf(src[i])), kPageSize);
      dst[i] = MigratePfn(*pfn, false);
      ++moved;
    }
    as.MigrateVmaPages(m);
    as.MigrateVmaFinalize(m);
    return moved;
  }

  Result<void> Access(uint64_t addr, void* buf, uint64_t len, bool write) {
    const uint64_t start = PageAlignDown(addr), end = PageAlignUp(addr + len);
    std::vector<uint64_t> pfns((end - start) / kPageSize);
    HmmRange r;
    r.notifier = &sub_;
    r.start = start;
    r.end = end;
    r.hmm_pfns = pfns.data();
    r.default_flags = kPfnReqFault | (write ? kPfnReqWrite : 0);
    r.dev_private_owner = this;
    auto* b = static_cast<std::byte*>(buf);
    return RangeFaultAndCommit(*as_, r, [&](HmmRange& rr) -> Result<bool> {
      MutexLock l(lock_);
      if (sub_.ReadRetry(rr.notifier_seq)) return false;
      for (uint64_t a = addr; a < addr + len;) {
        const uint64_t w = pfns[(PageAlignDown(a) - start) / kPageSize];
        const uint64_t n = std::min(addr + len - a, PageAlignDown(a) + kPageSize - a);
        std::byte* page = (w & kPfnDevice) ? DeviceData(HmmPfn(w)) : as_->pool().Data(HmmPfn(w));
        if (write)
          std::memcpy(page + (a % kPageSize), b + (a - addr), n);
        else
          std::memcpy(b + (a - addr), page + (a % kPageSize), n);
        a += n;
      }
      return true;
    });
  }

  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<DevicePagemap> pgmap_;
  std::vector<std::vector<std::byte>> vram_;
  MmuIntervalNotifier sub_;
  Mutex lock_;  // the device lock
  std::vector<uint64_t> free_ USVM_GUARDED_BY(lock_);
  uint64_t invalidations_ USVM_GUARDED_BY(lock_) = 0;
  std::atomic<uint64_t> cpu_faults_{0};
};

}  // namespace usvm::mm::testing

#endif  // USVM_TESTS_MM_DMIRROR_H_
