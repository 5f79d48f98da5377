// Pagemap / Devmem (drm_pagemap): migration to device memory and back,
// all-or-nothing, every error, CPU touch of a whole allocation, the
// timeslice, eviction without the mmap lock, Release accounting, peers,
// direct device-to-device copies, fork, populate and unbind.
#include "usvm/gpusvm/pagemap.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

#include "gpusvm/test_vram.h"
#include "mm/test_util.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::gpusvm {
namespace {

using mm::AddressSpace;
using mm::kPageSize;
using mm::PteInfo;
using mm::testing::Pattern;
using testing::TestVram;

class PagemapTest : public ::testing::Test {
 protected:
  PagemapTest() {
    auto clock = std::make_unique<ManualClock>(1'000'000'000);
    clock_ = clock.get();
    env_ = std::make_unique<Env>(std::move(clock), 1);
    pool_ = mm::testing::MakePool(256, *env_);
    as_ = mm::testing::MakeSpace(*pool_, *env_);
    vram_ = TestVram::Create({.npages = 1024, .owner = nullptr, .env = env_.get()});
  }
  ~PagemapTest() override {
    vram_.reset();
    vram2_.reset();
    as_.reset();
  }

  uint64_t Map(uint64_t len, uint32_t flags = mm::kMapPrivate | mm::kMapAnonymous) {
    auto a = as_->Mmap(0, len, mm::kProtRead | mm::kProtWrite, flags);
    EXPECT_TRUE(a.has_value());
    return a.value_or(0);
  }
  // Maps `len` bytes and fills them with Pattern(len, seed).
  uint64_t MapFilled(uint64_t len, uint8_t seed) {
    const uint64_t a = Map(len);
    auto p = Pattern(len, seed);
    EXPECT_TRUE(as_->Write(a, p.data(), len).has_value());
    return a;
  }
  std::vector<uint8_t> CpuRead(uint64_t a, uint64_t len) {
    std::vector<uint8_t> v(len);
    EXPECT_TRUE(as_->Read(a, v.data(), len).has_value());
    return v;
  }
  bool OnDevice(uint64_t a, const TestVram& v) {
    PteInfo p = as_->QueryPte(a);
    return p.kind == PteInfo::Kind::kDevicePrivate && v.Owns(p.pfn);
  }
  bool OnSystem(uint64_t a) { return as_->QueryPte(a).kind == PteInfo::Kind::kPresent; }
  // The device's view of [a, a + len): the bytes of its frames.
  std::vector<uint8_t> DeviceRead(const TestVram& v, uint64_t a, uint64_t len) {
    std::vector<uint8_t> out(len);
    for (uint64_t off = 0; off < len; off += kPageSize) {
      PteInfo p = as_->QueryPte(a + off);
      EXPECT_TRUE(v.Owns(p.pfn));
      if (!v.Owns(p.pfn)) return out;
      std::memcpy(out.data() + off, v.Data(p.pfn), std::min(kPageSize, len - off));
    }
    return out;
  }
  std::shared_ptr<mm::Mm> mm() { return as_; }

  ManualClock* clock_;
  std::unique_ptr<Env> env_;
  std::unique_ptr<mm::FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<TestVram> vram_;
  std::unique_ptr<TestVram> vram2_;
};

constexpr uint64_t k16 = 16 * kPageSize;

TEST_F(PagemapTest, MigrateThenDeviceAndCpuSeeTheBytes) {
  const uint64_t a = MapFilled(k16, 3);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value()) << dm.error().ToString();
  const void* rec = nullptr;
  for (uint64_t off = 0; off < k16; off += kPageSize) {
    ASSERT_TRUE(OnDevice(a + off, *vram_)) << off;
    const void* r = vram_->pagemap().AllocationOf(as_->QueryPte(a + off).pfn);
    ASSERT_NE(r, nullptr);
    if (rec) {
      EXPECT_EQ(r, rec);  // one record for the whole migration
    }
    rec = r;
    EXPECT_EQ(vram_->pagemap().DevmemOf(as_->QueryPte(a + off).pfn), dm->get());
  }
  EXPECT_EQ(DeviceRead(*vram_, a, k16), Pattern(k16, 3));
  EXPECT_EQ((*dm)->range_start(), a);
  EXPECT_EQ((*dm)->range_end(), a + k16);
  auto s = vram_->pagemap().stats();
  EXPECT_EQ(s.migrations_to_devmem, 1u);
  EXPECT_EQ(s.pages_to_devmem, 16u);
  EXPECT_EQ(vram_->pages_in_use(), 16u);
  EXPECT_FALSE((*dm)->detached());

