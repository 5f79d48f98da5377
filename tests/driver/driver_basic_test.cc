// Basic flows of the driver on one and two GPUs: GPU faults served with
// real bytes, migration to VRAM and back by a CPU touch, munmap reaching
// every GPU, the collector, binds. The IGT-style suite is driver_e2e_test.
#include <gtest/gtest.h>

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
  // The CPU touch brings them home, bytes intact.
  EXPECT_EQ(CpuCheck(kBuf, len, 0x1234), 0u);
  EXPECT_EQ(d.vram_stats().allocations, 0u);
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
