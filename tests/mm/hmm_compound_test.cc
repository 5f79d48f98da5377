// 2 MiB device pages (MIGRATE_VMA_SELECT_COMPOUND): the THP migration
// scenarios of the kernel's newest hmm-tests.c (migrate_anon_huge_empty,
// _zero, _free, _fault, _err, _zero_err) plus partial unmap, remap, fork and
// mprotect of a 2 MiB device page, each for device-private and
// device-coherent memory, through the HugeDevice test device.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "huge_device.h"
#include "usvm/mm/migrate_device.h"
#include "test_util.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm {
namespace {

using testing::HugeDevice;

class CompoundTest : public ::testing::TestWithParam<DeviceMemoryKind> {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
    dev_ = HugeDevice::Create(4, GetParam());
    ASSERT_NE(dev_, nullptr);
  }
  void TearDown() override {
    dev_.reset();
    as_->Exit();
  }
  bool coherent() const { return GetParam() == DeviceMemoryKind::kCoherent; }

  // A 2 MiB-aligned MADV_HUGEPAGE region inside a 4 MiB mapping.
  uint64_t MapHugeRegion(uint32_t prot = kProtRead | kProtWrite) {
    raw_ = *as_->Mmap(0, 2 * kHugePageSize, prot, kMapPrivate | kMapAnonymous);
    const uint64_t a = (raw_ + kHugePageSize - 1) & kHugeMask;
    EXPECT_TRUE(as_->Madvise(a, kHugePageSize, kMadvHugePage).has_value());
    return a;
  }
  void FillPattern(uint64_t a) {
    std::vector<uint32_t> v(kHugePageSize / 4);
    for (uint32_t i = 0; i < v.size(); ++i) v[i] = i;
    ASSERT_TRUE(as_->Write(a, v.data(), kHugePageSize).has_value());
  }
  // Checks the CPU view of the 2 MiB at a: the pattern, or zeros.
  void ExpectCpu(uint64_t a, bool pattern) {
    std::vector<uint32_t> v(kHugePageSize / 4);
    ASSERT_TRUE(as_->Read(a, v.data(), kHugePageSize).has_value());
    for (uint32_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], pattern ? i : 0u) << "word " << i;
  }
  // Checks what the device holds for the 4 KiB page at a.
  void ExpectDevicePage(uint64_t a, bool pattern) {
    const PteInfo p = as_->QueryPte(a);
    ASSERT_TRUE(p.device_memory) << std::hex << a;
    const auto* w = reinterpret_cast<const uint32_t*>(dev_->DataOfPfn(p.pfn));
    const uint32_t first = static_cast<uint32_t>((a & (kHugePageSize - 1)) / 4);
    for (uint32_t i = 0; i < kPageSize / 4; ++i) ASSERT_EQ(w[i], pattern ? first + i : 0u);
  }
  Result<uint64_t> ToDevice(uint64_t a, uint64_t len = kHugePageSize) {
    ReadLock l(as_->mmap_lock());
    return dev_->ToDevice(*as_, a, a + len);
  }
  Result<uint64_t> ToRam(uint64_t a, uint64_t len = kHugePageSize) {
    ReadLock l(as_->mmap_lock());
    return dev_->ToRam(*as_, a, a + len);
  }
  PteInfo::Kind DeviceKind() const {
    return coherent() ? PteInfo::Kind::kPresent : PteInfo::Kind::kDevicePrivate;
  }
  // The 2 MiB at a is one 2 MiB device page.
  void ExpectHugeDevicePage(uint64_t a) {
    const PteInfo p = as_->QueryPte(a);
    EXPECT_TRUE(p.huge);
    EXPECT_TRUE(p.device_memory);
    EXPECT_EQ(p.kind, DeviceKind());
    EXPECT_EQ(as_->QueryPte(a + kHugePageSize - kPageSize).pfn, p.pfn + kPagesPerHuge - 1);
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<HugeDevice> dev_;
  uint64_t raw_ = 0;
};

// migrate_anon_huge_empty: an unpopulated 2 MiB becomes one device page.
TEST_P(CompoundTest, HugeEmptyBecomesOneDevicePage) {
  const uint64_t a = MapHugeRegion(kProtRead);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  EXPECT_EQ(dev_->stats().huge_to_device, 1u);
  ExpectHugeDevicePage(a);
  EXPECT_FALSE(as_->QueryPte(a).writable);  // a PROT_READ mapping
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), kPagesPerHuge);
  ExpectDevicePage(a + 123 * kPageSize, false);
  ExpectCpu(a, false);
}

