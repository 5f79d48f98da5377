// GpuSvm with device memory (Pagemap/Devmem through the TestVram driver):
// the xe fault flow with migration to VRAM, GetPages over device pages
// (local, peer, several allocations, mixed with system pages, a failing
// device map), ScanMm, devmem_only, the collector evicting a partially
// unmapped range, and teardown leaving no device page allocated.
#include <gtest/gtest.h>

#include <cstring>

#include "gpusvm/test_driver.h"
#include "gpusvm/test_vram.h"
#include "mm/test_util.h"
#include "usvm/gpusvm/gpusvm.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/address_space.h"

namespace usvm::gpusvm::testing {
namespace {

using mm::AddressSpace;
using mm::kMapAnonymous;
using mm::kMapFixed;
using mm::kMapPrivate;
using mm::kProtRead;
using mm::kProtWrite;

constexpr uint64_t kBase = uint64_t{1} << 30;
constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint32_t kAnon = kMapPrivate | kMapAnonymous | kMapFixed;

// Resolves a GPU PTE's device address to the bytes behind it: our own VRAM
// (kLocal: an offset into it) or the peer's (kPeer).
struct VramBytes {
  TestVram* local = nullptr;
  TestVram* peer = nullptr;
  static std::byte* Resolve(void* cookie, const DeviceAddr& a) {
    auto* self = static_cast<VramBytes*>(cookie);
    TestVram* v = a.proto == AddrProto::kLocal ? self->local : self->peer;
    if (!v) return nullptr;
    const uint64_t off = a.proto == AddrProto::kPeer ? a.addr - TestVram::kPeerBase : a.addr;
    return v->Data(v->pagemap().pgmap().base() + off / mm::kPageSize);
  }
};

class GpuSvmDevmemTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = mm::testing::MakePool(256);
    as_ = mm::testing::MakeSpace(*pool_);
    vram_ = TestVram::Create({.npages = 4096});
    ASSERT_NE(vram_, nullptr);
  }
  void TearDown() override {
    driver_.reset();
    peer_.reset();
    vram_.reset();
  }
  // The GPU driver on the same device as vram_ (its DeviceMap answers
  // kLocal to it), or as a peer of it.
  void MakeDriver(const void* device, bool evict_on_eopnotsupp = false) {
    TestDriver::Options o;
    o.device = device;
    o.evict_on_eopnotsupp = evict_on_eopnotsupp;
    driver_ = TestDriver::Create(as_, o);
    ASSERT_NE(driver_, nullptr);
    bytes_.local = vram_.get();
    bytes_.peer = peer_.get();
    driver_->SetDeviceBytes(&VramBytes::Resolve, &bytes_);
  }
  void Map(uint64_t addr, uint64_t len) { ASSERT_TRUE(as_->Mmap(addr, len, kRW, kAnon).has_value()); }
  std::vector<uint8_t> Fill(uint64_t addr, uint64_t len, uint8_t seed) {
    std::vector<uint8_t> b(len);
    for (uint64_t i = 0; i < len; ++i) b[i] = static_cast<uint8_t>(seed + i * 13 + (i >> 12));
    EXPECT_TRUE(as_->Write(addr, b.data(), len).has_value());
    return b;
  }
  Ctx DevCtx() {
    Ctx c;
    c.device_private_page_owner = vram_->pagemap().owner();
    c.devmem_possible = true;
    return c;
  }

  std::unique_ptr<mm::FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<TestVram> vram_, peer_;
  std::unique_ptr<TestDriver> driver_;
  VramBytes bytes_;
};

