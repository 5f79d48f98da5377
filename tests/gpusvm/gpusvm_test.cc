// GpuSvm (drm_gpusvm) through a test driver: init rules, the fault flow,
// chunk selection, every FindOrInsert/GetPages error, invalidation and the
// garbage collector, driver-owned pages (seed 003), pages-only mode, Fini.
#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "gpusvm/test_driver.h"
#include "mm/dmirror.h"
#include "mm/test_util.h"
#include "usvm/gpusvm/gpusvm.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/hmm.h"

namespace usvm::gpusvm::testing {
namespace {

using mm::AddressSpace;
using mm::kMapAnonymous;
using mm::kMapFixed;
using mm::kMapPrivate;
using mm::kMapShared;
using mm::kProtRead;
using mm::kProtWrite;
using mm::testing::MakePool;
using mm::testing::MakeSpace;

constexpr uint64_t kBase = uint64_t{1} << 30;  // 1 GiB: 512 MiB and 2 MiB aligned
constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint32_t kAnon = kMapPrivate | kMapAnonymous | kMapFixed;

class GpuSvmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = MakePool(256);
    as_ = MakeSpace(*pool_);
  }
  void Map(uint64_t addr, uint64_t len, uint32_t prot = kRW, uint32_t flags = kAnon) {
    ASSERT_TRUE(as_->Mmap(addr, len, prot, flags).has_value());
  }
  void Fill(uint64_t addr, uint64_t len, uint8_t seed) {
    std::vector<uint8_t> b(len);
    for (uint64_t i = 0; i < len; ++i) b[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 12));
    ASSERT_TRUE(as_->Write(addr, b.data(), len).has_value());
  }
  Result<Range*> FindOrInsert(TestDriver& d, uint64_t addr, Ctx ctx = {}, uint64_t lo = 0,
                              uint64_t hi = ~uint64_t{0}) {
    DriverLockGuard g(d.svm().driver_lock());
    return d.svm().FindOrInsert(addr, lo, hi, ctx);
  }
  // A GpuSvm on as_ with the driver's own ops (chunks 64K, 4K) and one
  // range at kBase (which the caller has mapped).
  Result<std::unique_ptr<GpuSvm>> MakeSvmWithARange(GpuSvmOps& ops) {
    GpuSvmConfig c;
    c.mm = as_;
    c.mm_range = uint64_t{1} << 47;
    c.notifier_size = kSize2M;
    c.ops = &ops;
    c.chunk_sizes = {kSize64K, kSize4K};
    auto svm = USVM_TRY(GpuSvm::TryCreate(std::move(c)));
    DriverLockGuard g(svm->driver_lock());
    USVM_TRY(svm->FindOrInsert(kBase, 0, ~uint64_t{0}, Ctx{}));
    return svm;
  }
  std::unique_ptr<mm::FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

// ---- init ---------------------------------------------------------------------

struct NullOps : GpuSvmOps {
  void Invalidate(GpuSvm&, Notifier&, const mm::NotifierRange&) override {}
};

TEST_F(GpuSvmTest, InitRejectsBadConfigurations) {
  NullOps ops;
  auto base = [&] {
    GpuSvmConfig c;
    c.mm = as_;
    c.mm_start = 0;
    c.mm_range = uint64_t{1} << 47;
    c.notifier_size = kSize2M;
    c.ops = &ops;
    c.chunk_sizes = {kSize2M, kSize64K, kSize4K};
    return c;
  };
  EXPECT_TRUE(GpuSvm::TryCreate(base()).has_value());
  auto bad = [&](auto mutate) {
    GpuSvmConfig c = base();
    mutate(c);
    auto r = GpuSvm::TryCreate(std::move(c));
    return !r && r.error() == Errc::kInval;
  };
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.ops = nullptr; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.chunk_sizes = {}; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.chunk_sizes = {kSize2M, kSize64K}; }));  // no 4K
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.chunk_sizes = {kSize64K, kSize2M, kSize4K}; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.chunk_sizes = {kSize64K, kSize64K, kSize4K}; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.chunk_sizes = {3 * kSize64K, kSize4K}; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.notifier_size = kSize64K; }));  // < 2M chunk
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.notifier_size = 3 * kSize2M; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.mm_range = 0; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) { c.mm_start = 100; }));
  EXPECT_TRUE(bad([](GpuSvmConfig& c) {
    c.mm_start = ~uint64_t{0} - kSize4K + 1;
    c.mm_range = kSize2M;
  }));
  // Pages-only mode: everything of the range machinery must be empty.
  GpuSvmConfig po;
  EXPECT_TRUE(GpuSvm::TryCreate(po).has_value());
  auto bad_po = [&](auto mutate) {
    GpuSvmConfig c;
    mutate(c);
    auto r = GpuSvm::TryCreate(std::move(c));
    return !r && r.error() == Errc::kInval;
  };
  EXPECT_TRUE(bad_po([&](GpuSvmConfig& c) { c.ops = &ops; }));
  EXPECT_TRUE(bad_po([](GpuSvmConfig& c) { c.chunk_sizes = {kSize4K}; }));
  EXPECT_TRUE(bad_po([](GpuSvmConfig& c) { c.mm_range = kSize2M; }));
  EXPECT_TRUE(bad_po([](GpuSvmConfig& c) { c.mm_start = kSize2M; }));
  EXPECT_TRUE(bad_po([](GpuSvmConfig& c) { c.notifier_size = kSize2M; }));
}

// ---- the fault flow ----------------------------------------------------------

