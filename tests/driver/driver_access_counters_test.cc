// Access counter migrations (policy.h AccessCounterPolicy, gpu
// access_counters.h): a region the GPU maps remotely (system memory)
// migrates to its VRAM once the GPU's counter for it reaches the
// threshold, a cold one stays; the policy "off" services notifications
// without moving anything; a block the uvm thrashing policy pinned stays
// remote until the pin expires, then the counters bring it back (UVM).
// Faults and notifications are served from the test thread
// (fault_thread off), so every count is exact.
#include <gtest/gtest.h>

#include <string>

#include "driver/driver_test_util.h"
#include "usvm/driver/policy.h"

namespace usvm::driver::testing {
namespace {

constexpr uint32_t kThreshold = 256;  // UVM's default

MachineConfig Config(const std::string& policy) {
  MachineConfig c;
  c.fault_thread = false;
  c.svm.placement = Placement::kSystem;  // every fault maps system memory
  c.svm.access_counters = policy;
  c.access_counters = {.enabled = true, .granularity = gpu::k64K, .threshold = kThreshold};
  return c;
}

// `n` loads inside [va, va + 4 KiB) on one kernel thread; the pages must
// be mapped already (no fault servicing runs meanwhile).
Result<void> Loads(Vm& vm, uint64_t va, uint32_t n) {
  return Wait(vm.LaunchKernel(
      [va, n](gpu::KernelContext& k) {
        for (uint32_t i = 0; i < n; ++i) (void)k.Load(va + (i % 512) * 8);
      },
      {.threads = 1}));
}

// Serves what the GPU queued: here only access counter notifications.
void ServeNotifications(Machine& m) {
  auto r = m.vm().ServiceFaults(1'000'000);
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(*r, 0u);  // no fault: the doorbell
}

TEST(DriverAccessCounters, AHotRemoteRegionMigratesAColdOneStays) {
  Machine m(Config("on"));
  const uint64_t hot = m.MmapAligned(k2M), cold = m.MmapAligned(k2M);
  Ref ref_hot(hot, k2M), ref_cold(cold, k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), hot, k2M, 1));
  USVM_ASSERT_OK(CpuFill(m.as(), cold, k2M, 2));
  ref_hot.Fill(hot, k2M, 1);
  ref_cold.Fill(cold, k2M, 2);
  USVM_ASSERT_OK(m.vm().HandleFault(hot, gpu::kAccessRead));
  USVM_ASSERT_OK(m.vm().HandleFault(cold, gpu::kAccessRead));
  ASSERT_EQ(GpuPteKind(m.vm(), hot), gpu::PteKind::kSystem);
  ASSERT_EQ(GpuPteKind(m.vm(), cold), gpu::PteKind::kSystem);
  EXPECT_EQ(m.vm().stats().by_size[2].migrations, 0u);

  USVM_ASSERT_OK(Loads(m.vm(), cold, kThreshold - 1));  // one short
  USVM_ASSERT_OK(Loads(m.vm(), hot, kThreshold));
  ServeNotifications(m);
  const VmStats s = m.vm().stats();
  EXPECT_EQ(s.ac_notifications, 1u);
  EXPECT_EQ(s.ac_migrations, 1u);
  EXPECT_EQ(s.ac_migrated_bytes, k2M);  // the whole 2 MiB range (all or nothing)
  EXPECT_EQ(GpuPteKind(m.vm(), hot), gpu::PteKind::kLocalVram);
  EXPECT_EQ(DevicePages(m.as(), hot, k2M), 512u);
  EXPECT_EQ(GpuPteKind(m.vm(), cold), gpu::PteKind::kSystem);
  EXPECT_EQ(DevicePages(m.as(), cold, k2M), 0u);
  EXPECT_EQ(m.dev().gpu().access_counters().DebugCount(hot), 0u);  // cleared
  // The hot range's accesses are local now: no more counting.
  USVM_ASSERT_OK(Loads(m.vm(), hot, 4 * kThreshold));
  EXPECT_EQ(m.dev().gpu().access_counters().DebugCount(hot), 0u);
  EXPECT_EQ(m.dev().gpu().access_counters().pending(), 0u);
  // The bytes survived.
  EXPECT_TRUE(GpuMatches(m.vm(), ref_hot));
  EXPECT_TRUE(CpuMatches(m.as(), ref_hot));
  EXPECT_TRUE(CpuMatches(m.as(), ref_cold));
}