  // The CPU reads it back (a touch brings the whole allocation home).
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 3));
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off)) << off;
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(vram_->free_pages(), vram_->npages());
  s = vram_->pagemap().stats();
  EXPECT_EQ(s.migrations_to_ram, 1u);
  EXPECT_EQ(s.pages_to_ram, 16u);
  EXPECT_EQ(s.releases, 1u);
  EXPECT_EQ(vram_->pagemap().DebugLiveAllocations(), 0u);
}

TEST_F(PagemapTest, HolesReadAsZeros) {
  const uint64_t a = Map(k16);
  // Touch only page 3.
  const uint8_t x = 0x5a;
  ASSERT_TRUE(as_->Write(a + 3 * kPageSize + 7, &x, 1).has_value());
  ASSERT_TRUE(vram_->Migrate(mm(), a, a + k16).has_value());
  auto dev = DeviceRead(*vram_, a, k16);
  std::vector<uint8_t> want(k16, 0);
  want[3 * kPageSize + 7] = x;
  EXPECT_EQ(dev, want);
  EXPECT_EQ(CpuRead(a, k16), want);
}

TEST_F(PagemapTest, ErrorsConsumeTheAllocationOnce) {
  const uint64_t a = MapFilled(k16, 1);
  Pagemap& pm = vram_->pagemap();
  uint64_t releases = 0;
  auto expect = [&](Result<void> r, Errc code) {
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), code) << r.error().ToString();
    ++releases;
    EXPECT_EQ(vram_->releases(), releases);
    EXPECT_EQ(vram_->free_pages(), vram_->npages());
    EXPECT_EQ(vram_->pages_in_use(), 0u);
  };
  auto alloc = [&](uint64_t len) { return vram_->Alloc(mm(), len).value(); };

  EXPECT_EQ(pm.MigrateToDevmem(nullptr, *as_, a, a + k16, {}).error().code(), Errc::kInval);
  expect(pm.MigrateToDevmem(alloc(k16), *as_, a + 1, a + k16, {}), Errc::kInval);  // unaligned
  expect(pm.MigrateToDevmem(alloc(k16), *as_, a, a, {}), Errc::kInval);            // empty
  expect(pm.MigrateToDevmem(alloc(k16), *as_, a + k16, a, {}), Errc::kInval);      // reversed
  expect(pm.MigrateToDevmem(alloc(kPageSize), *as_, a, a + k16, {}), Errc::kInval);  // too small
  // Beyond the VMA.
  expect(pm.MigrateToDevmem(alloc(2 * k16), *as_, a, a + 2 * k16, {}), Errc::kInval);
  // No VMA.
  ASSERT_TRUE(as_->Munmap(a + k16 - kPageSize, kPageSize).has_value());
  expect(pm.MigrateToDevmem(alloc(kPageSize), *as_, a + k16 - kPageSize, a + k16, {}),
         Errc::kNoEnt);
  // Shared memory is not private anonymous.
  const uint64_t sh = Map(k16, mm::kMapShared | mm::kMapAnonymous);
  expect(pm.MigrateToDevmem(alloc(k16), *as_, sh, sh + k16, {}), Errc::kBusy);
  // Another address space.
  auto other = mm::testing::MakeSpace(*pool_, *env_);
  {
    auto d = vram_->Alloc(other, kPageSize).value();
    expect(pm.MigrateToDevmem(d, *as_, a, a + kPageSize, {}), Errc::kInval);
  }
  // No ops.
  {
    auto d = std::make_shared<Devmem>(pm, nullptr, mm(), kPageSize);
    auto r = pm.MigrateToDevmem(d, *as_, a, a + kPageSize, {});
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), Errc::kOpNotSupp);
    EXPECT_TRUE(d->detached());  // consumed all the same (no Release op to call)
  }
  // Size not a multiple of a page.
  {
    auto d = std::make_shared<TestVram::VramAlloc>(pm, vram_.get(), mm(), 100,
                                                   std::vector<mm::DevicePfn>{});
    auto r = pm.MigrateToDevmem(d, *as_, a, a + kPageSize, {});
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), Errc::kInval);
    ++releases;
    EXPECT_EQ(vram_->releases(), releases);
  }
  // Used twice: the second call fails and releases nothing more.
  {
    auto d = alloc(kPageSize);
    ASSERT_TRUE(pm.MigrateToDevmem(d, *as_, a, a + kPageSize, {}).has_value());
    auto r = pm.MigrateToDevmem(d, *as_, a + kPageSize, a + 2 * kPageSize, {});
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), Errc::kInval);
    EXPECT_EQ(vram_->releases(), releases);
    const auto want = Pattern(k16, 1);
    EXPECT_EQ(CpuRead(a, kPageSize), std::vector<uint8_t>(want.begin(), want.begin() + kPageSize));
    ++releases;
    EXPECT_EQ(vram_->releases(), releases);
  }
  // A mm that is gone.
  {
    auto child = as_->Fork().value();
    auto d = vram_->Alloc(child, kPageSize).value();
    child->Exit();
    expect(pm.MigrateToDevmem(d, *child, a, a + kPageSize, {}), Errc::kFault);
  }
  // Nothing moved through all of that.
  for (uint64_t off = 0; off < k16 - kPageSize; off += kPageSize) EXPECT_FALSE(OnDevice(a + off, *vram_));
}