// migrate_anon_huge_zero: a THP faulted in by a read moves whole.
TEST_P(CompoundTest, HugeZeroMovesWhole) {
  const uint64_t a = MapHugeRegion(kProtRead);
  uint32_t v = 1;
  ASSERT_TRUE(as_->Read(a, &v, 4).has_value());
  EXPECT_EQ(v, 0u);
  ASSERT_TRUE(as_->QueryPte(a).huge);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  ExpectHugeDevicePage(a);
  ExpectCpu(a, false);
}

// migrate_anon_huge_free: MADV_FREE of a 2 MiB device page succeeds; the
// pages stay (device entries are not lazily freeable) until munmap.
TEST_P(CompoundTest, HugeFreeThenUnmapReleasesEveryDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  const uint64_t free_before = pool_->GetStats().free_frames;
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  EXPECT_EQ(pool_->GetStats().free_frames, free_before + kPagesPerHuge);  // the THP went away
  ExpectDevicePage(a + 77 * kPageSize, true);
  ASSERT_TRUE(as_->Madvise(a, kHugePageSize, kMadvFree).has_value());
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), kPagesPerHuge);
  ASSERT_TRUE(as_->Munmap(raw_, 2 * kHugePageSize).has_value());
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), 0u);
}

// migrate_anon_huge_fault: a CPU touch brings all 2 MiB home as one page.
TEST_P(CompoundTest, HugeFaultBringsAllOfItHome) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  ExpectHugeDevicePage(a);
  ExpectCpu(a, true);
  if (!coherent()) {
    EXPECT_EQ(dev_->stats().cpu_faults, 1u);
    EXPECT_EQ(dev_->stats().huge_to_ram, 1u);
    const PteInfo p = as_->QueryPte(a);
    EXPECT_TRUE(p.huge);
    EXPECT_FALSE(p.device_memory);
    EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), 0u);
  } else {
    EXPECT_EQ(dev_->stats().cpu_faults, 0u);  // the CPU reads coherent memory in place
  }
  EXPECT_EQ(*ToRam(a), coherent() ? kPagesPerHuge : 0u);
  ExpectCpu(a, true);
}

// migrate_anon_huge_err: no 2 MiB of device memory: the source is split and
// moved as 4 KiB pages; then a 2 MiB device page comes home as 4 KiB pages
// when no system THP can be had.
TEST_P(CompoundTest, HugeErrFallsBackTo4KiBBothWays) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  dev_->set_fail_huge_alloc(true);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  EXPECT_EQ(dev_->stats().small_to_device, 1u);
  EXPECT_FALSE(as_->QueryPte(a).huge);
  EXPECT_EQ(as_->QueryPte(a).kind, DeviceKind());
  ExpectDevicePage(a + 2 * kPageSize, true);
  uint32_t v;
  ASSERT_TRUE(as_->Read(a + 2048 * 4, &v, 4).has_value());
  EXPECT_EQ(v, 2048u);
  ASSERT_TRUE(as_->Munmap(raw_, 2 * kHugePageSize).has_value());
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), 0u);

  dev_->set_fail_huge_alloc(false);
  const uint64_t b = MapHugeRegion();
  FillPattern(b);
  EXPECT_EQ(*ToDevice(b), kPagesPerHuge);
  ExpectHugeDevicePage(b);
  dev_->set_fail_huge_alloc(true);
  EXPECT_EQ(*ToRam(b), kPagesPerHuge);
  EXPECT_EQ(dev_->stats().small_to_ram, 1u);
  EXPECT_FALSE(as_->QueryPte(b).huge);
  EXPECT_FALSE(as_->QueryPte(b).device_memory);
  ExpectCpu(b, true);
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), 0u);
}