TEST_F(GpuSvmDevmemTest, AFaultMigratesToVramAndTheGpuReadsItsOwnMemory) {
  Map(kBase, kSize2M);
  auto want = Fill(kBase, kSize2M, 1);
  MakeDriver(vram_->device());
  // xe's flow: find or insert, migrate the range (PopulateMm), get pages.
  Range* r;
  {
    DriverLockGuard g(driver_->svm().driver_lock());
    r = *driver_->svm().FindOrInsert(kBase, 0, ~uint64_t{0}, DevCtx());
  }
  ASSERT_TRUE(r->migrate_devmem());
  ASSERT_TRUE(vram_->pagemap().PopulateMm(r->start(), r->end(), as_, 0).has_value());
  EXPECT_EQ(driver_->svm().ScanMm(r, vram_->pagemap().owner(), &vram_->pagemap().pgmap()),
            ScanResult::kEqual);
  auto f = driver_->Fault(kBase, DevCtx());
  ASSERT_TRUE(f.has_value()) << f.error().ToString();
  {
    ReadLock l(driver_->svm().notifier_lock());
    const Pages& p = *r->pages();
    EXPECT_TRUE(p.has_devmem_pages());
    EXPECT_EQ(p.dpagemap(), &vram_->pagemap());
    EXPECT_EQ(p.addrs()[0].proto, AddrProto::kLocal);
  }
  std::vector<uint8_t> gpu(kSize2M);
  ASSERT_TRUE(driver_->GpuRead(kBase, gpu.data(), kSize2M, DevCtx()).has_value());
  EXPECT_EQ(gpu, want);
  // A CPU touch brings the whole allocation home; the GPU's view of the
  // range is invalidated (MIGRATE) and refaults to system pages.
  uint64_t v = 0;
  ASSERT_TRUE(as_->Read(kBase + 8, &v, 8).has_value());
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_FALSE(driver_->HasPte(kBase, kBase + kSize2M));
  ASSERT_TRUE(driver_->GpuRead(kBase, gpu.data(), kSize2M, DevCtx()).has_value());
  EXPECT_EQ(gpu, want);
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kSystem);
  EXPECT_EQ(driver_->stale_after_invalidate(), 0u);
}

TEST_F(GpuSvmDevmemTest, APeerReachesDeviceMemoryOverTheInterconnect) {
  Map(kBase, kSize64K);
  auto want = Fill(kBase, kSize64K, 2);
  // Two devices sharing an owner: peers. The driver is the peer's GPU.
  peer_ = TestVram::Create({.npages = 64, .owner = vram_->pagemap().owner()});
  vram_->LinkPeer(*peer_, false);
  MakeDriver(peer_->device());
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K).has_value());
  auto f = driver_->Fault(kBase, DevCtx());
  ASSERT_TRUE(f.has_value()) << f.error().ToString();
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kPeer);
  std::vector<uint8_t> gpu(kSize64K);
  // Peer reads go to the other device's memory (no migration).
  bytes_.peer = vram_.get();
  ASSERT_TRUE(driver_->GpuRead(kBase, gpu.data(), kSize64K, DevCtx()).has_value());
  EXPECT_EQ(gpu, want);
  EXPECT_EQ(vram_->pages_in_use(), 16u);
}

TEST_F(GpuSvmDevmemTest, PagesOfTwoAllocationsNeedAllowMixed) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 3);
  MakeDriver(vram_->device());
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K / 2).has_value());
  ASSERT_TRUE(vram_->Migrate(as_, kBase + kSize64K / 2, kBase + kSize64K).has_value());
  auto e = driver_->Fault(kBase, DevCtx());
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kOpNotSupp);
  auto s = driver_->svm().GetStats();
  EXPECT_EQ(s.maps, s.unmaps);
  EXPECT_EQ(vram_->device_maps(), vram_->device_unmaps());
  Ctx mixed = DevCtx();
  mixed.allow_mixed = true;
  ASSERT_TRUE(driver_->Fault(kBase, mixed).has_value());
}

// xe's answer to EOPNOTSUPP: evict the range to system memory, fault again.
TEST_F(GpuSvmDevmemTest, ADriverThatEvictsOnEopnotsuppGetsSystemPages) {
  Map(kBase, kSize64K);
  auto want = Fill(kBase, kSize64K, 3);
  MakeDriver(vram_->device(), /*evict_on_eopnotsupp=*/true);
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K / 2).has_value());
  ASSERT_TRUE(vram_->Migrate(as_, kBase + kSize64K / 2, kBase + kSize64K).has_value());
  ASSERT_TRUE(driver_->Fault(kBase, DevCtx()).has_value());
  EXPECT_EQ(driver_->evict_retries(), 1u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kSystem);
  std::vector<uint8_t> gpu(kSize64K);
  ASSERT_TRUE(driver_->GpuRead(kBase, gpu.data(), kSize64K, DevCtx()).has_value());
  EXPECT_EQ(gpu, want);
}