TEST_F(PagemapTest, DevmemOfAnotherPagemapIsRefusedAndReleased) {
  vram2_ = TestVram::Create({.npages = 64, .owner = nullptr, .env = env_.get()});
  const uint64_t a = MapFilled(k16, 1);
  auto d = vram2_->Alloc(mm(), k16).value();
  auto r = vram_->pagemap().MigrateToDevmem(d, *as_, a, a + k16, {});
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kInval);
  EXPECT_EQ(vram2_->releases(), 1u);
  EXPECT_EQ(vram2_->free_pages(), 64u);
}

TEST_F(PagemapTest, AllOrNothingWhenAPageCannotBeCollected) {
  const uint64_t a = MapFilled(k16, 2);
  // A long-term pin keeps page 5 from migrating.
  mm::Pfn pinned;
  ASSERT_TRUE(as_->PinUserPages(a + 5 * kPageSize, 1, true, &pinned).has_value());
  auto r = vram_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kBusy);
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off)) << off;
  EXPECT_EQ(vram_->copy_to_devmem_calls(), 0u);
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->free_pages(), vram_->npages());
  as_->UnpinUserPage(pinned);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 2));
}

TEST_F(PagemapTest, AllOrNothingWithPagesOfAnotherOwner) {
  vram2_ = TestVram::Create({.npages = 64, .owner = nullptr, .env = env_.get()});
  const uint64_t a = MapFilled(k16, 4);
  ASSERT_TRUE(vram2_->Migrate(mm(), a, a + 4 * kPageSize).has_value());
  auto r = vram_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kBusy);
  for (uint64_t off = 4 * kPageSize; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_TRUE(OnDevice(a, *vram2_));
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 4));
}

TEST_F(PagemapTest, CopyFailureMovesNothing) {
  const uint64_t a = MapFilled(k16, 5);
  vram_->FailNextCopyToDevmem();
  auto r = vram_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kIo);
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(vram_->free_pages(), vram_->npages());
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 5));
}

TEST_F(PagemapTest, AlreadyThereSucceedsWithoutCopying) {
  const uint64_t a = MapFilled(k16, 6);
  auto first = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(first.has_value());
  const uint64_t copies = vram_->copy_to_devmem_calls();
  auto second = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  EXPECT_EQ(vram_->copy_to_devmem_calls(), copies);
  EXPECT_TRUE((*second)->detached());  // unused: released at once
  EXPECT_FALSE((*first)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pagemap().AllocationOf(as_->QueryPte(a).pfn),
            vram_->pagemap().AllocationOf(as_->QueryPte(a + kPageSize).pfn));
  EXPECT_EQ(vram_->pagemap().DevmemOf(as_->QueryPte(a).pfn), first->get());
}

TEST_F(PagemapTest, SamePagemapNeedsTheFlag) {
  const uint64_t a = MapFilled(k16, 7);
  auto half = vram_->Migrate(mm(), a, a + k16 / 2);
  ASSERT_TRUE(half.has_value());
  auto r = vram_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kBusy);
  EXPECT_TRUE(OnSystem(a + k16 / 2));
  MigrateDetails d;
  d.can_migrate_same_pagemap = true;
  auto whole = vram_->Migrate(mm(), a, a + k16, d);
  ASSERT_TRUE(whole.has_value()) << whole.error().ToString();
  // The first allocation's pages were moved into the new one: released.
  EXPECT_TRUE((*half)->detached());
  for (uint64_t off = 0; off < k16; off += kPageSize) {
    ASSERT_TRUE(OnDevice(a + off, *vram_));
    EXPECT_EQ(vram_->pagemap().DevmemOf(as_->QueryPte(a + off).pfn), whole->get());
  }
  EXPECT_EQ(DeviceRead(*vram_, a, k16), Pattern(k16, 7));
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 7));
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(vram_->releases(), 3u);
}

