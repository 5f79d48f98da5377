// Basic flows of the driver on one and two GPUs: GPU faults served with
// real bytes, migration to VRAM and back by a CPU touch, munmap reaching
// every GPU, the collector, binds. The IGT-style suite is driver_e2e_test.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "usvm/driver/driver.h"
#include "usvm/driver/frame_memory.h"
#include "usvm/gpusvm/pagemap.h"
#include "usvm/mm/address_space.h"

namespace usvm::driver {
namespace {

constexpr uint32_t kRW = mm::kProtRead | mm::kProtWrite;
constexpr uint32_t kAnon = mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed;
constexpr uint64_t kBuf = uint64_t{0x100000000000};

class DriverBasicTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = mm::FramePool::TryCreate(uint64_t{512} << 20, env_).value();
    mem_ = std::make_unique<FrameMemory>(*pool_);
    as_ = mm::AddressSpace::TryCreate(*pool_, {}, env_).value();
  }
  void TearDown() override {
    svm_.reset();
    devs_.clear();
    as_.reset();
  }
  Device& AddGpu(uint64_t vram = uint64_t{64} << 20, const void* owner = nullptr) {
    DeviceConfig c;
    c.gpu.vram_bytes = vram;
    c.owner = owner;
    devs_.push_back(Device::TryCreate(static_cast<uint32_t>(devs_.size()), c, mem_.get(), env_).value());
    return *devs_.back();
  }
  Svm& MakeSvm(SvmConfig c = {}) {
    svm_ = Svm::TryCreate(as_, c).value();
    return *svm_;
  }
  // A GPU kernel that writes v(i) to each 8-byte word of [va, va + len).
  Result<void> GpuFill(Vm& vm, uint64_t va, uint64_t len, uint64_t seed) {
    auto l = vm.LaunchKernel(
        [=](gpu::KernelContext& k) {
          for (uint64_t off = k.thread_id() * 8; off < len; off += 8 * k.num_threads()) k.Store(va + off, seed ^ off);
        },
        {.threads = 4});
    if (!l) return Err(l.error());
    return l->Wait();
  }
  Result<uint64_t> GpuSum(Vm& vm, uint64_t va, uint64_t len) {
    std::atomic<uint64_t> sum{0};
    auto l = vm.LaunchKernel(
        [&, va, len](gpu::KernelContext& k) {
          uint64_t s = 0;
          for (uint64_t off = k.thread_id() * 8; off < len; off += 8 * k.num_threads()) s += k.Load(va + off);
          sum.fetch_add(s);
        },
        {.threads = 4});
    if (!l) return Err(l.error());
    USVM_TRY(l->Wait());
    return sum.load();
  }
  uint64_t CpuCheck(uint64_t va, uint64_t len, uint64_t seed) {
    std::vector<uint64_t> b(len / 8);
    EXPECT_TRUE(as_->Read(va, b.data(), len).has_value());
    uint64_t bad = 0;
    for (uint64_t i = 0; i < b.size(); ++i) bad += b[i] != (seed ^ (i * 8));
    return bad;
  }

  Env env_;
  std::unique_ptr<mm::FramePool> pool_;
  std::unique_ptr<FrameMemory> mem_;
  std::shared_ptr<mm::AddressSpace> as_;
  std::vector<std::unique_ptr<Device>> devs_;
  std::unique_ptr<Svm> svm_;
};

TEST_F(DriverBasicTest, GpuWritesMigrateToVramAndCpuReadsThemBack) {
  Device& d = AddGpu();
  Svm& s = MakeSvm();
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{4} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 0x1234).has_value());
  const VmStats st = vm->stats();
  EXPECT_EQ(st.by_size[2].migrations, 2u);  // two 2 MiB ranges went to VRAM
  EXPECT_GT(st.leaves_2m, 0u);
  EXPECT_EQ(d.vram_stats().allocations, 2u);
  // Our own migrations' MIGRATE events were skipped (the driver had
  // invalidated the ranges itself first).
  EXPECT_EQ(s.stats().own_migrate_ignored, 2u);
  ASSERT_TRUE(vm->context().page_table().Walk(kBuf).has_value());
  // The CPU touch brings them home, bytes intact -- a migration that is
  // not ours: its invalidation zapped the GPU mapping.
  EXPECT_EQ(CpuCheck(kBuf, len, 0x1234), 0u);
  EXPECT_EQ(d.vram_stats().allocations, 0u);
  EXPECT_FALSE(vm->context().page_table().Walk(kBuf).has_value());
}

