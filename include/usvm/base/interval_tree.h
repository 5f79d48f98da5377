// IntervalTree: an intrusive, augmented red-black tree of closed intervals
// [start, last] (the kernel's interval_tree / INTERVAL_TREE_DEFINE).
//
// Nodes are ordered by `start` (ties keep insertion order: a new node goes
// to the right of equal keys) and every node also stores `subtree_last`,
// the largest `last` in its subtree. That augmentation lets an overlap
// query skip every subtree that ends before the query starts, so
//   IterFirst(start, last)      finds the leftmost overlapping node and
//   IterNext(node, start, last) the next one in start order,
// visiting k overlaps in O(log n + k) (each step is at most one descent plus
// one climb). Insert and Remove are O(log n): red-black rebalancing is at
// most three rotations, and the augmentation is repaired along one path.
//
// Invariants (checked by DebugCheck):
//   1. the in-order sequence is sorted by start;
//   2. every node's subtree_last == max(last, left->subtree_last,
//      right->subtree_last);
//   3. the root is black, no red node has a red child, and every path from
//      a node to a leaf has the same number of black nodes (so the height is
//      at most 2 log2(n + 1));
//   4. parent pointers agree with child pointers.
//
// Ownership and threads: the tree does not own its nodes; a node is embedded
// in its owner (IntrusiveIntervalTree gives the owner back). Not
// thread-safe: the owner's lock guards the tree and every node on it. A
// reader may walk the tree without that lock only while the owner guarantees
// no writer runs (the MMU notifier hub does this while its sequence is odd).
#ifndef USVM_BASE_INTERVAL_TREE_H_
#define USVM_BASE_INTERVAL_TREE_H_

#include <cstddef>
#include <cstdint>

namespace usvm {

// The fields a query reads on its way down come first, so they share one
// cache line when the node starts at a 32-byte boundary.
struct IntervalTreeNode {
  IntervalTreeNode* left = nullptr;
  IntervalTreeNode* right = nullptr;
  uint64_t start = 0;
  uint64_t subtree_last = 0;
  uint64_t last = 0;  // inclusive
  IntervalTreeNode* parent = nullptr;
  bool red = false;
  bool in_tree = false;  // true between Insert and Remove
};

class IntervalTree {
 public:
  IntervalTree() = default;
  IntervalTree(const IntervalTree&) = delete;
  IntervalTree& operator=(const IntervalTree&) = delete;

  bool empty() const { return root_ == nullptr; }
  size_t size() const { return size_; }

  // REQUIRES: !n->in_tree, n->start <= n->last.
  void Insert(IntervalTreeNode* n);
  // REQUIRES: n is in this tree.
  void Remove(IntervalTreeNode* n);

  // The first node (lowest start) overlapping [start, last], or nullptr.
  IntervalTreeNode* IterFirst(uint64_t start, uint64_t last) const;
  // The next node after n (in start order) overlapping [start, last].
  // REQUIRES: n overlaps [start, last] and is in the tree.
  static IntervalTreeNode* IterNext(IntervalTreeNode* n, uint64_t start, uint64_t last);

  // In-order first node, and successor (for whole-tree walks).
  IntervalTreeNode* First() const;
  static IntervalTreeNode* Next(IntervalTreeNode* n);

  // Verifies invariants 1-4; returns false on the first violation.
  bool DebugCheck() const;

 private:
  static void Recompute(IntervalTreeNode* n);
  static IntervalTreeNode* SubtreeSearch(IntervalTreeNode* n, uint64_t start, uint64_t last);
  void RotateLeft(IntervalTreeNode* x);
  void RotateRight(IntervalTreeNode* x);
  void Replace(IntervalTreeNode* old_child, IntervalTreeNode* parent, IntervalTreeNode* new_child);
  void InsertFixup(IntervalTreeNode* z);
  void RemoveFixup(IntervalTreeNode* x, IntervalTreeNode* x_parent);
  static void PropagateUp(IntervalTreeNode* n, const IntervalTreeNode* top, uint64_t top_old);

  IntervalTreeNode* root_ = nullptr;
  size_t size_ = 0;
};

// Typed view over an IntervalTree whose nodes are the `Member` of a T.
template <typename T, IntervalTreeNode T::*Member>
class IntrusiveIntervalTree {
 public:
  bool empty() const { return tree_.empty(); }
  size_t size() const { return tree_.size(); }
  void Insert(T* t) { tree_.Insert(&(t->*Member)); }
  void Remove(T* t) { tree_.Remove(&(t->*Member)); }
  T* IterFirst(uint64_t start, uint64_t last) const { return Owner(tree_.IterFirst(start, last)); }
  static T* IterNext(T* t, uint64_t start, uint64_t last) {
    return Owner(IntervalTree::IterNext(&(t->*Member), start, last));
  }
  T* First() const { return Owner(tree_.First()); }
  static T* Next(T* t) { return Owner(IntervalTree::Next(&(t->*Member))); }
  bool DebugCheck() const { return tree_.DebugCheck(); }

  static T* Owner(const IntervalTreeNode* n) {
    if (!n) return nullptr;
    constexpr size_t kFake = 4096;
    const auto off = reinterpret_cast<size_t>(&(reinterpret_cast<T*>(kFake)->*Member)) - kFake;
    return reinterpret_cast<T*>(reinterpret_cast<char*>(const_cast<IntervalTreeNode*>(n)) - off);
  }

 private:
  IntervalTree tree_;
};

}  // namespace usvm

#endif  // USVM_BASE_INTERVAL_TREE_H_