TEST_F(PagemapTest, CpuTouchBringsTheWholeAllocationBack) {
  const uint64_t a = MapFilled(k16, 8);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  uint8_t b;
  ASSERT_TRUE(as_->Read(a + 5 * kPageSize + 11, &b, 1).has_value());
  EXPECT_EQ(b, Pattern(k16, 8)[5 * kPageSize + 11]);
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off)) << off;
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pagemap().stats().migrations_to_ram, 1u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 8));
}

TEST_F(PagemapTest, CpuTouchIsClampedToTheFaultingVma) {
  const uint64_t a = MapFilled(k16, 9);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  // Split the VMA: the back half becomes read-only.
  ASSERT_TRUE(as_->Mprotect(a + k16 / 2, k16 / 2, mm::kProtRead).has_value());
  uint8_t b;
  ASSERT_TRUE(as_->Read(a, &b, 1).has_value());
  for (uint64_t off = 0; off < k16 / 2; off += kPageSize) EXPECT_TRUE(OnSystem(a + off)) << off;
  for (uint64_t off = k16 / 2; off < k16; off += kPageSize)
    EXPECT_TRUE(OnDevice(a + off, *vram_)) << off;
  EXPECT_FALSE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 0u);
  ASSERT_TRUE(as_->Read(a + k16 - 1, &b, 1).has_value());
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off)) << off;
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 9));
}

TEST_F(PagemapTest, CpuTouchWaitsForTheTimeslice) {
  const uint64_t a = MapFilled(k16, 10);
  MigrateDetails d;
  d.timeslice_ms = 5;
  const uint64_t t0 = env_->NowNs();
  auto dm = vram_->Migrate(mm(), a, a + k16, d);
  ASSERT_TRUE(dm.has_value());
  EXPECT_EQ((*dm)->timeslice_expiry_ns(), t0 + 5'000'000);
  clock_->Advance(1'000'000);  // 1 ms in: the touch waits the other 4
  uint8_t b;
  ASSERT_TRUE(as_->Read(a, &b, 1).has_value());
  EXPECT_GE(env_->NowNs(), t0 + 5'000'000);
  EXPECT_EQ(vram_->pagemap().stats().timeslice_waits, 1u);
  EXPECT_TRUE((*dm)->detached());

  // After the expiry there is no wait.
  auto dm2 = vram_->Migrate(mm(), a, a + k16, d);
  ASSERT_TRUE(dm2.has_value());
  clock_->Advance(6'000'000);
  const uint64_t t1 = env_->NowNs();
  ASSERT_TRUE(as_->Read(a, &b, 1).has_value());
  EXPECT_EQ(env_->NowNs(), t1);
  EXPECT_EQ(vram_->pagemap().stats().timeslice_waits, 1u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 10));
}

TEST_F(PagemapTest, EvictToRamWithoutTheMmapLock) {
  const uint64_t a = MapFilled(k16, 11);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  std::shared_ptr<Devmem> d = *dm;
  ASSERT_TRUE(vram_->pagemap().EvictToRam(d).has_value());
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_TRUE(d->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pagemap().stats().evictions, 1u);
  EXPECT_EQ(vram_->pagemap().stats().migrations_to_ram, 0u);  // no CPU fault
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 11));
  // Evicting a detached allocation succeeds at once.
  EXPECT_TRUE(vram_->pagemap().EvictToRam(d).has_value());
  EXPECT_EQ(vram_->releases(), 1u);
}