TEST(DriverAccessCounters, OffServicesNotificationsAndMovesNothing) {
  Machine m(Config("off"));
  const uint64_t va = m.MmapAligned(k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 3));
  USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
  USVM_ASSERT_OK(Loads(m.vm(), va, kThreshold));
  ServeNotifications(m);
  const VmStats s = m.vm().stats();
  EXPECT_EQ(s.ac_notifications, 1u);
  EXPECT_EQ(s.ac_migrations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);
  EXPECT_EQ(m.dev().vram_stats().bytes_to_vram, 0u);
  // Cleared: it notifies again after another threshold of accesses.
  USVM_ASSERT_OK(Loads(m.vm(), va, kThreshold));
  ServeNotifications(m);
  EXPECT_EQ(m.vm().stats().ac_notifications, 2u);
}

TEST(DriverAccessCounters, PreferredLocationKeepsTheRangeWhereTheUserPutIt) {
  MachineConfig c = Config("on");
  c.svm.placement = Placement::kFaultingGpu;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 4));
  USVM_ASSERT_OK(m.svm().SetAttributes(va, k2M, {.preferred = Location::System()}));
  USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
  ASSERT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);
  USVM_ASSERT_OK(Loads(m.vm(), va, kThreshold));
  ServeNotifications(m);
  EXPECT_EQ(m.vm().stats().ac_notifications, 1u);
  EXPECT_EQ(m.vm().stats().ac_migrations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);
}

TEST(DriverAccessCounters, APinnedBlockStaysRemoteUntilThePinExpires) {
  MachineConfig c = Config("on");
  c.svm.placement = Placement::kFaultingGpu;
  c.manual_clock = true;
  c.svm.thrashing = "uvm";
  c.svm.policy.lapse_ns = 1000;
  c.svm.policy.epoch_lapses = 1u << 30;
  c.svm.policy.pin_lapses = 1000;  // 1 ms of the manual clock
  c.svm.policy.thrashing_threshold = 3;
  c.svm.policy.pin_threshold = 2;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  Ref ref(va, k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 5));
  ref.Fill(va, k2M, 5);
  // Ping-pong until the thrashing policy pins the block (as in
  // DriverThrashing.PingPongIsThrottledThenPinned).
  for (int round = 0; round < 6; ++round) {
    USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
    ASSERT_TRUE(CpuMatches(m.as(), ref));  // the CPU touch brings it home
  }
  ASSERT_EQ(m.vm().stats().pins, 1u);
  USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
  ASSERT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);  // pinned: remote

  // Hot while pinned: the notification is left alone.
  USVM_ASSERT_OK(Loads(m.vm(), va, kThreshold));
  ServeNotifications(m);
  VmStats s = m.vm().stats();
  EXPECT_EQ(s.ac_notifications, 1u);
  EXPECT_EQ(s.ac_thrashing_skips, 1u);
  EXPECT_EQ(s.ac_migrations, 0u);
  EXPECT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);

  // The pin expires; the next notification migrates the block here.
  m.AdvanceClock(2'000'000);
  USVM_ASSERT_OK(Loads(m.vm(), va, kThreshold));
  ServeNotifications(m);
  s = m.vm().stats();
  EXPECT_EQ(s.ac_notifications, 2u);
  EXPECT_EQ(s.ac_migrations, 1u);
  EXPECT_EQ(s.ac_migrated_bytes, k2M);
  EXPECT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kLocalVram);
  EXPECT_EQ(DevicePages(m.as(), va, k2M), 512u);
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
}

TEST(DriverAccessCounters, UnknownPolicyAndBadCounterConfigAreEinval) {
  MachineConfig c;
  c.default_process = false;
  Machine m(c);
  auto as = AddressSpace::TryCreate(m.pool(), {}, m.env());
  ASSERT_TRUE(as.has_value());
  SvmConfig sc;
  sc.access_counters = "sometimes";
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  DeviceConfig dc;
  dc.gpu.vram_bytes = k2M * 4;
  dc.gpu.access_counters = {.enabled = true, .granularity = k4K};
  EXPECT_EQ(Code(Device::TryCreate(7, dc, &m.sysmem(), m.env())), Errc::kInval);
  (*as)->Exit();
}

}  // namespace
}  // namespace usvm::driver::testing