TEST_F(GpuSvmTest, FaultMirrorsTheCpuPagesAndGpuReadsTheirBytes) {
  Map(kBase, 4 * kSize2M);
  Fill(kBase, 4 * kSize2M, 1);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase + 5 * kPageSize, Ctx{});
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ((*r)->start(), kBase);
  EXPECT_EQ((*r)->size(), kSize2M);
  // Every PTE names the frame the CPU page table has.
  for (uint64_t a = kBase; a < kBase + kSize2M; a += kPageSize) {
    auto pte = d->Pte(a);
    ASSERT_TRUE(pte.has_value());
    EXPECT_EQ(pte->proto, AddrProto::kSystem);
    EXPECT_EQ(pte->addr >> mm::kPageShift, as_->QueryPte(a).pfn);
  }
  std::vector<uint8_t> cpu(kSize2M), gpu(kSize2M);
  ASSERT_TRUE(as_->Read(kBase + kSize2M, cpu.data(), kSize2M).has_value());
  ASSERT_TRUE(d->GpuRead(kBase + kSize2M, gpu.data(), kSize2M).has_value());
  EXPECT_EQ(cpu, gpu);
  // A GPU write is seen by the CPU.
  const uint64_t v = 0xfeedfacecafebeefull;
  ASSERT_TRUE(d->GpuWrite(kBase + 3 * kSize2M + 8, &v, 8).has_value());
  EXPECT_EQ(*as_->AtomicLoad(kBase + 3 * kSize2M + 8), v);
  EXPECT_EQ(d->svm().GetStats().ranges, 3u);
  EXPECT_EQ(d->svm().GetStats().notifiers, 1u);  // one 512 MiB window
  EXPECT_EQ(d->stale_after_invalidate(), 0u);
}

TEST_F(GpuSvmTest, AValidRangeIsFoundAgainWithoutNewPages) {
  Map(kBase, kSize2M);
  Fill(kBase, kSize2M, 2);
  auto d = TestDriver::Create(as_);
  auto r1 = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r1.has_value());
  const auto maps = d->svm().GetStats().maps;
  auto r2 = d->Fault(kBase + kSize2M - kPageSize, Ctx{});
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(*r1, *r2);
  EXPECT_EQ(d->svm().GetStats().maps, maps);  // still valid: nothing remapped
  EXPECT_EQ(d->svm().GetStats().get_pages, 2u);
}

TEST_F(GpuSvmTest, ATransparentHugePageIsMappedAsOne2MiBEntry) {
  Map(kBase, kSize2M);
  ASSERT_TRUE(as_->Madvise(kBase, kSize2M, mm::kMadvHugePage).has_value());
  Fill(kBase, kSize2M, 3);
  ASSERT_TRUE(as_->QueryPte(kBase).huge);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r.has_value());
  ReadLock l(d->svm().notifier_lock());
  const Pages& p = *(*r)->pages();
  EXPECT_EQ(p.addrs()[0].order, 9);
  EXPECT_EQ(d->svm().GetStats().maps, 1u);
}

// ---- chunk selection ----------------------------------------------------------

TEST_F(GpuSvmTest, ChunkIsTheLargestThatFitsTheVma) {
  // A VMA of 64 KiB + 8 KiB at a 2 MiB boundary: 64 KiB, then 4 KiB.
  Map(kBase, kSize64K + 2 * kPageSize);
  auto d = TestDriver::Create(as_);
  auto a = FindOrInsert(*d, kBase + kPageSize);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->start(), kBase);
  EXPECT_EQ((*a)->size(), kSize64K);
  auto b = FindOrInsert(*d, kBase + kSize64K + kPageSize);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ((*b)->start(), kBase + kSize64K + kPageSize);
  EXPECT_EQ((*b)->size(), kSize4K);
}

TEST_F(GpuSvmTest, ChunkIsClippedByTheGpuVaWindow) {
  Map(kBase, kSize2M);
  auto d = TestDriver::Create(as_);
  auto a = FindOrInsert(*d, kBase + kSize64K, {}, kBase + kSize64K, kBase + kSize2M);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->start(), kBase + kSize64K);
  EXPECT_EQ((*a)->size(), kSize64K);
}

// As drm_gpusvm: the SVM window bounds fault addresses, not chunks (the
// GPU VA window the driver passes bounds those).
TEST_F(GpuSvmTest, TheSvmWindowBoundsFaultAddressesNotChunks) {
  Map(kBase, kSize2M);
  TestDriver::Options o;
  o.mm_start = kBase;
  o.mm_range = kSize64K * 3;
  auto d = TestDriver::Create(as_, o);
  auto a = FindOrInsert(*d, kBase + kSize64K * 2 + kPageSize);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->size(), kSize2M);
  auto out = FindOrInsert(*d, kBase + kSize64K * 3);
  ASSERT_FALSE(out.has_value());
  EXPECT_EQ(out.error(), Errc::kInval);
}

TEST_F(GpuSvmTest, ALargerChunkThatWouldOverlapARangeStepsDown) {
  Map(kBase, kSize2M);
  auto d = TestDriver::Create(as_);
  // A 4 KiB range made through a narrow GPU VA window...
  auto a = FindOrInsert(*d, kBase, {}, kBase, kBase + kPageSize);
  ASSERT_TRUE(a.has_value());
  ASSERT_EQ((*a)->size(), kSize4K);
  // ...blocks the 2 MiB and the 64 KiB chunks around kBase + 8 KiB.
  auto b = FindOrInsert(*d, kBase + 2 * kPageSize);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ((*b)->size(), kSize4K);
  // Outside that 64 KiB, 64 KiB chunks fit (the 2 MiB still overlaps).
  auto c = FindOrInsert(*d, kBase + kSize64K);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ((*c)->size(), kSize64K);
}