TEST_F(PagemapTest, EvictCompletesWhileAnotherThreadHoldsTheMmapReadLock) {
  const uint64_t a = MapFilled(k16, 12);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  std::atomic<bool> held{false}, done{false};
  std::thread holder([&] {
    ReadLock l(as_->mmap_lock());
    held = true;
    // Holds the lock until the eviction finished (or 10 s passed).
    for (int i = 0; i < 10000 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (!held) std::this_thread::yield();
  std::shared_ptr<Devmem> d = *dm;
  auto r = vram_->pagemap().EvictToRam(d);
  const bool lock_still_held = as_->mmap_lock().DebugIsLocked();
  done = true;
  holder.join();
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_TRUE(lock_still_held);
  EXPECT_TRUE(d->detached());
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 12));
}

// Regression (found by the stress test): a CPU touch whose fault page
// someone else holds a passing reference on (an evictor between get and
// trylock, another fault between unlock and put) cannot collect it; the
// mm refaults a bounded number of times and then fails the access with
// EIO. MigrateToRam now waits for the reference to go.
TEST_F(PagemapTest, CpuTouchWaitsOutAPassingReference) {
  const uint64_t a = MapFilled(k16, 25);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  mm::DevicePagemap& pg = vram_->pagemap().pgmap();
  const uint64_t idx = pg.IndexOf(as_->QueryPte(a).pfn);
  pg.Get(idx);  // the passing reference
  std::atomic<bool> done{false};
  Result<void> r;
  std::vector<uint8_t> got(k16);
  std::thread cpu([&] {
    r = as_->Read(a, got.data(), k16);
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(done.load());  // still waiting, not failed
  pg.Put(idx);
  cpu.join();
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(got, Pattern(k16, 25));
  EXPECT_TRUE((*dm)->detached());
}

TEST_F(PagemapTest, EvictErrors) {
  Pagemap& pm = vram_->pagemap();
  EXPECT_EQ(pm.EvictToRam(nullptr).error().code(), Errc::kInval);
  auto fresh = vram_->Alloc(mm(), k16).value();
  EXPECT_EQ(pm.EvictToRam(fresh).error().code(), Errc::kInval);  // never migrated
  vram2_ = TestVram::Create({.npages = 64, .owner = nullptr, .env = env_.get()});
  const uint64_t a = MapFilled(k16, 13);
  auto theirs = vram2_->Migrate(mm(), a, a + k16).value();
  EXPECT_EQ(pm.EvictToRam(theirs).error().code(), Errc::kInval);
  // A copy failure leaves the pages on the device; the retry moves them.
  vram2_->FailNextCopyToRam();
  ASSERT_TRUE(vram2_->pagemap().EvictToRam(theirs).has_value());
  EXPECT_TRUE(theirs->detached());
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 13));
}

TEST_F(PagemapTest, ReleaseRunsOnceAfterMunmap) {
  const uint64_t a = MapFilled(k16, 14);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  ASSERT_TRUE(as_->Munmap(a, k16 / 2).has_value());
  EXPECT_FALSE((*dm)->detached());
  EXPECT_EQ(vram_->pages_in_use(), 8u);
  ASSERT_TRUE(as_->Munmap(a + k16 / 2, k16 / 2).has_value());
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->free_pages(), vram_->npages());
  EXPECT_EQ(vram_->pagemap().stats().pages_to_ram, 0u);
}

TEST_F(PagemapTest, PeersSeeEachOthersPagesThroughRangeFault) {
  static int shared_owner;
  vram_ = TestVram::Create({.npages = 256, .owner = &shared_owner, .env = env_.get()});
  vram2_ = TestVram::Create({.npages = 256, .owner = &shared_owner, .env = env_.get()});
  vram_->LinkPeer(*vram2_, /*direct=*/false);
  const uint64_t a = MapFilled(k16, 15);
  ASSERT_TRUE(vram_->Migrate(mm(), a, a + k16).has_value());

  struct Ops : mm::MmuIntervalNotifierOps {
    bool Invalidate(mm::MmuIntervalNotifier* sub, const mm::NotifierRange&, uint64_t seq) override {
      MutexLock l(mu);
      sub->SetSeq(seq);
      return true;
    }
    Mutex mu;
  } ops;
  mm::MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->InsertIntervalNotifier(&sub, a, k16, &ops).has_value());
  std::vector<uint64_t> words(16);
  mm::HmmRange r;
  r.notifier = &sub;
  r.start = a;
  r.end = a + k16;
  r.hmm_pfns = words.data();
  r.default_flags = mm::kPfnReqFault;
  r.dev_private_owner = &shared_owner;
  ASSERT_TRUE(mm::RangeFaultAndCommit(*as_, r, [&](mm::HmmRange& rr) -> Result<bool> {
                MutexLock l(ops.mu);
                return !sub.ReadRetry(rr.notifier_seq);
              }).has_value());
  for (uint64_t i = 0; i < 16; ++i) {
    ASSERT_TRUE(words[i] & mm::kPfnDevice) << i;
    const mm::DevicePfn pfn = mm::HmmPfn(words[i]);
    EXPECT_TRUE(vram_->Owns(pfn));
    // The peer reaches it over the interconnect; the owner locally.
    Pagemap* pm = Pagemap::FromPage(pfn);
    ASSERT_EQ(pm, &vram_->pagemap());
    auto peer = pm->DeviceMap(vram2_->device(), pfn, 0);
    ASSERT_TRUE(peer.has_value());
    EXPECT_EQ(peer->proto, AddrProto::kPeer);
    auto local = pm->DeviceMap(vram_->device(), pfn, 0);
    ASSERT_TRUE(local.has_value());
    EXPECT_EQ(local->proto, AddrProto::kLocal);
    int stranger;
    EXPECT_FALSE(pm->DeviceMap(&stranger, pfn, 0).has_value());
  }
  EXPECT_EQ(vram_->pagemap().stats().migrations_to_ram, 0u);
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnDevice(a + off, *vram_));
  ASSERT_TRUE(sub.Remove().has_value());
}

