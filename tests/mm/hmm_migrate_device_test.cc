// Migration by device frame (migrate_device.h): eviction without the mmap
// lock through the device reverse map, and pagemap teardown built on it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "dmirror.h"
#include "test_util.h"
#include "usvm/mm/migrate_device.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPages = 8;

uint64_t Pattern(int who, uint64_t page) { return (uint64_t(who) << 32) | (page + 1); }

// Records the MIGRATE notifications one address space gets, with owner.
class MigrateLog final : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    MutexLock l(mu);
    sub->SetSeq(cur_seq);
    if (r.event == NotifyEvent::kMigrate) owners.push_back(r.owner);
    return true;
  }
  std::vector<const void*> Take() {
    MutexLock l(mu);
    return std::exchange(owners, {});
  }
  Mutex mu;
  std::vector<const void*> owners USVM_GUARDED_BY(mu);
};

class MigrateDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(64);
    as_ = testing::MakeSpace(*pool_);
    dev_ = testing::DMirror::Create(as_, 2 * kPages);
    ASSERT_TRUE(dev_);
    a_ = *as_->Mmap(0, kPages * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
    ASSERT_TRUE(dev_->Watch(a_, kPages * kPageSize).has_value());
    for (uint64_t p = 0; p < kPages; ++p) ASSERT_TRUE(as_->AtomicStore(a_ + p * kPageSize, Pattern(0, p)).has_value());
    ASSERT_EQ(*dev_->MigrateToDevice(a_, a_ + kPages * kPageSize), kPages);
  }
  std::vector<DevicePfn> DevicePfns() {
    std::vector<DevicePfn> pfns;
    for (uint64_t p = 0; p < kPages; ++p) pfns.push_back(as_->QueryPte(a_ + p * kPageSize).pfn);
    return pfns;
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<testing::DMirror> dev_;
  uint64_t a_ = 0;
};

