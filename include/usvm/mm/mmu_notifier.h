// MMU notifiers: how the address space tells mirrors (GPUs) that CPU page
// table entries are about to be removed or downgraded.
//
// Every operation that removes or downgrades a mapping brackets the page
// table change with
//   InvalidateRangeStart(range)   // before: mirrors drop their copies
//   ... change the CPU page table ...
//   InvalidateRangeEnd(range)     // after
// with the kernel's event for that operation (see NotifyEvent). Both are
// called with the mmap lock held (read or write, as the operation needs)
// and no page table lock held, so callbacks may sleep; they must never take
// the mmap lock.
//
// MmuNotifierSubscriptions is the per-address-space hub (the kernel's
// struct mmu_notifier_subscriptions). It serves two kinds of subscriber:
//
//  * classic whole-address-space notifiers (MmuNotifier, struct
//    mmu_notifier): Register/Unregister, or the shared, reference-counted
//    Get/Put (mmu_notifier_get/put: one notifier per (allocator, mm));
//    start/end/release callbacks;
//  * interval notifiers (MmuIntervalNotifier, mmu_interval_notifier.h):
//    an augmented interval tree of subscriptions, the global
//    invalidate_seq, the count of active invalidations, a wait queue and a
//    deferred list, with the sequence protocol of mm/mmu_notifier.c.
//
// Interval invalidation, step by step (mn_itree_*):
//   1. Start: under the spinlock, active++; if any subscription overlaps,
//      the global seq becomes odd. cur_seq = that seq.
//   2. Walk the overlapping subscriptions WITHOUT the spinlock (the tree
//      cannot change while the seq is odd: Insert/Remove go to the
//      deferred list), calling InvalidateStart (pass 1) with cur_seq; then
//      every returned finish object's Finish (pass 2), in order.
//   3. End: under the spinlock, active--; the last one to end an odd
//      sequence makes it even, applies the deferred inserts and removes,
//      and wakes ReadBegin/Remove sleepers.
// Nested and concurrent invalidations from many threads therefore share one
// odd sequence until the last of them ends. A non-blockable invalidation
// whose callback returns false stops the walk, still runs the finish pass
// of the callbacks that succeeded, ends its part (3) and fails with EAGAIN;
// its caller must not call InvalidateRangeEnd.
//
// Invariants:
//   - invalidate_seq is even iff no invalidation that hit a subscription
//     is active; it only grows.
//   - while it is odd the tree is not modified; the deferred list is empty
//     while it is even.
//   - a subscription's seq is odd and differs from the global seq while it
//     is not colliding with an active invalidation.
//
// Locking:
//   - lock_ (SpinLock) guards the tree, the deferred list, active count and
//     writes of invalidate_seq. Never held across a callback.
//   - list_lock_ (RwSemaphore) guards the classic list: shared for
//     callbacks (the kernel's SRCU read side), exclusive to change it, so
//     Unregister/Put return only once no callback of that notifier runs.
//   - order: mmap_lock -> list_lock_ -> lock_. The hub takes the mmap lock
//     itself only in Register, Get and the first Insert (as the kernel's
//     mmu_notifier_register does), so those must not be called with the
//     mmap lock held; use the ...Locked forms under the write lock.
//   - Remove and Unregister from an invalidation callback of the same hub
//     would deadlock (they wait for the callback to return); they detect
//     it and fail with EDEADLK. Put from a callback (Release included) is
//     allowed: the free is deferred to the end of that walk.
//
// Fast path: when nothing was ever subscribed, InvalidateRangeStart/End
// are two relaxed atomic loads. "Has interval subscriptions" is sticky and
// first set under the mmap write lock, like the kernel's has_itree, so an
// invalidation bracket (run under the mmap lock) never sees it change.
//
// Thread-safety: every public method is safe to call concurrently.
#ifndef USVM_MM_MMU_NOTIFIER_H_
#define USVM_MM_MMU_NOTIFIER_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include "usvm/base/interval_tree.h"
#include "usvm/base/intrusive_list.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/base/thread_annotations.h"
#include "usvm/base/wait_queue.h"
#include "usvm/mm/mmu_interval_notifier.h"
#include "usvm/mm/mmu_notifier_range.h"

