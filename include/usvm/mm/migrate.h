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
// what cannot move: page-cache pages (every page of a shared mapping, and
// the not-yet-written pages of a private file mapping), pages with other
// users (forked copy-on-write, pinned), device pages of another owner, and
// pages the select flags exclude. A private file mapping's own copies
// (pages it has written) are anonymous and are collected. Empty and
// zero-page entries of private anonymous memory are collected with no
// source page (src without kMigratePfnValid): a destination page fills
// the hole; holes of file mappings are not.
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
//
// 2 MiB pages (kMigrateSelectCompound): a 2 MiB-aligned 2 MiB part of the
// range that one 2 MiB entry maps (a THP, or a 2 MiB device page), or that
// has no page table at all (an empty PMD of anonymous memory), is
// collected as one unit: src[i] = pfn | kMigratePfnCompound | ... for the
// first page and 0 for the other 511 (a hole: kMigratePfnMigrate |
// kMigratePfnCompound with no pfn). The caller then either
//   - fills dst[i] with a 2 MiB destination (MigratePfn(first, device) |
//     kMigratePfnCompound, 512 consecutive frames each with refcount 1):
//     the page moves whole and is mapped by one 2 MiB entry;
//   - or, when it cannot get 2 MiB, fills dst[i..i+511] with 4 KiB pages
//     (the fallback): Pages splits the source and each page moves alone;
//   - or leaves dst[i] 0: the unit stays where it is.
// A 2 MiB entry that cannot move whole (pinned or shared writable pages)
// is split and its pages are collected one by one. cpages counts 4 KiB
// pages. Without the flag every 2 MiB entry is split first.
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
// A 2 MiB page (MIGRATE_PFN_COMPOUND): set on the first word of 512; the
// other 511 words of that page are 0. The pfn is the first of 512
// consecutive frames, each with its own reference.
inline constexpr uint64_t kMigratePfnCompound = 1u << 5;
inline constexpr unsigned kMigratePfnShift = 6;

inline constexpr uint64_t MigratePfn(uint64_t pfn, bool device) {
  return (pfn << kMigratePfnShift) | kMigratePfnValid | (device ? kMigratePfnDevice : 0);
}
inline constexpr uint64_t MigratePfnOf(uint64_t word) { return word >> kMigratePfnShift; }

// Which source pages to collect.
inline constexpr uint32_t kMigrateSelectSystem = 1u << 0;
inline constexpr uint32_t kMigrateSelectDevicePrivate = 1u << 1;
inline constexpr uint32_t kMigrateSelectDeviceCoherent = 1u << 2;
// Collect 2 MiB pages whole (MIGRATE_VMA_SELECT_COMPOUND), see below.
inline constexpr uint32_t kMigrateSelectCompound = 1u << 3;

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
  // Left 0 inside MigrateToRam, Setup fills in the page of the fault this
  // thread is handling (the kernel requires the driver to pass it).
  uint64_t fault_page = 0;
  // Written by Setup: pages collected (kMigratePfnMigrate set).
  uint64_t cpages = 0;
  // Internal: the address space, set by Setup.
  void* internal = nullptr;
};

}  // namespace usvm::mm

#endif  // USVM_MM_MIGRATE_H_