TEST_F(GpuSvmTest, ChunksAtOrBelowTheThresholdNeedEveryCpuPagePresent) {
  // 128 KiB VMA: 2 MiB cannot fit; 64 KiB is at the threshold.
  Map(kBase, 2 * kSize64K);
  auto d = TestDriver::Create(as_);
  Ctx ctx;
  ctx.check_pages_threshold = kSize64K;
  auto a = FindOrInsert(*d, kBase, ctx);  // nothing faulted in: 4 KiB
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->size(), kSize4K);
  Fill(kBase + kSize64K, kSize64K, 4);  // the second 64 KiB fully present
  auto b = FindOrInsert(*d, kBase + kSize64K, ctx);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ((*b)->size(), kSize64K);
  // Without the threshold the first 64 KiB would have been taken whole.
  ASSERT_TRUE(as_->Write(kBase + kSize64K - 8, "x", 1).has_value());
  auto c = FindOrInsert(*d, kBase + kSize64K - kPageSize, ctx);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ((*c)->size(), kSize4K);
}

// ---- FindOrInsert errors --------------------------------------------------------

TEST_F(GpuSvmTest, FindOrInsertErrors) {
  Map(kBase, kSize2M, kProtRead);
  TestDriver::Options o;
  o.mm_start = kBase - kSize2M;
  o.mm_range = 4 * kSize2M;
  auto d = TestDriver::Create(as_, o);
  // Outside the window.
  auto e1 = FindOrInsert(*d, kBase + 8 * kSize2M);
  ASSERT_FALSE(e1.has_value());
  EXPECT_EQ(e1.error(), Errc::kInval);
  // No VMA.
  auto e2 = FindOrInsert(*d, kBase - kSize64K);
  ASSERT_FALSE(e2.has_value());
  EXPECT_EQ(e2.error(), Errc::kNoEnt);
  // A write needed on a read-only VMA; read_only is fine.
  auto e3 = FindOrInsert(*d, kBase);
  ASSERT_FALSE(e3.has_value());
  EXPECT_EQ(e3.error(), Errc::kPerm);
  Ctx ro;
  ro.read_only = true;
  EXPECT_TRUE(FindOrInsert(*d, kBase, ro).has_value());
  // Nothing fits: the GPU VA window excludes the faulting page.
  Map(kBase + 2 * kSize2M, kSize2M);
  auto e4 = FindOrInsert(*d, kBase + 2 * kSize2M + kSize64K, {}, 0, kBase + 2 * kSize2M);
  ASSERT_FALSE(e4.has_value());
  EXPECT_EQ(e4.error(), Errc::kInval);
  // The driver lock is required.
  auto e5 = d->svm().FindOrInsert(kBase, 0, ~uint64_t{0}, ro);
  ASSERT_FALSE(e5.has_value());
  EXPECT_EQ(e5.error(), Errc::kInval);
  EXPECT_EQ(d->svm().GetStats().driver_lock_violations, 1u);
  // Failed inserts left no notifier behind (only the one with a range).
  EXPECT_EQ(d->svm().GetStats().notifiers, 1u);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 1u);
  // The address space gone.
  as_->Exit();
  auto e6 = FindOrInsert(*d, kBase + kSize2M + kPageSize, ro);
  ASSERT_FALSE(e6.has_value());
  EXPECT_EQ(e6.error(), Errc::kFault);
}

TEST_F(GpuSvmTest, AllocationFailuresAreEnomemAndLeaveNothingBehind) {
  Env env;
  Map(kBase, kSize2M);
  TestDriver::Options o;
  o.env = &env;
  auto d = TestDriver::Create(as_, o);
  env.faults().FailNth("gpusvm.notifier_alloc", 1);
  auto a = FindOrInsert(*d, kBase);
  ASSERT_FALSE(a.has_value());
  EXPECT_EQ(a.error(), Errc::kNoMem);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 0u);
  env.faults().FailNth("gpusvm.range_alloc", 1);
  auto b = FindOrInsert(*d, kBase);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error(), Errc::kNoMem);
  // The notifier made for the failed range was removed again.
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 0u);
  EXPECT_EQ(d->svm().GetStats().notifiers, 0u);
  auto c = FindOrInsert(*d, kBase);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 1u);
}

TEST_F(GpuSvmTest, OnlyAnonymousPrivateRangesMayMigrateToDeviceMemory) {
  Map(kBase, kSize2M);
  Map(kBase + kSize2M, kSize2M, kRW, kMapShared | kMapAnonymous | kMapFixed);
  auto d = TestDriver::Create(as_);
  Ctx ctx;
  ctx.devmem_possible = true;
  auto a = FindOrInsert(*d, kBase, ctx);
  auto b = FindOrInsert(*d, kBase + kSize2M, ctx);
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_TRUE((*a)->migrate_devmem());
  EXPECT_FALSE((*b)->migrate_devmem());
  auto c = FindOrInsert(*d, kBase + 3 * kSize2M / 2, Ctx{});
  EXPECT_TRUE(c.has_value());
}

// ---- GetPages ----------------------------------------------------------------------

TEST_F(GpuSvmTest, GetPagesOfAReadOnlyVmaNeedsReadOnly) {
  Map(kBase, kSize64K, kProtRead);
  auto d = TestDriver::Create(as_);
  Ctx ro;
  ro.read_only = true;
  auto r = FindOrInsert(*d, kBase, ro);
  ASSERT_TRUE(r.has_value());
  auto* t = static_cast<TestRange*>(*r);
  d->svm().InitPages(&t->pages, t);
  auto e = d->svm().GetPages(t, Ctx{});
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kPerm);
  ASSERT_TRUE(d->svm().GetPages(t, ro).has_value());
  ReadLock l(d->svm().notifier_lock());
  EXPECT_TRUE(d->svm().PagesValid(t->pages));
  // Never-written private memory reads as the zero page.
  EXPECT_EQ(t->pages.addrs()[0].addr, 0u);
}

