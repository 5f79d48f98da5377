// MMU interval notifiers: a mirror's subscription to one virtual address
// interval of an address space (the kernel's struct mmu_interval_notifier).
//
// A driver embeds an MmuIntervalNotifier in each object that mirrors part
// of the CPU page table (a GPU SVM notifier window, a userptr), inserts it
// with MmuNotifierSubscriptions::Insert and gets a callback before any CPU
// page table entry inside the interval is removed or downgraded. Mirroring
// follows the sequence-count protocol of mm/mmu_notifier.c:
//
//   again:
//     seq = sub.ReadBegin();                 // sleeps while sub collides
//     snapshot the CPU page table (HMM range fault) -- no driver lock held
//     driver_lock.Lock();
//     if (sub.ReadRetry(seq)) { driver_lock.Unlock(); goto again; }
//     program the device page table from the snapshot
//     driver_lock.Unlock();
//
//   bool Ops::Invalidate(sub, range, cur_seq) {
//     if (!range.blockable) return false;    // would sleep on driver_lock
//     driver_lock.Lock();
//     sub->SetSeq(cur_seq);                  // makes every ReadRetry fail
//     zap the device mappings in range, flush the device TLB
//     driver_lock.Unlock();
//     return true;
//   }
//
// Because the callback publishes cur_seq under the same driver lock that
// ReadRetry runs under, a snapshot that raced with an invalidation is never
// programmed, and once the callback returns no device mapping of the range
// survives.
//
// Two-pass invalidation (seed 002): an ops class may override
// InvalidateStart to start the work (post a TLB flush to the GPU) and hand
// back an MmuIntervalFinish whose Finish waits for it. The hub runs every
// first pass of one invalidation, then every Finish in order, before
// InvalidateRangeStart returns, so N GPUs flush in parallel. A finish object
// must be private to one invalidation (callbacks of one subscription can run
// concurrently from different invalidations); MmuIntervalFinishPool hands
// them out. When none can be had -- the pool is empty because concurrent
// invalidations hold its objects (busy), or the "mmu_notifier.finish_alloc"
// fault site fires -- InvalidateStart must fall back to a complete
// single-pass invalidation and return with *finish == nullptr.
//
// Lifetime: the driver owns the subscription; it must stay alive from
// Insert until Remove returns, and Remove must not be called from one of
// the address space's invalidation callbacks (it returns EDEADLK there:
// defer it to a worker, as seed 000 does). An inserted subscription keeps
// its address space alive (a reference taken by Insert, dropped when
// Remove returns, as the kernel's mmgrab/mmdrop), so the owner may drop
// its own references first; the address space may be destroyed inside
// that Remove.
#ifndef USVM_MM_MMU_INTERVAL_NOTIFIER_H_
#define USVM_MM_MMU_INTERVAL_NOTIFIER_H_

#include <atomic>
#include <bit>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "usvm/base/env.h"
#include "usvm/base/interval_tree.h"
#include "usvm/base/intrusive_list.h"
#include "usvm/base/result.h"
#include "usvm/mm/mmu_notifier_range.h"

namespace usvm::mm {

class MmuIntervalNotifier;
class MmuNotifierSubscriptions;

// The second pass of a two-pass invalidation (struct
// mmu_interval_notifier_finish). Embed it in a larger object to carry data
// from the first pass to the second.
class MmuIntervalFinish {
 public:
  virtual ~MmuIntervalFinish() = default;
  // Completes what InvalidateStart began (waits for the TLB flush). There
  // is no error reporting. Called once per hand-back, on the invalidating
  // thread; the object is not touched by the hub afterwards, so Finish may
  // return it to its pool.
  virtual void Finish(const NotifierRange& range, uint64_t cur_seq) = 0;

