// TestVram: a test device-memory driver for the gpusvm layer (the role xe's
// VRAM manager plays for drm_pagemap), built only on gpusvm's public API.
//
// It owns `npages` pages of real bytes (a lazily committed anonymous
// mapping), a free map of frames (2 MiB-aligned blocks for 2 MiB
// allocations), and a Pagemap over them; it implements
// PagemapOps (DeviceMap: kLocal for its own device, kPeer for devices
// linked with LinkPeer, EFAULT for anyone else; PopulateMm: Alloc +
// MigrateToDevmem) and DevmemOps (frames, copies, Release returning the
// frames). Every op is counted. Copy ops can be made to fail
// (FailNext...), and the direct device-to-device path can be enabled per
// peer (LinkPeer(..., direct), SetDirectFrom).
//
// Devices that share an owner are peers in the mm's eyes (range fault
// reports each other's pages): pass the same owner to both Create calls.
//
// Thread-safety: every method may be called concurrently; lock_ guards the
// free map and the peer table; counters are atomics. Device bytes are
// copied only while their pages are locked and unmapped (the copy ops).
//
// Usage:
//   auto vram = TestVram::Create({.npages = 1024});
//   auto dm = vram->Alloc(as, len).value();
//   vram->pagemap().MigrateToDevmem(dm, *as, addr, addr + len, {});
#ifndef USVM_TESTS_GPUSVM_TEST_VRAM_H_
#define USVM_TESTS_GPUSVM_TEST_VRAM_H_

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/mm.h"

namespace usvm::gpusvm::testing {

class TestVram final : public PagemapOps, public DevmemOps {
 public:
  struct Config {
    uint64_t npages = 1024;
    const void* owner = nullptr;  // null: this device alone (owner = the TestVram)
    Env* env = nullptr;           // the pagemap's clock (null: Env::Default())
  };

  // One allocation: its frames, in address order.
  class VramAlloc final : public Devmem {
   public:
    // `frames` as the driver will report them. Made by Alloc (whose frames
    // Release returns), or by a test directly (bogus frames: Release
    // returns nothing).
    VramAlloc(Pagemap& pm, DevmemOps* ops, std::shared_ptr<mm::Mm> mm, uint64_t size,
              std::vector<mm::DevicePfn> frames, bool from_alloc = false)
        : Devmem(pm, ops, std::move(mm), size), frames_(std::move(frames)), from_alloc_(from_alloc) {}
    const std::vector<mm::DevicePfn>& frames() const { return frames_; }
    bool from_alloc() const { return from_alloc_; }

   private:
    const std::vector<mm::DevicePfn> frames_;
    const bool from_alloc_;
  };

  static std::unique_ptr<TestVram> Create(const Config& config) {
    std::unique_ptr<TestVram> v(new TestVram(config.npages));
    if (v->bytes_ == nullptr) return nullptr;
    PagemapConfig pc;
    pc.npages = config.npages;
    pc.owner = config.owner ? config.owner : v.get();
    pc.device = v.get();
    pc.ops = v.get();
    pc.env = config.env;
    auto pm = Pagemap::TryCreate(pc);
    if (!pm) return nullptr;
    v->pm_ = std::move(*pm);
    v->base_ = v->pm_->pgmap().base();
    {
      MutexLock l(v->lock_);
      v->free_map_.assign(config.npages, true);
      v->nfree_ = config.npages;
    }
    return v;
  }
  ~TestVram() override {
    // The pagemap's teardown evicts what is still mapped (through our
    // CopyToRam) and releases every allocation: keep the bytes, and pm_
    // set (Release and Data use it), until then.
    delete pm_.get();
    (void)pm_.release();
    munmap(bytes_, npages_ * mm::kPageSize);
  }
  TestVram(const TestVram&) = delete;
  TestVram& operator=(const TestVram&) = delete;

  Pagemap& pagemap() const { return *pm_; }
  const void* device() const { return this; }