TEST_F(DriverBasicTest, SystemPlacementMapsSystemPages) {
  Device& d = AddGpu();
  SvmConfig c;
  c.placement = Placement::kSystem;
  Svm& s = MakeSvm(c);
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{1} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 77).has_value());
  EXPECT_EQ(vm->stats().by_size[0].migrations + vm->stats().by_size[1].migrations +
                vm->stats().by_size[2].migrations,
            0u);
  EXPECT_EQ(CpuCheck(kBuf, len, 77), 0u);
}

TEST_F(DriverBasicTest, MunmapReachesEveryGpuAndTheCollectorRemovesRanges) {
  Device& d0 = AddGpu();
  Device& d1 = AddGpu();
  SvmConfig c;
  c.placement = Placement::kSystem;
  Svm& s = MakeSvm(c);
  Vm* v0 = s.Attach(d0).value();
  Vm* v1 = s.Attach(d1).value();
  const uint64_t len = uint64_t{2} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*v0, kBuf, len, 5).has_value());
  auto sum = GpuSum(*v1, kBuf, len);
  ASSERT_TRUE(sum.has_value());
  ASSERT_TRUE(d0.gpu().page_table().Walk(kBuf).has_value());
  ASSERT_TRUE(d1.gpu().page_table().Walk(kBuf).has_value());
  ASSERT_TRUE(as_->Munmap(kBuf, len).has_value());
  EXPECT_FALSE(d0.gpu().page_table().Walk(kBuf).has_value());
  EXPECT_FALSE(d1.gpu().page_table().Walk(kBuf).has_value());
  ASSERT_TRUE(s.CollectGarbage().has_value());
  EXPECT_EQ(s.stats().ranges, 0u);
  // A GPU access now fails cleanly: only that kernel is cancelled.
  auto bad = GpuFill(*v0, kBuf, 4096, 1);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error(), Errc::kNoEnt);
}

TEST_F(DriverBasicTest, BindMapsAheadOfFaultsAndInvalidationUnbinds) {
  Device& d = AddGpu();
  Svm& s = MakeSvm();
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{1} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  auto h = vm->Bind(kBuf, len);
  ASSERT_TRUE(h.has_value()) << h.error().ToString();
  EXPECT_TRUE(vm->BindValid(*h).value());
  const uint64_t faults_before = d.gpu().fault_unit().Stats().raised;
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 9).has_value());
  EXPECT_EQ(d.gpu().fault_unit().Stats().raised, faults_before);  // no fault
  EXPECT_EQ(s.stats().ranges, 0u);                                // no SVM range
  ASSERT_TRUE(as_->Mprotect(kBuf, len, mm::kProtRead).has_value());
  EXPECT_FALSE(vm->BindValid(*h).value());
  EXPECT_FALSE(d.gpu().page_table().Walk(kBuf).has_value());
  EXPECT_EQ(CpuCheck(kBuf, len, 9), 0u);
  ASSERT_TRUE(vm->Unbind(*h).has_value());
  EXPECT_EQ(vm->Unbind(*h).error(), Errc::kNoEnt);
}

}  // namespace
}  // namespace usvm::driver