namespace usvm::mm {

class MmuNotifierAllocator;

// A classic whole-address-space notifier (struct mmu_notifier with its
// ops). The owner keeps it alive while registered.
class MmuNotifier {
 public:
  virtual ~MmuNotifier() = default;
  // Return false only when !range.blockable and the callback would sleep;
  // the invalidation then fails with EAGAIN. A notifier whose start can
  // fail should not rely on its end: on EAGAIN every registered notifier
  // gets InvalidateRangeEnd, as in the kernel.
  virtual bool InvalidateRangeStart(const NotifierRange& range) { return true; }
  virtual void InvalidateRangeEnd(const NotifierRange& range) {}
  // The address space is being torn down, or the notifier is being
  // unregistered: stop using the address space. Called at most once. Not
  // called by a hub built without an address space (there is none to pass).
  virtual void Release(AddressSpace& mm) {}

 private:
  friend class MmuNotifierSubscriptions;
  // Guarded by the owning hub's list_lock_ (another object's lock, so not
  // annotated). hub_: where it is registered (kept after release for Put);
  // allocator_/users_: set for notifiers made by Get.
  MmuNotifierSubscriptions* hub_ = nullptr;
  MmuNotifierAllocator* allocator_ = nullptr;
  // Guarded by the owning hub's put_lock_: references taken by Get.
  uint32_t users_ = 0;
  // Atomic: makes Release run once when teardown and Unregister race.
  std::atomic<bool> release_called_{false};
  // Atomic: set when the last Put came from a callback; walks skip the
  // notifier from then on, and the hub frees it once no walk can see it.
  std::atomic<bool> dead_{false};
};

// The alloc_notifier/free_notifier half of mmu_notifier_ops, for Get/Put:
// one notifier per (allocator, address space), shared and refcounted.
class MmuNotifierAllocator {
 public:
  virtual ~MmuNotifierAllocator() = default;
  // A new notifier for `mm` (null for a hub without an address space). Called
  // with the mmap write lock held (if there is an address space). The
  // error is returned by Get.
  virtual Result<MmuNotifier*> AllocNotifier(AddressSpace* mm) = 0;
  // Called once, after the last Put, when no callback of n runs or can run.
  virtual void FreeNotifier(MmuNotifier* n) = 0;
};

// The per-address-space notifier hub (see the file comment).
class MmuNotifierSubscriptions {
 public:
  // `mm` may be null (unit tests, benchmarks): then there is no mmap lock to
  // take or check, and interval subscriptions count as present from the
  // start, so invalidations always take the full path.
  explicit MmuNotifierSubscriptions(AddressSpace* mm);
  MmuNotifierSubscriptions(const MmuNotifierSubscriptions&) = delete;
  MmuNotifierSubscriptions& operator=(const MmuNotifierSubscriptions&) = delete;

  AddressSpace* mm() const { return mm_; }

  // ---- classic notifiers ------------------------------------------------

  // mmu_notifier_register: takes the mmap write lock. EINVAL if null or
  // already registered, ESRCH after the address space was released.
  Result<void> Register(MmuNotifier* n) USVM_EXCLUDES(list_lock_);
  // __mmu_notifier_register. REQUIRES: the mmap write lock (EINVAL if not).
  Result<void> RegisterLocked(MmuNotifier* n) USVM_EXCLUDES(list_lock_);
  // mmu_notifier_unregister: unhooks n, waits for its running callbacks,
  // and calls its Release unless teardown already did. ENOENT if not
  // registered; success (no-op) after the address space was released.
  // EINVAL for a notifier obtained by Get (use Put). EDEADLK from a
  // callback of this hub.
  Result<void> Unregister(MmuNotifier* n) USVM_EXCLUDES(list_lock_);

  // mmu_notifier_get: the notifier of `alloc` on this address space with
  // one more reference, or a new one from alloc->AllocNotifier,
  // registered. Takes the mmap write lock. ESRCH after release; EINVAL if
  // alloc is null; AllocNotifier's error.
  Result<MmuNotifier*> Get(MmuNotifierAllocator* alloc) USVM_EXCLUDES(list_lock_);
  // mmu_notifier_get_locked. REQUIRES: the mmap write lock (EINVAL if not).
  Result<MmuNotifier*> GetLocked(MmuNotifierAllocator* alloc) USVM_EXCLUDES(list_lock_);
  // mmu_notifier_put: drops a reference; the last one unhooks the notifier,
  // waits for its running callbacks and calls FreeNotifier before Put
  // returns. From a callback of this hub (its own Release included, as
  // the kernel allows) Put cannot wait for the walk it runs in: the
  // notifier is unhooked at once (no later callback reaches it) and freed
  // when that walk ends, like the kernel's SRCU-deferred free.
  // EINVAL: not from Get on this hub, or no reference left.
  Result<void> Put(MmuNotifier* n) USVM_EXCLUDES(list_lock_);

