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
// struct mmu_notifier_subscriptions). This file holds the classic
// whole-address-space notifiers (struct mmu_notifier): register, the
// start/end/release callbacks. Interval notifiers build on the same hub.
#ifndef USVM_MM_MMU_NOTIFIER_H_
#define USVM_MM_MMU_NOTIFIER_H_

#include <cstdint>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/base/thread_annotations.h"

namespace usvm::mm {

class AddressSpace;

// Why a range is invalidated (enum mmu_notifier_event).
enum class NotifyEvent : uint8_t {
  kUnmap,           // munmap, the old range of mremap: the range is gone
  kClear,           // madvise DONTNEED/FREE, COW break, THP split, reclaim
  kProtectionVma,   // mprotect
  kProtectionPage,  // write-protect of individual pages (fork's COW setup)
  kSoftDirty,       // soft-dirty tracking reset
  kRelease,         // address space teardown
  kMigrate,         // migrate_vma (owner says who migrates)
  kExclusive,       // make a page device-exclusive (owner says who)
};

const char* NotifyEventName(NotifyEvent e);

// struct mmu_notifier_range.
struct NotifierRange {
  AddressSpace* mm = nullptr;
  uint64_t start = 0;  // page aligned
  uint64_t end = 0;    // exclusive, page aligned
  NotifyEvent event = NotifyEvent::kUnmap;
  // The driver cookie of kMigrate/kExclusive, so a driver can skip its own
  // migrations; nullptr otherwise.
  const void* owner = nullptr;
  // False for invalidations that may not sleep (the OOM reaper's); a
  // callback that would have to sleep then returns false / EAGAIN.
  bool blockable = true;
};

// A classic whole-address-space notifier (struct mmu_notifier with its
// ops). The owner keeps it alive while registered.
class MmuNotifier {
 public:
  virtual ~MmuNotifier() = default;
  // Return false only when !range.blockable and the callback would sleep;
  // the invalidation then fails with EAGAIN.
  virtual bool InvalidateRangeStart(const NotifierRange& range) { return true; }
  virtual void InvalidateRangeEnd(const NotifierRange& range) {}
  // The address space is being torn down: stop using it. Called once,
  // after which the notifier is unhooked (as mmu_notifier_release does).
  virtual void Release(AddressSpace& mm) {}
};

// The per-address-space notifier hub.
//
// Locking: the list of classic notifiers is guarded by list_lock_, taken
// shared by every invalidation (the kernel's SRCU read side) and exclusive
// by Register/Unregister, so Unregister returns only once no callback of
// that notifier runs or can run. Unregister from inside a callback
// deadlocks, as in the kernel: defer it to a worker.
class MmuNotifierSubscriptions {
 public:
  explicit MmuNotifierSubscriptions(AddressSpace* mm) : mm_(mm) {}
  MmuNotifierSubscriptions(const MmuNotifierSubscriptions&) = delete;
  MmuNotifierSubscriptions& operator=(const MmuNotifierSubscriptions&) = delete;

  // mmu_notifier_register: EINVAL if null or already registered, ESRCH
  // after the address space was released.
  Result<void> Register(MmuNotifier* n) USVM_EXCLUDES(list_lock_);
  // mmu_notifier_unregister: ENOENT if never registered; success (no-op)
  // after the address space was released. Waits for running callbacks.
  Result<void> Unregister(MmuNotifier* n) USVM_EXCLUDES(list_lock_);

  // Called by the address space around page-table changes. Start returns
  // EAGAIN (and the caller must not call End) when a non-blockable
  // invalidation met a callback that would sleep.
  Result<void> InvalidateRangeStart(const NotifierRange& range) USVM_EXCLUDES(list_lock_);
  void InvalidateRangeEnd(const NotifierRange& range) USVM_EXCLUDES(list_lock_);
  // Teardown: every classic notifier's Release, then they are unhooked.
  void Release() USVM_EXCLUDES(list_lock_);

  // True when anything is subscribed (lets callers skip building ranges).
  bool HasSubscribers() const;

 private:
  AddressSpace* const mm_;  // non-owning back pointer; outlives this
  mutable RwSemaphore list_lock_;
  std::vector<MmuNotifier*> notifiers_ USVM_GUARDED_BY(list_lock_);
  bool released_ USVM_GUARDED_BY(list_lock_) = false;
};

}  // namespace usvm::mm

#endif  // USVM_MM_MMU_NOTIFIER_H_
