// Policies (policy.h): each policy's decisions on hand-made patterns --
// the pure functions on bitmaps and candidate lists first, then the same
// decisions through the driver's fault handler (faults served from the
// test thread, so every count is deterministic), and the bad names.
#include <gtest/gtest.h>

#include <string>

#include "driver/driver_test_util.h"
#include "usvm/driver/policy.h"

namespace usvm::driver::testing {
namespace {

constexpr uint64_t kBlk = uint64_t{0x40000000};  // a 2 MiB aligned block start

BlockState Block(std::initializer_list<uint32_t> resident, uint32_t fault_page) {
  BlockState b;
  b.start = kBlk;
  b.lo = kBlk;
  b.hi = kBlk + kBlockBytes;
  b.fault_va = kBlk + uint64_t{fault_page} * k4K;
  for (uint32_t p : resident) b.resident.set(p);
  return b;
}
uint64_t Pg(uint32_t p) { return kBlk + uint64_t{p} * k4K; }

// ---- density ------------------------------------------------------------------

TEST(DensityPolicy, LoneFaultBringsNothingMore) {
  DensityMigration d(51);
  // A lone page in an empty block: only its own leaf (1 page) is dense.
  VaSpan s = d.Expand(Block({}, 100));
  EXPECT_EQ(s.start, Pg(100));
  EXPECT_EQ(s.end, Pg(101));
}

TEST(DensityPolicy, SubtreeAboveThresholdIsBroughtWhole) {
  DensityMigration d(51);
  // Pages 0, 1 resident, fault on 2: the 4-page subtree is 3/4 > 51%.
  VaSpan s = d.Expand(Block({0, 1}, 2));
  EXPECT_EQ(s.start, Pg(0));
  EXPECT_EQ(s.end, Pg(4));
  // Exactly half is not more than 51%: pages 0 resident, fault on 1 gives
  // the pair (2/2) but 2/4 of the next level is not enough.
  s = d.Expand(Block({0}, 1));
  EXPECT_EQ(s.start, Pg(0));
  EXPECT_EQ(s.end, Pg(2));
}

TEST(DensityPolicy, BringsTheWholeBlockAfter51PercentFaulted) {
  DensityMigration d(51);
  // 256 pages (50%) of the block resident, in its first half; a fault in
  // the second half makes 257/512 > 50% but not > 51% of the block.
  BlockState b = Block({}, 300);
  for (uint32_t p = 0; p < 256; ++p) b.resident.set(p);
  VaSpan s = d.Expand(b);
  EXPECT_NE(s.end - s.start, kBlockBytes);
  // 261 resident + the fault = 262/512 = 51.2% > 51%: the whole block.
  for (uint32_t p = 256; p < 261; ++p) b.resident.set(p);
  s = d.Expand(b);
  EXPECT_EQ(s.start, kBlk);
  EXPECT_EQ(s.end, kBlk + kBlockBytes);
}

TEST(DensityPolicy, ClampedToTheVma) {
  DensityMigration d(51);
  BlockState b = Block({}, 10);
  for (uint32_t p = 0; p < 400; ++p) b.resident.set(p);
  b.hi = Pg(450);  // the VMA ends there
  VaSpan s = d.Expand(b);
  EXPECT_EQ(s.start, kBlk);
  EXPECT_EQ(s.end, Pg(450));
}

TEST(DensityPolicy, SequentialFaultsPerBlock) {
  // A sequential scan: each fault brings the densest subtree; count the
  // faults one 2 MiB block takes: pages 0, 1, 2, 4, 8, 16, 32, 64, 65,
  // 128, 129, 130, 256, 257, 258, 260, 264 (at 65 the 128-page subtree is
  // 66/128 = 51.6%; at 264 the block is 265/512 = 51.8%).
  DensityMigration d(51);
  std::bitset<kBlockPages> res;
  int faults = 0;
  for (uint32_t p = 0; p < kBlockPages; ++p) {
    if (res[p]) continue;
    ++faults;
    BlockState b = Block({}, p);
    b.resident = res;
    VaSpan s = d.Expand(b);
    for (uint64_t a = s.start; a < s.end; a += k4K) res.set((a - kBlk) / k4K);
    res.set(p);
  }
  EXPECT_EQ(faults, 17);
}

// ---- tree --------------------------------------------------------------------

TEST(TreePolicy, BringsTheBasicBlockAndDenseNodes) {
  TreeMigration t(50);
  // A fault brings its 64 KiB basic block (16 pages) at least.
  VaSpan s = t.Expand(Block({}, 20));
  EXPECT_EQ(s.start, Pg(16));
  EXPECT_EQ(s.end, Pg(32));
  // Basic blocks 0 and 1 resident, fault in block 2: 48/64 > 50%: the
  // 256 KiB node (64 pages).
  BlockState b = Block({}, 40);
  for (uint32_t p = 0; p < 32; ++p) b.resident.set(p);
  s = t.Expand(b);
  EXPECT_EQ(s.start, Pg(0));
  EXPECT_EQ(s.end, Pg(64));
  // Sequential: 0, 16, 32, 64, 128, 256: 6 faults per block.
  std::bitset<kBlockPages> res;
  int faults = 0;
  for (uint32_t p = 0; p < kBlockPages; ++p) {
    if (res[p]) continue;
    ++faults;
    BlockState x = Block({}, p);
    x.resident = res;
    VaSpan e = t.Expand(x);
    for (uint64_t a = e.start; a < e.end; a += k4K) res.set((a - kBlk) / k4K);
  }
  EXPECT_EQ(faults, 6);
}

// ---- eviction orders ------------------------------------------------------------

TEST(EvictionPolicy, OrdersOnCandidateLists) {
  // In list (LRU) order: {offset, size, populated, last_use, uses}.
  const std::vector<EvictCandidate> c = {
      {0 * k2M, k2M, 1, 7, 4},  // A: populated first, used most, used least recently
      {1 * k2M, k2M, 2, 8, 2},  // B
      {2 * k2M, k2M, 3, 9, 2},  // C
      {3 * k2M, k2M, 4, 10, 2}, // D
  };
  EXPECT_EQ(LruEviction().PickVictim(c), 0u);
  EXPECT_EQ(LfuEviction().PickVictim(c), 1u);  // fewest uses; tie: least recent
  EXPECT_EQ(PseudoLruEviction().PickVictim(c), 0u);
  // A root chunk with free space ("unused") goes first, whatever its age.
  std::vector<EvictCandidate> d = c;
  d.push_back({4 * k2M, k64K, 11, 11, 1});
  EXPECT_EQ(PseudoLruEviction().PickVictim(d), 4u);
  // Among full ones the oldest population, not the least recent use.
  std::vector<EvictCandidate> e = {c[1], c[0], c[2]};
  EXPECT_EQ(PseudoLruEviction().PickVictim(e), 1u);
}

// ---- thrashing ------------------------------------------------------------------

TEST(UvmThrashingPolicy, ThrottlesThenPins) {
  PolicyParams p;  // threshold 3, pin after 10 throttles
  UvmThrashing t(p);
  uint64_t now = 1000;
  const uint64_t lapse = p.lapse_ns;
  // First migration: no event.
  EXPECT_EQ(t.OnMigrate(kBlk, 0, kBlockPages, 0, now).action, ThrashAction::kNone);
  // Returns 1 and 2: events below the threshold.
  EXPECT_EQ(t.OnMigrate(kBlk, 0, kBlockPages, 0, now += lapse).action, ThrashAction::kNone);
  EXPECT_EQ(t.OnMigrate(kBlk, 0, kBlockPages, 0, now += lapse).action, ThrashAction::kNone);
  // Returns 3..12: ten throttles, each a nap of one lapse.
  for (int i = 0; i < 10; ++i) {
    ThrashDecision d = t.OnMigrate(kBlk, 0, kBlockPages, 0, now += lapse);
    ASSERT_EQ(d.action, ThrashAction::kThrottle) << "return " << i + 3;
    EXPECT_EQ(d.nap_ns, lapse);
  }
  // The next return pins it, for pin_lapses lapses.
  ThrashDecision d = t.OnMigrate(kBlk, 0, kBlockPages, 0, now += lapse);
  EXPECT_EQ(d.action, ThrashAction::kPin);
  EXPECT_TRUE(d.pin_started);
  EXPECT_TRUE(t.Pinned(kBlk, now + lapse));
  d = t.OnMigrate(kBlk, 0, kBlockPages, 0, now + lapse);
  EXPECT_EQ(d.action, ThrashAction::kPin);
  EXPECT_FALSE(d.pin_started);
  EXPECT_FALSE(t.Pinned(kBlk, now + uint64_t{p.pin_lapses} * lapse));
  const ThrashStats s = t.stats();
  EXPECT_EQ(s.events, 13u);
  EXPECT_EQ(s.throttles, 10u);
  EXPECT_EQ(s.pins, 1u);
  EXPECT_EQ(s.pinned_faults, 2u);
  // Another block is not affected.
  EXPECT_EQ(t.OnMigrate(kBlk + kBlockBytes, 0, 1, 0, now).action, ThrashAction::kNone);
}

TEST(UvmThrashingPolicy, NewPagesAndNewEpochsAreNotThrashing) {
  PolicyParams p;
  UvmThrashing t(p);
  // Faults bringing different pages of one block: no event.
  for (uint32_t i = 0; i < 100; ++i) EXPECT_EQ(t.OnMigrate(kBlk, i, 1, 0, 1000 + i).action, ThrashAction::kNone);
  EXPECT_EQ(t.stats().events, 0u);
  // Returns spaced by more than an epoch: each starts a new one.
  const uint64_t epoch = uint64_t{p.epoch_lapses} * p.lapse_ns;
  for (uint64_t i = 1; i <= 20; ++i)
    EXPECT_EQ(t.OnMigrate(kBlk + kBlockBytes, 0, 16, 0, i * (epoch + 1)).action, ThrashAction::kNone);
  EXPECT_EQ(t.stats().events, 0u);
}

TEST(PolicyRegistry, NamesAndErrors) {
  PolicyParams p;
  for (const std::string& n : MigrationPolicyNames()) {
    auto m = MakeMigrationPolicy(n, p);
    ASSERT_TRUE(m.has_value()) << n;
    EXPECT_EQ((*m)->name(), n);
  }
  for (const std::string& n : EvictionPolicyNames()) EXPECT_EQ((*MakeEvictionPolicy(n))->name(), n);
  for (const std::string& n : ThrashingPolicyNames()) EXPECT_EQ((*MakeThrashingPolicy(n, p))->name(), n);
  EXPECT_EQ(Code(MakeMigrationPolicy("dense", p)), Errc::kInval);
  EXPECT_EQ(Code(MakeEvictionPolicy("")), Errc::kInval);
  EXPECT_EQ(Code(MakeThrashingPolicy("UVM", p)), Errc::kInval);
  p.density_threshold = 0;
  EXPECT_EQ(Code(MakeMigrationPolicy("density", p)), Errc::kInval);
  p = {};
  p.lapse_ns = 0;
  EXPECT_EQ(Code(MakeThrashingPolicy("uvm", p)), Errc::kInval);
}

// ---- through the driver ----------------------------------------------------------

TEST(DriverPolicy, UnknownNamesFailCreation) {
  MachineConfig c;
  c.default_process = false;
  Machine m(c);
  auto as = AddressSpace::TryCreate(m.pool(), {}, m.env());
  ASSERT_TRUE(as.has_value());
  SvmConfig sc;
  sc.migration = "nope";
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  sc = {};
  sc.thrashing = "nope";
  EXPECT_EQ(Code(Svm::TryCreate(*as, sc)), Errc::kInval);
  DeviceConfig dc;
  dc.gpu.vram_bytes = k2M * 4;
  dc.eviction = "mru";
  EXPECT_EQ(Code(Device::TryCreate(7, dc, &m.sysmem(), m.env())), Errc::kInval);
  (*as)->Exit();
}

// 4 KiB chunks (UVM's fault granularity), one 2 MiB block, faults in
// address order from the test thread.
struct SeqResult {
  uint64_t faults = 0, valid = 0, prefetches = 0, device_pages = 0, bytes = 0;
};
SeqResult SequentialFaults(const std::string& policy) {
  MachineConfig c;
  c.svm.chunk_sizes = {k4K};
  c.svm.migration = policy;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  Ref ref(va, k2M);
  EXPECT_TRUE(CpuFill(m.as(), va, k2M, 7).has_value());
  ref.Fill(va, k2M, 7);
  SeqResult r;
  for (uint64_t a = va; a < va + k2M; a += k4K) {
    auto h = m.vm().HandleFault(a, gpu::kAccessRead);
    EXPECT_TRUE(h.has_value()) << h.error().ToString();
  }
  const VmStats s = m.vm().stats();
  r.faults = s.by_size[0].faults;
  r.valid = s.by_size[0].valid_faults;
  r.prefetches = s.policy_prefetches;
  r.bytes = s.policy_prefetch_bytes;
  r.device_pages = DevicePages(m.as(), va, k2M);
  // The bytes survived the migrations.
  EXPECT_TRUE(GpuMatches(m.vm(), ref));
  EXPECT_TRUE(CpuMatches(m.as(), ref));
  return r;
}

TEST(DriverPolicy, FaultOnlyMigratesOnlyTheFaultingPage) {
  SeqResult r = SequentialFaults("fault-only");
  EXPECT_EQ(r.faults, 512u);
  EXPECT_EQ(r.valid, 0u);
  EXPECT_EQ(r.prefetches, 0u);
  EXPECT_EQ(r.device_pages, 512u);
}

TEST(DriverPolicy, DensityBringsTheBlockAfterHalfOfItFaulted) {
  SeqResult r = SequentialFaults("density");
  // Every fault is handled; only 17 of them migrate on their own (the
  // pages of DensityPolicy.SequentialFaultsPerBlock), the others find their
  // page brought already.
  EXPECT_EQ(r.faults, 512u);
  EXPECT_EQ(r.faults - r.valid, 17u);
  EXPECT_EQ(r.prefetches, 512u - 17u);
  EXPECT_EQ(r.bytes, (512u - 17u) * k4K);
  EXPECT_EQ(r.device_pages, 512u);
}

TEST(DriverPolicy, TreeBringsBasicBlocksAndDenseNodes) {
  SeqResult r = SequentialFaults("tree");
  EXPECT_EQ(r.faults - r.valid, 6u);
  EXPECT_EQ(r.prefetches, 512u - 6u);
  EXPECT_EQ(r.device_pages, 512u);
}

TEST(DriverPolicy, DensityUnderThresholdLeavesTheRestAlone) {
  MachineConfig c;
  c.svm.chunk_sizes = {k4K};
  c.svm.migration = "density";
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 3));
  // Every 4th page: each fault finds its 2- and 4-page subtrees at most
  // half full, so nothing else moves.
  for (uint64_t a = va; a < va + k2M; a += 4 * k4K) USVM_ASSERT_OK(m.vm().HandleFault(a, gpu::kAccessRead));
  EXPECT_EQ(m.vm().stats().policy_prefetches, 0u);
  EXPECT_EQ(DevicePages(m.as(), va, k2M), 128u);
}