  // An allocation of `size` bytes (rounded up to pages) for `mm`, frames
  // in ascending order. A multiple of 2 MiB gets whole 2 MiB blocks (512
  // free frames starting at an index that is a multiple of 512) when
  // enough are free and huge blocks are enabled (set_huge_blocks), so its
  // migrations can use 2 MiB device pages; otherwise any free frames.
  // EINVAL for size 0; ENOMEM when not enough frames are free.
  Result<std::shared_ptr<VramAlloc>> Alloc(std::shared_ptr<mm::Mm> mm, uint64_t size) {
    const uint64_t n = (size + mm::kPageSize - 1) / mm::kPageSize;
    if (n == 0) return Err(Errc::kInval, "test vram: empty allocation");
    std::vector<mm::DevicePfn> frames;
    frames.reserve(n);
    {
      MutexLock l(lock_);
      if (nfree_ < n) {
        alloc_failures_++;
        return Err(Errc::kNoMem, "test vram: full");
      }
      if (n % mm::kPagesPerHuge == 0 && huge_blocks_) {
        for (uint64_t b = 0; b + mm::kPagesPerHuge <= npages_ && frames.size() < n;
             b += mm::kPagesPerHuge) {
          bool all = true;
          for (uint64_t k = 0; k < mm::kPagesPerHuge && all; ++k) all = free_map_[b + k];
          if (!all) continue;
          for (uint64_t k = 0; k < mm::kPagesPerHuge; ++k) frames.push_back(base_ + b + k);
        }
        if (frames.size() < n) frames.clear();
      }
      if (frames.empty()) {
        for (uint64_t k = 0; k < npages_ && frames.size() < n; ++k) {
          const uint64_t i = (cursor_ + k) % npages_;
          if (free_map_[i]) frames.push_back(base_ + i);
        }
        cursor_ = (frames.back() - base_ + 1) % npages_;
      }
      for (mm::DevicePfn f : frames) free_map_[f - base_] = false;
      nfree_ -= n;
    }
    if (!std::is_sorted(frames.begin(), frames.end())) std::sort(frames.begin(), frames.end());
    allocs_++;
    return std::make_shared<VramAlloc>(*pm_, this, std::move(mm), n * mm::kPageSize,
                                       std::move(frames), /*from_alloc=*/true);
  }

  // Alloc + MigrateToDevmem of [start, end). The allocation is returned
  // (for EvictToRam) when the migration succeeded.
  Result<std::shared_ptr<VramAlloc>> Migrate(const std::shared_ptr<mm::Mm>& mm, uint64_t start,
                                          uint64_t end, const MigrateDetails& details = {}) {
    if (end <= start) return Err(Errc::kInval, "test vram: empty range");
    auto a = USVM_TRY(Alloc(mm, end - start));
    USVM_TRY(pm_->MigrateToDevmem(a, *mm, start, end, details));
    return a;
  }

  // Peers: `other` reaches our memory over an interconnect (DeviceMap
  // answers kPeer to it), both ways. With `direct`, each copies the
  // other's pages straight into its own (CopyFromPeer); without, such
  // copies bounce through system memory.
  void LinkPeer(TestVram& other, bool direct) {
    {
      MutexLock l(lock_);
      peers_[&other] = direct;
    }
    MutexLock l(other.lock_);
    other.peers_[this] = direct;
  }

  // Whether we copy `peer`'s pages into ours directly (it stays a peer).
  void SetDirectFrom(const TestVram& peer, bool direct) {
    MutexLock l(lock_);
    peers_[&peer] = direct;
  }

  // The 4 KiB of one of our device frames (tests read device memory
  // through it, as the device would).
  std::byte* Data(mm::DevicePfn pfn) const {
    return bytes_ + (pfn - base_) * mm::kPageSize;
  }
  bool Owns(mm::DevicePfn pfn) const {
    return pfn >= base_ && pfn - base_ < npages_;
  }