  // ---- interval notifiers -----------------------------------------------

  // mmu_interval_notifier_insert: subscribes `sub` to [start, start+length).
  // Takes the mmap write lock the first time any interval notifier is
  // inserted in this hub. During an invalidation the insert is deferred and
  // the subscription collides (its first ReadBegin waits).
  // EINVAL: null sub/ops, sub already inserted, length 0 or overflowing
  // (the kernel's EOVERFLOW), or the address space was released.
  Result<void> Insert(MmuIntervalNotifier* sub, uint64_t start, uint64_t length,
                      MmuIntervalNotifierOps* ops) USVM_EXCLUDES(lock_);
  // mmu_interval_notifier_insert_locked. REQUIRES: the mmap write lock
  // (EINVAL if not held).
  Result<void> InsertLocked(MmuIntervalNotifier* sub, uint64_t start, uint64_t length,
                            MmuIntervalNotifierOps* ops) USVM_EXCLUDES(lock_);
  // mmu_interval_notifier_remove: unsubscribes `sub` and returns once no
  // callback of it runs or can run (it may sleep until the current
  // invalidation ends). EINVAL: not inserted here. EDEADLK: called from an
  // invalidation callback of this hub (it would wait for itself).
  Result<void> Remove(MmuIntervalNotifier* sub) USVM_EXCLUDES(lock_);

  // ---- the address space's side -----------------------------------------

  // Called by the address space around page-table changes, with the mmap
  // lock held. Start returns EAGAIN (and the caller must not call End) when
  // a non-blockable invalidation met a callback that would sleep.
  Result<void> InvalidateRangeStart(const NotifierRange& range)
      USVM_EXCLUDES(lock_, list_lock_);
  void InvalidateRangeEnd(const NotifierRange& range) USVM_EXCLUDES(lock_, list_lock_);
  // Teardown (exit_mmap): one RELEASE invalidation over the whole space to
  // the interval subscriptions (they stay inserted until their owners
  // remove them; later inserts fail), then every classic notifier's
  // Release, after which they are unhooked. Idempotent.
  void Release() USVM_EXCLUDES(lock_, list_lock_);

  // True when invalidations must be reported (the kernel's
  // mm_has_notifiers): a classic notifier is registered, or interval
  // notifiers were ever inserted (sticky). Stable under the mmap lock.
  bool HasSubscribers() const;

  // ---- racy queries for tests and assertions ----------------------------

  uint64_t DebugInvalidateSeq() const { return invalidate_seq_.load(std::memory_order_relaxed); }
  uint64_t DebugActiveInvalidations() const USVM_EXCLUDES(lock_);
  // Subscriptions in the tree, and on the deferred list.
  size_t DebugTreeSize() const USVM_EXCLUDES(lock_);
  size_t DebugDeferredSize() const USVM_EXCLUDES(lock_);
  // Kernel WARN_ONs hit: a blockable invalidation or a RELEASE whose
  // callback returned false.
  uint64_t DebugWarnings() const { return warnings_.load(std::memory_order_relaxed); }

  // Test hooks that hold a thread at a point where a race window opens, so
  // regression tests of lifetime rules are deterministic. Install before
  // any concurrent use of the hub; nullptr (the default) disables them.
  struct DebugHooks {
    virtual ~DebugHooks() = default;
    // Remove queued a deferred removal and dropped lock_; about to wait.
    virtual void RemoveDeferred() {}
    // The last InvalidateRangeEnd made the seq even and is about to apply
    // the deferred list; lock_ is held (do not touch the hub).
    virtual void SeqReleasedLocked() {}
  };
  void DebugSetHooks(DebugHooks* hooks) { debug_hooks_ = hooks; }

 private:
  friend class MmuIntervalNotifier;
  using Tree = IntrusiveIntervalTree<MmuIntervalNotifier, &MmuIntervalNotifier::node_>;
  using FinishList = IntrusiveList<MmuIntervalFinish, &MmuIntervalFinish::link_>;

