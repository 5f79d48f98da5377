#include "usvm/base/interval_tree.h"

#include <algorithm>

namespace usvm {

void IntervalTree::Recompute(IntervalTreeNode* n) {
  uint64_t m = n->last;
  if (n->left) m = std::max(m, n->left->subtree_last);
  if (n->right) m = std::max(m, n->right->subtree_last);
  n->subtree_last = m;
}

// Recomputes subtree_last from n up to `top` (the highest node whose
// subtree changed shape; its value before the change was top_old), then
// further up only while the value keeps changing.
void IntervalTree::PropagateUp(IntervalTreeNode* n, const IntervalTreeNode* top,
                               uint64_t top_old) {
  bool above = false;
  for (; n; n = n->parent) {
    const uint64_t old = n == top ? top_old : n->subtree_last;
    Recompute(n);
    if (n == top) above = true;
    if (above && n->subtree_last == old) return;
  }
}

// Puts new_child where old_child hung below parent (or at the root).
void IntervalTree::Replace(IntervalTreeNode* old_child, IntervalTreeNode* parent,
                           IntervalTreeNode* new_child) {
  if (!parent)
    root_ = new_child;
  else if (parent->left == old_child)
    parent->left = new_child;
  else
    parent->right = new_child;
  if (new_child) new_child->parent = parent;
}

// x's right child y takes x's place; x becomes y's left child. y now spans
// exactly the nodes x spanned, so it inherits x's subtree_last.
void IntervalTree::RotateLeft(IntervalTreeNode* x) {
  IntervalTreeNode* y = x->right;
  x->right = y->left;
  if (y->left) y->left->parent = x;
  Replace(x, x->parent, y);
  y->left = x;
  x->parent = y;
  y->subtree_last = x->subtree_last;
  Recompute(x);
}

void IntervalTree::RotateRight(IntervalTreeNode* x) {
  IntervalTreeNode* y = x->left;
  x->left = y->right;
  if (y->right) y->right->parent = x;
  Replace(x, x->parent, y);
  y->right = x;
  x->parent = y;
  y->subtree_last = x->subtree_last;
  Recompute(x);
}

void IntervalTree::Insert(IntervalTreeNode* z) {
  z->left = z->right = nullptr;
  z->red = true;
  z->subtree_last = z->last;
  z->in_tree = true;
  IntervalTreeNode* parent = nullptr;
  // Descend; every node on the path gains z in its subtree.
  for (IntervalTreeNode* x = root_; x;) {
    parent = x;
    if (x->subtree_last < z->last) x->subtree_last = z->last;
    x = z->start < x->start ? x->left : x->right;
  }
  z->parent = parent;
  if (!parent)
    root_ = z;
  else if (z->start < parent->start)
    parent->left = z;
  else
    parent->right = z;
  ++size_;
  InsertFixup(z);
}

void IntervalTree::InsertFixup(IntervalTreeNode* z) {
  while (z->parent && z->parent->red) {
    IntervalTreeNode* p = z->parent;
    IntervalTreeNode* g = p->parent;  // exists: a red node is never the root
    if (p == g->left) {
      IntervalTreeNode* u = g->right;
      if (u && u->red) {
        p->red = false;
        u->red = false;
        g->red = true;
        z = g;
        continue;
      }
      if (z == p->right) {
        z = p;
        RotateLeft(z);
        p = z->parent;
      }
      p->red = false;
      g->red = true;
      RotateRight(g);
    } else {
      IntervalTreeNode* u = g->left;
      if (u && u->red) {
        p->red = false;
        u->red = false;
        g->red = true;
        z = g;
        continue;
      }
      if (z == p->left) {
        z = p;
        RotateRight(z);
        p = z->parent;
      }
      p->red = false;
      g->red = true;
      RotateLeft(g);
    }
  }
  root_->red = false;
}

void IntervalTree::Remove(IntervalTreeNode* z) {
  bool removed_black = !z->red;
  IntervalTreeNode* x;         // the node that moves into the removed slot
  IntervalTreeNode* x_parent;  // its parent afterwards (x may be null)
  IntervalTreeNode* top;       // highest node whose subtree changed shape
  uint64_t top_old;            // its subtree_last before
  if (!z->left || !z->right) {
    x = z->left ? z->left : z->right;
    x_parent = z->parent;
    top = x_parent;
    top_old = top ? top->subtree_last : 0;
    Replace(z, z->parent, x);
  } else {
    // Two children: the successor y (leftmost of the right subtree) takes
    // z's place and colour; y's old slot is what loses a node.
    IntervalTreeNode* y = z->right;
    while (y->left) y = y->left;
    removed_black = !y->red;
    x = y->right;
    if (y->parent == z) {
      x_parent = y;
    } else {
      x_parent = y->parent;
      Replace(y, y->parent, x);
      y->right = z->right;
      y->right->parent = y;
    }
    top = y;
    top_old = z->subtree_last;
    Replace(z, z->parent, y);
    y->left = z->left;
    y->left->parent = y;
    y->red = z->red;
  }
  // Repair the augmentation from the lowest changed node to the root; the
  // rotations of the colour fix-up then keep it correct.
  PropagateUp(x_parent, top, top_old);
  if (removed_black) RemoveFixup(x, x_parent);
  --size_;
  z->parent = z->left = z->right = nullptr;
  z->in_tree = false;
}

// x carries an extra black; push it up or resolve it by rotation.
void IntervalTree::RemoveFixup(IntervalTreeNode* x, IntervalTreeNode* xp) {
  while (x != root_ && (!x || !x->red)) {
    if (x == xp->left) {
      IntervalTreeNode* w = xp->right;  // non-null: x's side is one black short
      if (w->red) {
        w->red = false;
        xp->red = true;
        RotateLeft(xp);
        w = xp->right;
      }
      if ((!w->left || !w->left->red) && (!w->right || !w->right->red)) {
        w->red = true;
        x = xp;
        xp = x->parent;
      } else {
        if (!w->right || !w->right->red) {
          w->left->red = false;
          w->red = true;
          RotateRight(w);
          w = xp->right;
        }
        w->red = xp->red;
        xp->red = false;
        if (w->right) w->right->red = false;
        RotateLeft(xp);
        x = root_;
        xp = nullptr;
      }
    } else {
      IntervalTreeNode* w = xp->left;
      if (w->red) {
        w->red = false;
        xp->red = true;
        RotateRight(xp);
        w = xp->left;
      }
      if ((!w->left || !w->left->red) && (!w->right || !w->right->red)) {
        w->red = true;
        x = xp;
        xp = x->parent;
      } else {
        if (!w->left || !w->left->red) {
          w->right->red = false;
          w->red = true;
          RotateLeft(w);
          w = xp->left;
        }
        w->red = xp->red;
        xp->red = false;
        if (w->left) w->left->red = false;
        RotateRight(xp);
        x = root_;
        xp = nullptr;
      }
    }
  }
  if (x) x->red = false;
}

// The leftmost node of n's subtree overlapping [start, last].
// REQUIRES: n && start <= n->subtree_last.
IntervalTreeNode* IntervalTree::SubtreeSearch(IntervalTreeNode* n, uint64_t start,
                                              uint64_t last) {
  for (;;) {
    // Something on the left ends at or after start: the leftmost overlap, if
    // any, is there; and if that subtree has none, nothing to its right can
    // overlap either (everything there starts after a node that starts
    // beyond `last`).
    if (n->left && start <= n->left->subtree_last) {
      n = n->left;
      continue;
    }
    if (n->start > last) return nullptr;
    if (start <= n->last) return n;
    if (n->right && start <= n->right->subtree_last) {
      n = n->right;
      continue;
    }
    return nullptr;
  }
}

IntervalTreeNode* IntervalTree::IterFirst(uint64_t start, uint64_t last) const {
  if (!root_ || root_->subtree_last < start) return nullptr;
  return SubtreeSearch(root_, start, last);
}

IntervalTreeNode* IntervalTree::IterNext(IntervalTreeNode* n, uint64_t start, uint64_t last) {
  IntervalTreeNode* r = n->right;
  for (;;) {
    // Everything left of n (and n) is done; try n's right subtree.
    if (r && start <= r->subtree_last) return SubtreeSearch(r, start, last);
    // Climb until we arrive from a left child: that parent is next in order.
    IntervalTreeNode* prev;
    do {
      prev = n;
      n = n->parent;
      if (!n) return nullptr;
      r = n->right;
    } while (prev == r);
    if (n->start > last) return nullptr;
    if (start <= n->last) return n;
  }
}

IntervalTreeNode* IntervalTree::First() const {
  IntervalTreeNode* n = root_;
  if (!n) return nullptr;
  while (n->left) n = n->left;
  return n;
}

IntervalTreeNode* IntervalTree::Next(IntervalTreeNode* n) {
  if (n->right) {
    n = n->right;
    while (n->left) n = n->left;
    return n;
  }
  IntervalTreeNode* p = n->parent;
  while (p && n == p->right) {
    n = p;
    p = p->parent;
  }
  return p;
}

namespace {
// Returns the black height of n's subtree, or -1 on a violation.
int CheckSubtree(const IntervalTreeNode* n, const IntervalTreeNode* parent) {
  if (!n) return 1;
  if (n->parent != parent || !n->in_tree) return -1;
  if (n->start > n->last) return -1;
  if (n->red && ((n->left && n->left->red) || (n->right && n->right->red))) return -1;
  if (n->left && n->left->start > n->start) return -1;
  if (n->right && n->right->start < n->start) return -1;
  uint64_t m = n->last;
  if (n->left) m = std::max(m, n->left->subtree_last);
  if (n->right) m = std::max(m, n->right->subtree_last);
  if (m != n->subtree_last) return -1;
  int lh = CheckSubtree(n->left, n);
  int rh = CheckSubtree(n->right, n);
  if (lh < 0 || rh < 0 || lh != rh) return -1;
  return lh + (n->red ? 0 : 1);
}
}  // namespace

bool IntervalTree::DebugCheck() const {
  if (root_ && root_->red) return false;
  if (CheckSubtree(root_, nullptr) < 0) return false;
  // Global order (the local parent/child checks above do not imply it).
  size_t count = 0;
  const IntervalTreeNode* prev = nullptr;
  for (IntervalTreeNode* n = First(); n; n = Next(n)) {
    if (prev && prev->start > n->start) return false;
    prev = n;
    ++count;
  }
  return count == size_;
}

}  // namespace usvm