class PeerMigrationTest : public PagemapTest, public ::testing::WithParamInterface<bool> {};

TEST_P(PeerMigrationTest, DeviceToDevice) {
  const bool direct = GetParam();
  static int shared_owner;
  vram_ = TestVram::Create({.npages = 256, .owner = &shared_owner, .env = env_.get()});
  vram2_ = TestVram::Create({.npages = 256, .owner = &shared_owner, .env = env_.get()});
  vram_->LinkPeer(*vram2_, direct);
  const uint64_t a = MapFilled(k16, 16);
  auto on_a = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(on_a.has_value());
  // Without source_peer_migrates: EBUSY, as the kernel.
  auto r = vram2_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kBusy);
  EXPECT_TRUE(OnDevice(a, *vram_));
  MigrateDetails d;
  d.source_peer_migrates = true;
  auto on_b = vram2_->Migrate(mm(), a, a + k16, d);
  ASSERT_TRUE(on_b.has_value()) << on_b.error().ToString();
  for (uint64_t off = 0; off < k16; off += kPageSize) ASSERT_TRUE(OnDevice(a + off, *vram2_));
  EXPECT_TRUE((*on_a)->detached());
  EXPECT_EQ(DeviceRead(*vram2_, a, k16), Pattern(k16, 16));
  auto s = vram2_->pagemap().stats();
  EXPECT_EQ(s.peer_pages_direct, direct ? 16u : 0u);
  EXPECT_EQ(s.peer_pages_bounced, direct ? 0u : 16u);
  EXPECT_EQ(vram2_->peer_copy_calls(), direct ? 1u : 0u);
  EXPECT_EQ(vram_->copy_to_ram_calls(), direct ? 0u : 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 16));
  EXPECT_EQ(vram2_->pages_in_use(), 0u);
}

INSTANTIATE_TEST_SUITE_P(DirectAndBounced, PeerMigrationTest, ::testing::Bool());

TEST_F(PagemapTest, ForkWhilePagesAreOnTheDevice) {
  const uint64_t a = MapFilled(k16, 17);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  auto child = as_->Fork().value();
  // The child's touch gives it its own copy.
  std::vector<uint8_t> v(k16);
  ASSERT_TRUE(child->Read(a, v.data(), k16).has_value());
  EXPECT_EQ(v, Pattern(k16, 17));
  const uint8_t x = 0xee;
  ASSERT_TRUE(child->Write(a, &x, 1).has_value());
  // The parent's bytes are unchanged.
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 17));
  child->Exit();
  child.reset();
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
}

TEST_F(PagemapTest, PopulateMm) {
  Pagemap& pm = vram_->pagemap();
  const uint64_t a = MapFilled(k16, 18);
  EXPECT_EQ(pm.PopulateMm(a, a + k16, nullptr, 0).error().code(), Errc::kInval);
  EXPECT_EQ(pm.PopulateMm(a + 1, a + k16, mm(), 0).error().code(), Errc::kInval);
  EXPECT_EQ(pm.PopulateMm(a, a, mm(), 0).error().code(), Errc::kInval);
  ASSERT_TRUE(pm.PopulateMm(a, a + k16, mm(), 3).has_value());
  EXPECT_EQ(vram_->populate_mm_calls(), 1u);
  EXPECT_TRUE(OnDevice(a, *vram_));
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 18));
  EXPECT_EQ(pm.stats().timeslice_waits, 1u);
  // A gone address space.
  auto child = as_->Fork().value();
  child->Exit();
  std::shared_ptr<mm::Mm> cm = child;
  EXPECT_EQ(pm.PopulateMm(a, a + k16, cm, 0).error().code(), Errc::kFault);
}