TEST_F(GpuSvmTest, AWriteAfterAReadOnlyMappingRemapsThePagesWritable) {
  Map(kBase, kSize64K);
  auto d = TestDriver::Create(as_);
  uint64_t v = 7;
  // A GPU read of never-written memory maps the zero page read-only...
  ASSERT_TRUE(d->GpuRead(kBase, &v, 8, [] { Ctx c; c.read_only = true; return c; }()).has_value());
  EXPECT_EQ(v, 0u);
  EXPECT_EQ(d->Pte(kBase)->addr, 0u);
  // ...and a GPU write must not write through it: the pages are faulted
  // again for writing (a private frame), and the CPU sees the value.
  v = 99;
  ASSERT_TRUE(d->GpuWrite(kBase, &v, 8).has_value());
  EXPECT_EQ(d->svm().GetStats().write_upgrades, 1u);
  EXPECT_NE(d->Pte(kBase)->addr, 0u);
  EXPECT_EQ(*as_->AtomicLoad(kBase), 99u);
  uint64_t zero = 1;
  ASSERT_TRUE(as_->Read(kBase + kSize64K - 8, &zero, 8).has_value());
  EXPECT_EQ(zero, 0u);
}

TEST_F(GpuSvmTest, GetPagesOfUninitialisedPagesIsEinval) {
  Map(kBase, kSize64K);
  auto d = TestDriver::Create(as_);
  auto r = FindOrInsert(*d, kBase);
  ASSERT_TRUE(r.has_value());
  auto e = d->svm().GetPages(*r, Ctx{});
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kInval);
}

// The race drm_gpusvm's notifier-lock protocol exists for: an invalidation
// between the range fault and the mapping step. GetPages must see the moved
// sequence, throw the snapshot away and map the new pages.
struct InvalidateAfterRangeFault : GpuSvm::DebugHooks {
  AddressSpace* as = nullptr;
  uint64_t addr = 0, len = 0;
  int fired = 0;
  void AfterRangeFault(Pages*) override {
    if (fired++ == 0) (void)as->Madvise(addr, len, mm::kMadvDontNeed);
  }
};

TEST_F(GpuSvmTest, InvalidationRacingGetPagesYieldsARetryAndNeverAStaleMapping) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 5);
  auto d = TestDriver::Create(as_);
  InvalidateAfterRangeFault hook;
  hook.as = as_.get();
  hook.addr = kBase;
  hook.len = kSize64K;
  d->svm().DebugSetHooks(&hook);
  const mm::Pfn old_pfn = as_->QueryPte(kBase).pfn;
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(hook.fired, 2);  // the first snapshot was thrown away
  EXPECT_EQ(d->svm().GetStats().get_pages_retries, 1u);
  // The GPU maps the pages faulted in after DONTNEED (zero-filled), not the
  // freed frame.
  auto pte = d->Pte(kBase);
  ASSERT_TRUE(pte.has_value());
  EXPECT_EQ(pte->addr >> mm::kPageShift, as_->QueryPte(kBase).pfn);
  EXPECT_NE(pte->addr >> mm::kPageShift, old_pfn);
  uint64_t v = 1;
  ASSERT_TRUE(d->GpuRead(kBase + 64, &v, 8).has_value());
  EXPECT_EQ(v, 0u);
  d->svm().DebugSetHooks(nullptr);
}

TEST_F(GpuSvmTest, AFailedDeviceMappingLeavesNothingMapped) {
  Env env;
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 6);
  TestDriver::Options o;
  o.env = &env;
  auto d = TestDriver::Create(as_, o);
  env.faults().FailNth("gpusvm.dma_map", 5);
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kFault);
  auto s = d->svm().GetStats();
  EXPECT_EQ(s.maps, 4u);
  EXPECT_EQ(s.unmaps, 4u);
  // The next fault succeeds.
  ASSERT_TRUE(d->Fault(kBase, Ctx{}).has_value());
}

// ---- invalidation and garbage collection -----------------------------------------

TEST_F(GpuSvmTest, MunmapMarksTheRangeUnmappedAndTheCollectorRemovesIt) {
  Map(kBase, kSize2M);
  Fill(kBase, kSize2M, 7);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r.has_value());
  Range* range = *r;
  ASSERT_TRUE(as_->Munmap(kBase, kSize2M).has_value());
  // The callback zapped, unmapped the pages and queued; it removed nothing.
  EXPECT_EQ(d->PteCount(), 0u);
  EXPECT_EQ(d->gc_pending(), 1u);
  {
    ReadLock l(d->svm().notifier_lock());
    EXPECT_TRUE(range->unmapped());
    EXPECT_FALSE(range->partial_unmap());
    EXPECT_FALSE(d->svm().PagesValid(*range->pages()));
  }
  EXPECT_EQ(d->svm().GetStats().ranges, 1u);
  auto e = d->svm().GetPages(range, Ctx{});  // unmapped: EFAULT
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kFault);
  d->CollectGarbage();
  auto s = d->svm().GetStats();
  EXPECT_EQ(s.ranges, 0u);
  EXPECT_EQ(s.notifiers, 0u);
  EXPECT_EQ(s.maps, s.unmaps);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 0u);
  EXPECT_EQ(d->live_ranges(), 0);
  EXPECT_EQ(d->backstop_frees(), 0u);
  EXPECT_EQ(d->stale_after_invalidate(), 0u);
}

// An UNMAP can reach a range between FindOrInsert and InitPages (the
// callback sees no pages yet). The pages must be born unmapped, or a
// GetPages after the VMA was mapped again would map pages for a range the
// collector is about to drop (and RangeRemove would then refuse it).
TEST_F(GpuSvmTest, AnUnmapBeforeInitPagesLeavesThePagesUnmapped) {
  Map(kBase, kSize64K);
  auto d = TestDriver::Create(as_);
  auto r = FindOrInsert(*d, kBase);
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(as_->Munmap(kBase, kSize64K).has_value());
  Map(kBase, kSize64K);  // the same addresses, mapped again
  auto* t = static_cast<TestRange*>(*r);
  d->svm().InitPages(&t->pages, t);
  auto e = d->svm().GetPages(t, Ctx{});
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kFault);
  d->CollectGarbage();
  EXPECT_EQ(d->gc_failures(), 0u);
  EXPECT_EQ(d->svm().GetStats().ranges, 0u);
  // A new fault makes a new range over the new mapping.
  ASSERT_TRUE(d->Fault(kBase, Ctx{}).has_value());
}

