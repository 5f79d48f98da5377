// PageTable against a reference model (a map of 4 KiB pages) after random
// batched binds, rebinds, zaps and unbinds of mixed page sizes.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "usvm/base/env.h"
#include "usvm/gpu/page_table.h"

namespace usvm::gpu {
namespace {

struct RefPage {
  uint64_t leaf_va;
  uint64_t leaf_size;
  uint64_t phys;  // of this 4 KiB page
  uint32_t prot;
};
using Model = std::map<uint64_t, RefPage>;

// Three 8 MiB windows under different level-3 / level-2 entries.
constexpr uint64_t kWindows[] = {0, uint64_t{1} << 39, (uint64_t{5} << 30) + (uint64_t{6} << 21)};
constexpr uint64_t kWindow = uint64_t{8} << 20;

// The leaf containing va in the model.
const RefPage* Leaf(const Model& m, uint64_t va) {
  auto it = m.find(va & ~uint64_t{4095});
  return it == m.end() ? nullptr : &it->second;
}

bool ModelSplits(const Model& m, uint64_t start, uint64_t end) {
  const RefPage* a = Leaf(m, start);
  const RefPage* b = Leaf(m, end - 1);
  return (a && a->leaf_va < start) || (b && b->leaf_va + b->leaf_size > end);
}

// Table pages the model needs: root, level-2, level-1 and level-0 tables.
uint64_t ExpectedTables(const Model& m) {
  if (m.empty()) return 0;
  std::set<uint64_t> l2, l1, l0;
  for (auto& [va, p] : m) {
    l2.insert(va >> 39);
    l1.insert(va >> 30);
    if (p.leaf_size != (uint64_t{2} << 20)) l0.insert(va >> 21);
  }
  return 1 + l2.size() + l1.size() + l0.size();
}

void ExpectSame(const PageTable& pt, const Model& model) {
  ASSERT_TRUE(pt.DebugCheck().has_value()) << pt.DebugCheck().error().what();
  Model got;
  for (const Mapping& m : pt.DebugMappings())
    for (uint64_t off = 0; off < m.size; off += 4096)
      got[m.va + off] = {m.va, m.size, m.pte.phys() + off,
                         uint32_t(m.pte.raw() & (kProtWrite | kProtAtomic))};
  ASSERT_EQ(got.size(), model.size());
  for (auto& [va, p] : model) {
    auto it = got.find(va);
    ASSERT_NE(it, got.end()) << std::hex << va;
    EXPECT_EQ(it->second.leaf_va, p.leaf_va) << std::hex << va;
    EXPECT_EQ(it->second.leaf_size, p.leaf_size) << std::hex << va;
    EXPECT_EQ(it->second.phys, p.phys) << std::hex << va;
    EXPECT_EQ(it->second.prot, p.prot) << std::hex << va;
  }
}

void RunRandom(bool with_zap, uint64_t seed) {
  Env env(std::make_unique<ManualClock>(), seed);
  PageTable pt(0, env, nullptr);
  Model model;
  Rng rng(seed);
  size_t max_pages = 0, binds_ok = 0, binds_failed = 0;
  auto random_va = [&](uint64_t align) {
    return kWindows[rng.Uniform(3)] + rng.Uniform(kWindow / align) * align;
  };
  for (int step = 0; step < 3000; ++step) {
    const uint64_t kind = rng.Uniform(10);
    if (kind < 6) {
      // A batch of 1-3 binds.
      std::vector<BindOp> ops;
      const int n = 1 + int(rng.Uniform(3));
      for (int i = 0; i < n; ++i) {
        const PageSize s = PageSize(rng.Uniform(10) < 6 ? 0 : rng.Uniform(10) < 7 ? 1 : 2);
        const uint64_t b = PageBytes(s);
        ops.push_back({random_va(b), s, PhysAddr::System(rng.Uniform(1 << 20) * (b >> 12)),
                       uint32_t(rng.Uniform(4)) << 1});
      }
      const BindMode mode = rng.OneIn(2) ? BindMode::kReplace : BindMode::kNoReplace;
      // Model: all-or-nothing.
      bool ok = true;
      for (size_t i = 0; i < ops.size() && ok; ++i)
        for (size_t j = 0; j < i; ++j)
          if (ops[i].va < ops[j].va + PageBytes(ops[j].size) && ops[j].va < ops[i].va + PageBytes(ops[i].size))
            ok = false;
      for (const BindOp& op : ops) {
        const uint64_t b = PageBytes(op.size);
        if (mode == BindMode::kNoReplace) {
          auto it = model.lower_bound(op.va);
          if (it != model.end() && it->first < op.va + b) ok = false;
        } else if (const RefPage* l = Leaf(model, op.va); l && (l->leaf_va < op.va || l->leaf_va + l->leaf_size > op.va + b)) {
          ok = false;
        }
      }
      auto r = pt.Bind(ops, mode);
      ASSERT_EQ(r.has_value(), ok) << "step " << step;
      ++(ok ? binds_ok : binds_failed);
      if (ok) {
        for (const BindOp& op : ops) {
          const uint64_t b = PageBytes(op.size);
          model.erase(model.lower_bound(op.va), model.lower_bound(op.va + b));
          for (uint64_t off = 0; off < b; off += 4096) model[op.va + off] = {op.va, b, op.pa.addr + off, op.prot};
        }
      }
    } else {
      const uint64_t start = random_va(4096);
      const uint64_t len = std::min<uint64_t>((1 + rng.Uniform(1024)) * 4096, kWindows[0] + (uint64_t{1} << 47) - start);
      const bool ok = !ModelSplits(model, start, start + len);
      auto r = (with_zap && rng.OneIn(2)) ? pt.Zap(start, len) : pt.Unbind(start, len);
      ASSERT_EQ(r.has_value(), ok) << "step " << step;
      if (ok) model.erase(model.lower_bound(start), model.lower_bound(start + len));
      if (!ok) { EXPECT_EQ(r.error(), Errc::kInval); }
    }
    max_pages = std::max(max_pages, model.size());
    if (step % 25 == 0) ExpectSame(pt, model);
    if (!with_zap) { ASSERT_EQ(pt.table_pages(), ExpectedTables(model)) << "step " << step; }
    // Walk agrees with the model at a random address.
    const uint64_t probe = random_va(8);
    auto w = pt.Walk(probe);
    const RefPage* l = Leaf(model, probe);
    ASSERT_EQ(w.has_value(), l != nullptr);
    if (l) {
      EXPECT_EQ(w->va, l->leaf_va);
      EXPECT_EQ(w->pte.phys() + ((probe & ~uint64_t{4095}) - w->va), l->phys);
    } else {
      EXPECT_EQ(w.error(), Errc::kNoEnt);
    }
  }
  ExpectSame(pt, model);
  // The run must have covered both outcomes and a populated table.
  EXPECT_GT(max_pages, 1000u);
  EXPECT_GT(binds_ok, 100u);
  EXPECT_GT(binds_failed, 100u);
  // Unbinding everything frees every table page, the root included.
  for (uint64_t w : kWindows) ASSERT_TRUE(pt.Unbind(w, kWindow).has_value());
  EXPECT_EQ(pt.table_pages(), 0u);
  EXPECT_TRUE(pt.DebugMappings().empty());
}

TEST(PageTableTest, RandomBindUnbindMatchesReference) { RunRandom(false, 7); }
TEST(PageTableTest, RandomBindZapUnbindMatchesReference) { RunRandom(true, 11); }

TEST(PageTableTest, SixtyFourKLeafIsSixteenContiguousEntries) {
  Env env(std::make_unique<ManualClock>(), 1);
  PageTable pt(0, env, nullptr);
  ASSERT_TRUE(pt.Bind({0x10000, PageSize::k64K, PhysAddr::System(0x40), kProtWrite}).has_value());
  for (uint64_t off = 0; off < 0x10000; off += 4096) {
    auto m = pt.Walk(0x10000 + off).value();
    EXPECT_EQ(m.va, 0x10000u);
    EXPECT_EQ(m.size, 0x10000u);
    EXPECT_EQ(m.pte.phys(), 0x40000u);
    EXPECT_TRUE(m.pte.writable());
  }
  // Partial unbind or zap of the 64 KiB leaf is refused.
  EXPECT_EQ(pt.Unbind(0x11000, 4096).error(), Errc::kInval);
  EXPECT_EQ(pt.Zap(0x10000, 0x8000).error(), Errc::kInval);
  // Zap keeps the tables, Unbind frees them.
  const uint64_t tables = pt.table_pages();
  EXPECT_EQ(tables, 4u);
  ASSERT_TRUE(pt.Zap(0x10000, 0x10000).has_value());
  EXPECT_EQ(pt.table_pages(), tables);
  EXPECT_EQ(pt.Walk(0x10000).error(), Errc::kNoEnt);
  ASSERT_TRUE(pt.Unbind(0, uint64_t{2} << 20).has_value());
  EXPECT_EQ(pt.table_pages(), 0u);
}

TEST(PageTableTest, TwoMegReplaceFreesTheLevelZeroTable) {
  Env env(std::make_unique<ManualClock>(), 1);
  PageTable pt(0, env, nullptr);
  ASSERT_TRUE(pt.Bind({0x200000, PageSize::k4K, PhysAddr::System(1), 0}).has_value());
  EXPECT_EQ(pt.table_pages(), 4u);
  EXPECT_EQ(pt.Bind({0x200000, PageSize::k2M, PhysAddr::System(512), 0}).error(), Errc::kExist);
  ASSERT_TRUE(pt.Bind({0x200000, PageSize::k2M, PhysAddr::System(512), 0}, BindMode::kReplace).has_value());
  EXPECT_EQ(pt.table_pages(), 3u);
  // A 4 KiB bind inside the 2 MiB leaf would split it.
  EXPECT_EQ(pt.Bind({0x201000, PageSize::k4K, PhysAddr::System(1), 0}, BindMode::kReplace).error(),
            Errc::kInval);
  ASSERT_TRUE(pt.DebugCheck().has_value());
}

TEST(PageTableTest, AllocationFailureLeavesEverythingUnchanged) {
  Env env(std::make_unique<ManualClock>(), 1);
  PageTable pt(0, env, nullptr);
  ASSERT_TRUE(pt.Bind({0x1000, PageSize::k4K, PhysAddr::System(1), 0}).has_value());
  const auto before = pt.DebugMappings();
  const uint64_t tables = pt.table_pages();
  // Second op needs three new tables (level 2, 1, 0); the second of them fails.
  env.faults().FailNth("gpu.pt_alloc", 2);
  std::vector<BindOp> ops = {{0x2000, PageSize::k4K, PhysAddr::System(2), 0},
                             {uint64_t{1} << 39, PageSize::k4K, PhysAddr::System(3), 0}};
  EXPECT_EQ(pt.Bind(ops).error(), Errc::kNoMem);
  EXPECT_EQ(pt.table_pages(), tables);
  EXPECT_EQ(pt.DebugMappings().size(), before.size());
  EXPECT_EQ(pt.Walk(0x2000).error(), Errc::kNoEnt);
  ASSERT_TRUE(pt.DebugCheck().has_value());
  // A limit on table pages gives ENOMEM the same way.
  PageTable small(0, env, nullptr, 3);
  EXPECT_EQ(small.Bind({0x1000, PageSize::k4K, PhysAddr::System(1), 0}).error(), Errc::kNoMem);
  EXPECT_EQ(small.table_pages(), 0u);
  EXPECT_TRUE(small.Bind({0x200000, PageSize::k2M, PhysAddr::System(512), 0}).has_value());
}

}  // namespace
}  // namespace usvm::gpu