  // ---- PagemapOps ----
  Result<DeviceAddr> DeviceMap(Pagemap& pm, const void* device, mm::DevicePfn pfn,
                               unsigned order) override {
    device_maps_++;
    if (!Owns(pfn)) return Err(Errc::kInval, "test vram: not our frame");
    const uint64_t off = (pfn - base_) * mm::kPageSize;
    if (device == this) return DeviceAddr{off, AddrProto::kLocal, static_cast<uint8_t>(order)};
    MutexLock l(lock_);
    for (auto& [peer, direct] : peers_)
      if (peer == device)
        return DeviceAddr{kPeerBase + off, AddrProto::kPeer, static_cast<uint8_t>(order)};
    return Err(Errc::kFault, "test vram: device cannot reach this memory");
  }
  void DeviceUnmap(Pagemap&, const void*, const DeviceAddr&) override { device_unmaps_++; }
  Result<void> PopulateMm(Pagemap& pm, uint64_t start, uint64_t end,
                          const std::shared_ptr<mm::Mm>& mm, uint64_t timeslice_ms) override {
    populate_mm_calls_++;
    auto a = USVM_TRY(Alloc(mm, end - start));
    MigrateDetails d;
    d.timeslice_ms = timeslice_ms;
    return pm.MigrateToDevmem(std::move(a), *mm, start, end, d);
  }