TEST_F(GpuSvmTest, PartialMunmapDestroysTheWholeRangeAndNeverSplitsIt) {
  Map(kBase, kSize2M);
  Fill(kBase, kSize2M, 8);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase + kSize64K, Ctx{});
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ((*r)->size(), kSize2M);
  ASSERT_TRUE(as_->Munmap(kBase, kSize64K).has_value());
  {
    ReadLock l(d->svm().notifier_lock());
    EXPECT_TRUE((*r)->unmapped());
    EXPECT_TRUE((*r)->partial_unmap());
  }
  // The rest is still mapped for the CPU; a GPU fault there collects the
  // old range first and then makes new, smaller ones (the VMA shrank).
  auto r2 = d->Fault(kBase + kSize2M - kPageSize, Ctx{});
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(d->collected(), 1u);
  EXPECT_EQ((*r2)->size(), kSize64K);
  std::vector<uint8_t> cpu(kSize64K), gpu(kSize64K);
  ASSERT_TRUE(as_->Read(kBase + kSize64K, cpu.data(), kSize64K).has_value());
  ASSERT_TRUE(d->GpuRead(kBase + kSize64K, gpu.data(), kSize64K).has_value());
  EXPECT_EQ(cpu, gpu);
}

TEST_F(GpuSvmTest, ProtectionChangesInvalidateWithoutUnmapping) {
  Map(kBase, kSize2M);
  Fill(kBase, kSize2M, 9);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(as_->Mprotect(kBase, kSize2M, kProtRead).has_value());
  EXPECT_EQ(d->PteCount(), 0u);
  EXPECT_EQ(d->gc_pending(), 0u);
  {
    ReadLock l(d->svm().notifier_lock());
    EXPECT_FALSE((*r)->unmapped());
  }
  // A write fault is now EPERM; a read refaults the same range.
  auto w = d->Fault(kBase, Ctx{});
  ASSERT_FALSE(w.has_value());
  EXPECT_EQ(w.error(), Errc::kPerm);
  Ctx ro;
  ro.read_only = true;
  auto again = d->Fault(kBase, ro);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(*again, *r);
}

TEST_F(GpuSvmTest, ForkWriteProtectInvalidatesTheParentsMirror) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 10);
  auto d = TestDriver::Create(as_);
  ASSERT_TRUE(d->Fault(kBase, Ctx{}).has_value());
  auto child = as_->Fork();
  ASSERT_TRUE(child.has_value());
  EXPECT_EQ(d->PteCount(), 0u);  // PROTECTION_PAGE zapped the writable view
  // The parent's next GPU write breaks COW; the child keeps the old bytes.
  const uint64_t v = 42;
  ASSERT_TRUE(d->GpuWrite(kBase, &v, 8).has_value());
  EXPECT_EQ(*as_->AtomicLoad(kBase), 42u);
  EXPECT_NE(*(*child)->AtomicLoad(kBase), 42u);
  (*child)->Exit();
}

// RangeRemove from the invalidation callback would wait for the callback
// itself (its notifier's removal) while holding the notifier lock: it is
// refused and the range stays.

TEST_F(GpuSvmTest, RangeRemoveFromTheCallbackIsEdeadlkAndKeepsTheRange) {
  struct Ops : GpuSvmOps {
    GpuSvm* svm = nullptr;
    Errc seen = Errc::kOk;
    void Invalidate(GpuSvm& s, Notifier& n, const mm::NotifierRange& range) override {
      GpuSvm::ForEachRangeSafe(&n, range.start, range.end, [&](Range* r) {
        auto res = s.RangeRemove(r);
        seen = res ? Errc::kOk : res.error().code();
      });
    }
  } ops;
  Map(kBase, kSize64K);
  auto svm = MakeSvmWithARange(ops);
  ASSERT_TRUE(svm.has_value());
  {
    DriverLockGuard g((*svm)->driver_lock());
    // munmap with the driver lock held (driver lock -> mmap lock is the
    // documented order), so the lock check passes and only EDEADLK is left.
    ASSERT_TRUE(as_->Munmap(kBase, kSize64K).has_value());
  }
  EXPECT_EQ(ops.seen, Errc::kDeadlk);
  EXPECT_EQ((*svm)->GetStats().ranges, 1u);
  DriverLockGuard g((*svm)->driver_lock());
  EXPECT_TRUE((*svm)->HasMapping(kBase, kBase + kSize64K));
}

// Seed 003: the framework never drops a range whose pages are still mapped
// for the device; the owner unmaps (in the invalidation) first.
TEST_F(GpuSvmTest, RangeRemoveWithPagesStillMappedIsRefused) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 11);
  auto d = TestDriver::Create(as_);
  auto r = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(r.has_value());
  {
    DriverLockGuard g(d->svm().driver_lock());
    auto e = d->svm().RangeRemove(*r);
    ASSERT_FALSE(e.has_value());
    EXPECT_EQ(e.error(), Errc::kBusy);
    EXPECT_EQ(d->svm().GetStats().remove_refused, 1u);
    EXPECT_TRUE((*r)->in_tree());
  }
  d->svm().UnmapPages((*r)->pages(), Ctx{});
  {
    DriverLockGuard g(d->svm().driver_lock());
    ASSERT_TRUE(d->svm().RangeRemove(*r).has_value());
  }
  EXPECT_EQ(d->live_ranges(), 0);
  EXPECT_EQ(d->backstop_frees(), 0u);
  auto s = d->svm().GetStats();
  EXPECT_EQ(s.maps, s.unmaps);
}