TEST_F(PagemapTest, UnbindEvictsAndRefusesNewWork) {
  Pagemap& pm = vram_->pagemap();
  const uint64_t a = MapFilled(k16, 19);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  EXPECT_EQ(pm.Unbind(), 0u);
  EXPECT_TRUE(pm.unbound());
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(pm.PopulateMm(a, a + k16, mm(), 0).error().code(), Errc::kNoDev);
  auto r = vram_->Migrate(mm(), a, a + k16);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kNoDev);
  EXPECT_EQ(vram_->releases(), 2u);
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 19));
}

TEST_F(PagemapTest, TeardownWithPagesMappedBringsThemHome) {
  const uint64_t a = MapFilled(k16, 20);
  ASSERT_TRUE(vram_->Migrate(mm(), a, a + k16).has_value());
  vram_.reset();
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 20));
}

TEST_F(PagemapTest, CpuTouchCopyFailureFailsTheAccessAndKeepsThePages) {
  const uint64_t a = MapFilled(k16, 21);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  vram_->FailNextCopyToRam();
  uint8_t b;
  auto r = as_->Read(a, &b, 1);
  ASSERT_FALSE(r.has_value());  // SIGBUS in the kernel's terms
  for (uint64_t off = 0; off < k16; off += kPageSize) EXPECT_TRUE(OnDevice(a + off, *vram_));
  EXPECT_FALSE((*dm)->detached());
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 21));  // the next touch works
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
}

TEST_F(PagemapTest, PopulateGivingFramesInUseIsRefused) {
  const uint64_t a = MapFilled(k16, 22);
  auto first = vram_->Migrate(mm(), a, a + k16 / 2);
  ASSERT_TRUE(first.has_value());
  // A buggy driver hands out frames the first allocation still uses (the
  // last one free, so some pages get initialised before the failure).
  std::vector<mm::DevicePfn> frames((*first)->frames().begin(), (*first)->frames().end());
  std::reverse(frames.begin(), frames.end());
  frames.insert(frames.begin(), vram_->pagemap().pgmap().PfnOf(vram_->npages() - 1));
  frames.resize(k16 / 2 / kPageSize);
  auto bad = std::make_shared<TestVram::VramAlloc>(vram_->pagemap(), vram_.get(), mm(), k16 / 2,
                                                   frames);
  auto r = vram_->pagemap().MigrateToDevmem(bad, *as_, a + k16 / 2, a + k16, {});
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kBusy);
  EXPECT_TRUE(bad->detached());
  EXPECT_FALSE((*first)->detached());
  for (uint64_t off = k16 / 2; off < k16; off += kPageSize) EXPECT_TRUE(OnSystem(a + off));
  EXPECT_EQ(vram_->pages_in_use(), 8u);  // only the first allocation's
  const auto want = Pattern(k16, 22);
  EXPECT_EQ(DeviceRead(*vram_, a, k16 / 2), std::vector<uint8_t>(want.begin(), want.begin() + k16 / 2));
  // A frame outside the pagemap: EINVAL.
  auto alien = std::make_shared<TestVram::VramAlloc>(
      vram_->pagemap(), vram_.get(), mm(), kPageSize, std::vector<mm::DevicePfn>{1});
  r = vram_->pagemap().MigrateToDevmem(alien, *as_, a + k16 / 2, a + k16 / 2 + kPageSize, {});
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kInval);
  EXPECT_TRUE(alien->detached());
  EXPECT_EQ(CpuRead(a, k16), Pattern(k16, 22));
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(vram_->free_pages(), vram_->npages());
}

TEST_F(PagemapTest, MremappedAllocationComesHomeOnTouch) {
  const uint64_t a = MapFilled(k16, 23);
  auto dm = vram_->Migrate(mm(), a, a + k16);
  ASSERT_TRUE(dm.has_value());
  auto b = as_->Mremap(a, k16, k16, mm::kMremapMayMove | mm::kMremapFixed, a + 64 * k16);
  ASSERT_TRUE(b.has_value()) << b.error().ToString();
  EXPECT_TRUE(OnDevice(*b, *vram_));
  // Outside the recorded range: the kernel's size-aligned window, clamped.
  EXPECT_EQ(CpuRead(*b, k16), Pattern(k16, 23));
  EXPECT_TRUE((*dm)->detached());
}

// 2 MiB: a THP (or an untouched 2 MiB of anonymous memory) moves as one
// 2 MiB device page when the driver's frames are one aligned block, else
// as 512 pages; CPU touch and eviction bring it home either way.
class HugePagemapTest : public PagemapTest,
                        public ::testing::WithParamInterface<std::tuple<bool, bool, bool>> {};

