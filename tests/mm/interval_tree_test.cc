// IntervalTree against a brute-force reference model: random inserts,
// removes and overlap queries, with the red-black and augmentation
// invariants checked after every step.
#include "usvm/base/interval_tree.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <vector>

#include "usvm/base/env.h"

namespace usvm {
namespace {

struct Item {
  int id = 0;
  IntervalTreeNode node;
};
using Tree = IntrusiveIntervalTree<Item, &Item::node>;

std::vector<int> Query(const Tree& t, uint64_t start, uint64_t last) {
  std::vector<int> out;
  for (Item* it = t.IterFirst(start, last); it; it = Tree::IterNext(it, start, last))
    out.push_back(it->id);
  return out;
}

// The reference: every live item overlapping [start, last], in the order
// the tree must report them (by start; equal starts in insertion order is
// not promised, so callers compare sorted sets when starts tie).
std::vector<int> Brute(const std::vector<std::unique_ptr<Item>>& items, const std::set<int>& live,
                       uint64_t start, uint64_t last) {
  std::vector<int> out;
  for (int id : live) {
    const Item& it = *items[id];
    if (it.node.start <= last && start <= it.node.last) out.push_back(id);
  }
  return out;
}

TEST(IntervalTree, EmptyTreeFindsNothing) {
  Tree t;
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.IterFirst(0, UINT64_MAX), nullptr);
  EXPECT_TRUE(t.DebugCheck());
}

TEST(IntervalTree, OverlapIsInclusiveAtBothEnds) {
  Tree t;
  Item a{1, {}}, b{2, {}}, c{3, {}};
  a.node.start = 10, a.node.last = 19;
  b.node.start = 20, b.node.last = 29;
  c.node.start = 0, c.node.last = UINT64_MAX;
  t.Insert(&a);
  t.Insert(&b);
  EXPECT_EQ(Query(t, 19, 19), std::vector<int>({1}));
  EXPECT_EQ(Query(t, 19, 20), std::vector<int>({1, 2}));
  EXPECT_EQ(Query(t, 30, 40), std::vector<int>());
  EXPECT_EQ(Query(t, 0, 9), std::vector<int>());
  t.Insert(&c);
  EXPECT_EQ(Query(t, 0, 9), std::vector<int>({3}));
  EXPECT_EQ(Query(t, 25, UINT64_MAX), std::vector<int>({3, 2}));
  t.Remove(&a);
  EXPECT_FALSE(a.node.in_tree);
  EXPECT_EQ(Query(t, 15, 15), std::vector<int>({3}));
  EXPECT_TRUE(t.DebugCheck());
}

TEST(IntervalTree, RandomOperationsMatchReferenceModel) {
  Rng rng(42);
  constexpr int kItems = 600;
  std::vector<std::unique_ptr<Item>> items;
  for (int i = 0; i < kItems; ++i) {
    items.push_back(std::make_unique<Item>());
    items.back()->id = i;
  }
  std::set<int> live;
  Tree t;
  for (int step = 0; step < 20000; ++step) {
    int id = static_cast<int>(rng.Uniform(kItems));
    Item& it = *items[id];
    uint64_t op = rng.Uniform(10);
    if (op < 4) {
      if (!live.count(id)) {
        // Small key space so starts tie and intervals nest often.
        it.node.start = rng.Uniform(1000);
        it.node.last = it.node.start + rng.Uniform(rng.OneIn(10) ? 500 : 20);
        t.Insert(&it);
        live.insert(id);
      }
    } else if (op < 7) {
      if (live.count(id)) {
        t.Remove(&it);
        live.erase(id);
      }
    } else {
      uint64_t s = rng.Uniform(1100);
      uint64_t l = s + rng.Uniform(rng.OneIn(5) ? 400 : 10);
      std::vector<int> got = Query(t, s, l);
      // Reported in start order.
      for (size_t i = 1; i < got.size(); ++i)
        ASSERT_LE(items[got[i - 1]]->node.start, items[got[i]]->node.start);
      std::sort(got.begin(), got.end());
      ASSERT_EQ(got, Brute(items, live, s, l)) << "step " << step;
    }
    ASSERT_EQ(t.size(), live.size());
    if (step % 16 == 0) {
      ASSERT_TRUE(t.DebugCheck()) << "step " << step;
    }
  }
  for (int id : live) t.Remove(items[id].get());
  EXPECT_TRUE(t.empty());
  EXPECT_TRUE(t.DebugCheck());
}

TEST(IntervalTree, SequentialInsertStaysBalanced) {
  // Ascending keys are the worst case for an unbalanced tree; the red-black
  // height bound keeps a full walk cheap and DebugCheck verifies the shape.
  constexpr int kN = 1 << 14;
  std::vector<Item> items(kN);
  Tree t;
  for (int i = 0; i < kN; ++i) {
    items[i].id = i;
    items[i].node.start = static_cast<uint64_t>(i) * 4096;
    items[i].node.last = items[i].node.start + 4095;
    t.Insert(&items[i]);
  }
  ASSERT_TRUE(t.DebugCheck());
  EXPECT_EQ(Query(t, 4096 * 100, 4096 * 100), std::vector<int>({100}));
  EXPECT_EQ(Query(t, 4096 * 100 + 4095, 4096 * 101), std::vector<int>({100, 101}));
  for (int i = 0; i < kN; i += 2) t.Remove(&items[i]);
  ASSERT_TRUE(t.DebugCheck());
  EXPECT_EQ(Query(t, 0, 4096 * 4), std::vector<int>({1, 3}));
  EXPECT_EQ(t.size(), static_cast<size_t>(kN / 2));
}

}  // namespace
}  // namespace usvm