TEST_F(GpuSvmTest, RangeRemoveOfAForeignOrRemovedRangeIsEinval) {
  Map(kBase, kSize64K);
  auto d1 = TestDriver::Create(as_);
  auto d2 = TestDriver::Create(as_);
  auto r = FindOrInsert(*d1, kBase);
  ASSERT_TRUE(r.has_value());
  {
    DriverLockGuard g(d2->svm().driver_lock());
    auto e = d2->svm().RangeRemove(*r);
    ASSERT_FALSE(e.has_value());
    EXPECT_EQ(e.error(), Errc::kInval);
    auto n = d2->svm().RangeRemove(nullptr);
    ASSERT_FALSE(n.has_value());
  }
  DriverLockGuard g(d1->svm().driver_lock());
  d1->svm().RangeGet(*r);  // keep it alive past removal
  ASSERT_TRUE(d1->svm().RangeRemove(*r).has_value());
  auto again = d1->svm().RangeRemove(*r);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error(), Errc::kInval);
  d1->svm().RangePut(*r);
}

TEST_F(GpuSvmTest, IterationSurvivesRemovingTheCurrentRange) {
  Map(kBase, kSize2M);
  auto d = TestDriver::Create(as_);
  for (uint64_t a = kBase; a < kBase + kSize2M; a += kSize64K)
    ASSERT_TRUE(FindOrInsert(*d, a, {}, kBase, kBase + kSize2M - kSize64K + kSize64K / 2).has_value());
  DriverLockGuard g(d->svm().driver_lock());
  Notifier* n = d->svm().NotifierFind(kBase, kBase + 1);
  ASSERT_NE(n, nullptr);
  uint64_t prev = 0, seen = 0;
  GpuSvm::ForEachRangeSafe(n, kBase, kBase + kSize2M, [&](Range* r) {
    EXPECT_GT(r->start() + 1, prev);  // address order
    prev = r->start() + 1;
    ++seen;
    ASSERT_TRUE(d->svm().RangeRemove(r).has_value());
  });
  EXPECT_EQ(seen, 32u);  // 31 64 KiB chunks, then a 4 KiB one (the window ends mid-64K)
  EXPECT_FALSE(d->svm().HasMapping(kBase, kBase + kSize2M));
  EXPECT_EQ(d->svm().GetStats().notifiers, 0u);
}

// ---- notifier modes ------------------------------------------------------------------

TEST_F(GpuSvmTest, OneNotifierPerRangeModeGivesEachRangeItsOwnNotifier) {
  Map(kBase, 2 * kSize2M + kSize64K);
  Fill(kBase, 2 * kSize2M + kSize64K, 12);
  TestDriver::Options o;
  o.mode = NotifierMode::kPerRange;
  auto d = TestDriver::Create(as_, o);
  ASSERT_TRUE(d->Fault(kBase, Ctx{}).has_value());
  ASSERT_TRUE(d->Fault(kBase + kSize2M, Ctx{}).has_value());
  ASSERT_TRUE(d->Fault(kBase + 2 * kSize2M, Ctx{}).has_value());
  auto s = d->svm().GetStats();
  EXPECT_EQ(s.ranges, 3u);
  EXPECT_EQ(s.notifiers, 3u);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 3u);
  // A munmap of one range's pages invalidates only that notifier.
  const auto inv = d->invalidations();
  ASSERT_TRUE(as_->Munmap(kBase + kSize2M, kSize2M).has_value());
  EXPECT_EQ(d->invalidations(), inv + 1);
  d->CollectGarbage();
  EXPECT_EQ(d->svm().GetStats().notifiers, 2u);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 2u);
}

TEST_F(GpuSvmTest, OneNotifierPerRangeHonoursTheThresholdAndOverlaps) {
  Map(kBase, 2 * kSize64K);
  TestDriver::Options o;
  o.mode = NotifierMode::kPerRange;
  auto d = TestDriver::Create(as_, o);
  Ctx ctx;
  ctx.check_pages_threshold = kSize64K;
  Fill(kBase + kSize64K, kSize64K, 13);
  auto a = FindOrInsert(*d, kBase, ctx);  // absent pages: 4 KiB
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->size(), kSize4K);
  auto b = FindOrInsert(*d, kBase + kSize64K, ctx);  // present: 64 KiB
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ((*b)->size(), kSize64K);
  auto c = FindOrInsert(*d, kBase + 2 * kPageSize);  // next to the 4 KiB range
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ((*c)->size(), kSize4K);
  EXPECT_EQ(d->svm().GetStats().notifiers, 3u);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 3u);  // the stepped-down ones were removed
}

// ---- two-pass ---------------------------------------------------------------------------

TEST_F(GpuSvmTest, TwoPassInvalidationRunsTheFinishAfterEveryFirstPass) {
  struct LoggingFinish : mm::MmuIntervalFinish {
    std::vector<int>* log = nullptr;
    void Finish(const mm::NotifierRange&, uint64_t) override { log->push_back(2); }
  };
  struct Ops : GpuSvmOps {
    std::vector<int> log;
    LoggingFinish fin;
    void Invalidate(GpuSvm&, Notifier&, const mm::NotifierRange&) override { log.push_back(0); }
    void InvalidateStart(GpuSvm& s, Notifier& n, const mm::NotifierRange& r,
                         mm::MmuIntervalFinish** finish) override {
      log.push_back(1);
      fin.log = &log;
      *finish = &fin;
    }
  } ops;
  Map(kBase, kSize64K);
  auto svm = MakeSvmWithARange(ops);
  ASSERT_TRUE(svm.has_value());
  ASSERT_TRUE(as_->Mprotect(kBase, kSize64K, kProtRead).has_value());
  EXPECT_EQ(ops.log, (std::vector<int>{1, 2}));
}