namespace usvm::driver {
namespace {

TEST_F(DriverBasicTest, TwoAddressSpacesShareOneGpuThroughContexts) {
  Device& d = AddGpu();
  Svm& s1 = MakeSvm();
  auto as2 = mm::AddressSpace::TryCreate(*pool_, {}, env_).value();
  auto s2 = Svm::TryCreate(as2, {}).value();
  Vm* v1 = s1.Attach(d).value();
  Vm* v2 = s2->Attach(d).value();
  EXPECT_EQ(&v1->context(), &d.gpu().default_context());
  EXPECT_NE(&v2->context(), &v1->context());
  EXPECT_EQ(s1.Attach(d).error(), Errc::kExist);
  const uint64_t len = uint64_t{2} << 20;
  // The same VA in both address spaces, different bytes.
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(as2->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*v1, kBuf, len, 111).has_value());
  ASSERT_TRUE(GpuFill(*v2, kBuf, len, 222).has_value());
  EXPECT_EQ(CpuCheck(kBuf, len, 111), 0u);
  std::vector<uint64_t> b(len / 8);
  ASSERT_TRUE(as2->Read(kBuf, b.data(), len).has_value());
  uint64_t bad = 0;
  for (uint64_t i = 0; i < b.size(); ++i) bad += b[i] != (222 ^ (i * 8));
  EXPECT_EQ(bad, 0u);
  // A munmap in one address space leaves the other's mapping alone.
  ASSERT_TRUE(GpuSum(*v2, kBuf, len).has_value());
  ASSERT_TRUE(as_->Munmap(kBuf, len).has_value());
  EXPECT_TRUE(v2->context().page_table().Walk(kBuf).has_value());
  EXPECT_FALSE(v1->context().page_table().Walk(kBuf).has_value());
  s2.reset();
  EXPECT_EQ(d.vram_stats().allocations, 0u);
}

TEST_F(DriverBasicTest, GpuAtomicsMigrateOrAreRefusedByTheAttribute) {
  Device& d = AddGpu();
  SvmConfig c;
  c.placement = Placement::kSystem;
  Svm& s = MakeSvm(c);
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{64} << 10;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(s.SetAttributes(kBuf, len, {.atomic = AtomicMode::kCpu}).has_value());
  auto atomics = [&](uint32_t threads, uint64_t n) {
    auto l = vm->LaunchKernel(
        [=](gpu::KernelContext& k) {
          for (uint64_t i = 0; i < n; ++i) k.AtomicAdd(kBuf, 1);
        },
        {.threads = threads});
    return l.has_value() ? l->Wait() : Result<void>(Err(l.error()));
  };
  auto r = atomics(1, 1);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kAcces);
  // Device atomics: the range moves to VRAM (system placement or not).
  ASSERT_TRUE(s.SetAttributes(kBuf, len, {.atomic = AtomicMode::kDevice}).has_value());
  ASSERT_TRUE(atomics(4, 1000).has_value());
  // Untouched by the CPU, 64 KiB is at the check-pages threshold: a 4 KiB
  // range around the counter.
  EXPECT_EQ(vm->stats().by_size[0].migrations, 1u);
  uint64_t v = 0;
  ASSERT_TRUE(as_->Read(kBuf, &v, 8).has_value());
  EXPECT_EQ(v, 4000u);
  // Setting the same attribute again invalidates nothing.
  const uint64_t inv = s.stats().attribute_invalidations;
  ASSERT_TRUE(s.SetAttributes(kBuf, len, {.atomic = AtomicMode::kDevice}).has_value());
  EXPECT_EQ(s.stats().attribute_invalidations, inv);
  auto q = s.QueryAttributes(kBuf - 4096, len + 8192).value();
  ASSERT_EQ(q.size(), 3u);
  EXPECT_EQ(q[1].attrs.atomic, AtomicMode::kDevice);
  EXPECT_EQ(q[0].attrs.atomic, AtomicMode::kUndefined);
}

TEST_F(DriverBasicTest, WorkingSetTwiceVramRunsWithEviction) {
  Device& d = AddGpu(uint64_t{8} << 20);
  Svm& s = MakeSvm();
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{16} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 0xabc).has_value());
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 0xdef).has_value());
  EXPECT_GT(d.vram_stats().evictions, 0u);
  EXPECT_EQ(CpuCheck(kBuf, len, 0xdef), 0u);
}

}  // namespace
}  // namespace usvm::driver

