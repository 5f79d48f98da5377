// MigrateVma: move the pages of a range between system memory and device
// memory (mm/migrate_device.c: migrate_vma_setup / _pages / _finalize).
//
//   MigrateVma m{.start = s, .end = e, .src = src, .dst = dst,
//                .pgmap_owner = me, .flags = kMigrateSelectSystem};
//   ReadLock l(as.mmap_lock());
//   USVM_TRY(as.MigrateVmaSetup(m));       // collect; MIGRATE notification
//   for each i with src[i] & kMigratePfnMigrate:
//     allocate a destination page, copy the bytes (src 0 = a hole: zero),
//     dst[i] = MigratePfn(dpfn, device) | (src[i] & kMigratePfnWrite);
//   as.MigrateVmaPages(m);                 // commit what can be committed
//   as.MigrateVmaFinalize(m);              // remap; unused dst pages freed
//
// Setup installs migration entries over every collected page: CPU accesses
// to them wait until Finalize. It skips (clears kMigratePfnMigrate for)
// what cannot move: shared and file-backed pages, pages with other users
// (forked copy-on-write, pinned), device pages of another owner, and pages
// the select flags exclude. Empty and zero-page entries of private
// anonymous memory are collected with no source page (src without
// kMigratePfnValid): a destination page fills the hole.
//
// The notification carries NotifyEvent::kMigrate and pgmap_owner, so a
// driver can ignore invalidations caused by its own migrations.
//
// Device pages are locked (DevicePagemap::TryLockPage) while collected:
// Setup skips a device page another thread holds locked (a CPU fault, or
// another migrator), except `fault_page`, which the caller (MigrateToRam,
// called by the CPU fault path) already holds locked and referenced, as
// the kernel's migrate_vma_collect does. Finalize unlocks what Setup
// locked, never the fault page.
#ifndef USVM_MM_MIGRATE_H_
#define USVM_MM_MIGRATE_H_

#include <cstdint>

#include "usvm/mm/types.h"

namespace usvm::mm {

struct VmaInfo;

// src/dst words: flags in the low bits, the frame number above.
inline constexpr uint64_t kMigratePfnValid = 1u << 0;
inline constexpr uint64_t kMigratePfnMigrate = 1u << 1;
inline constexpr uint64_t kMigratePfnWrite = 1u << 3;
inline constexpr uint64_t kMigratePfnDevice = 1u << 4;  // the pfn is a DevicePfn
inline constexpr unsigned kMigratePfnShift = 6;

inline constexpr uint64_t MigratePfn(uint64_t pfn, bool device) {
  return (pfn << kMigratePfnShift) | kMigratePfnValid | (device ? kMigratePfnDevice : 0);
}
inline constexpr uint64_t MigratePfnOf(uint64_t word) { return word >> kMigratePfnShift; }

// Which source pages to collect.
inline constexpr uint32_t kMigrateSelectSystem = 1u << 0;
inline constexpr uint32_t kMigrateSelectDevicePrivate = 1u << 1;
inline constexpr uint32_t kMigrateSelectDeviceCoherent = 1u << 2;

struct MigrateVma {
  uint64_t start = 0;  // page aligned, inside one VMA
  uint64_t end = 0;
  uint64_t* src = nullptr;  // (end - start) / 4096 words, written by Setup
  uint64_t* dst = nullptr;  // filled by the caller before Pages
  const void* pgmap_owner = nullptr;
  uint32_t flags = 0;
  // The VMA the caller looked the range up in (struct migrate_vma.vma).
  // Optional here (the lookup needs the mmap lock the caller already
  // holds); if set, Setup checks that it is the VMA holding [start, end):
  // EINVAL otherwise.
  const VmaInfo* vma = nullptr;
  // The DevicePfn whose CPU fault led here (migrate_to_ram's
  // vmf->page), or 0: locked and referenced by the fault path. Setup:
  // EINVAL if it is not a page of a registered pagemap or not locked.
  uint64_t fault_page = 0;
  // Written by Setup: pages collected (kMigratePfnMigrate set).
  uint64_t cpages = 0;
  // Internal: the address space, set by Setup.
  void* internal = nullptr;
};

}  // namespace usvm::mm

#endif  // USVM_MM_MIGRATE_H_