// ---- pages-only mode (userptr) ----------------------------------------------------------

TEST_F(GpuSvmTest, PagesOnlyModeMirrorsAUserptrWithTheDriversOwnNotifier) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 14);
  auto svm = GpuSvm::TryCreate(GpuSvmConfig{});
  ASSERT_TRUE(svm.has_value());
  GpuSvm& s = **svm;
  struct Userptr : mm::MmuIntervalNotifierOps {
    GpuSvm* svm;
    Pages pages;
    int invalidations = 0;
    bool Invalidate(mm::MmuIntervalNotifier* sub, const mm::NotifierRange&, uint64_t seq) override {
      WriteLock l(svm->notifier_lock());
      sub->SetSeq(seq);
      Ctx ctx;
      ctx.in_notifier = true;
      svm->UnmapPages(&pages, ctx);
      ++invalidations;
      return true;
    }
  } up;
  up.svm = &s;
  mm::MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, kBase, kSize64K, &up).has_value());
  s.InitPages(&up.pages);
  // FindOrInsert has nothing to do in this mode.
  {
    DriverLockGuard g(s.driver_lock());
    auto e = s.FindOrInsert(kBase, 0, ~uint64_t{0}, Ctx{});
    ASSERT_FALSE(e.has_value());
    EXPECT_EQ(e.error(), Errc::kInval);
  }
  // A range the notifier does not cover is refused.
  auto bad = s.GetPages(&up.pages, *as_, &sub, kBase, kBase + 2 * kSize64K, Ctx{});
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error(), Errc::kInval);
  ASSERT_TRUE(s.GetPages(&up.pages, *as_, &sub, kBase, kBase + kSize64K, Ctx{}).has_value());
  {
    ReadLock l(s.notifier_lock());
    EXPECT_TRUE(s.PagesValid(up.pages));
    EXPECT_EQ(up.pages.addrs()[0].addr >> mm::kPageShift, as_->QueryPte(kBase).pfn);
  }
  ASSERT_TRUE(as_->Madvise(kBase, kPageSize, mm::kMadvDontNeed).has_value());
  EXPECT_EQ(up.invalidations, 1);
  {
    ReadLock l(s.notifier_lock());
    EXPECT_FALSE(s.PagesValid(up.pages));
  }
  ASSERT_TRUE(s.GetPages(&up.pages, *as_, &sub, kBase, kBase + kSize64K, Ctx{}).has_value());
  s.FreePages(&up.pages);
  s.FreePages(&up.pages);  // idempotent
  auto st = s.GetStats();
  EXPECT_EQ(st.maps, st.unmaps);
  EXPECT_EQ(st.backstop_unmaps, 16u);  // the second mapping was never invalidated
  ASSERT_TRUE(sub.Remove().has_value());
}

// ---- Fini ------------------------------------------------------------------------------

TEST_F(GpuSvmTest, FiniLeavesNothingMappedAndEveryNotifierRemoved) {
  Map(kBase, 8 * kSize2M);
  Map(kBase + (uint64_t{1} << 29), kSize2M);  // in a second 512 MiB window
  Fill(kBase, 8 * kSize2M, 15);
  auto d = TestDriver::Create(as_);
  for (uint64_t a = kBase; a < kBase + 8 * kSize2M; a += kSize2M)
    ASSERT_TRUE(d->Fault(a, Ctx{}).has_value());
  Ctx ro;
  ro.read_only = true;
  ASSERT_TRUE(d->Fault(kBase + (uint64_t{1} << 29), ro).has_value());
  auto before = d->svm().GetStats();
  EXPECT_EQ(before.notifiers, 2u);
  EXPECT_EQ(before.ranges, 9u);
  d->svm().Fini();
  d->svm().Fini();  // idempotent
  EXPECT_EQ(d->svm().GetStats().ranges, 0u);
  EXPECT_EQ(d->svm().GetStats().notifiers, 0u);
  d->DestroySvm();
  EXPECT_EQ(d->live_ranges(), 0);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 0u);
  // Fini unmapped every mapping exactly once, before the ranges went (so
  // the drivers' FreePages backstop found nothing).
  EXPECT_EQ(d->last_maps(), before.maps);
  EXPECT_EQ(d->last_unmaps(), before.maps);
  EXPECT_EQ(d->backstop_frees(), 0u);
}

TEST_F(GpuSvmTest, FiniCountsEachMappingUnmappedExactlyOnce) {
  Map(kBase, 4 * kSize2M);
  Fill(kBase, 4 * kSize2M, 16);
  auto d = TestDriver::Create(as_);
  for (uint64_t a = kBase; a < kBase + 4 * kSize2M; a += kSize2M)
    ASSERT_TRUE(d->Fault(a, Ctx{}).has_value());
  ASSERT_TRUE(as_->Mprotect(kBase, kSize2M, kProtRead).has_value());  // one unmapped early
  GpuSvm::Stats s = d->svm().GetStats();
  EXPECT_EQ(s.maps, 4 * 512u);
  EXPECT_EQ(s.unmaps, 512u);
  // Snapshot the counters the destructor leaves behind through a range
  // free hook: every map has been unmapped once, no backstop was needed.
  uint64_t maps = 0, unmaps = 0;
  {
    DriverLockGuard g(d->svm().driver_lock());
    d->svm().ForEachNotifierSafe(0, ~uint64_t{0}, [&](Notifier* n) {
      GpuSvm::ForEachRangeSafe(n, 0, ~uint64_t{0}, [&](Range* r) {
        d->svm().UnmapPages(r->pages(), Ctx{});
        ASSERT_TRUE(d->svm().RangeRemove(r).has_value());
      });
    });
    s = d->svm().GetStats();
    maps = s.maps;
    unmaps = s.unmaps;
  }
  EXPECT_EQ(maps, unmaps);
  EXPECT_EQ(s.backstop_unmaps, 0u);
  EXPECT_EQ(s.notifiers, 0u);
  EXPECT_EQ(d->backstop_frees(), 0u);
}