TEST_F(GpuSvmDevmemTest, SystemAndDevicePagesMixOnlyWithAllowMixedInEitherOrder) {
  Map(kBase, 2 * kSize64K);
  Fill(kBase, 2 * kSize64K, 4);
  MakeDriver(vram_->device());
  // First range: device pages then system pages; second: the other way
  // round (drm_gpusvm refuses this one even with allow_mixed).
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K / 2).has_value());
  ASSERT_TRUE(vram_->Migrate(as_, kBase + 3 * kSize64K / 2, kBase + 2 * kSize64K).has_value());
  for (uint64_t a : {kBase, kBase + kSize64K}) {
    auto e = driver_->Fault(a, DevCtx());
    ASSERT_FALSE(e.has_value());
    EXPECT_EQ(e.error(), Errc::kOpNotSupp);
  }
  Ctx mixed = DevCtx();
  mixed.allow_mixed = true;
  for (uint64_t a : {kBase, kBase + kSize64K}) {
    auto r = driver_->Fault(a, mixed);
    ASSERT_TRUE(r.has_value()) << r.error().ToString();
    ReadLock l(driver_->svm().notifier_lock());
    EXPECT_TRUE((*r)->pages()->has_devmem_pages());
  }
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kLocal);
  EXPECT_EQ(driver_->Pte(kBase + kSize64K)->proto, AddrProto::kSystem);
  EXPECT_EQ(driver_->Pte(kBase + 2 * kSize64K - kPageSize)->proto, AddrProto::kLocal);
}

TEST_F(GpuSvmDevmemTest, DevicePagesOfTwoPagemapsAreRefused) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 5);
  peer_ = TestVram::Create({.npages = 64, .owner = vram_->pagemap().owner()});
  vram_->LinkPeer(*peer_, false);
  MakeDriver(vram_->device());
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K / 2).has_value());
  ASSERT_TRUE(peer_->Migrate(as_, kBase + kSize64K / 2, kBase + kSize64K).has_value());
  {
    DriverLockGuard g(driver_->svm().driver_lock());
    Range* r = *driver_->svm().FindOrInsert(kBase, 0, ~uint64_t{0}, DevCtx());
    EXPECT_EQ(driver_->svm().ScanMm(r, vram_->pagemap().owner(), &vram_->pagemap().pgmap()),
              ScanResult::kMixedDevice);
  }
  Ctx mixed = DevCtx();
  mixed.allow_mixed = true;
  auto e = driver_->Fault(kBase, mixed);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kOpNotSupp);
  EXPECT_EQ(vram_->device_maps() + peer_->device_maps(),
            vram_->device_unmaps() + peer_->device_unmaps());
}

// A device that cannot reach the memory: GetPages fails with EFAULT.
TEST_F(GpuSvmDevmemTest, ADeviceWithNoPathToTheMemoryGetsEfault) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 6);
  peer_ = TestVram::Create({.npages = 64, .owner = vram_->pagemap().owner()});
  MakeDriver(peer_->device());  // same owner, but not linked to vram_
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K).has_value());
  auto e = driver_->Fault(kBase, DevCtx());
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kFault);
  EXPECT_EQ(vram_->device_unmaps(), 0u);
  vram_->LinkPeer(*peer_, false);
  ASSERT_TRUE(driver_->Fault(kBase, DevCtx()).has_value());
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kPeer);
}

// The error path of GetPages must unmap the device mappings it already
// made: drm_gpusvm recorded the pagemap only on success and leaked them
// (CVE-2026-68240). The fifth device mapping fails here.
TEST_F(GpuSvmDevmemTest, AFailedDeviceMapUnmapsTheDeviceMappingsAlreadyMade) {
  Env env;
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 6);
  TestDriver::Options o;
  o.device = vram_->device();
  o.env = &env;
  driver_ = TestDriver::Create(as_, o);
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K).has_value());
  env.faults().FailNth("gpusvm.device_map", 5);
  auto e = driver_->Fault(kBase, DevCtx());
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kFault);
  EXPECT_EQ(vram_->device_maps(), 4u);
  EXPECT_EQ(vram_->device_unmaps(), 4u);
  ASSERT_TRUE(driver_->Fault(kBase, DevCtx()).has_value());
}

TEST_F(GpuSvmDevmemTest, DevmemOnlyNeedsEveryPageInDeviceMemory) {
  Map(kBase, kSize64K);
  auto want = Fill(kBase, kSize64K, 7);
  MakeDriver(vram_->device());
  Ctx only = DevCtx();
  only.devmem_only = true;
  auto e = driver_->Fault(kBase, only);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error(), Errc::kFault);
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K).has_value());
  ASSERT_TRUE(driver_->Fault(kBase, only).has_value());
  std::vector<uint8_t> gpu(kSize64K);
  ASSERT_TRUE(driver_->GpuRead(kBase, gpu.data(), kSize64K, only).has_value());
  EXPECT_EQ(gpu, want);
}

