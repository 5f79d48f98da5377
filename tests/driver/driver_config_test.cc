// One standard workload under a matrix of driver configurations (chunk
// sizes, invalidation mode, placement, peer policy, own-migrate skipping,
// collector worker, fault batches, a bounded fault buffer, tiny VRAM):
// CPU fill, two GPUs adding to halves and to all of it, a partial munmap,
// a fork, every byte checked. Plus the creation errors.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "driver/driver_test_util.h"

namespace usvm::driver::testing {
namespace {

constexpr uint64_t k1M = uint64_t{1} << 20;

struct ConfigCase {
  std::string name;
  std::function<void(MachineConfig&)> tweak;
};

class DriverConfigTest : public ::testing::TestWithParam<ConfigCase> {};

TEST_P(DriverConfigTest, StandardWorkload) {
  MachineConfig c;
  c.gpus = 2;
  c.shared_owner = true;
  c.peer_access = true;
  c.vram_bytes = 16 * k1M;
  GetParam().tweak(c);
  Machine m(c);
  const uint64_t len = 3 * k2M + 5 * k64K;
  const uint64_t va = m.MmapAligned(len);
  Ref ref(va, len);
  USVM_ASSERT_OK(CpuFill(m.as(), va, len / 2, 1));
  ref.Fill(va, len / 2, 1);
  // GPU 0 the first half, GPU 1 the second, then both all of it.
  USVM_ASSERT_OK(GpuAdd(m.vm(0), va, len / 2, 3));
  USVM_ASSERT_OK(GpuFill(m.vm(1), va + len / 2, len - len / 2, 2));
  for (uint64_t a = va; a < va + len / 2; a += 8) ref.Set64(a, ref.Get64(a) + 3);
  ref.Fill(va + len / 2, len - len / 2, 2);
  for (uint32_t g = 0; g < 2; ++g) {
    USVM_ASSERT_OK(GpuAdd(m.vm(g), va, len, 10 * (g + 1)));
    for (uint64_t a = va; a < va + len; a += 8) ref.Set64(a, ref.Get64(a) + 10 * (g + 1));
  }
  ASSERT_TRUE(GpuMatches(m.vm(0), ref));
  ASSERT_TRUE(GpuMatches(m.vm(1), ref));
  // A partial munmap.
  const uint64_t hole = va + k2M - k64K;
  USVM_ASSERT_OK(m.as().Munmap(hole, 2 * k64K));
  for (uint32_t g = 0; g < 2; ++g) EXPECT_EQ(Code(GpuRead(m.vm(g), hole, 8)), Errc::kNoEnt) << "GPU " << g;
  // A fork; the parent's GPUs write after it.
  auto child = m.as().Fork();
  ASSERT_TRUE(child.has_value());
  m.Keep(*child);
  Ref before = ref;
  USVM_ASSERT_OK(GpuAdd(m.vm(1), va, hole - va, 100));
  for (uint64_t a = va; a < hole; a += 8) ref.Set64(a, ref.Get64(a) + 100);
  EXPECT_TRUE(GpuMatchesSpan(m.vm(0), ref, va, hole - va));
  EXPECT_TRUE(GpuMatchesSpan(m.vm(1), ref, hole + 2 * k64K, va + len - hole - 2 * k64K));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, va, hole - va));
  EXPECT_TRUE(CpuMatchesSpan(m.as(), ref, hole + 2 * k64K, va + len - hole - 2 * k64K));
  EXPECT_TRUE(CpuMatchesSpan(**child, before, va, hole - va));
  USVM_EXPECT_OK(m.svm().error());
  m.Teardown();
  EXPECT_EQ(m.pool().GetStats().free_frames, m.baseline_free_frames()) << "frames leaked";
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, DriverConfigTest,
    ::testing::Values(
        ConfigCase{"Default", [](MachineConfig&) {}},
        ConfigCase{"Only4K", [](MachineConfig& c) { c.svm.chunk_sizes = {k4K}; }},
        ConfigCase{"Only64KAnd4K", [](MachineConfig& c) { c.svm.chunk_sizes = {k64K, k4K}; }},
        ConfigCase{"SinglePass", [](MachineConfig& c) { c.svm.invalidation = InvalidationMode::kSinglePass; }},
        ConfigCase{"SystemPlacement", [](MachineConfig& c) { c.svm.placement = Placement::kSystem; }},
        ConfigCase{"PeerMigrate", [](MachineConfig& c) { c.svm.peer_policy = PeerPolicy::kMigrate; }},
        ConfigCase{"PeerSystem", [](MachineConfig& c) { c.svm.peer_policy = PeerPolicy::kSystem; }},
        ConfigCase{"NoPeerAccess", [](MachineConfig& c) { c.peer_access = false; }},
        ConfigCase{"OwnOwners", [](MachineConfig& c) { c.shared_owner = false; }},
        ConfigCase{"NoIgnoreOwnMigrate", [](MachineConfig& c) { c.svm.ignore_own_migrate = false; }},
        ConfigCase{"NoGcWorker", [](MachineConfig& c) { c.svm.gc_worker = false; }},
        ConfigCase{"SmallNotifiers", [](MachineConfig& c) { c.svm.notifier_size = 2 * k2M; }},
        ConfigCase{"FaultBatch1", [](MachineConfig& c) { c.fault_batch = 1; }},
        ConfigCase{"FaultBuffer4", [](MachineConfig& c) { c.fault_buffer_entries = 4; }},
        ConfigCase{"TinyVram", [](MachineConfig& c) { c.vram_bytes = 2 * k2M; }},
        ConfigCase{"OneExecThread", [](MachineConfig& c) { c.exec_threads = 1; }},
        ConfigCase{"ManyExecThreads", [](MachineConfig& c) { c.exec_threads = 8; }},
        ConfigCase{"NoRetryBudget", [](MachineConfig& c) { c.svm.fault_retry_budget = 0; }}),
    [](const ::testing::TestParamInfo<ConfigCase>& i) { return i.param.name; });