 private:
  friend class MmuNotifierSubscriptions;
  // Links the object on its invalidation's pending list between the two
  // passes; owned by the invalidating thread during that time.
  ListNode link_;
};

// The callbacks of an interval subscription (struct
// mmu_interval_notifier_ops). Callbacks run with the address space's mmap
// lock held (read or write) and no page table lock; they may sleep unless
// !range.blockable; they must not take the mmap lock, insert or remove
// interval notifiers, or call ReadBegin.
class MmuIntervalNotifierOps {
 public:
  virtual ~MmuIntervalNotifierOps() = default;

  // Single-pass invalidation: on return the driver must no longer use any
  // device mapping of [range.start, range.end) ∩ the subscription. Must
  // call sub->SetSeq(cur_seq) under the driver lock. Return false only when
  // !range.blockable and the work would sleep; the invalidation then fails
  // with EAGAIN.
  virtual bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& range,
                          uint64_t cur_seq) = 0;

  // First pass of a two-pass invalidation. Same contract as Invalidate, but
  // may leave the final wait to *finish (set it to a private finish object,
  // or leave it nullptr when everything is done). The hub calls this one;
  // the default does the whole invalidation through Invalidate.
  virtual bool InvalidateStart(MmuIntervalNotifier* sub, const NotifierRange& range,
                               uint64_t cur_seq, MmuIntervalFinish** finish) {
    *finish = nullptr;
    return Invalidate(sub, range, cur_seq);
  }
};

// One subscription. Insert it with MmuNotifierSubscriptions::Insert.
//
// State (the hub's transitions, under its spinlock):
//   1. idle -> in tree (Insert while no invalidation walks the tree), or
//      idle -> pending insert (Insert during one: deferred list);
//   2. pending insert -> in tree when the last invalidation ends;
//   3. in tree -> idle (Remove while no invalidation walks the tree), or
//      in tree -> pending remove -> idle when the last invalidation ends;
//   4. pending insert -> idle (Remove before it was applied).
class alignas(32) MmuIntervalNotifier {
 public:
  MmuIntervalNotifier() = default;
  // REQUIRES: not inserted (Remove has returned, or Insert never succeeded).
  ~MmuIntervalNotifier() { assert(!hub_ && "interval notifier destroyed while inserted"); }
  MmuIntervalNotifier(const MmuIntervalNotifier&) = delete;
  MmuIntervalNotifier& operator=(const MmuIntervalNotifier&) = delete;

  // mmu_interval_read_begin: waits while an invalidation that includes this
  // subscription is in progress, then returns the sequence to pass to
  // ReadRetry. A subscription inserted during an invalidation waits for
  // that invalidation on its first call. May sleep.
  // REQUIRES: inserted; no driver lock that callbacks take is held; not
  // called from an invalidation callback.
  uint64_t ReadBegin();

  // mmu_interval_read_retry: true if an invalidation has run SetSeq since
  // ReadBegin returned `seq`, so the snapshot must be thrown away.
  // REQUIRES: the driver lock that the callbacks hold around SetSeq.
  bool ReadRetry(uint64_t seq) const { return seq_.load(std::memory_order_relaxed) != seq; }

  // mmu_interval_check_retry: the lockless, advisory form of ReadRetry, to
  // give up early on long work. A false answer proves nothing.
  bool CheckRetry(uint64_t seq) const { return seq_.load(std::memory_order_acquire) != seq; }

  // mmu_interval_set_seq: called by every invalidation callback with its
  // cur_seq. REQUIRES: the driver lock that ReadRetry runs under.
  void SetSeq(uint64_t cur_seq) { seq_.store(cur_seq, std::memory_order_release); }

  // Same as hub()->Remove(this).
  Result<void> Remove();

  // The interval, valid while inserted: [start(), end()), last() == end()-1.
  uint64_t start() const { return node_.start; }
  uint64_t last() const { return node_.last; }
  uint64_t end() const { return node_.last + 1; }
  // The hub it is inserted in, or nullptr. Owner-serialised (changed only
  // by Insert and Remove, which the owner must not race with each other).
  MmuNotifierSubscriptions* hub() const { return hub_; }
  // The address space (may be null for a hub built without one).
  AddressSpace* mm() const;
  MmuIntervalNotifierOps* ops() const { return ops_; }
  // Racy, for tests: whether the hub still has this subscription on its
  // deferred list (an insert or remove not yet applied). Once Remove has
  // returned the hub never touches the subscription again, so then the
  // answer is exact and must be false.
  bool DebugPending() const { return deferred_link_.linked(); }