  bool InCallback() const;
  Result<void> CheckMmapWriteLocked() const;
  void EnsureItree(bool mmap_write_locked);
  Result<void> InsertInternal(MmuIntervalNotifier* sub, uint64_t start, uint64_t length,
                              MmuIntervalNotifierOps* ops) USVM_EXCLUDES(lock_);
  MmuIntervalNotifier* ItreeInvStartRange(const NotifierRange& range, uint64_t* cur_seq)
      USVM_EXCLUDES(lock_);
  void ItreeInvEnd() USVM_EXCLUDES(lock_);
  // Both passes over the overlapping subscriptions. EAGAIN (after ending
  // its part) when a non-blockable callback failed.
  Result<void> ItreeInvalidate(const NotifierRange& range) USVM_EXCLUDES(lock_);
  uint64_t ReadBegin(MmuIntervalNotifier* sub) USVM_EXCLUDES(lock_);
  // True once the invalidation sequence `seq` has ended and its deferred
  // list was applied (checked under lock_).
  bool SeqReleased(uint64_t seq) const USVM_EXCLUDES(lock_);
  Result<void> RegisterInternal(MmuNotifier* n) USVM_EXCLUDES(list_lock_);
  Result<void> HlistInvalidateStart(const NotifierRange& range) USVM_EXCLUDES(list_lock_);
  Result<void> HlistInvalidateStartWalk(const NotifierRange& range) USVM_EXCLUDES(list_lock_);
  void HlistInvalidateEnd(const NotifierRange& range) USVM_EXCLUDES(list_lock_);
  // Unhooks and frees the notifiers whose last Put came from a callback,
  // unless this thread is still inside a walk of this hub (the outermost
  // walk does it).
  void ReapDeferredPuts() USVM_EXCLUDES(list_lock_, put_lock_);

  // Constant after construction.
  AddressSpace* const mm_;  // non-owning back pointer; outlives this

  // Atomic fast-path flags. has_itree_: sticky, first set under the mmap
  // write lock (or at construction when mm_ is null). classic_count_:
  // written under list_lock_ (exclusive), read locklessly by invalidations.
  std::atomic<bool> has_itree_;
  std::atomic<uint32_t> classic_count_{0};
  // Atomic: makes Release idempotent.
  std::atomic<bool> release_started_{false};
  // Atomic counter, statistics only.
  std::atomic<uint64_t> warnings_{0};
  // Set before concurrent use (DebugSetHooks); read-only afterwards.
  DebugHooks* debug_hooks_ = nullptr;

  // Interval notifier state, protected by lock_.
  mutable SpinLock lock_;
  Tree itree_ USVM_GUARDED_BY(lock_);
  IntrusiveList<MmuIntervalNotifier, &MmuIntervalNotifier::deferred_link_> deferred_
      USVM_GUARDED_BY(lock_);
  uint64_t active_invalidate_ranges_ USVM_GUARDED_BY(lock_) = 0;
  bool itree_released_ USVM_GUARDED_BY(lock_) = false;
  // Atomic: written only under lock_; read locklessly by ReadBegin/Remove
  // sleepers (their wake-up condition). Starts even (2, as in the kernel).
  std::atomic<uint64_t> invalidate_seq_{2};
  // Sleepers of ReadBegin and Remove; woken when the seq becomes even.
  WaitQueue wq_;

  // Classic notifier state, protected by list_lock_.
  mutable RwSemaphore list_lock_;
  // Serialises Get so two callers do not both allocate.
  Mutex get_mu_ USVM_ACQUIRED_BEFORE(list_lock_);
  std::vector<MmuNotifier*> notifiers_ USVM_GUARDED_BY(list_lock_);
  bool released_ USVM_GUARDED_BY(list_lock_) = false;
  // Innermost: the users_ counts of Get'ed notifiers, and the notifiers
  // put from callbacks, waiting to be freed after their walk.
  mutable SpinLock put_lock_ USVM_ACQUIRED_AFTER(list_lock_);
  std::vector<MmuNotifier*> deferred_free_ USVM_GUARDED_BY(put_lock_);
  // Atomic: deferred_free_ is non-empty (a lockless check for the walks).
  std::atomic<bool> has_deferred_free_{false};
};

}  // namespace usvm::mm

#endif  // USVM_MM_MMU_NOTIFIER_H_