namespace usvm::driver {
namespace {

class DriverPeerTest : public DriverBasicTest, public ::testing::WithParamInterface<PeerPolicy> {};

// A range in GPU 0's VRAM read by GPU 1 of the same owner with peer access.
TEST_P(DriverPeerTest, PeerPolicyDecidesWhereAPeersPagesGo) {
  static const char kOwner = 0;
  Device& d0 = AddGpu(uint64_t{64} << 20, &kOwner);
  Device& d1 = AddGpu(uint64_t{64} << 20, &kOwner);
  ASSERT_TRUE(d0.EnablePeerAccess(d1).has_value());
  SvmConfig c;
  c.peer_policy = GetParam();
  Svm& s = MakeSvm(c);
  Vm* v0 = s.Attach(d0).value();
  Vm* v1 = s.Attach(d1).value();
  const uint64_t len = uint64_t{2} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*v0, kBuf, len, 42).has_value());
  ASSERT_EQ(d0.vram_stats().allocations, 1u);
  auto sum = GpuSum(*v1, kBuf, len);
  ASSERT_TRUE(sum.has_value());
  uint64_t want = 0;
  for (uint64_t off = 0; off < len; off += 8) want += 42 ^ off;
  EXPECT_EQ(*sum, want);
  auto m = v1->context().page_table().Walk(kBuf).value();
  switch (GetParam()) {
    case PeerPolicy::kMapRemote:
      EXPECT_EQ(v1->stats().peer_maps, 1u);
      EXPECT_EQ(m.pte.kind(), gpu::PteKind::kPeerVram);
      EXPECT_EQ(d0.vram_stats().allocations, 1u);
      EXPECT_TRUE(v0->context().page_table().Walk(kBuf).has_value());  // still mapped on 0
      break;
    case PeerPolicy::kMigrate:
      EXPECT_EQ(m.pte.kind(), gpu::PteKind::kLocalVram);
      EXPECT_EQ(d0.vram_stats().allocations, 0u);
      EXPECT_EQ(d1.vram_stats().allocations, 1u);
      EXPECT_FALSE(v0->context().page_table().Walk(kBuf).has_value());  // invalidated on 0
      break;
    case PeerPolicy::kSystem:
      EXPECT_EQ(m.pte.kind(), gpu::PteKind::kSystem);
      EXPECT_EQ(d0.vram_stats().allocations + d1.vram_stats().allocations, 0u);
      break;
  }
  EXPECT_EQ(CpuCheck(kBuf, len, 42), 0u);
}

INSTANTIATE_TEST_SUITE_P(Policies, DriverPeerTest,
                         ::testing::Values(PeerPolicy::kMapRemote, PeerPolicy::kMigrate, PeerPolicy::kSystem),
                         [](const auto& info) { return std::string(PeerPolicyName(info.param)) == "map-remote"
                                                           ? std::string("MapRemote")
                                                           : std::string(PeerPolicyName(info.param)) == "migrate"
                                                                 ? std::string("Migrate")
                                                                 : std::string("System"); });

TEST_F(DriverBasicTest, DevicesOfDifferentOwnersNeverMapEachOther) {
  Device& d0 = AddGpu();
  Device& d1 = AddGpu();  // owners differ (each its own)
  SvmConfig c;
  c.peer_policy = PeerPolicy::kMigrate;  // map-remote would keep them in system memory
  Svm& s = MakeSvm(c);
  Vm* v0 = s.Attach(d0).value();
  Vm* v1 = s.Attach(d1).value();
  const uint64_t len = uint64_t{2} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*v0, kBuf, len, 7).has_value());
  ASSERT_TRUE(GpuFill(*v1, kBuf, len, 8).has_value());
  EXPECT_EQ(d0.vram_stats().allocations, 0u);
  EXPECT_EQ(d1.vram_stats().allocations, 1u);
  EXPECT_EQ(v1->context().page_table().Walk(kBuf).value().pte.kind(), gpu::PteKind::kLocalVram);
  EXPECT_FALSE(v0->context().page_table().Walk(kBuf).has_value());
  EXPECT_EQ(CpuCheck(kBuf, len, 8), 0u);
}

TEST_F(DriverBasicTest, PrefetchMovesRangesAndSkipsThoseAlreadyThere) {
  Device& d = AddGpu();
  Svm& s = MakeSvm();
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{4} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  std::vector<uint64_t> b(len / 8);
  for (uint64_t i = 0; i < b.size(); ++i) b[i] = 3 ^ (i * 8);
  ASSERT_TRUE(as_->Write(kBuf, b.data(), len).has_value());
  ASSERT_TRUE(vm->Prefetch(kBuf, len, Location::Device(0)).has_value());
  EXPECT_EQ(vm->stats().by_size[2].migrations, 2u);
  EXPECT_EQ(d.vram_stats().allocations, 2u);
  const uint64_t raised = vm->context().fault_unit().Stats().raised;
  auto sum = GpuSum(*vm, kBuf, len);
  ASSERT_TRUE(sum.has_value());
  EXPECT_EQ(vm->context().fault_unit().Stats().raised, raised);  // mapped: no fault
  ASSERT_TRUE(vm->Prefetch(kBuf, len, Location::Device(0)).has_value());
  EXPECT_EQ(vm->stats().by_size[2].migrations, 2u);  // skipped: already there
  ASSERT_TRUE(vm->Prefetch(kBuf, len, Location::System()).has_value());
  EXPECT_EQ(d.vram_stats().allocations, 0u);
  EXPECT_EQ(vm->context().page_table().Walk(kBuf).value().pte.kind(), gpu::PteKind::kSystem);
  EXPECT_EQ(CpuCheck(kBuf, len, 3), 0u);
  EXPECT_EQ(vm->Prefetch(kBuf, len, Location::Device(5)).error(), Errc::kInval);
  EXPECT_EQ(vm->Prefetch(kBuf + 1, len, Location::System()).error(), Errc::kInval);
}

