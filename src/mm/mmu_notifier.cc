#include "usvm/mm/mmu_notifier.h"

#include <algorithm>
#include <cassert>

#include "usvm/mm/address_space.h"

namespace usvm::mm {

namespace {

// The hub whose callback the current thread is running (the kernel uses
// lockdep maps for this); lets Remove/Unregister/Put fail with EDEADLK
// instead of waiting for themselves.
thread_local const MmuNotifierSubscriptions* tls_callback_hub = nullptr;

class CallbackScope {
 public:
  explicit CallbackScope(const MmuNotifierSubscriptions* hub) : prev_(tls_callback_hub) {
    tls_callback_hub = hub;
  }
  ~CallbackScope() { tls_callback_hub = prev_; }
  CallbackScope(const CallbackScope&) = delete;
  CallbackScope& operator=(const CallbackScope&) = delete;

 private:
  const MmuNotifierSubscriptions* prev_;
};

}  // namespace

const char* NotifyEventName(NotifyEvent e) {
  switch (e) {
    case NotifyEvent::kUnmap: return "UNMAP";
    case NotifyEvent::kClear: return "CLEAR";
    case NotifyEvent::kProtectionVma: return "PROTECTION_VMA";
    case NotifyEvent::kProtectionPage: return "PROTECTION_PAGE";
    case NotifyEvent::kSoftDirty: return "SOFT_DIRTY";
    case NotifyEvent::kRelease: return "RELEASE";
    case NotifyEvent::kMigrate: return "MIGRATE";
    case NotifyEvent::kExclusive: return "EXCLUSIVE";
  }
  return "?";
}

// ---- MmuIntervalNotifier ---------------------------------------------------

uint64_t MmuIntervalNotifier::ReadBegin() {
  assert(hub_ && "ReadBegin on a subscription that is not inserted");
  return hub_->ReadBegin(this);
}

Result<void> MmuIntervalNotifier::Remove() {
  if (!hub_) return Err(Errc::kInval, "interval notifier not inserted");
  return hub_->Remove(this);
}

AddressSpace* MmuIntervalNotifier::mm() const { return hub_ ? hub_->mm() : nullptr; }

// ---- hub: common -----------------------------------------------------------

MmuNotifierSubscriptions::MmuNotifierSubscriptions(AddressSpace* mm)
    : mm_(mm), has_itree_(mm == nullptr) {}

bool MmuNotifierSubscriptions::InCallback() const { return tls_callback_hub == this; }

Result<void> MmuNotifierSubscriptions::CheckMmapWriteLocked() const {
  if (mm_ && !mm_->mmap_lock().DebugIsWriteLocked())
    return Err(Errc::kInval, "mmap lock not held for write");
  return {};
}

bool MmuNotifierSubscriptions::HasSubscribers() const {
  return has_itree_.load(std::memory_order_acquire) ||
         classic_count_.load(std::memory_order_acquire) != 0;
}

Result<void> MmuNotifierSubscriptions::InvalidateRangeStart(const NotifierRange& range) {
  const bool itree = has_itree_.load(std::memory_order_acquire);
  const bool classic = classic_count_.load(std::memory_order_acquire) != 0;
  if (!itree && !classic) [[likely]]
    return {};
  if (itree) USVM_TRY(ItreeInvalidate(range));
  if (classic) {
    Result<void> r = HlistInvalidateStart(range);
    if (!r) {
      // The caller will not call End, so end the interval part here. (The
      // kernel leaves it active in this case; that leaks the active count.)
      if (itree) ItreeInvEnd();
      return r;
    }
  }
  return {};
}

void MmuNotifierSubscriptions::InvalidateRangeEnd(const NotifierRange& range) {
  if (has_itree_.load(std::memory_order_acquire)) ItreeInvEnd();
  if (classic_count_.load(std::memory_order_acquire) != 0) HlistInvalidateEnd(range);
}

void MmuNotifierSubscriptions::Release() {
  if (release_started_.exchange(true, std::memory_order_acq_rel)) return;

  // mn_itree_release: later inserts fail; one RELEASE over everything.
  {
    SpinLockGuard g(lock_);
    itree_released_ = true;
  }
  if (has_itree_.load(std::memory_order_acquire)) {
    NotifierRange range;
    range.mm = mm_;
    range.start = 0;
    range.end = UINT64_MAX;
    range.event = NotifyEvent::kRelease;
    range.blockable = true;
    // Blockable: callbacks cannot make it fail (a false return is a WARN).
    (void)ItreeInvalidate(range);
    ItreeInvEnd();
  }

  // mn_hlist_release: every notifier's Release, then unhook them all.
  {
    WriteLock l(list_lock_);
    released_ = true;  // Register now fails with ESRCH
  }
  {
    ReadLock l(list_lock_);
    CallbackScope scope(this);
    for (MmuNotifier* n : notifiers_) {
      if (n->dead_.load(std::memory_order_acquire)) continue;
      if (!n->release_called_.exchange(true, std::memory_order_acq_rel) && mm_) n->Release(*mm_);
    }
  }
  ReapDeferredPuts();  // notifiers that Put themselves from Release
  {
    WriteLock l(list_lock_);
    notifiers_.clear();
    classic_count_.store(0, std::memory_order_release);
  }
}

// ---- hub: interval notifiers ----------------------------------------------

void MmuNotifierSubscriptions::EnsureItree(bool mmap_write_locked) {
  if (has_itree_.load(std::memory_order_acquire)) return;
  // First interval subscription of this address space. Every invalidation
  // bracket runs under the mmap lock, so flipping the flag under the write
  // lock means no bracket sees Start and End disagree about it.
  if (mmap_write_locked) {
    has_itree_.store(true, std::memory_order_release);
  } else {
    WriteLock l(mm_->mmap_lock());
    has_itree_.store(true, std::memory_order_release);
  }
}

Result<void> MmuNotifierSubscriptions::Insert(MmuIntervalNotifier* sub, uint64_t start,
                                              uint64_t length, MmuIntervalNotifierOps* ops) {
  if (!sub || !ops) return Err(Errc::kInval, "null interval notifier or ops");
  EnsureItree(/*mmap_write_locked=*/false);
  return InsertInternal(sub, start, length, ops);
}

Result<void> MmuNotifierSubscriptions::InsertLocked(MmuIntervalNotifier* sub, uint64_t start,
                                                    uint64_t length,
                                                    MmuIntervalNotifierOps* ops) {
  if (!sub || !ops) return Err(Errc::kInval, "null interval notifier or ops");
  USVM_TRY(CheckMmapWriteLocked());
  EnsureItree(/*mmap_write_locked=*/true);
  return InsertInternal(sub, start, length, ops);
}

Result<void> MmuNotifierSubscriptions::InsertInternal(MmuIntervalNotifier* sub, uint64_t start,
                                                      uint64_t length,
                                                      MmuIntervalNotifierOps* ops) {
  if (sub->hub_) return Err(Errc::kInval, "interval notifier already inserted");
  if (length == 0 || start + (length - 1) < start)
    return Err(Errc::kInval, "empty or overflowing interval");
  // mmgrab: the subscription holds the address space until Remove.
  std::shared_ptr<AddressSpace> mm_ref;
  if (mm_) {
    mm_ref = mm_->weak_from_this().lock();
    if (!mm_ref) return Err(Errc::kInval, "address space is being destroyed");
  }
  SpinLockGuard g(lock_);
  if (itree_released_) return Err(Errc::kInval, "address space released");
  sub->hub_ = this;
  sub->mm_ref_ = std::move(mm_ref);
  sub->ops_ = ops;
  sub->node_.start = start;
  sub->node_.last = start + (length - 1);
  const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
  if (active_invalidate_ranges_ != 0) {
    // Some invalidation is between Start and End and we cannot know its
    // range: treat the new subscription as hit, so its first ReadBegin
    // waits until that invalidation ends.
    if (seq & 1) {
      // Walkers are in the tree: defer (applied by the last ItreeInvEnd).
      deferred_.push_back(sub);
    } else {
      invalidate_seq_.store(seq | 1, std::memory_order_relaxed);
      itree_.Insert(sub);
    }
    sub->seq_.store(invalidate_seq_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  } else {
    assert(!(seq & 1));
    // Odd, not the current seq, and far from being reached again.
    sub->seq_.store(seq - 1, std::memory_order_relaxed);
    itree_.Insert(sub);
  }
  return {};
}

Result<void> MmuNotifierSubscriptions::Remove(MmuIntervalNotifier* sub) {
  if (!sub || sub->hub_ != this)
    return Err(Errc::kInval, "interval notifier not inserted in this address space");
  if (InCallback())
    return Err(Errc::kDeadlk, "Remove from an invalidation callback of the same address space");
  uint64_t wait_seq = 0;
  {
    SpinLockGuard g(lock_);
    const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
    if (seq & 1) {
      if (!sub->node_.in_tree) {
        // Its insert is still pending: just drop it.
        deferred_.erase(sub);
      } else {
        if (sub->deferred_link_.linked())
          return Err(Errc::kInval, "interval notifier removal already pending");
        // Walkers may be calling it: the last ItreeInvEnd unlinks it.
        deferred_.push_back(sub);
        wait_seq = seq;
      }
    } else {
      itree_.Remove(sub);
    }
  }
  if (wait_seq) {
    if (debug_hooks_) [[unlikely]]
      debug_hooks_->RemoveDeferred();
    // mmu_interval_seq_released: the condition takes lock_. The last
    // ItreeInvEnd makes the seq even and then, still under lock_, walks the
    // deferred list, which links through `sub`; a lockless check could see
    // the new seq and return while that walk is about to touch sub, and
    // the owner would free it under the walker.
    wq_.Wait([&] { return SeqReleased(wait_seq); });
  }
  sub->hub_ = nullptr;
  sub->ops_ = nullptr;
  // mmdrop: this may be the last reference, and destroying the address
  // space destroys this hub. Nothing after the return touches `this`.
  std::shared_ptr<AddressSpace> mm_ref = std::move(sub->mm_ref_);
  return {};
}

bool MmuNotifierSubscriptions::SeqReleased(uint64_t seq) const {
  SpinLockGuard g(lock_);
  return invalidate_seq_.load(std::memory_order_relaxed) != seq;
}

uint64_t MmuNotifierSubscriptions::ReadBegin(MmuIntervalNotifier* sub) {
  uint64_t seq;
  bool invalidating;
  {
    SpinLockGuard g(lock_);
    seq = sub->seq_.load(std::memory_order_acquire);
    invalidating = seq == invalidate_seq_.load(std::memory_order_relaxed);
  }
  // The callback of the invalidation in progress may already have run
  // SetSeq(seq); waiting until the seq moves on means the caller's page
  // table snapshot starts after every such invalidation ended.
  if (invalidating)
    wq_.Wait([&] { return invalidate_seq_.load(std::memory_order_acquire) != seq; });
  return seq;
}

MmuIntervalNotifier* MmuNotifierSubscriptions::ItreeInvStartRange(const NotifierRange& range,
                                                                  uint64_t* cur_seq) {
  SpinLockGuard g(lock_);
  ++active_invalidate_ranges_;
  MmuIntervalNotifier* sub = nullptr;
  if (range.end > range.start) sub = itree_.IterFirst(range.start, range.end - 1);
  uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
  if (sub) {
    seq |= 1;
    invalidate_seq_.store(seq, std::memory_order_relaxed);
  }
  *cur_seq = seq;
  return sub;
}

void MmuNotifierSubscriptions::ItreeInvEnd() {
  {
    SpinLockGuard g(lock_);
    assert(active_invalidate_ranges_ > 0 && "InvalidateRangeEnd without Start");
    const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
    if (--active_invalidate_ranges_ != 0 || !(seq & 1)) return;
    // Last one out: the seq becomes even and the tree may change again.
    invalidate_seq_.store(seq + 1, std::memory_order_release);
    if (debug_hooks_) [[unlikely]]
      debug_hooks_->SeqReleasedLocked();
    while (MmuIntervalNotifier* sub = deferred_.pop_front()) {
      if (sub->node_.in_tree)
        itree_.Remove(sub);
      else
        itree_.Insert(sub);
    }
  }
  wq_.WakeAll();
}

// The walk reads the tree without lock_: ItreeInvStartRange found a
// subscription and made the seq odd, and nothing modifies the tree until
// the last ItreeInvEnd makes it even again, which cannot happen before our
// own End.
Result<void> MmuNotifierSubscriptions::ItreeInvalidate(const NotifierRange& range) {
  uint64_t cur_seq;
  MmuIntervalNotifier* sub = ItreeInvStartRange(range, &cur_seq);
  if (!sub) return {};
  const uint64_t last = range.end - 1;
  bool would_block = false;
  FinishList finishes;
  {
    CallbackScope scope(this);
    for (; sub; sub = Tree::IterNext(sub, range.start, last)) {
      MmuIntervalFinish* finish = nullptr;
      const bool ok = sub->ops_->InvalidateStart(sub, range, cur_seq, &finish);
      if (ok && finish) finishes.push_back(finish);
      if (!ok) {
        if (range.blockable || range.event == NotifyEvent::kRelease) {
          // The kernel WARNs and carries on: only a non-blockable
          // invalidation may fail.
          warnings_.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        would_block = true;
        break;
      }
    }
    // Second pass, in first-pass order, also when stopping early.
    while (MmuIntervalFinish* f = finishes.pop_front()) f->Finish(range, cur_seq);
  }
  if (would_block) {
    // The non-blocking caller may not call End.
    ItreeInvEnd();
    return Err(Errc::kAgain, "non-blockable invalidation would block");
  }
  return {};
}

uint64_t MmuNotifierSubscriptions::DebugActiveInvalidations() const {
  SpinLockGuard g(lock_);
  return active_invalidate_ranges_;
}

size_t MmuNotifierSubscriptions::DebugTreeSize() const {
  SpinLockGuard g(lock_);
  return itree_.size();
}

size_t MmuNotifierSubscriptions::DebugDeferredSize() const {
  SpinLockGuard g(lock_);
  return deferred_.size();
}

// ---- hub: classic notifiers -----------------------------------------------

Result<void> MmuNotifierSubscriptions::Register(MmuNotifier* n) {
  if (!n) return Err(Errc::kInval, "null notifier");
  if (!mm_) return RegisterInternal(n);
  // Like mm_take_all_locks: no invalidation bracket is in flight while the
  // list grows, so none sees an End without its Start.
  WriteLock l(mm_->mmap_lock());
  return RegisterInternal(n);
}

Result<void> MmuNotifierSubscriptions::RegisterLocked(MmuNotifier* n) {
  if (!n) return Err(Errc::kInval, "null notifier");
  USVM_TRY(CheckMmapWriteLocked());
  return RegisterInternal(n);
}

Result<void> MmuNotifierSubscriptions::RegisterInternal(MmuNotifier* n) {
  WriteLock l(list_lock_);
  if (released_) return Err(Errc::kSrch, "address space already released");
  if (n->hub_ || std::find(notifiers_.begin(), notifiers_.end(), n) != notifiers_.end())
    return Err(Errc::kInval, "notifier already registered");
  n->hub_ = this;
  n->release_called_.store(false, std::memory_order_relaxed);
  notifiers_.push_back(n);
  classic_count_.store(static_cast<uint32_t>(notifiers_.size()), std::memory_order_release);
  return {};
}

Result<void> MmuNotifierSubscriptions::Unregister(MmuNotifier* n) {
  if (!n) return Err(Errc::kInval, "null notifier");
  if (InCallback())
    return Err(Errc::kDeadlk, "Unregister from a notifier callback of the same address space");
  {
    // Taking the lock exclusively waits for every running callback.
    WriteLock l(list_lock_);
    if (n->allocator_ && n->hub_ == this)
      return Err(Errc::kInval, "notifier came from Get: use Put");
    auto it = std::find(notifiers_.begin(), notifiers_.end(), n);
    // After teardown every notifier was already unhooked by Release: like
    // mmu_notifier_unregister, that is not an error.
    if (it == notifiers_.end()) {
      if (released_) {
        if (n->hub_ == this) n->hub_ = nullptr;
        return {};
      }
      return Err(Errc::kNoEnt, "notifier not registered");
    }
    notifiers_.erase(it);
    n->hub_ = nullptr;
    classic_count_.store(static_cast<uint32_t>(notifiers_.size()), std::memory_order_release);
  }
  if (!n->release_called_.exchange(true, std::memory_order_acq_rel) && mm_) {
    {
      CallbackScope scope(this);
      n->Release(*mm_);
    }
    ReapDeferredPuts();
  }
  return {};
}

Result<MmuNotifier*> MmuNotifierSubscriptions::Get(MmuNotifierAllocator* alloc) {
  if (!alloc) return Err(Errc::kInval, "null allocator");
  if (!mm_) return GetLocked(alloc);
  WriteLock l(mm_->mmap_lock());
  return GetLocked(alloc);
}

Result<MmuNotifier*> MmuNotifierSubscriptions::GetLocked(MmuNotifierAllocator* alloc) {
  if (!alloc) return Err(Errc::kInval, "null allocator");
  USVM_TRY(CheckMmapWriteLocked());
  MutexLock g(get_mu_);
  {
    WriteLock l(list_lock_);
    if (released_) return Err(Errc::kSrch, "address space already released");
    SpinLockGuard g(put_lock_);
    for (MmuNotifier* n : notifiers_) {
      if (n->allocator_ == alloc && !n->dead_.load(std::memory_order_relaxed) &&
          n->users_ != UINT32_MAX) {
        ++n->users_;
        return n;
      }
    }
  }
  MmuNotifier* n = USVM_TRY(alloc->AllocNotifier(mm_));
  if (!n) return Err(Errc::kNoMem, "allocator returned no notifier");
  {
    WriteLock l(list_lock_);
    SpinLockGuard g(put_lock_);
    n->allocator_ = alloc;
    n->users_ = 1;
    n->dead_.store(false, std::memory_order_relaxed);
  }
  Result<void> r = RegisterInternal(n);
  if (!r) {
    {
      WriteLock l(list_lock_);
      SpinLockGuard g(put_lock_);
      n->allocator_ = nullptr;
      n->users_ = 0;
    }
    alloc->FreeNotifier(n);
    return Err(r.error());
  }
  return n;
}

Result<void> MmuNotifierSubscriptions::Put(MmuNotifier* n) {
  if (!n) return Err(Errc::kInval, "null notifier");
  if (InCallback()) {
    // The walk that called us holds list_lock_ shared, so the notifier
    // cannot leave the list now: make every walk skip it from here on and
    // let the walk free it when it ends (the kernel's hlist_del_rcu plus
    // an SRCU-deferred free).
    SpinLockGuard g(put_lock_);
    if (n->hub_ != this || !n->allocator_ || n->users_ == 0 ||
        n->dead_.load(std::memory_order_relaxed))
      return Err(Errc::kInval, "notifier not obtained by Get on this address space");
    if (--n->users_ != 0) return {};
    n->dead_.store(true, std::memory_order_release);
    deferred_free_.push_back(n);
    has_deferred_free_.store(true, std::memory_order_release);
    return {};
  }
  MmuNotifierAllocator* alloc;
  {
    WriteLock l(list_lock_);
    {
      SpinLockGuard g(put_lock_);
      if (n->hub_ != this || !n->allocator_ || n->users_ == 0 ||
          n->dead_.load(std::memory_order_relaxed))
        return Err(Errc::kInval, "notifier not obtained by Get on this address space");
      if (--n->users_ != 0) return {};
    }
    auto it = std::find(notifiers_.begin(), notifiers_.end(), n);
    if (it != notifiers_.end()) notifiers_.erase(it);
    classic_count_.store(static_cast<uint32_t>(notifiers_.size()), std::memory_order_release);
    alloc = n->allocator_;
    n->allocator_ = nullptr;
    n->hub_ = nullptr;
  }
  // The exclusive lock above waited out every callback that had started,
  // and n is off the list, so none can start: free it.
  alloc->FreeNotifier(n);
  return {};
}

void MmuNotifierSubscriptions::ReapDeferredPuts() {
  if (!has_deferred_free_.load(std::memory_order_acquire)) [[likely]]
    return;
  if (InCallback()) return;  // an outer walk on this thread still runs
  std::vector<std::pair<MmuNotifier*, MmuNotifierAllocator*>> dead;
  {
    // Exclusive: every walk that could still see a dead notifier is over.
    WriteLock l(list_lock_);
    std::vector<MmuNotifier*> batch;
    {
      SpinLockGuard g(put_lock_);
      batch.swap(deferred_free_);
      has_deferred_free_.store(false, std::memory_order_release);
    }
    for (MmuNotifier* n : batch) {
      auto it = std::find(notifiers_.begin(), notifiers_.end(), n);
      if (it != notifiers_.end()) notifiers_.erase(it);
      dead.emplace_back(n, n->allocator_);
      n->allocator_ = nullptr;
      n->hub_ = nullptr;
    }
    classic_count_.store(static_cast<uint32_t>(notifiers_.size()), std::memory_order_release);
  }
  for (auto [n, alloc] : dead) alloc->FreeNotifier(n);
}

Result<void> MmuNotifierSubscriptions::HlistInvalidateStart(const NotifierRange& range) {
  Result<void> r = HlistInvalidateStartWalk(range);
  ReapDeferredPuts();
  return r;
}

Result<void> MmuNotifierSubscriptions::HlistInvalidateStartWalk(const NotifierRange& range) {
  ReadLock l(list_lock_);
  CallbackScope scope(this);
  bool failed = false;
  for (MmuNotifier* n : notifiers_) {
    if (n->dead_.load(std::memory_order_acquire)) continue;
    if (!n->InvalidateRangeStart(range)) {
      // Only legal for non-blockable ranges (the kernel WARNs otherwise
      // and carries on); every notifier still sees the start.
      if (range.blockable)
        warnings_.fetch_add(1, std::memory_order_relaxed);
      else
        failed = true;
    }
  }
  if (!failed) return {};
  // Those that succeeded expect an End; the caller will not call it, so
  // do it now (mn_hlist_invalidate_range_start).
  for (MmuNotifier* n : notifiers_)
    if (!n->dead_.load(std::memory_order_acquire)) n->InvalidateRangeEnd(range);
  return Err(Errc::kAgain, "non-blockable invalidation would block");
}

void MmuNotifierSubscriptions::HlistInvalidateEnd(const NotifierRange& range) {
  {
    ReadLock l(list_lock_);
    CallbackScope scope(this);
    for (MmuNotifier* n : notifiers_)
      if (!n->dead_.load(std::memory_order_acquire)) n->InvalidateRangeEnd(range);
  }
  ReapDeferredPuts();
}

}  // namespace usvm::mm