// A parent and two forked children (one forked from the other) share every
// device page; eviction by device frame finds all three mappings through
// the rmap, notifies each space with the pagemap's owner, and leaves all
// three on one system copy with the device bytes; writes then COW apart.
TEST_F(MigrateDeviceTest, EvictionReachesParentAndTwoForkedChildren) {
  auto child1 = *as_->Fork();
  auto child2 = *child1->Fork();
  std::shared_ptr<AddressSpace> spaces[3] = {as_, child1, child2};
  MigrateLog logs[3];
  MmuIntervalNotifier subs[3];
  for (int s = 0; s < 3; ++s)
    ASSERT_TRUE(spaces[s]->notifiers().Insert(&subs[s], a_, kPages * kPageSize, &logs[s]).has_value());
  const auto pfns = DevicePfns();
  for (uint64_t p = 0; p < kPages; ++p) {
    for (auto& sp : spaces) ASSERT_EQ(sp->QueryPte(a_ + p * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
    EXPECT_EQ(dev_->pagemap().DebugRmapCount(dev_->pagemap().IndexOf(pfns[p])), 3u);
  }
  // No mmap lock is held by anyone here.
  auto moved = EvictDevicePages(dev_->pagemap(), pfns.data(), pfns.size());
  ASSERT_TRUE(moved.has_value());
  EXPECT_EQ(*moved, kPages);
  EXPECT_EQ(dev_->evicted(), kPages);
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  EXPECT_EQ(dev_->free_pages(), 2 * kPages) << "PageFree for every page";
  for (int s = 0; s < 3; ++s) {
    auto owners = logs[s].Take();
    EXPECT_FALSE(owners.empty()) << "space " << s << " got no MIGRATE notification";
    for (const void* o : owners) EXPECT_EQ(o, dev_.get());
  }
  for (uint64_t p = 0; p < kPages; ++p) {
    const uint64_t addr = a_ + p * kPageSize;
    const Pfn shared = as_->QueryPte(addr).pfn;
    for (auto& sp : spaces) {
      const PteInfo pte = sp->QueryPte(addr);
      EXPECT_EQ(pte.kind, PteInfo::Kind::kPresent);
      EXPECT_FALSE(pte.device_memory);
      EXPECT_FALSE(pte.writable) << "still shared copy-on-write";
      EXPECT_EQ(pte.pfn, shared);
      EXPECT_EQ(*sp->AtomicLoad(addr), Pattern(0, p));
    }
    EXPECT_EQ(dev_->pagemap().DebugRmapCount(dev_->pagemap().IndexOf(pfns[p])), 0u);
  }
  for (int s = 0; s < 3; ++s)
    for (uint64_t p = 0; p < kPages; ++p)
      ASSERT_TRUE(spaces[s]->AtomicStore(a_ + p * kPageSize, Pattern(s + 1, p)).has_value());
  for (int s = 0; s < 3; ++s)
    for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(*spaces[s]->AtomicLoad(a_ + p * kPageSize), Pattern(s + 1, p));
  for (int s = 0; s < 3; ++s) ASSERT_TRUE(subs[s].Remove().has_value());
  child2->Exit();
  child1->Exit();
}

// The rmap follows entries that move (mremap) and forgets zapped ones
// (munmap, exit), so eviction finds the moved mapping and nothing else.
TEST_F(MigrateDeviceTest, RmapFollowsMremapAndForgetsZappedEntries) {
  auto child = *as_->Fork();
  const auto pfns = DevicePfns();
  auto& pm = dev_->pagemap();
  // Child: move the range elsewhere. Parent: unmap the second half.
  const uint64_t moved_to =
      *child->Mremap(a_, kPages * kPageSize, kPages * kPageSize, kMremapMayMove | kMremapFixed,
                     a_ + 64 * kPageSize);
  ASSERT_TRUE(as_->Munmap(a_ + kPages / 2 * kPageSize, kPages / 2 * kPageSize).has_value());
  for (uint64_t p = 0; p < kPages; ++p)
    EXPECT_EQ(pm.DebugRmapCount(pm.IndexOf(pfns[p])), p < kPages / 2 ? 2u : 1u) << p;
  ASSERT_EQ(*EvictDevicePages(pm, pfns.data(), pfns.size()), kPages);
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(child->QueryPte(moved_to + p * kPageSize).kind, PteInfo::Kind::kPresent);
    EXPECT_EQ(*child->AtomicLoad(moved_to + p * kPageSize), Pattern(0, p));
    if (p < kPages / 2) {
      EXPECT_EQ(*as_->AtomicLoad(a_ + p * kPageSize), Pattern(0, p));
    }
  }
  EXPECT_EQ(dev_->device_pages_in_use(), 0u);
  child->Exit();
  EXPECT_EQ(pool_->RefCount(as_->QueryPte(a_).pfn), 1u) << "the child's reference went with it";
}

// A page someone else holds locked (a CPU fault, a migrator), or with a
// reference that is not a mapping, is not collected and keeps its entries.
TEST_F(MigrateDeviceTest, LockedOrExtraReferencedPagesAreNotCollected) {
  const auto pfns = DevicePfns();
  auto& pm = dev_->pagemap();
  const uint64_t locked = pm.IndexOf(pfns[1]), held = pm.IndexOf(pfns[2]);
  ASSERT_TRUE(pm.TryLockPage(locked));
  pm.Get(held);
  std::vector<uint64_t> src(kPages), dst(kPages);
  ASSERT_TRUE(MigrateDevicePfns(pm, pfns.data(), kPages, src.data(), dst.data()).has_value());
  for (uint64_t p = 0; p < kPages; ++p) {
    const bool busy = p == 1 || p == 2;
    EXPECT_EQ(src[p] == 0, busy) << p;
    EXPECT_EQ(as_->QueryPte(a_ + p * kPageSize).kind, busy ? PteInfo::Kind::kDevicePrivate : PteInfo::Kind::kMigration) << p;
  }
  // Nothing copied: finalize restores every device entry.
  MigrateDevicePages(pm, src.data(), dst.data(), kPages);
  MigrateDeviceFinalize(pm, nullptr, src.data(), dst.data(), kPages);
  for (uint64_t p = 0; p < kPages; ++p)
    EXPECT_EQ(as_->QueryPte(a_ + p * kPageSize).kind, PteInfo::Kind::kDevicePrivate) << p;
  EXPECT_TRUE(pm.PageLocked(locked)) << "not ours to unlock";
  pm.UnlockPage(locked);
  pm.Put(held);
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(*as_->AtomicLoad(a_ + p * kPageSize), Pattern(0, p));
}

TEST_F(MigrateDeviceTest, BadArgumentsAreEinval) {
  auto& pm = dev_->pagemap();
  const auto pfns = DevicePfns();
  std::vector<uint64_t> src(kPages), dst(kPages);
  EXPECT_EQ(MigrateDevicePfns(pm, nullptr, 1, src.data(), dst.data()).error(), Errc::kInval);
  EXPECT_EQ(MigrateDevicePfns(pm, pfns.data(), 0, src.data(), dst.data()).error(), Errc::kInval);
  EXPECT_EQ(MigrateDevicePfns(pm, pfns.data(), 1, nullptr, dst.data()).error(), Errc::kInval);
  const DevicePfn outside[2] = {pfns[0], pm.base() + pm.npages()};
  EXPECT_EQ(MigrateDevicePfns(pm, outside, 2, src.data(), dst.data()).error(), Errc::kInval);
  EXPECT_EQ(MigrateDeviceRange(pm, pm.npages(), 1, src.data(), dst.data()).error(), Errc::kInval);
  EXPECT_EQ(MigrateDeviceRange(pm, 1, pm.npages(), src.data(), dst.data()).error(), Errc::kInval);
  EXPECT_EQ(EvictDevicePages(pm, outside, 2).error(), Errc::kInval);
  // Nothing was touched by the refused calls.
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(as_->QueryPte(a_ + p * kPageSize).kind, PteInfo::Kind::kDevicePrivate);
    EXPECT_FALSE(pm.PageLocked(pm.IndexOf(pfns[p])));
  }
  // Free pages are simply not collected.
  std::vector<uint64_t> src2(pm.npages()), dst2(pm.npages());
  ASSERT_TRUE(MigrateDeviceRange(pm, 0, pm.npages(), src2.data(), dst2.data()).has_value());
  uint64_t collected = 0;
  for (uint64_t w : src2) collected += (w & kMigratePfnMigrate) != 0;
  EXPECT_EQ(collected, kPages);
  MigrateDevicePages(pm, src2.data(), dst2.data(), pm.npages());
  MigrateDeviceFinalize(pm, nullptr, src2.data(), dst2.data(), pm.npages());
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(*as_->AtomicLoad(a_ + p * kPageSize), Pattern(0, p));
}