// ---- device pages through range fault --------------------------------------------------

TEST_F(GpuSvmTest, ScanMmClassifiesWhereThePagesAre) {
  Map(kBase, kSize64K);
  auto d = TestDriver::Create(as_);
  auto r = FindOrInsert(*d, kBase);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(d->svm().ScanMm(*r, nullptr, nullptr), ScanResult::kUnpopulated);
  Fill(kBase, kSize64K, 17);
  EXPECT_EQ(d->svm().ScanMm(*r, nullptr, nullptr), ScanResult::kSystem);
  // Device pages of another driver's pagemap (the mm's test mirror).
  auto dev = mm::testing::DMirror::Create(as_, 64);
  ASSERT_TRUE(dev->MigrateToDevice(kBase, kBase + kSize64K / 2).has_value());
  EXPECT_EQ(d->svm().ScanMm(*r, dev.get(), &dev->pagemap()), ScanResult::kMixed);
  ASSERT_TRUE(dev->MigrateToDevice(kBase + kSize64K / 2, kBase + kSize64K).has_value());
  EXPECT_EQ(d->svm().ScanMm(*r, dev.get(), &dev->pagemap()), ScanResult::kEqual);
  EXPECT_EQ(d->svm().ScanMm(*r, dev.get(), nullptr), ScanResult::kOther);
  // Another owner's device pages are not reported: unpopulated.
  EXPECT_EQ(d->svm().ScanMm(*r, nullptr, nullptr), ScanResult::kUnpopulated);
}

TEST_F(GpuSvmTest, DevicePagesOfAForeignPagemapAreEopnotsupp) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 18);
  auto d = TestDriver::Create(as_);
  auto dev = mm::testing::DMirror::Create(as_, 64);
  ASSERT_TRUE(dev->MigrateToDevice(kBase, kBase + kSize64K).has_value());
  Ctx ctx;
  ctx.device_private_page_owner = dev.get();  // reported, not migrated
  auto r = d->Fault(kBase, ctx);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kOpNotSupp);
  auto s = d->svm().GetStats();
  EXPECT_EQ(s.maps, s.unmaps);
  // Without that owner the range fault migrates them home: it works.
  auto ok = d->Fault(kBase, Ctx{});
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ(dev->device_pages_in_use(), 0u);
  std::vector<uint8_t> cpu(kSize64K), gpu(kSize64K);
  ASSERT_TRUE(as_->Read(kBase, cpu.data(), kSize64K).has_value());
  ASSERT_TRUE(d->GpuRead(kBase, gpu.data(), kSize64K).has_value());
  EXPECT_EQ(cpu, gpu);
}

TEST_F(GpuSvmTest, DevmemOnlyRefusesSystemPages) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 19);
  auto d = TestDriver::Create(as_);
  Ctx ctx;
  ctx.devmem_only = true;
  auto r = d->Fault(kBase, ctx);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kFault);
}

TEST_F(GpuSvmTest, RangeEvictBringsEveryDevicePageHome) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 20);
  std::vector<uint8_t> want(kSize64K);
  ASSERT_TRUE(as_->Read(kBase, want.data(), kSize64K).has_value());
  auto d = TestDriver::Create(as_);
  auto r = FindOrInsert(*d, kBase);
  ASSERT_TRUE(r.has_value());
  auto dev = mm::testing::DMirror::Create(as_, 64);
  ASSERT_TRUE(dev->MigrateToDevice(kBase, kBase + kSize64K).has_value());
  EXPECT_EQ(dev->device_pages_in_use(), 16u);
  ASSERT_TRUE(d->svm().RangeEvict(*r).has_value());
  EXPECT_EQ(dev->device_pages_in_use(), 0u);
  EXPECT_EQ(d->svm().ScanMm(*r, nullptr, nullptr), ScanResult::kSystem);
  std::vector<uint8_t> got(kSize64K);
  ASSERT_TRUE(as_->Read(kBase, got.data(), kSize64K).has_value());
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace usvm::gpusvm::testing

namespace usvm::gpusvm::testing {
namespace {

// A range the caller still holds (RangeGet) after it was removed -- with
// its notifier, when it was the last -- is refused by RangeEvict and
// GetPages (EINVAL) and scans as unpopulated: its notifier is not followed.
TEST_F(GpuSvmTest, ARemovedRangeIsRefusedNotFollowed) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 5);
  auto d = TestDriver::Create(as_);
  auto r = FindOrInsert(*d, kBase);
  ASSERT_TRUE(r.has_value());
  Range* held = d->svm().RangeGet(*r);
  {
    DriverLockGuard g(d->svm().driver_lock());
    ASSERT_TRUE(d->svm().RangeRemove(held).has_value());
  }
  EXPECT_EQ(d->svm().GetStats().notifiers, 0u);
  EXPECT_EQ(d->svm().RangeEvict(held).error(), Errc::kInval);
  EXPECT_EQ(d->svm().ScanMm(held, nullptr, nullptr), ScanResult::kUnpopulated);
  auto* t = static_cast<TestRange*>(held);
  d->svm().InitPages(&t->pages, held);
  EXPECT_EQ(d->svm().GetPages(held, Ctx{}).error(), Errc::kInval);
  d->svm().RangePut(held);
  EXPECT_EQ(d->live_ranges(), 0);
}

}  // namespace
}  // namespace usvm::gpusvm::testing