// ---- eviction through the driver ----------------------------------------------------

// VRAM of 4 x 2 MiB; four 2 MiB ranges A..D migrated in order, then
// `uses` (indices: each a re-commit -- an attribute change invalidates the
// range, the next fault maps it again from VRAM), then a fifth range
// needs room. Returns which of A..D left VRAM (-1: none, -2: several).
int Victim(const std::string& policy, const std::vector<int>& uses) {
  MachineConfig c;
  c.vram_bytes = 4 * k2M;
  c.eviction = policy;
  Machine m(c);
  std::vector<uint64_t> v;
  for (int i = 0; i < 5; ++i) v.push_back(m.MmapAligned(k2M));
  for (uint64_t a : v) EXPECT_TRUE(CpuFill(m.as(), a, k2M, a).has_value());
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(m.vm().HandleFault(v[i], gpu::kAccessRead).has_value());
  for (int i : uses) {
    AttributeUpdate on, off;
    on.access_in_place = true;
    off.access_in_place = false;
    EXPECT_TRUE(m.svm().SetAttributes(v[i], k2M, on).has_value());
    EXPECT_TRUE(m.vm().HandleFault(v[i], gpu::kAccessRead).has_value());
    EXPECT_TRUE(m.svm().SetAttributes(v[i], k2M, off).has_value());
    EXPECT_TRUE(m.vm().HandleFault(v[i], gpu::kAccessRead).has_value());
  }
  for (int i = 0; i < 4; ++i) EXPECT_EQ(DevicePages(m.as(), v[i], k2M), 512u) << "range " << i;
  EXPECT_TRUE(m.vm().HandleFault(v[4], gpu::kAccessRead).has_value());
  EXPECT_EQ(DevicePages(m.as(), v[4], k2M), 512u);
  EXPECT_EQ(m.dev().vram_stats().evictions, 1u);
  int gone = -1;
  for (int i = 0; i < 4; ++i)
    if (DevicePages(m.as(), v[i], k2M) == 0) gone = gone == -1 ? i : -2;
  // No byte lost through the eviction.
  for (uint64_t a : v) {
    Ref ref(a, k2M);
    ref.Fill(a, k2M, a);
    EXPECT_TRUE(CpuMatches(m.as(), ref));
  }
  return gone;
}