// migrate_anon_huge_zero_err: the same with a read-only zero-filled page.
TEST_P(CompoundTest, HugeZeroErrFallsBackTo4KiB) {
  const uint64_t a = MapHugeRegion(kProtRead);
  dev_->set_fail_huge_alloc(true);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);  // an empty PMD, split into 512 holes
  EXPECT_FALSE(as_->QueryPte(a).huge);
  ExpectDevicePage(a + 2048 * 4, false);
  ExpectCpu(a, false);
  ASSERT_TRUE(as_->Munmap(raw_, 2 * kHugePageSize).has_value());
  const uint64_t b = MapHugeRegion(kProtRead);
  uint32_t v = 1;
  ASSERT_TRUE(as_->Read(b, &v, 4).has_value());  // a zero-filled THP
  EXPECT_EQ(*ToDevice(b), kPagesPerHuge);
  EXPECT_FALSE(as_->QueryPte(b).huge);
  ExpectCpu(b, false);
}

// A partial munmap splits the 2 MiB device page: the unmapped half's device
// pages are freed, the rest stays and comes home page by page.
TEST_P(CompoundTest, PartialUnmapSplitsTheDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  ASSERT_TRUE(as_->Munmap(a + kHugePageSize / 2, kHugePageSize / 2).has_value());
  EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), kPagesPerHuge / 2);
  const PteInfo p = as_->QueryPte(a);
  EXPECT_FALSE(p.huge);
  EXPECT_EQ(p.kind, DeviceKind());
  std::vector<uint32_t> v(kHugePageSize / 8);
  ASSERT_TRUE(as_->Read(a, v.data(), kHugePageSize / 2).has_value());
  for (uint32_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], i);
  if (!coherent()) {
    EXPECT_EQ(dev_->pgmap().DebugPagesInUse(), 0u);
  }
}

// mremap moves a 2 MiB device page whole to a 2 MiB-aligned address.
TEST_P(CompoundTest, RemapMovesTheDevicePageWhole) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  const uint64_t raw = *as_->Mmap(0, 2 * kHugePageSize, kProtNone, kMapPrivate | kMapAnonymous);
  const uint64_t to = (raw + kHugePageSize - 1) & kHugeMask;
  ASSERT_EQ(*as_->Mremap(a, kHugePageSize, kHugePageSize, kMremapMayMove | kMremapFixed, to), to);
  ExpectHugeDevicePage(to);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kNone);
  ExpectCpu(to, true);
}

// fork shares the 2 MiB device page read-only; each side's write gets its
// own copy, the other keeps the old bytes.
TEST_P(CompoundTest, ForkSharesTheDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  auto child = *as_->Fork();
  const PteInfo pc = child->QueryPte(a);
  EXPECT_TRUE(pc.huge);
  EXPECT_FALSE(pc.writable);
  EXPECT_EQ(pc.pfn, as_->QueryPte(a).pfn);
  uint32_t x = 0xabcdef;
  ASSERT_TRUE(as_->Write(a + 8, &x, 4).has_value());
  uint32_t y = 0;
  ASSERT_TRUE(child->Read(a + 8, &y, 4).has_value());
  EXPECT_EQ(y, 2u);
  ASSERT_TRUE(as_->Read(a + 8, &y, 4).has_value());
  EXPECT_EQ(y, 0xabcdefu);
  std::vector<uint32_t> v(kHugePageSize / 4);
  ASSERT_TRUE(child->Read(a, v.data(), kHugePageSize).has_value());
  for (uint32_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], i);
  child->Exit();
}

// mprotect of one 4 KiB page splits the 2 MiB device page; bytes stay.
TEST_P(CompoundTest, PartialMprotectSplitsTheDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  ASSERT_TRUE(as_->Mprotect(a + 5 * kPageSize, kPageSize, kProtRead).has_value());
  EXPECT_FALSE(as_->QueryPte(a).huge);
  EXPECT_FALSE(as_->QueryPte(a + 5 * kPageSize).writable);
  EXPECT_EQ(as_->QueryPte(a + 6 * kPageSize).kind, DeviceKind());
  ExpectCpu(a, true);
}

// A range fault reports a 2 MiB device page with order 9.
TEST_P(CompoundTest, RangeFaultReportsOrder9) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  struct NopOps : MmuIntervalNotifierOps {
    bool Invalidate(MmuIntervalNotifier* s, const NotifierRange&, uint64_t seq) override {
      s->SetSeq(seq);
      return true;
    }
  } ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, a, kHugePageSize, &ops));
  std::vector<uint64_t> words(kPagesPerHuge);
  HmmRange r;
  r.notifier = &sub;
  r.start = a;
  r.end = a + kHugePageSize;
  r.hmm_pfns = words.data();
  r.dev_private_owner = dev_.get();
  r.notifier_seq = sub.ReadBegin();
  {
    ReadLock l(as_->mmap_lock());
    ASSERT_TRUE(as_->RangeFault(r).has_value());
  }
  const PteInfo p = as_->QueryPte(a);
  for (uint64_t k : {uint64_t{0}, uint64_t{300}}) {
    EXPECT_TRUE(words[k] & kPfnValid);
    EXPECT_TRUE(words[k] & kPfnDevice);
    EXPECT_EQ(HmmOrder(words[k]), 9u);
    EXPECT_EQ(HmmPfn(words[k]), p.pfn + k);
  }
  ASSERT_TRUE(sub.Remove());
}