  // ---- DevmemOps ----
  void Release(Devmem& devmem) override {
    auto& a = static_cast<VramAlloc&>(devmem);
    releases_++;
    MutexLock l(lock_);
    if (!a.from_alloc()) return;
    for (mm::DevicePfn f : a.frames()) free_map_[f - base_] = true;
    nfree_ += a.frames().size();
  }
  Result<void> PopulateDevmemPfn(Devmem& devmem, uint64_t npages, mm::DevicePfn* pfns) override {
    populate_pfn_calls_++;
    auto& a = static_cast<VramAlloc&>(devmem);
    if (npages > a.frames().size()) return Err(Errc::kInval, "test vram: more pages than the allocation");
    std::copy_n(a.frames().begin(), npages, pfns);
    return {};
  }
  Result<void> CopyToDevmem(Devmem&, const mm::DevicePfn* dst, std::byte* const* src,
                            uint64_t n) override {
    if (fail_copy_to_devmem_.exchange(false)) return Err(Errc::kIo, "test vram: copy failed (injected)");
    copy_to_devmem_calls_++;
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < n; ++i) {
      if (src[i])
        Copy(Data(dst[i]), src[i], mm::kPageSize);
      else
        Zero(Data(dst[i]));
    }
    AddCopyTime(t0);
    pages_to_devmem_ += n;
    return {};
  }
  Result<void> CopyToRam(Devmem&, const mm::DevicePfn* src, std::byte* const* dst,
                         uint64_t n) override {
    if (fail_copy_to_ram_.exchange(false)) return Err(Errc::kIo, "test vram: copy failed (injected)");
    copy_to_ram_calls_++;
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < n; ++i) Copy(dst[i], Data(src[i]), mm::kPageSize);
    AddCopyTime(t0);
    pages_to_ram_ += n;
    return {};
  }
  Result<void> CopyFromPeer(Devmem&, const mm::DevicePfn* dst, Pagemap& from,
                            const mm::DevicePfn* src, uint64_t n) override {
    auto* peer = static_cast<const TestVram*>(from.device());
    if (peer != this) {
      MutexLock l(lock_);
      auto it = peers_.find(peer);
      if (it == peers_.end() || !it->second)
        return Err(Errc::kOpNotSupp, "test vram: no direct path");
    }
    peer_copy_calls_++;
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < n; ++i) Copy(Data(dst[i]), peer->Data(src[i]), mm::kPageSize);
    AddCopyTime(t0);
    pages_from_peer_ += n;
    return {};
  }

  // ---- test controls and counters ----
  void FailNextCopyToDevmem() { fail_copy_to_devmem_ = true; }
  // Whether 2 MiB allocations get whole aligned blocks (default true).
  void set_huge_blocks(bool v) {
    MutexLock l(lock_);
    huge_blocks_ = v;
  }
  void FailNextCopyToRam() { fail_copy_to_ram_ = true; }
  uint64_t free_pages() {
    MutexLock l(lock_);
    return nfree_;
  }
  uint64_t npages() const { return npages_; }
  uint64_t pages_in_use() const { return pm_->pgmap().DebugPagesInUse(); }
  uint64_t allocs() const { return allocs_; }
  uint64_t alloc_failures() const { return alloc_failures_; }
  uint64_t releases() const { return releases_; }
  uint64_t populate_mm_calls() const { return populate_mm_calls_; }
  uint64_t populate_pfn_calls() const { return populate_pfn_calls_; }
  uint64_t copy_to_devmem_calls() const { return copy_to_devmem_calls_; }
  uint64_t copy_to_ram_calls() const { return copy_to_ram_calls_; }
  uint64_t peer_copy_calls() const { return peer_copy_calls_; }
  uint64_t pages_to_devmem() const { return pages_to_devmem_; }
  uint64_t pages_to_ram() const { return pages_to_ram_; }
  uint64_t pages_from_peer() const { return pages_from_peer_; }
  uint64_t device_maps() const { return device_maps_; }
  uint64_t device_unmaps() const { return device_unmaps_; }
  // Real time spent inside the copy loops of the copy ops (ns).
  uint64_t copy_ns() const { return copy_ns_; }

  static constexpr uint64_t kPeerBase = uint64_t{1} << 48;

 private:
  explicit TestVram(uint64_t npages) : npages_(npages) {
    void* p = mmap(nullptr, npages * mm::kPageSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    bytes_ = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
  }

  // The copy engine. The copy ops only run while the pages involved are
  // locked and unmapped (migration entries: CPU accesses wait), so a plain
  // memcpy races with nothing.
  static void Copy(std::byte* dst, const std::byte* src, uint64_t n) { std::memcpy(dst, src, n); }
  static void Zero(std::byte* dst) { std::memset(dst, 0, mm::kPageSize); }
  void AddCopyTime(std::chrono::steady_clock::time_point t0) {
    copy_ns_ += static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                          std::chrono::steady_clock::now() - t0)
                                          .count());
  }

  const uint64_t npages_;
  std::byte* bytes_ = nullptr;  // npages_ * 4 KiB, MAP_NORESERVE
  std::unique_ptr<Pagemap> pm_;
  mm::DevicePfn base_ = 0;  // our first frame (constant after Create)

  Mutex lock_;
  std::vector<bool> free_map_ USVM_GUARDED_BY(lock_);  // by frame index
  uint64_t nfree_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t cursor_ USVM_GUARDED_BY(lock_) = 0;  // where a small allocation starts looking
  bool huge_blocks_ USVM_GUARDED_BY(lock_) = true;
  std::map<const TestVram*, bool> peers_ USVM_GUARDED_BY(lock_);  // peer -> direct copy

  std::atomic<bool> fail_copy_to_devmem_{false}, fail_copy_to_ram_{false};
  std::atomic<uint64_t> allocs_{0}, alloc_failures_{0}, releases_{0}, populate_mm_calls_{0},
      populate_pfn_calls_{0}, copy_to_devmem_calls_{0}, copy_to_ram_calls_{0}, peer_copy_calls_{0},
      pages_to_devmem_{0}, pages_to_ram_{0}, pages_from_peer_{0}, device_maps_{0},
      device_unmaps_{0}, copy_ns_{0};
};

}  // namespace usvm::gpusvm::testing

#endif  // USVM_TESTS_GPUSVM_TEST_VRAM_H_
