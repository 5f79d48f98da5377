// A test device with 2 MiB device pages (the role of lib/test_hmm.c's
// THP support): device memory in 2 MiB blocks, migration with
// kMigrateSelectCompound, and the 4 KiB fallback when a 2 MiB allocation
// fails (HMM_DMIRROR_FLAG_FAIL_ALLOC), in both directions. Device-private
// or device-coherent. Used by hmm_compound_test.cc and hmm_bench.cc.
//
// Thread-safety: every method may be called concurrently (a migrating
// thread, CPU faults calling MigrateToRam on others); mu_ guards the
// allocation state, the counters are atomics.
#ifndef USVM_TESTS_MM_HUGE_DEVICE_H_
#define USVM_TESTS_MM_HUGE_DEVICE_H_

#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm::testing {

class HugeDevice final : public DevicePagemapOps {
 public:
  // `blocks` 2 MiB blocks of device memory.
  static std::unique_ptr<HugeDevice> Create(uint64_t blocks, DeviceMemoryKind kind) {
    auto d = std::unique_ptr<HugeDevice>(new HugeDevice());
    const uint64_t npages = blocks * kPagesPerHuge;
    auto pm = DevicePagemap::TryCreate(npages, d.get(), d.get(), kind);
    if (!pm) return nullptr;
    d->pgmap_ = std::move(*pm);
    if (kind == DeviceMemoryKind::kPrivate) d->vram_.resize(npages << kPageShift);
    MutexLock l(d->mu_);
    d->used_.assign(npages, false);
    d->whole_.assign(blocks, false);
    return d;
  }
  ~HugeDevice() override {
    // Deleting the pagemap migrates what is still mapped home through
    // MigrateToRam, which uses pgmap_: keep it set meanwhile.
    delete pgmap_.get();
    (void)pgmap_.release();
  }

  DevicePagemap& pgmap() { return *pgmap_; }
  // Make 2 MiB allocations (device and system) fail: the 4 KiB fallback.
  void set_fail_huge_alloc(bool v) { fail_huge_alloc_.store(v); }
  std::byte* Data(uint64_t index) {
    return pgmap_->coherent() ? pgmap_->CoherentData(index) : vram_.data() + (index << kPageShift);
  }
  // The bytes of the device page a migrate word or range-fault pfn names.
  std::byte* DataOfPfn(DevicePfn dpfn) { return Data(pgmap_->IndexOf(dpfn)); }

  struct Stats {
    uint64_t huge_to_device = 0, small_to_device = 0;  // units moved
    uint64_t huge_to_ram = 0, small_to_ram = 0;
    uint64_t cpu_faults = 0;
  };
  Stats stats() const {
    return {counters_.huge_to_device.load(), counters_.small_to_device.load(),
            counters_.huge_to_ram.load(), counters_.small_to_ram.load(), counters_.cpu_faults.load()};
  }

  // Moves [start, end) to device memory (with 2 MiB units when `compound`).
  // Returns the 4 KiB pages moved. REQUIRES: the mmap read lock.
  Result<uint64_t> ToDevice(AddressSpace& as, uint64_t start, uint64_t end, bool compound = true) {
    return Move(as, start, end, true, compound);
  }
  Result<uint64_t> ToRam(AddressSpace& as, uint64_t start, uint64_t end, bool compound = true) {
    return Move(as, start, end, false, compound);
  }

  // DevicePagemapOps.
  void PageFree(DevicePagemap&, uint64_t index) override {
    MutexLock l(mu_);
    used_[index] = false;
    whole_[index / kPagesPerHuge] = false;
  }
  // The fault path holds the page locked and referenced: it is passed as
  // fault_page.
  Result<void> MigrateToRam(Mm& port, uint64_t addr, DevicePagemap& pgmap, uint64_t index) override {
    AddressSpace& as = static_cast<AddressSpace&>(port);
    counters_.cpu_faults.fetch_add(1);
    const DevicePfn fault_page = pgmap.PfnOf(index);
    bool whole;
    {
      MutexLock l(mu_);
      whole = whole_[index / kPagesPerHuge];
    }
    if (whole) {
      // A 2 MiB device page: bring all of it home as one page, if the
      // whole 2 MiB is still one mapping (else the 4 KiB path below).
      const uint64_t base = addr & kHugeMask;
      auto r = Move(as, base, base + kHugePageSize, false, true, fault_page);
      if (r) return {};
      if (r.error() != Errc::kInval) return Err(r.error());
    }
    USVM_TRY(Move(as, addr, addr + kPageSize, false, false, fault_page));
    return {};
  }
  // Device-frame eviction: the page's 4 KiB to a system page.
  Result<void> CopyToRam(DevicePagemap&, uint64_t index, std::byte* to) override {
    std::memcpy(to, Data(index), kPageSize);
    return {};
  }

 private:
  HugeDevice() = default;

  // A free, 2 MiB-aligned run of 512 device pages, each initialised.
  Result<uint64_t> AllocBlock() {
    if (fail_huge_alloc_.load()) return Err(Errc::kNoMem, "2 MiB device allocation failed (injected)");
    MutexLock l(mu_);
    for (uint64_t b = 0; b < whole_.size(); ++b) {
      const uint64_t first = b * kPagesPerHuge;
      bool free = true;
      for (uint64_t k = 0; k < kPagesPerHuge && free; ++k) free = !used_[first + k];
      if (!free) continue;
      for (uint64_t k = 0; k < kPagesPerHuge; ++k) {
        USVM_TRY(pgmap_->InitPage(first + k));
        used_[first + k] = true;
      }
      whole_[b] = true;
      return first;
    }
    return Err(Errc::kNoMem, "no free 2 MiB block of device memory");
  }
  Result<uint64_t> AllocPage() {
    MutexLock l(mu_);
    // Next fit from where the last allocation ended.
    for (uint64_t n = 0; n < used_.size(); ++n) {
      const uint64_t i = (next_ + n) % used_.size();
      if (used_[i]) continue;
      USVM_TRY(pgmap_->InitPage(i));
      used_[i] = true;
      next_ = i + 1;
      return i;
    }
    return Err(Errc::kNoMem, "device memory full");
  }

