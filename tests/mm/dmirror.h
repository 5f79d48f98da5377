// A test mirror device (the role of the kernel's lib/test_hmm.c "dmirror"),
// built only on public mm APIs and used only by tests: it reads and writes
// process memory through range fault, keeps "device memory" in a plain
// array of pages registered as a DevicePagemap, and migrates pages to and
// from it with MigrateVma.
//
// Extras for the selftests (tests/mm/hmm_selftests_test.cc): Snapshot
// (range fault without faulting, the raw output words), the words of the
// last device access, per-device counters, a settable range-fault timeout,
// and a device memory that can be made small to test "device full".
// Several DMirrors may mirror one address space (two devices), and one may
// mirror a fork child.
//
// Thread-safety: every method may be called concurrently (device threads
// migrating while others read); lock_ is the device lock that ReadRetry
// runs under.
#ifndef USVM_TESTS_MM_DMIRROR_H_
#define USVM_TESTS_MM_DMIRROR_H_

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
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
    // Deleting the pagemap evicts everything still mapped first, through
    // CopyToRam, and PageFree runs for every page: keep pgmap_ set meanwhile.
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
  // `words`, if given, receives the range fault output (one word per page
  // of the page-aligned range) that the copy used.
  Result<void> Read(uint64_t addr, void* out, uint64_t len, std::vector<uint64_t>* words = nullptr) {
    return Access(addr, out, len, false, words);
  }
  Result<void> Write(uint64_t addr, const void* in, uint64_t len,
                     std::vector<uint64_t>* words = nullptr) {
    return Access(addr, const_cast<void*>(in), len, true, words);
  }

  // HMM_DMIRROR_SNAPSHOT: range fault of [start, end) with no fault
  // requested; the raw output words (see hmm.h). Retries on EBUSY.
  Result<std::vector<uint64_t>> Snapshot(uint64_t start, uint64_t end) {
    std::vector<uint64_t> words((end - start) / kPageSize);
    HmmRange r;
    r.notifier = &sub_;
    r.start = start;
    r.end = end;
    r.hmm_pfns = words.data();
    r.dev_private_owner = this;
    USVM_TRY(RangeFaultAndCommit(*as_, r,
                                 [&](HmmRange& rr) -> Result<bool> {
                                   MutexLock l(lock_);
                                   return !sub_.ReadRetry(rr.notifier_seq);
                                 },
                                 timeout_ns_.load()));
    return words;
  }

  // A device fault of [start, end) without copying any bytes (what a GPU
  // fault handler does before it programs its page table): range fault
  // with kPfnReqFault (and kPfnReqWrite) on every page; the output words
  // go to `words` if given.
  Result<void> FaultIn(uint64_t start, uint64_t end, bool write, std::vector<uint64_t>* words = nullptr) {
    std::vector<uint64_t> local;
    std::vector<uint64_t>& pfns = words ? *words : local;
    pfns.assign((end - start) / kPageSize, 0);
    HmmRange r;
    r.notifier = &sub_;
    r.start = start;
    r.end = end;
    r.hmm_pfns = pfns.data();
    r.default_flags = kPfnReqFault | (write ? kPfnReqWrite : 0);
    r.dev_private_owner = this;
    return RangeFaultAndCommit(*as_, r,
                               [&](HmmRange& rr) -> Result<bool> {
                                 MutexLock l(lock_);
                                 return !sub_.ReadRetry(rr.notifier_seq);
                               },
                               timeout_ns_.load());
  }

  // HMM_DMIRROR_EXCLUSIVE: makes every page of [start, end) exclusive to
  // this device (make_device_exclusive) and records it in the device page
  // table, for device atomics. Returns the pages made exclusive; stops at
  // the first error.
  // REQUIRES: Watch covers the range (the sequence tells whether the CPU
  // took the page back before the device recorded it).
  Result<uint64_t> MakeExclusive(uint64_t start, uint64_t end) {
    uint64_t n = 0;
    for (uint64_t a = start; a < end; a += kPageSize) {
      for (;;) {
        const uint64_t seq = sub_.ReadBegin();
        ReadLock l(as_->mmap_lock());
        const Pfn pfn = USVM_TRY(as_->MakeDeviceExclusive(a, this));
        MutexLock dl(lock_);
        if (sub_.ReadRetry(seq)) continue;
        exclusive_[a] = pfn;
        break;
      }
      ++n;
    }
    return n;
  }
  // Whether the device still holds exclusive access to the page at addr.
  bool HasExclusive(uint64_t addr) {
    MutexLock l(lock_);
    return exclusive_.count(PageAlignDown(addr)) != 0;
  }
  // A device atomic fetch-add on the 8-byte word at addr: only through
  // exclusive access (EPERM once the CPU or fork has revoked it, as
  // dmirror_check_atomic).
  Result<uint64_t> AtomicFetchAdd(uint64_t addr, uint64_t v) {
    if (addr % 8 != 0) return Err(Errc::kInval, "dmirror atomic: unaligned");
    MutexLock l(lock_);
    auto it = exclusive_.find(PageAlignDown(addr));
    if (it == exclusive_.end()) return Err(Errc::kPerm, "dmirror atomic: no exclusive access");
    auto* w = reinterpret_cast<uint64_t*>(as_->pool().Data(it->second) + addr % kPageSize);
    return std::atomic_ref<uint64_t>(*w).fetch_add(v);
  }

  // The timeout of RangeFaultAndCommit in device accesses.
  void set_timeout_ns(uint64_t ns) { timeout_ns_.store(ns); }

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
      if (!idx) {  // out of device memory: this page stays
        device_full_++;
        continue;
      }
      if (src[i] & kMigratePfnValid)
        std::memcpy(vram_[*idx].data(), as_->pool().Data(MigratePfnOf(src[i])), kPageSize);
      else
        std::memset(vram_[*idx].data(), 0, kPageSize);
      dst[i] = MigratePfn(pgmap_->PfnOf(*idx), true);
      ++moved;
    }
    as_->MigrateVmaPages(m);
    as_->MigrateVmaFinalize(m);
    to_device_ += moved;
    return moved;
  }

  // Migrates the device pages of [start, end) back to system memory.
  Result<uint64_t> MigrateToSystem(uint64_t start, uint64_t end) {
    ReadLock l(as_->mmap_lock());
    return MigrateBackLocked(*as_, start, end, nullptr);
  }

  // DevicePagemapOps.
  void PageFree(DevicePagemap&, uint64_t index) override {
    MutexLock l(lock_);
    free_.push_back(index);
  }
  // `as` may be a fork child of the mirrored process: device pages are
  // shared copy-on-write after fork. As dmirror_devmem_fault, a page that
  // cannot get a system frame fails the CPU access (ENOMEM) and stays on
  // the device.
  //
  // The fault path must call this with the page referenced and locked (it
  // is passed on as fault_page); a call that finds the page free or
  // unlocked is counted in bad_migrate_to_ram() (a use-after-free in the
  // fault path). set_migrate_to_ram_delay_us() stretches each call so that
  // tests can make CPU faults overlap.
  Result<void> MigrateToRam(Mm& port, uint64_t addr, DevicePagemap& pgmap,
                            uint64_t index) override {
    AddressSpace& as = static_cast<AddressSpace&>(port);
    as.mmap_lock().AssertReaderHeld();
    cpu_faults_++;
    if (pgmap.RefCount(index) == 0 || !pgmap.PageLocked(index)) bad_migrate_to_ram_++;
    if (uint64_t us = migrate_to_ram_delay_us_.load())
      std::this_thread::sleep_for(std::chrono::microseconds(us));
    bool alloc_failed = false;
    auto r = MigrateBackLocked(as, addr, addr + kPageSize, &alloc_failed, pgmap.PfnOf(index));
    if (!r) return Err(r.error());
    if (alloc_failed) return Err(Errc::kNoMem, "dmirror: no system frame for migrate_to_ram");
    return {};
  }

  // Device-frame eviction (EvictDevicePages, pagemap teardown): the
  // device's copy engine.
  Result<void> CopyToRam(DevicePagemap&, uint64_t index, std::byte* to) override {
    std::memcpy(to, vram_[index].data(), kPageSize);
    evicted_++;
    return {};
  }

  // MmuIntervalNotifierOps: the device "page table" is range fault's
  // snapshot; dropping it means bumping the sequence.
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    MutexLock l(lock_);
    // Our own make-exclusive keeps the frame where it is: nothing to drop
    // (dmirror_interval_invalidate ignores it too).
    if (r.event == NotifyEvent::kExclusive && r.owner == this) return true;
    sub->SetSeq(cur_seq);
    if (r.event == NotifyEvent::kMigrate && r.owner == this) return true;
    invalidations_++;
    // Anything else revokes the device's exclusive access in the range.
    for (auto it = exclusive_.lower_bound(r.start); it != exclusive_.end() && it->first < r.end;) {
      it = exclusive_.erase(it);
      exclusive_revoked_++;
    }
    return true;
  }

  DevicePagemap& pagemap() { return *pgmap_; }
  AddressSpace& as() { return *as_; }
  uint64_t device_pages_in_use() { return pgmap_->DebugPagesInUse(); }
  uint64_t cpu_faults() const { return cpu_faults_; }
  // Pages copied home by device-frame eviction (CopyToRam).
  uint64_t evicted() const { return evicted_; }
  // MigrateToRam calls for a page that was free or not locked by the caller.
  uint64_t bad_migrate_to_ram() const { return bad_migrate_to_ram_; }
  void set_migrate_to_ram_delay_us(uint64_t us) { migrate_to_ram_delay_us_.store(us); }
  // Pages moved by MigrateToDevice / back to system memory (any path).
  uint64_t pages_to_device() const { return to_device_; }
  uint64_t pages_to_system() const { return to_system_; }
  // Pages MigrateToDevice left behind because device memory was full.
  uint64_t device_full() const { return device_full_; }
  // Invalidations other than our own migrations.
  uint64_t invalidations() {
    MutexLock l(lock_);
    return invalidations_;
  }
  uint64_t exclusive_revoked() {
    MutexLock l(lock_);
    return exclusive_revoked_;
  }
  // True if dpfn is one of this device's frames.
  bool Owns(DevicePfn dpfn) const { return dpfn >= pgmap_->base() && dpfn < pgmap_->base() + pgmap_->npages(); }
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

  // `alloc_failed`, if given, is set when a page stayed on the device for
  // want of a system frame.
  Result<uint64_t> MigrateBackLocked(AddressSpace& as, uint64_t start, uint64_t end,
                                     bool* alloc_failed, DevicePfn fault_page = 0) {
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
    m.fault_page = fault_page;
    USVM_TRY(as.MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate) || !(src[i] & kMigratePfnValid)) continue;
      auto pfn = as.pool().AllocPage(FramePool::Zero::kNo);
      if (!pfn) {
        if (alloc_failed) *alloc_failed = true;
        continue;
      }
      std::memcpy(as.pool().Data(*pfn), DeviceData(MigratePfnOf(src[i])), kPageSize);
      dst[i] = MigratePfn(*pfn, false);
      ++moved;
    }
    as.MigrateVmaPages(m);
    as.MigrateVmaFinalize(m);
    to_system_ += moved;
    return moved;
  }

  Result<void> Access(uint64_t addr, void* buf, uint64_t len, bool write,
                      std::vector<uint64_t>* words) {
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
    // Range fault reports our own device pages as they are: one shared
    // read-only (after fork) comes without kPfnWrite even for a write.
    // Like a driver, we then bring that page home (this process's view
    // gets its own copy) and fault again.
    for (;;) {
      uint64_t read_only_device_page = 0;
      USVM_TRY(RangeFaultAndCommit(*as_, r, [&](HmmRange& rr) -> Result<bool> {
        MutexLock l(lock_);
        if (sub_.ReadRetry(rr.notifier_seq)) return false;
        if (write)
          for (uint64_t i = 0; i < pfns.size(); ++i)
            if ((pfns[i] & kPfnDevice) && !(pfns[i] & kPfnWrite)) {
              read_only_device_page = start + i * kPageSize;
              return true;
            }
        return CopyLocked(pfns, start, addr, b, len, write, words);
      }, timeout_ns_.load()));
      if (read_only_device_page == 0) return {};
      USVM_TRY(MigrateToSystem(read_only_device_page, read_only_device_page + kPageSize));
    }
  }

  // The copy of a device access, once its pages are known.
  bool CopyLocked(const std::vector<uint64_t>& pfns, uint64_t start, uint64_t addr, std::byte* b,
                  uint64_t len, bool write, std::vector<uint64_t>* words) USVM_REQUIRES(lock_) {
    for (uint64_t a = addr; a < addr + len;) {
      const uint64_t w = pfns[(PageAlignDown(a) - start) / kPageSize];
      const uint64_t n = std::min(addr + len - a, PageAlignDown(a) + kPageSize - a);
      std::byte* page = (w & kPfnDevice) ? DeviceData(HmmPfn(w)) : as_->pool().Data(HmmPfn(w));
      Copy(write ? page + (a % kPageSize) : b + (a - addr), write ? b + (a - addr) : page + (a % kPageSize), n);
      a += n;
    }
    if (words) *words = pfns;
    return true;
  }

  // The device's DMA: like hardware, it races with CPU stores to the same
  // memory word by word, so aligned 8-byte words are copied with relaxed
  // atomics (the CPU's Atomic* ops are atomic against it); the rest is a
  // plain memcpy.
  static void Copy(std::byte* dst, const std::byte* src, uint64_t n) {
    const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if ((d | s | n) % 8 != 0) {
      std::memcpy(dst, src, n);
      return;
    }
    auto* dw = reinterpret_cast<uint64_t*>(dst);
    auto* sw = reinterpret_cast<uint64_t*>(const_cast<std::byte*>(src));
    for (uint64_t i = 0; i < n / 8; ++i)
      std::atomic_ref<uint64_t>(dw[i]).store(std::atomic_ref<uint64_t>(sw[i]).load(std::memory_order_relaxed),
                                             std::memory_order_relaxed);
  }

  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<DevicePagemap> pgmap_;
  std::vector<std::vector<std::byte>> vram_;
  MmuIntervalNotifier sub_;
  Mutex lock_;  // the device lock
  std::vector<uint64_t> free_ USVM_GUARDED_BY(lock_);
  uint64_t invalidations_ USVM_GUARDED_BY(lock_) = 0;
  std::map<uint64_t, Pfn> exclusive_ USVM_GUARDED_BY(lock_);  // device page table: exclusive pages
  uint64_t exclusive_revoked_ USVM_GUARDED_BY(lock_) = 0;
  std::atomic<uint64_t> cpu_faults_{0};
  std::atomic<uint64_t> evicted_{0};
  std::atomic<uint64_t> bad_migrate_to_ram_{0};
  std::atomic<uint64_t> migrate_to_ram_delay_us_{0};
  std::atomic<uint64_t> to_device_{0};
  std::atomic<uint64_t> to_system_{0};
  std::atomic<uint64_t> device_full_{0};
  std::atomic<uint64_t> timeout_ns_{1'000'000'000};
};

}  // namespace usvm::mm::testing

#endif  // USVM_TESTS_MM_DMIRROR_H_
