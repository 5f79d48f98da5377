// NotifyEvent and NotifierRange: what an invalidation tells its notifiers
// (the kernel's enum mmu_notifier_event and struct mmu_notifier_range).
// Shared by the classic notifiers (mmu_notifier.h) and the interval
// notifiers (mmu_interval_notifier.h).
#ifndef USVM_MM_MMU_NOTIFIER_RANGE_H_
#define USVM_MM_MMU_NOTIFIER_RANGE_H_

#include <cstdint>

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

}  // namespace usvm::mm

#endif  // USVM_MM_MMU_NOTIFIER_RANGE_H_