TEST_F(DriverBasicTest, CollectorFailurePutsTheVmInAnErrorState) {
  Device& d = AddGpu();
  SvmConfig c;
  c.gc_worker = false;
  c.placement = Placement::kSystem;
  c.env = &env_;
  Svm& s = MakeSvm(c);
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{2} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 1).has_value());
  ASSERT_TRUE(as_->Munmap(kBuf, len / 2).has_value());
  env_.faults().FailNth("driver.gc", 1);
  auto r = s.CollectGarbage();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(s.error().error(), Errc::kIo);
  // Later faults report it; nothing crashed.
  auto f = GpuFill(*vm, kBuf + len / 2, 4096, 2);
  ASSERT_FALSE(f.has_value());
  EXPECT_EQ(f.error(), Errc::kIo);
  env_.faults().ClearAll();
}

TEST_F(DriverBasicTest, UserptrIsRevalidatedBeforeTheNextLaunch) {
  Device& d = AddGpu();
  Svm& s = MakeSvm();
  Vm* vm = s.Attach(d).value();
  const uint64_t len = uint64_t{256} << 10;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  auto h = vm->Bind(kBuf, len, {.userptr = true}).value();
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 10).has_value());
  // MADV_DONTNEED drops the pages: the userptr is invalidated...
  ASSERT_TRUE(as_->Madvise(kBuf, len, mm::kMadvDontNeed).has_value());
  EXPECT_FALSE(vm->BindValid(h).value());
  EXPECT_EQ(vm->stats().bind_invalidations, 1u);
  // ... and revalidated by the next launch, before any GPU access.
  const uint64_t raised = vm->context().fault_unit().Stats().raised;
  ASSERT_TRUE(GpuFill(*vm, kBuf, len, 11).has_value());
  EXPECT_EQ(vm->context().fault_unit().Stats().raised, raised);
  EXPECT_EQ(vm->stats().rebinds, 1u);
  EXPECT_TRUE(vm->BindValid(h).value());
  EXPECT_EQ(CpuCheck(kBuf, len, 11), 0u);
  EXPECT_EQ(vm->Bind(kBuf + 4096, 4096).error(), Errc::kExist);
}

}  // namespace
}  // namespace usvm::driver

