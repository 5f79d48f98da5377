// Every public call of the gpu layer, given invalid arguments, returns an
// error (never aborts) and leaves the state as it was. Table-driven.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "gpu_test_util.h"

namespace usvm::gpu {
namespace {

using testing::Machine;

constexpr uint64_t kVa = uint64_t{0x100} << 21;

// Everything observable about a GPU's state that a failed call must not
// change.
struct Snapshot {
  std::vector<std::pair<uint64_t, uint64_t>> mappings;  // va, raw pte
  uint64_t tables;
  uint64_t vram_free;
  uint64_t vram_blocks;
  FaultStats faults;
  bool peer;
  bool operator==(const Snapshot& o) const {
    return mappings == o.mappings && tables == o.tables && vram_free == o.vram_free &&
           vram_blocks == o.vram_blocks && faults.raised == o.faults.raised &&
           faults.replayed == o.faults.replayed && faults.cancelled == o.faults.cancelled &&
           peer == o.peer;
  }
};

Snapshot Take(Machine& m) {
  Gpu& g = *m.gpu[0];
  Snapshot s;
  for (const Mapping& mp : g.page_table().DebugMappings()) s.mappings.emplace_back(mp.va, mp.pte.raw());
  s.tables = g.page_table().table_pages();
  s.vram_free = g.vram().Stats().free_bytes;
  s.vram_blocks = g.vram().Stats().allocated_blocks;
  s.faults = g.fault_unit().Stats();
  s.peer = g.HasPeerAccess(1);
  return s;
}

struct Case {
  std::string name;
  Errc expect;
  std::function<Error(Machine&)> call;
};

template <typename T>
Error ErrOf(const Result<T>& r) {
  return r.has_value() ? Error(Errc::kOk) : r.error();
}

TEST(BadInputTest, EveryCallRejectsBadArgumentsWithoutChangingState) {
  const PhysAddr sys = PhysAddr::System(1);
  const std::vector<Case> cases = {
      // PageTable::Bind
      {"bind empty batch", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind(std::span<const BindOp>())); }},
      {"bind misaligned va", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa + 8, PageSize::k4K, sys, 0})); }},
      {"bind 64K misaligned va", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa + 4096, PageSize::k64K, PhysAddr::System(16), 0})); }},
      {"bind 64K misaligned pa", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k64K, sys, 0})); }},
      {"bind 2M misaligned pa", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k2M, PhysAddr::System(16), 0})); }},
      {"bind bad page size", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize(7), sys, 0})); }},
      {"bind beyond 48 bits", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVaLimit, PageSize::k4K, sys, 0})); }},
      {"bind straddles 48 bits", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVaLimit - 4096, PageSize::k64K, PhysAddr::System(16), 0})); }},
      {"bind bad prot", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, sys, 0x100})); }},
      {"bind frame out of range", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, PhysAddr::System(1 << 30), 0})); }},
      {"bind VRAM beyond size", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, PhysAddr::Vram(0, uint64_t{1} << 40), 0})); }},
      {"bind peer without access", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, PhysAddr::Vram(1, 0), 0})); }},
      {"bind bad GPU id", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, PhysAddr::Vram(200, 0), 0})); }},
      {"bind bad mem kind", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, PhysAddr{MemKind(9), 0, 0}, 0})); }},
      {"bind overlapping ops", Errc::kInval, [&](Machine& m) {
         std::vector<BindOp> ops = {{kVa, PageSize::k64K, PhysAddr::System(16), 0}, {kVa + 4096, PageSize::k4K, sys, 0}};
         return ErrOf(m.gpu[0]->page_table().Bind(ops));
       }},
      {"bind over existing", Errc::kExist, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa + k2M, PageSize::k4K, sys, 0})); }},
      {"batch with one bad op", Errc::kExist, [&](Machine& m) {
         std::vector<BindOp> ops = {{kVa, PageSize::k4K, sys, 0}, {kVa + k2M, PageSize::k4K, sys, 0}};
         return ErrOf(m.gpu[0]->page_table().Bind(ops));
       }},
      {"replace splitting a 64K leaf", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa + 2 * k2M + 4096, PageSize::k4K, sys, 0}, BindMode::kReplace)); }},
      {"bind bad mode", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->page_table().Bind({kVa, PageSize::k4K, sys, 0}, BindMode(5))); }},
      // Zap / Unbind / Walk
      {"unbind empty", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Unbind(kVa, 0)); }},
      {"unbind unaligned", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Unbind(kVa + 1, 4096)); }},
      {"unbind beyond 48 bits", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Unbind(kVaLimit - 4096, 8192)); }},
      {"unbind splits 64K", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Unbind(kVa + 2 * k2M, 4096)); }},
      {"unbind no ranges", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Unbind(std::span<const VaRange>())); }},
      {"zap splits 64K", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Zap(kVa + 2 * k2M + 4096, 4096)); }},
      {"zap overflowing range", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Zap(4096, UINT64_MAX - 4095)); }},
      {"walk beyond 48 bits", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Walk(kVaLimit)); }},
      {"walk unmapped", Errc::kNoEnt, [](Machine& m) { return ErrOf(m.gpu[0]->page_table().Walk(kVa)); }},
      // TLB
      {"invalidate empty", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->InvalidateTlb(kVa, 0)); }},
      {"invalidate unaligned", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->InvalidateTlb(kVa + 3, 4096)); }},
      {"invalidate beyond 48 bits", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->InvalidateTlb(kVaLimit, 4096)); }},
      // VRAM
      {"vram alloc 0", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Alloc(0)); }},
      {"vram alloc too big", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Alloc(uint64_t{4} << 30)); }},
      {"vram alloc when full", Errc::kNoMem, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Alloc(uint64_t{32} << 20)); }},
      {"vram free unallocated", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Free(k2M * 3)); }},
      {"vram free unaligned", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Free(12)); }},
      {"vram free beyond", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->vram().Free(uint64_t{1} << 40)); }},
      // Copy
      {"copy bad engine", Errc::kInval, [&](Machine& m) { return ErrOf(m.gpu[0]->Copy(9, {&sys, 1}, {&sys, 1})); }},
      {"copy empty", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->Copy(0, {}, {})); }},
      {"copy unequal lists", Errc::kInval, [&](Machine& m) {
         PhysAddr two[2] = {sys, sys};
         return ErrOf(m.gpu[0]->Copy(0, two, {&sys, 1}));
       }},
      {"copy unaligned page", Errc::kInval, [&](Machine& m) {
         PhysAddr bad = PhysAddr::Vram(0, 8);
         return ErrOf(m.gpu[0]->Copy(0, {&sys, 1}, {&bad, 1}));
       }},
      {"copy beyond VRAM", Errc::kInval, [&](Machine& m) {
         PhysAddr bad = PhysAddr::Vram(0, uint64_t{16} << 20);
         return ErrOf(m.gpu[0]->Copy(0, {&sys, 1}, {&bad, 1}));
       }},
      {"copy to peer without access", Errc::kInval, [&](Machine& m) {
         PhysAddr bad = PhysAddr::Vram(1, 0);
         return ErrOf(m.gpu[0]->Copy(0, {&sys, 1}, {&bad, 1}));
       }},
      // Fault unit
      {"fetch zero", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Fetch(0, 0)); }},
      {"fetch none", Errc::kTime, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Fetch(4, 1000)); }},
      {"replay unknown", Errc::kNoEnt, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Replay(12345)); }},
      {"cancel unknown", Errc::kNoEnt, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Cancel(12345, Error(Errc::kFault))); }},
      {"cancel with success", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Cancel(1, Error(Errc::kOk))); }},
      {"raise bad access", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Raise(kVa, 0x40, 0, 0)); }},
      {"raise beyond 48 bits", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->fault_unit().Raise(kVaLimit, kAccessRead, 0, 0)); }},
      // Launches
      {"launch empty kernel", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchKernel(KernelFn())); }},
      {"launch zero threads", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchKernel([](KernelContext&) {}, {.threads = 0})); }},
      {"launch too many threads", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchKernel([](KernelContext&) {}, {.threads = (1u << 20) + 1})); }},
      {"pattern unaligned", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.va = kVa + 4, .length = 64})); }},
      {"pattern zero length", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.va = kVa, .length = 0})); }},
      {"pattern beyond 48 bits", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.va = kVaLimit - 8, .length = 64})); }},
      {"pattern zero stride", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.pattern = Pattern::kStride, .va = kVa, .length = 64, .stride = 0})); }},
      {"pattern odd stride", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.pattern = Pattern::kStride, .va = kVa, .length = 64, .stride = 12})); }},
      {"pattern zero gather", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.pattern = Pattern::kRandomGather, .va = kVa, .length = 64})); }},
      {"pattern zero iterations", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.va = kVa, .length = 64, .iterations = 0})); }},
      {"pattern bad kind", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->LaunchPattern({.pattern = Pattern(42), .va = kVa, .length = 64})); }},
      // Peers and creation
      {"peer with itself", Errc::kInval, [](Machine& m) { return ErrOf(m.gpu[0]->EnablePeerAccess(*m.gpu[0])); }},
      {"disable absent peer", Errc::kNoEnt, [](Machine& m) { return ErrOf(m.gpu[0]->DisablePeerAccess(*m.gpu[1])); }},
      {"gpu id too big", Errc::kInval, [](Machine& m) { return ErrOf(Gpu::TryCreate(kMaxGpus, testing::SmallConfig(), m.sysmem.get(), *m.env)); }},
      {"gpu zero VRAM", Errc::kInval, [](Machine& m) {
         GpuConfig c = testing::SmallConfig();
         c.vram_bytes = 0;
         return ErrOf(Gpu::TryCreate(5, c, m.sysmem.get(), *m.env));
       }},
      {"gpu unaligned VRAM", Errc::kInval, [](Machine& m) {
         GpuConfig c = testing::SmallConfig();
         c.vram_bytes = 5000;
         return ErrOf(Gpu::TryCreate(5, c, m.sysmem.get(), *m.env));
       }},
      {"gpu zero exec threads", Errc::kInval, [](Machine& m) {
         GpuConfig c = testing::SmallConfig(0);
         return ErrOf(Gpu::TryCreate(5, c, m.sysmem.get(), *m.env));
       }},
      {"gpu zero copy engines", Errc::kInval, [](Machine& m) {
         GpuConfig c = testing::SmallConfig();
         c.copy_engines = 0;
         return ErrOf(Gpu::TryCreate(5, c, m.sysmem.get(), *m.env));
       }},
      {"gpu zero TLB ways", Errc::kInval, [](Machine& m) {
         GpuConfig c = testing::SmallConfig();
         c.tlb.ways = 0;
         return ErrOf(Gpu::TryCreate(5, c, m.sysmem.get(), *m.env));
       }},
      {"buddy bad size", Errc::kInval, [](Machine&) { return ErrOf(BuddyAllocator::TryCreate(4097)); }},
      {"buddy bad order", Errc::kInval, [](Machine&) { return ErrOf(BuddyAllocator::TryCreate(k2M, 31)); }},
      {"arena zero frames", Errc::kInval, [](Machine&) { return ErrOf(ArenaSystemMemory::TryCreate(0)); }},
  };

  Machine m(2);
  Gpu& g = *m.gpu[0];
  // Some state to protect: a 2 MiB leaf, a 4 KiB leaf, a 64 KiB leaf, VRAM
  // blocks.
  const uint64_t v = g.vram().Alloc(k2M).value();
  ASSERT_TRUE(g.vram().Alloc(uint64_t{8} << 20).has_value());
  std::vector<BindOp> ops = {{kVa + k2M, PageSize::k4K, PhysAddr::System(2), kProtWrite},
                             {kVa + 2 * k2M, PageSize::k64K, PhysAddr::System(32), 0},
                             {kVa + 3 * k2M, PageSize::k2M, PhysAddr::Vram(0, v), kProtWrite}};
  ASSERT_TRUE(g.page_table().Bind(ops).has_value());

  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const Snapshot before = Take(m);
    const Error e = c.call(m);
    EXPECT_EQ(e.code(), c.expect) << c.name << ": got " << e.ToString();
    EXPECT_TRUE(Take(m) == before) << c.name << " changed state";
    ASSERT_TRUE(g.page_table().DebugCheck().has_value());
    ASSERT_TRUE(g.vram().allocator().DebugCheck().has_value());
  }
}

}  // namespace
}  // namespace usvm::gpu