TEST(DriverConfig, CreationErrors) {
  auto env = std::make_unique<Env>();
  auto pool = mm::FramePool::TryCreate(uint64_t{64} << 20, *env);
  ASSERT_TRUE(pool.has_value());
  FrameMemory sysmem(**pool);
  EXPECT_EQ(Code(Device::TryCreate(gpu::kMaxGpus, {}, &sysmem, *env)), Errc::kInval);
  DeviceConfig bad;
  bad.gpu.exec_threads = 0;
  EXPECT_EQ(Code(Device::TryCreate(0, bad, &sysmem, *env)), Errc::kInval);
  EXPECT_EQ(Code(Svm::TryCreate(nullptr, {})), Errc::kInval);
  auto as = AddressSpace::TryCreate(**pool, {}, *env);
  ASSERT_TRUE(as.has_value());
  SvmConfig sc;
  sc.env = env.get();
  sc.chunk_sizes = {k64K, k2M};  // not descending
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc.chunk_sizes = {3 * k4K};
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc.chunk_sizes = {};
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc = {};
  sc.env = env.get();
  sc.notifier_size = 12345;
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc = {};
  sc.env = env.get();
  sc.va_size = 0;
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc = {};
  sc.env = env.get();
  auto svm = Svm::TryCreate(*as, sc);
  ASSERT_TRUE(svm.has_value()) << svm.error().ToString();
  EXPECT_EQ((*svm)->vm(0), nullptr);
  auto dev = Device::TryCreate(3, {}, &sysmem, *env);
  ASSERT_TRUE(dev.has_value());
  EXPECT_EQ((*dev)->id(), 3u);
  EXPECT_EQ((*dev)->vram_stats().bytes_total, DeviceConfig{}.gpu.vram_bytes);
  EXPECT_EQ((*dev)->vram_stats().allocations, 0u);
  auto vm = (*svm)->Attach(**dev);
  ASSERT_TRUE(vm.has_value());
  EXPECT_EQ((*vm)->gpu_id(), 3u);
  EXPECT_EQ(&(*vm)->device(), dev->get());
  EXPECT_EQ(&(*vm)->svm(), svm->get());
  EXPECT_EQ((*svm)->vm(3), *vm);
  EXPECT_STRNE(InvalidationModeName(InvalidationMode::kTwoPass), InvalidationModeName(InvalidationMode::kSinglePass));
  EXPECT_STRNE(AtomicModeName(AtomicMode::kCpu), AtomicModeName(AtomicMode::kDevice));
  EXPECT_STRNE(PlacementName(Placement::kSystem), PlacementName(Placement::kFaultingGpu));
  svm->reset();
  dev->reset();
  (*as)->Exit();
}

}  // namespace
}  // namespace usvm::driver::testing