TEST(DriverEviction, EachPolicysOrder) {
  // A used three times more, then B, C, D once each: A is the least
  // recently used, B the least frequently used (tie with C, D broken by
  // recency), A the oldest population.
  const std::vector<int> heavy_a = {0, 0, 0, 1, 2, 3};
  EXPECT_EQ(Victim("lru", heavy_a), 0);
  EXPECT_EQ(Victim("lfu", heavy_a), 1);
  EXPECT_EQ(Victim("pseudo-lru", heavy_a), 0);
  // A used once after all were populated: LRU and LFU take B, pseudo-LRU
  // (blind to GPU use) still A.
  EXPECT_EQ(Victim("lru", {0}), 1);
  EXPECT_EQ(Victim("lfu", {0}), 1);
  EXPECT_EQ(Victim("pseudo-lru", {0}), 0);
}

TEST(DriverEviction, PseudoLruTakesUnusedRootChunksFirst) {
  for (const std::string policy : {"lru", "pseudo-lru"}) {
    SCOPED_TRACE(policy);
    MachineConfig c;
    c.vram_bytes = 4 * k2M;
    c.eviction = policy;
    Machine m(c);
    std::vector<uint64_t> v;
    for (int i = 0; i < 4; ++i) v.push_back(m.MmapAligned(k2M));
    const uint64_t small = m.MmapAligned(k64K);  // a 64 KiB VMA: a 64 KiB range
    for (uint64_t a : v) USVM_ASSERT_OK(CpuFill(m.as(), a, k2M, 9));
    USVM_ASSERT_OK(CpuFill(m.as(), small, k64K, 9));
    // A, B, C fill three root chunks; the small range goes into the
    // fourth, which stays partly free; then D needs a whole 2 MiB.
    for (int i = 0; i < 3; ++i) USVM_ASSERT_OK(m.vm().HandleFault(v[i], gpu::kAccessRead));
    USVM_ASSERT_OK(m.vm().HandleFault(small, gpu::kAccessRead));
    ASSERT_EQ(DevicePages(m.as(), small, k64K), 16u);
    USVM_ASSERT_OK(m.vm().HandleFault(v[3], gpu::kAccessRead));
    EXPECT_EQ(DevicePages(m.as(), v[3], k2M), 512u);
    if (policy == "lru") {
      // The least recently used (A) went; the small one stayed.
      EXPECT_EQ(m.dev().vram_stats().evictions, 1u);
      EXPECT_EQ(DevicePages(m.as(), v[0], k2M), 0u);
      EXPECT_EQ(DevicePages(m.as(), small, k64K), 16u);
    } else {
      EXPECT_EQ(m.dev().vram_stats().evictions, 1u);
      EXPECT_EQ(DevicePages(m.as(), small, k64K), 0u);
      for (int i = 0; i < 3; ++i) EXPECT_EQ(DevicePages(m.as(), v[i], k2M), 512u) << i;
    }
  }
}