TEST_F(GpuSvmDevmemTest, TheCollectorEvictsAPartiallyUnmappedRangeThenRemovesIt) {
  Map(kBase, kSize2M);
  auto want = Fill(kBase, kSize2M, 8);
  MakeDriver(vram_->device());
  auto r = driver_->Fault(kBase, DevCtx());
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(vram_->pagemap().PopulateMm(kBase, kBase + kSize2M, as_, 0).has_value());
  ASSERT_TRUE(driver_->Fault(kBase, DevCtx()).has_value());
  ASSERT_EQ(driver_->Pte(kBase + kSize64K)->proto, AddrProto::kLocal);
  ASSERT_TRUE(as_->Munmap(kBase, kSize64K).has_value());
  // The collector: evict (the rest of the range comes home), then remove.
  driver_->CollectGarbage();
  EXPECT_EQ(driver_->gc_failures(), 0u);
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(driver_->svm().GetStats().ranges, 0u);
  std::vector<uint8_t> got(kSize2M - kSize64K);
  ASSERT_TRUE(as_->Read(kBase + kSize64K, got.data(), got.size()).has_value());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin() + kSize64K));
}

TEST_F(GpuSvmDevmemTest, TeardownLeavesNoDevicePageAndNoDeviceMapping) {
  Map(kBase, 4 * kSize2M);
  Fill(kBase, 4 * kSize2M, 9);
  MakeDriver(vram_->device());
  for (uint64_t a = kBase; a < kBase + 4 * kSize2M; a += kSize2M) {
    ASSERT_TRUE(vram_->pagemap().PopulateMm(a, a + kSize2M, as_, 0).has_value());
    ASSERT_TRUE(driver_->Fault(a, DevCtx()).has_value());
  }
  EXPECT_EQ(vram_->pages_in_use(), 4 * 512u);
  driver_->DestroySvm();  // Fini: every device mapping unmapped once
  EXPECT_EQ(vram_->device_maps(), vram_->device_unmaps());
  EXPECT_EQ(driver_->backstop_frees(), 0u);
  EXPECT_EQ(as_->notifiers().DebugTreeSize(), 0u);
  as_->Exit();  // the address space goes: its device pages are freed
  EXPECT_EQ(vram_->pages_in_use(), 0u);
  EXPECT_EQ(vram_->releases(), vram_->allocs());
}

}  // namespace
}  // namespace usvm::gpusvm::testing

namespace usvm::gpusvm::testing {
namespace {

// After fork, our device pages are shared copy-on-write: range fault
// reports them read-only even under a write request (hmm_vma_handle_pte).
// Mapping them writable would let the parent's device writes reach the
// child; GetPages refuses a write there (EOPNOTSUPP) and maps them for
// reading.
TEST_F(GpuSvmDevmemTest, AReadOnlyDevicePageAfterForkIsNotMappedForWriting) {
  Map(kBase, kSize64K);
  Fill(kBase, kSize64K, 3);
  MakeDriver(vram_->device());
  ASSERT_TRUE(vram_->Migrate(as_, kBase, kBase + kSize64K).has_value());
  auto child = as_->Fork();
  ASSERT_TRUE(child.has_value());
  Ctx w = DevCtx();
  auto f = driver_->Fault(kBase, w);
  ASSERT_FALSE(f.has_value());
  EXPECT_EQ(f.error(), Errc::kOpNotSupp);
  Ctx r = DevCtx();
  r.read_only = true;
  ASSERT_TRUE(driver_->Fault(kBase, r).has_value());
  EXPECT_FALSE(driver_->PteWritable(kBase));
  EXPECT_EQ(driver_->Pte(kBase)->proto, AddrProto::kLocal);
  // Evicting (the CPU path breaks the copy-on-write) lets the write map.
  {
    DriverLockGuard g(driver_->svm().driver_lock());
    Notifier* n = driver_->svm().NotifierFind(kBase, kBase + 1);
    Range* rg = n ? GpuSvm::RangeFind(n, kBase, kBase + 1) : nullptr;
    ASSERT_NE(rg, nullptr);
    ASSERT_TRUE(driver_->svm().RangeEvict(rg).has_value());
  }
  ASSERT_TRUE(driver_->Fault(kBase, w).has_value());
  EXPECT_TRUE(driver_->PteWritable(kBase));
  (*child)->Exit();
}

}  // namespace
}  // namespace usvm::gpusvm::testing