  // Source bytes of a src word (nullptr for a hole).
  std::byte* SrcData(AddressSpace& as, uint64_t w) {
    if (!(w & kMigratePfnValid)) return nullptr;
    return (w & kMigratePfnDevice) ? DataOfPfn(MigratePfnOf(w)) : as.pool().Data(MigratePfnOf(w));
  }
  static void CopyOrZero(std::byte* to, const std::byte* from, uint64_t n) {
    if (from)
      std::memcpy(to, from, n);
    else
      std::memset(to, 0, n);
  }

  // One destination 4 KiB page for source word `w`; its dst word, or 0.
  uint64_t MoveSmall(AddressSpace& as, uint64_t w, bool to_device) {
    const std::byte* from = SrcData(as, w);
    if (to_device) {
      auto idx = AllocPage();
      if (!idx) return 0;
      CopyOrZero(Data(*idx), from, kPageSize);
      return MigratePfn(pgmap_->PfnOf(*idx), true);
    }
    auto pfn = as.pool().AllocPage(FramePool::Zero::kNo);
    if (!pfn) return 0;
    CopyOrZero(as.pool().Data(*pfn), from, kPageSize);
    return MigratePfn(*pfn, false);
  }

  Result<uint64_t> Move(AddressSpace& as, uint64_t start, uint64_t end, bool to_device, bool compound,
                        DevicePfn fault_page = 0) {
    as.mmap_lock().AssertReaderHeld();
    const uint64_t n = (end - start) >> kPageShift;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = start;
    m.end = end;
    m.src = src.data();
    m.dst = dst.data();
    m.pgmap_owner = this;
    m.flags = (to_device ? kMigrateSelectSystem
                         : (pgmap_->coherent() ? kMigrateSelectDeviceCoherent
                                               : kMigrateSelectDevicePrivate)) |
              (compound ? kMigrateSelectCompound : 0);
    m.fault_page = fault_page;
    USVM_TRY(as.MigrateVmaSetup(m));
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      if (!(src[i] & kMigratePfnMigrate)) continue;
      if (!(src[i] & kMigratePfnCompound)) {
        if (!to_device && !(src[i] & kMigratePfnValid)) continue;  // a hole stays a hole
        dst[i] = MoveSmall(as, src[i], to_device);
        moved += dst[i] != 0;
        continue;
      }
      // A 2 MiB unit: one 2 MiB destination, else 512 4 KiB ones.
      const std::byte* from = SrcData(as, src[i]);
      if (to_device) {
        if (auto b = AllocBlock()) {
          CopyOrZero(Data(*b), from, kHugePageSize);
          dst[i] = MigratePfn(pgmap_->PfnOf(*b), true) | kMigratePfnCompound;
          counters_.huge_to_device.fetch_add(1);
          moved += kPagesPerHuge;
          i += kPagesPerHuge - 1;
          continue;
        }
      } else if (!fail_huge_alloc_.load()) {
        if (auto base = as.pool().AllocHuge(FramePool::Zero::kNo)) {
          CopyOrZero(as.pool().Data(*base), from, kHugePageSize);
          dst[i] = MigratePfn(*base, false) | kMigratePfnCompound;
          counters_.huge_to_ram.fetch_add(1);
          moved += kPagesPerHuge;
          i += kPagesPerHuge - 1;
          continue;
        }
      }
      for (uint64_t k = 0; k < kPagesPerHuge; ++k) {
        const uint64_t w = (src[i] & kMigratePfnValid) ? (src[i] & ~kMigratePfnCompound) +
                                                              (k << kMigratePfnShift)
                                                        : kMigratePfnMigrate;
        dst[i + k] = MoveSmall(as, w, to_device);
        moved += dst[i + k] != 0;
      }
      if (to_device)
        counters_.small_to_device.fetch_add(1);
      else
        counters_.small_to_ram.fetch_add(1);
      i += kPagesPerHuge - 1;
    }
    as.MigrateVmaPages(m);
    as.MigrateVmaFinalize(m);
    return moved;
  }

  std::unique_ptr<DevicePagemap> pgmap_;
  std::vector<std::byte> vram_;  // device-private bytes (coherent: the pagemap's arena)
  Mutex mu_;
  std::vector<bool> used_ USVM_GUARDED_BY(mu_);   // device page allocated
  std::vector<bool> whole_ USVM_GUARDED_BY(mu_);  // block allocated as one 2 MiB page, none freed yet
  uint64_t next_ USVM_GUARDED_BY(mu_) = 0;        // where AllocPage looks first
  std::atomic<bool> fail_huge_alloc_{false};
  struct {
    std::atomic<uint64_t> huge_to_device{0}, small_to_device{0}, huge_to_ram{0}, small_to_ram{0},
        cpu_faults{0};
  } counters_;
};

}  // namespace usvm::mm::testing

#endif  // USVM_TESTS_MM_HUGE_DEVICE_H_