// ---- thrashing through the driver ---------------------------------------------------

TEST(DriverThrashing, PingPongIsThrottledThenPinned) {
  MachineConfig c;
  c.svm.thrashing = "uvm";
  c.svm.policy.lapse_ns = 1000;           // 1 us naps: fast
  c.svm.policy.epoch_lapses = 1u << 30;   // one epoch for the whole test
  c.svm.policy.pin_lapses = 1u << 30;     // pinned for the rest of it
  c.svm.policy.thrashing_threshold = 3;
  c.svm.policy.pin_threshold = 2;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  Ref ref(va, k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 5));
  ref.Fill(va, k2M, 5);
  // GPU fault (migrates to VRAM), CPU touch (brings it home): 1 + 2
  // events below the threshold, 2 throttles, then the pin.
  for (int round = 0; round < 6; ++round) {
    USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
    const VmStats s = m.vm().stats();
    if (round < 5) {
      EXPECT_EQ(DevicePages(m.as(), va, k2M), 512u) << "round " << round;
      EXPECT_EQ(s.throttles, round < 3 ? 0u : uint64_t(round - 2)) << "round " << round;
      EXPECT_EQ(s.pins, 0u);
    } else {
      // Pinned: served from system memory, mapped remotely.
      EXPECT_EQ(DevicePages(m.as(), va, k2M), 0u);
      EXPECT_EQ(s.throttles, 2u);
      EXPECT_EQ(s.pins, 1u);
      EXPECT_EQ(s.pinned_faults, 1u);
      EXPECT_EQ(GpuPteKind(m.vm(), va), gpu::PteKind::kSystem);
    }
    ASSERT_TRUE(CpuMatches(m.as(), ref));  // the CPU touch
  }
  // Still pinned: the CPU's touches no longer move anything, and the
  // GPU's mapping of system memory stays.
  const uint64_t in = m.dev().vram_stats().bytes_to_vram;
  for (int round = 0; round < 4; ++round) {
    USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
    USVM_ASSERT_OK(GpuAdd(m.vm(), va, k2M, 1));
    for (uint64_t a = va; a < va + k2M; a += 8) ref.Set64(a, ref.Get64(a) + 1);
    ASSERT_TRUE(CpuMatches(m.as(), ref));
  }
  EXPECT_EQ(m.dev().vram_stats().bytes_to_vram, in);
  EXPECT_EQ(m.vm().stats().migrate_failures, 0u);
}

TEST(DriverThrashing, NoneNeverInterferes) {
  MachineConfig c;
  Machine m(c);
  const uint64_t va = m.MmapAligned(k2M);
  Ref ref(va, k2M);
  USVM_ASSERT_OK(CpuFill(m.as(), va, k2M, 5));
  ref.Fill(va, k2M, 5);
  for (int round = 0; round < 16; ++round) {
    USVM_ASSERT_OK(m.vm().HandleFault(va, gpu::kAccessRead));
    EXPECT_EQ(DevicePages(m.as(), va, k2M), 512u);
    ASSERT_TRUE(CpuMatches(m.as(), ref));
  }
  const VmStats s = m.vm().stats();
  EXPECT_EQ(s.throttles + s.pins + s.pinned_faults, 0u);
  EXPECT_EQ(m.dev().vram_stats().bytes_to_vram, 16 * k2M);
}

}  // namespace
}  // namespace usvm::driver::testing