namespace usvm::driver {
namespace {

TEST_F(DriverBasicTest, ADeviceDestroyedFirstDetachesItself) {
  AddGpu();
  Device& d1 = AddGpu();
  SvmConfig c;
  c.placement = Placement::kSystem;
  Svm& s = MakeSvm(c);
  Vm* v0 = s.Attach(*devs_[0]).value();
  Vm* v1 = s.Attach(d1).value();
  const uint64_t len = uint64_t{1} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  ASSERT_TRUE(GpuFill(*v0, kBuf, len, 4).has_value());
  devs_[0].reset();
  EXPECT_EQ(s.vm(0), nullptr);
  EXPECT_EQ(v0->HandleFault(kBuf, gpu::kAccessRead).error(), Errc::kNoDev);
  ASSERT_TRUE(GpuFill(*v1, kBuf, len, 5).has_value());
  ASSERT_TRUE(as_->Munmap(kBuf, len).has_value());  // reaches only GPU 1 now
  EXPECT_EQ(s.Detach(d1).has_value(), true);
  EXPECT_EQ(s.Detach(d1).error(), Errc::kNoEnt);
}

TEST_F(DriverBasicTest, BadInputIsRefusedWithAnErrorCode) {
  Device& d = AddGpu();
  EXPECT_EQ(Svm::TryCreate(nullptr, {}).error(), Errc::kInval);
  SvmConfig bad;
  bad.chunk_sizes = {k64K, k2M, k4K};
  EXPECT_EQ(Svm::TryCreate(as_, bad).error(), Errc::kInval);
  bad = {};
  bad.va_size = 0;
  EXPECT_EQ(Svm::TryCreate(as_, bad).error(), Errc::kInval);
  DeviceConfig dc;
  dc.gpu.vram_bytes = 12345;
  EXPECT_EQ(Device::TryCreate(7, dc, mem_.get(), env_).error(), Errc::kInval);
  dc = {};
  dc.fault_batch = 0;
  EXPECT_EQ(Device::TryCreate(7, dc, mem_.get(), env_).error(), Errc::kInval);
  SvmConfig c;
  c.va_start = uint64_t{1} << 40;
  c.va_size = uint64_t{1} << 30;
  Svm& s = MakeSvm(c);
  Vm* vm = s.Attach(d).value();
  EXPECT_EQ(s.SetAttributes(kBuf + 1, 4096, {}).error(), Errc::kInval);
  EXPECT_EQ(s.SetAttributes(kBuf, 4096, {}).error(), Errc::kInval);  // outside the window
  EXPECT_EQ(s.SetAttributes(c.va_start, 4096, {.preferred = Location::Device(9)}).error(), Errc::kInval);
  EXPECT_EQ(s.QueryAttributes(c.va_start, 0).error(), Errc::kInval);
  EXPECT_EQ(vm->Bind(kBuf, 4096).error(), Errc::kInval);
  EXPECT_EQ(vm->Bind(c.va_start, 4096).error(), Errc::kFault);  // no VMA there (userptr: EFAULT)
  EXPECT_EQ(vm->Unbind(99).error(), Errc::kNoEnt);
  EXPECT_EQ(vm->BindValid(99).error(), Errc::kNoEnt);
  EXPECT_EQ(vm->HandleFault(kBuf, gpu::kAccessRead).error(), Errc::kInval);  // outside the window
  EXPECT_EQ(vm->HandleFault(c.va_start, gpu::kAccessRead).error(), Errc::kNoEnt);
  ASSERT_TRUE(as_->Mmap(c.va_start, 4096, mm::kProtRead, kAnon).has_value());
  EXPECT_EQ(vm->HandleFault(c.va_start, gpu::kAccessWrite).error(), Errc::kPerm);
  EXPECT_TRUE(vm->HandleFault(c.va_start, gpu::kAccessRead).has_value());
  EXPECT_EQ(vm->stats().faults_cancelled, 3u);
}

}  // namespace
}  // namespace usvm::driver

namespace usvm::driver {
namespace {

// A full fault buffer drops faults; they are raised again after the next
// replay, and every access completes.
TEST_F(DriverBasicTest, ABoundedFaultBufferOverflowsAndEveryAccessStillCompletes) {
  DeviceConfig dc;
  dc.gpu.vram_bytes = uint64_t{64} << 20;
  dc.gpu.exec_threads = 16;
  dc.gpu.fault_buffer_entries = 2;
  dc.fault_thread = false;  // faults are served below, once all are raised
  devs_.push_back(Device::TryCreate(0, dc, mem_.get(), env_).value());
  SvmConfig c;
  c.chunk_sizes = {k4K};
  c.placement = Placement::kSystem;
  Svm& s = MakeSvm(c);
  Vm* vm = s.Attach(*devs_[0]).value();
  const uint64_t len = uint64_t{1} << 20;
  ASSERT_TRUE(as_->Mmap(kBuf, len, kRW, kAnon).has_value());
  auto l = vm->LaunchKernel(
      [&](gpu::KernelContext& k) {
        for (uint64_t off = k.thread_id() * 4096; off < len; off += 4096 * k.num_threads())
          k.Store(kBuf + off, off);
      },
      {.threads = 16});
  ASSERT_TRUE(l.has_value());
  gpu::FaultUnit& fu = vm->context().fault_unit();
  // Every thread faults on its first page; two get entries, 14 are dropped.
  for (int i = 0; i < 10000 && fu.Stats().raised < 16; ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
  ASSERT_EQ(fu.Stats().raised, 16u);
  EXPECT_EQ(fu.Stats().dropped, 14u);
  EXPECT_EQ(fu.outstanding(), 2u);
  // Served batch by batch, the dropped faults come back after each answer
  // until every access has completed.
  while (!l->fence().IsSignalled()) (void)vm->ServiceFaults(1'000'000);
  ASSERT_TRUE(l->Wait().has_value());
  EXPECT_EQ(fu.Stats().fetched, len / 4096);
  for (uint64_t off = 0; off < len; off += 4096) {
    uint64_t v = 0;
    ASSERT_TRUE(as_->Read(kBuf + off, &v, 8).has_value());
    ASSERT_EQ(v, off);
  }
}

}  // namespace
}  // namespace usvm::driver
