// IntrusiveList: a circular doubly-linked list threaded through a ListNode
// member of the element (the kernel's list_head), so linking and unlinking
// never allocate and an element can unlink itself in O(1).
//
//   struct Block { ListNode link; ... };
//   IntrusiveList<Block, &Block::link> partial;
//
// The list does not own its elements. Not thread-safe: the owner's lock
// guards the list and every node on it.
#ifndef USVM_BASE_INTRUSIVE_LIST_H_
#define USVM_BASE_INTRUSIVE_LIST_H_

#include <cstddef>

namespace usvm {

struct ListNode {
  ListNode* prev = nullptr;
  ListNode* next = nullptr;
  // True while the node is on some list.
  bool linked() const { return next != nullptr; }
};

template <typename T, ListNode T::*Member>
class IntrusiveList {
 public:
  IntrusiveList() { head_.prev = head_.next = &head_; }
  IntrusiveList(const IntrusiveList&) = delete;
  IntrusiveList& operator=(const IntrusiveList&) = delete;

  bool empty() const { return head_.next == &head_; }
  size_t size() const { return size_; }

  T* front() const { return empty() ? nullptr : Owner(head_.next); }
  T* back() const { return empty() ? nullptr : Owner(head_.prev); }

  void push_front(T* t) { InsertAfter(&head_, &(t->*Member)); }
  void push_back(T* t) { InsertAfter(head_.prev, &(t->*Member)); }
  // Inserts t before pos (at the end when pos is nullptr). REQUIRES: pos,
  // if given, is on this list.
  void insert_before(T* pos, T* t) {
    InsertAfter(pos ? (pos->*Member).prev : head_.prev, &(t->*Member));
  }

  // REQUIRES: t is on this list.
  void erase(T* t) {
    ListNode* n = &(t->*Member);
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = nullptr;
    --size_;
  }

  T* pop_front() {
    T* t = front();
    if (t) erase(t);
    return t;
  }

  // Next element after t, or nullptr at the end.
  T* next(T* t) const {
    ListNode* n = (t->*Member).next;
    return n == &head_ ? nullptr : Owner(n);
  }

  template <typename F>
  void ForEach(F f) const {
    for (ListNode* n = head_.next; n != &head_;) {
      ListNode* nx = n->next;  // f may erase the current element
      f(Owner(n));
      n = nx;
    }
  }

 private:
  static T* Owner(const ListNode* n) {
    // Offset of Member inside T, computed on a suitably aligned fake
    // address (never dereferenced) rather than on nullptr.
    constexpr size_t kFake = 4096;
    const auto off = reinterpret_cast<size_t>(&(reinterpret_cast<T*>(kFake)->*Member)) - kFake;
    return reinterpret_cast<T*>(reinterpret_cast<char*>(const_cast<ListNode*>(n)) - off);
  }
  void InsertAfter(ListNode* pos, ListNode* n) {
    n->prev = pos;
    n->next = pos->next;
    pos->next->prev = n;
    pos->next = n;
    ++size_;
  }

  ListNode head_;
  size_t size_ = 0;
};

}  // namespace usvm

#endif  // USVM_BASE_INTRUSIVE_LIST_H_
