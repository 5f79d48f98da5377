#include "usvm/mm/mmu_notifier.h"

#include <algorithm>

namespace usvm::mm {

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

Result<void> MmuNotifierSubscriptions::Register(MmuNotifier* n) {
  if (!n) return Err(Errc::kInval, "null notifier");
  WriteLock l(list_lock_);
  if (released_) return Err(Errc::kSrch, "address space already released");
  if (std::find(notifiers_.begin(), notifiers_.end(), n) != notifiers_.end())
    return Err(Errc::kInval, "notifier already registered");
  notifiers_.push_back(n);
  return {};
}

Result<void> MmuNotifierSubscriptions::Unregister(MmuNotifier* n) {
  WriteLock l(list_lock_);
  auto it = std::find(notifiers_.begin(), notifiers_.end(), n);
  // After teardown every notifier was already unhooked by Release: like
  // mmu_notifier_unregister, that is not an error.
  if (it == notifiers_.end()) {
    if (released_) return {};
    return Err(Errc::kNoEnt, "notifier not registered");
  }
  notifiers_.erase(it);
  return {};
}

Result<void> MmuNotifierSubscriptions::InvalidateRangeStart(const NotifierRange& range) {
  ReadLock l(list_lock_);
  bool failed = false;
  for (MmuNotifier* n : notifiers_) {
    if (!n->InvalidateRangeStart(range)) {
      // Only legal for non-blockable ranges (the kernel WARNs otherwise and
      // carries on); every notifier still sees the start.
      if (!range.blockable) failed = true;
    }
  }
  if (failed) return Err(Errc::kAgain, "non-blockable invalidation would block");
  return {};
}

void MmuNotifierSubscriptions::InvalidateRangeEnd(const NotifierRange& range) {
  ReadLock l(list_lock_);
  for (MmuNotifier* n : notifiers_) n->InvalidateRangeEnd(range);
}

void MmuNotifierSubscriptions::Release() {
  std::vector<MmuNotifier*> list;
  {
    WriteLock l(list_lock_);
    released_ = true;
    list.swap(notifiers_);
  }
  for (MmuNotifier* n : list) n->Release(*mm_);
}

bool MmuNotifierSubscriptions::HasSubscribers() const {
  ReadLock l(list_lock_);
  return !notifiers_.empty();
}

}  // namespace usvm::mm