// A device with its own bookkeeping that outlives the pagemap, to watch
// teardown: PageFree per page, and whether it came before the destructor
// returned.
class TeardownDevice final : public DevicePagemapOps {
 public:
  void PageFree(DevicePagemap&, uint64_t index) override { frees[index].fetch_add(1); }
  Result<void> MigrateToRam(Mm&, uint64_t, DevicePagemap&, uint64_t) override {
    return Err(Errc::kFault, "teardown device: no CPU faults expected");
  }
  Result<void> CopyToRam(DevicePagemap&, uint64_t index, std::byte* to) override {
    std::memcpy(to, vram[index].data(), kPageSize);
    return {};
  }
  std::vector<std::vector<std::byte>> vram = std::vector<std::vector<std::byte>>(kPages, std::vector<std::byte>(kPageSize));
  std::atomic<int> frees[kPages] = {};
};

// Moves [a, a + kPages pages) of `as` into pgmap (page p -> device page p).
void MoveToDevice(AddressSpace& as, DevicePagemap& pm, TeardownDevice& dev, uint64_t a) {
  std::vector<uint64_t> src(kPages), dst(kPages);
  MigrateVma m;
  m.start = a;
  m.end = a + kPages * kPageSize;
  m.src = src.data();
  m.dst = dst.data();
  m.pgmap_owner = &dev;
  m.flags = kMigrateSelectSystem;
  ReadLock l(as.mmap_lock());
  ASSERT_TRUE(as.MigrateVmaSetup(m).has_value());
  for (uint64_t p = 0; p < kPages; ++p) {
    ASSERT_TRUE(src[p] & kMigratePfnValid);
    ASSERT_TRUE(pm.InitPage(p).has_value());
    std::memcpy(dev.vram[p].data(), as.pool().Data(MigratePfnOf(src[p])), kPageSize);
    dst[p] = MigratePfn(pm.PfnOf(p), true);
  }
  as.MigrateVmaPages(m);
  as.MigrateVmaFinalize(m);
}

// memunmap_pages: teardown brings every mapped page home in every space
// (forked child included), calls PageFree for every page, and waits for a
// reference held elsewhere to go before it returns.
TEST(MigrateDeviceTeardownTest, TeardownEvictsEveryMapperAndWaitsForEveryReference) {
  auto pool = testing::MakePool(32);
  auto as = testing::MakeSpace(*pool);
  TeardownDevice dev;
  auto pm = std::move(*DevicePagemap::TryCreate(kPages, &dev, &dev));
  const uint64_t a = *as->Mmap(0, kPages * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  for (uint64_t p = 0; p < kPages; ++p) ASSERT_TRUE(as->AtomicStore(a + p * kPageSize, Pattern(7, p)).has_value());
  MoveToDevice(*as, *pm, dev, a);
  auto child = *as->Fork();
  ASSERT_EQ(child->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  // Someone (a migrator, a driver thread) holds page 3 a while longer.
  DevicePagemap* raw = pm.get();
  raw->Get(3);
  std::atomic<bool> dropped{false};
  std::thread holder([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    dropped.store(true);
    raw->Put(3);
  });
  pm.reset();  // teardown
  EXPECT_TRUE(dropped.load()) << "teardown returned before the last reference went";
  holder.join();
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(dev.frees[p].load(), 1) << "PageFree once for page " << p;
    for (auto* sp : {as.get(), child.get()}) {
      EXPECT_EQ(sp->QueryPte(a + p * kPageSize).kind, PteInfo::Kind::kPresent);
      EXPECT_EQ(*sp->AtomicLoad(a + p * kPageSize), Pattern(7, p));
    }
  }
  child->Exit();
}

}  // namespace
}  // namespace usvm::mm