// The device rmap holds one record per 4 KiB page of a 2 MiB device entry,
// through fork, mremap and munmap; eviction by device frame (no mmap lock)
// splits the entry and brings every mapper's pages home.
TEST_P(CompoundTest, EvictionByFrameReachesEveryMapperOfA2MiBDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  ExpectHugeDevicePage(a);
  DevicePagemap& pm = dev_->pgmap();
  const DevicePfn head = as_->QueryPte(a).pfn;
  const uint64_t idx = pm.IndexOf(head);
  for (uint64_t k : {uint64_t{0}, uint64_t{311}, kPagesPerHuge - 1}) EXPECT_EQ(pm.DebugRmapCount(idx + k), 1u);
  auto child = *as_->Fork();
  for (uint64_t k : {uint64_t{0}, uint64_t{311}, kPagesPerHuge - 1}) EXPECT_EQ(pm.DebugRmapCount(idx + k), 2u);
  // The parent's copy moves whole to another aligned address.
  const uint64_t raw = *as_->Mmap(0, 2 * kHugePageSize, kProtNone, kMapPrivate | kMapAnonymous);
  const uint64_t to = (raw + kHugePageSize - 1) & kHugeMask;
  ASSERT_EQ(*as_->Mremap(a, kHugePageSize, kHugePageSize, kMremapMayMove | kMremapFixed, to), to);
  ExpectHugeDevicePage(to);
  std::vector<DevicePfn> pfns(kPagesPerHuge);
  for (uint64_t k = 0; k < kPagesPerHuge; ++k) pfns[k] = head + k;
  auto moved = EvictDevicePages(pm, pfns.data(), pfns.size());
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  EXPECT_EQ(*moved, kPagesPerHuge);
  EXPECT_EQ(pm.DebugPagesInUse(), 0u);
  for (uint64_t k : {uint64_t{0}, uint64_t{311}, kPagesPerHuge - 1}) EXPECT_EQ(pm.DebugRmapCount(idx + k), 0u);
  EXPECT_FALSE(as_->QueryPte(to).device_memory);
  EXPECT_FALSE(child->QueryPte(a).device_memory);
  ExpectCpu(to, true);
  std::vector<uint32_t> v(kHugePageSize / 4);
  ASSERT_TRUE(child->Read(a, v.data(), kHugePageSize).has_value());
  for (uint32_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], i);
  child->Exit();
}

// munmap of one mapper of a shared 2 MiB device page forgets its records.
TEST_P(CompoundTest, UnmapForgetsTheRecordsOfA2MiBDevicePage) {
  const uint64_t a = MapHugeRegion();
  FillPattern(a);
  EXPECT_EQ(*ToDevice(a), kPagesPerHuge);
  DevicePagemap& pm = dev_->pgmap();
  const uint64_t idx = pm.IndexOf(as_->QueryPte(a).pfn);
  auto child = *as_->Fork();
  ASSERT_TRUE(child->Munmap(a, kHugePageSize).has_value());
  EXPECT_EQ(pm.DebugRmapCount(idx + 7), 1u);
  EXPECT_EQ(pm.DebugPagesInUse(), kPagesPerHuge);
  child->Exit();
  ASSERT_TRUE(as_->Munmap(raw_, 2 * kHugePageSize).has_value());
  EXPECT_EQ(pm.DebugRmapCount(idx + 7), 0u);
  EXPECT_EQ(pm.DebugPagesInUse(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Kinds, CompoundTest,
                         ::testing::Values(DeviceMemoryKind::kPrivate, DeviceMemoryKind::kCoherent),
                         [](const auto& info) {
                           return info.param == DeviceMemoryKind::kPrivate ? "Private" : "Coherent";
                         });

}  // namespace
}  // namespace usvm::mm