 private:
  friend class MmuNotifierSubscriptions;

  // Guarded by hub_->lock_ (not expressible as an annotation: the lock is
  // in another object); read without it by invalidations while the hub's
  // sequence is odd, when the tree cannot change.
  IntervalTreeNode node_;
  // On the hub's deferred list while an insert or remove is pending;
  // guarded by hub_->lock_.
  ListNode deferred_link_;
  // Atomic: written by SetSeq under the driver lock, by Insert under the
  // hub lock; read by ReadRetry (driver lock), ReadBegin (hub lock) and
  // CheckRetry (no lock).
  std::atomic<uint64_t> seq_{0};
  // Owner-serialised: set by Insert, cleared when Remove returns.
  MmuNotifierSubscriptions* hub_ = nullptr;
  MmuIntervalNotifierOps* ops_ = nullptr;
  // The address space, held from Insert until Remove returns (the
  // kernel's mmgrab/mmdrop): Remove must be able to reach the hub even
  // when every other reference to the address space is gone.
  // Owner-serialised like hub_.
  std::shared_ptr<AddressSpace> mm_ref_;
};

// A small fixed pool of finish objects, as seed 002 recommends over
// GFP_NOWAIT allocations: TryAlloc never sleeps and fails (nullptr) when
// all N objects are in use -- concurrent invalidations hold them -- or when
// the "mmu_notifier.finish_alloc" fault site of `env` fires. The caller
// then falls back to a single-pass invalidation. A pool of one object per
// subscription is the "embedded finish object" pattern: busy while another
// invalidation of that subscription is between its passes.
//
// Thread-safety: TryAlloc and Free are lock-free and safe to call
// concurrently.
template <typename T, size_t N>
class MmuIntervalFinishPool {
  static_assert(N >= 1 && N <= 64, "the free set is one 64-bit word");

 public:
  static constexpr const char* kFaultSite = "mmu_notifier.finish_alloc";

  explicit MmuIntervalFinishPool(Env& env = Env::Default()) : env_(env) {}
  MmuIntervalFinishPool(const MmuIntervalFinishPool&) = delete;
  MmuIntervalFinishPool& operator=(const MmuIntervalFinishPool&) = delete;

  // A free object, or nullptr (exhausted, or fault injected).
  T* TryAlloc() {
    if (env_.ShouldFail(kFaultSite)) return nullptr;
    uint64_t f = free_.load(std::memory_order_relaxed);
    while (f != 0) {
      const int i = std::countr_zero(f);
      if (free_.compare_exchange_weak(f, f & ~(uint64_t{1} << i), std::memory_order_acquire,
                                      std::memory_order_relaxed))
        return &objs_[i];
    }
    return nullptr;
  }
  // REQUIRES: t came from TryAlloc of this pool and is not yet freed.
  void Free(T* t) {
    const size_t i = static_cast<size_t>(t - objs_);
    free_.fetch_or(uint64_t{1} << i, std::memory_order_release);
  }
  // Racy count of objects handed out, for tests.
  size_t DebugInUse() const {
    return N - static_cast<size_t>(std::popcount(free_.load(std::memory_order_relaxed)));
  }

 private:
  static constexpr uint64_t kAllFree = N == 64 ? ~uint64_t{0} : (uint64_t{1} << N) - 1;

  Env& env_;
  T objs_[N];
  // Atomic: bit i set while objs_[i] is free.
  std::atomic<uint64_t> free_{kAllFree};
};

}  // namespace usvm::mm

#endif  // USVM_MM_MMU_INTERVAL_NOTIFIER_H_