TEST_P(HugePagemapTest, TwoMiB) {
  const auto [thp, blocks, evict] = GetParam();
  constexpr uint64_t k2M = mm::kHugePageSize;
  const uint64_t m = Map(3 * k2M);
  const uint64_t a = mm::HugeAlignUp(m);
  if (thp) {
    ASSERT_TRUE(as_->Madvise(a, k2M, mm::kMadvHugePage).has_value());
  }
  auto want = Pattern(k2M, 24);
  if (thp) {
    ASSERT_TRUE(as_->Write(a, want.data(), k2M).has_value());
    ASSERT_TRUE(as_->QueryPte(a).huge);
  } else {
    want.assign(k2M, 0);  // never touched: one empty 2 MiB unit, zeros
  }
  vram_->set_huge_blocks(blocks);
  // Without blocks, keep the frames off the 2 MiB grid (a fresh VRAM would
  // hand out an aligned run by chance).
  std::shared_ptr<TestVram::VramAlloc> offset;
  if (!blocks) offset = vram_->Alloc(mm(), kPageSize).value();
  auto dm = vram_->Migrate(mm(), a, a + k2M);
  ASSERT_TRUE(dm.has_value()) << dm.error().ToString();
  EXPECT_EQ(vram_->pagemap().stats().huge_pages_to_devmem, blocks ? 1u : 0u);
  EXPECT_EQ(as_->QueryPte(a).huge, blocks);
  for (uint64_t off = 0; off < k2M; off += 61 * kPageSize) EXPECT_TRUE(OnDevice(a + off, *vram_));
  EXPECT_EQ(DeviceRead(*vram_, a, k2M), want);
  if (evict) {
    ASSERT_TRUE(vram_->pagemap().EvictToRam(*dm).has_value());
  } else {
    uint8_t b;
    ASSERT_TRUE(as_->Read(a + 77 * kPageSize, &b, 1).has_value());
    // A 2 MiB device page comes home whole, as one 2 MiB system page.
    EXPECT_EQ(as_->QueryPte(a).huge, blocks);
  }
  EXPECT_TRUE((*dm)->detached());
  EXPECT_EQ(vram_->releases(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(CpuRead(a, k2M), want);
}

INSTANTIATE_TEST_SUITE_P(ThpBlocksEvict, HugePagemapTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool(), ::testing::Bool()));

TEST_F(PagemapTest, ForeignAndFreeFrames) {
  Pagemap& pm = vram_->pagemap();
  EXPECT_EQ(pm.AllocationOf(pm.pgmap().PfnOf(0)), nullptr);  // free
  EXPECT_EQ(pm.AllocationOf(0), nullptr);                    // not ours
  EXPECT_EQ(pm.DevmemOf(pm.pgmap().base() + pm.pgmap().npages()), nullptr);
  EXPECT_EQ(Pagemap::FromPage(pm.pgmap().PfnOf(3)), &pm);
  EXPECT_EQ(Pagemap::FromPage(0), nullptr);
}

TEST_F(PagemapTest, PopulateWithoutTheOpIsNotSupported) {
  struct MapOnly : PagemapOps {
    Result<DeviceAddr> DeviceMap(Pagemap&, const void*, mm::DevicePfn, unsigned) override {
      return DeviceAddr{};
    }
    void DeviceUnmap(Pagemap&, const void*, const DeviceAddr&) override {}
  } ops;
  int owner, device;
  PagemapConfig c;
  c.npages = 8;
  c.owner = &owner;
  c.device = &device;
  c.ops = &ops;
  auto pm = Pagemap::TryCreate(c);
  ASSERT_TRUE(pm.has_value());
  const uint64_t a = Map(k16);
  EXPECT_EQ((*pm)->PopulateMm(a, a + k16, mm(), 0).error().code(), Errc::kOpNotSupp);
  EXPECT_EQ(&(*pm)->env(), &Env::Default());
}

TEST_F(PagemapTest, TryCreateRejectsBadConfigs) {
  PagemapConfig c;
  EXPECT_EQ(Pagemap::TryCreate(c).error().code(), Errc::kInval);
  int owner, device;
  c.npages = 4;
  c.owner = &owner;
  c.device = &device;
  EXPECT_EQ(Pagemap::TryCreate(c).error().code(), Errc::kInval);  // no ops
}

}  // namespace
}  // namespace usvm::gpusvm
