// Migration by device frame: move device pages to system memory without
// knowing where they are mapped and without any mmap lock
// (mm/migrate_device.c: migrate_device_pfns / migrate_device_range,
// migrate_device_pages, migrate_device_finalize; drm_pagemap's
// evict_to_ram is built on them, and so is pagemap teardown here).
//
//   uint64_t src[n], dst[n];
//   USVM_TRY(MigrateDevicePfns(pgmap, pfns, n, src, dst));  // lock + unmap
//   for each i with src[i] & kMigratePfnMigrate:
//     Pfn p = allocate a system frame from `pool`; copy the device page;
//     dst[i] = MigratePfn(p, false);
//   MigrateDevicePages(pgmap, src, dst, n);                 // what can go
//   MigrateDeviceFinalize(pgmap, &pool, src, dst, n);       // remap, unlock
//
// MigrateDevicePfns takes, for each device page, a reference (none if the
// page is free) and the page lock (skipping a page another thread holds:
// a CPU fault, a MigrateVma, another eviction), then finds every CPU entry
// that maps it through the pagemap's reverse map -- in every address
// space, forked children included -- and replaces each with a migration
// entry, under a MIGRATE notification carrying the pagemap's owner in
// each address space, under that space's page table locks but not its
// mmap lock. A page with references other than its mappings (a CPU fault
// holding it, a pin, a page the driver holds unmapped) gets its entries
// restored and is not collected, as migrate_vma_check_page decides. CPU
// accesses to a collected page wait until Finalize, which points every
// mapper at the new system page (each mapping takes a reference on it;
// the caller's allocation reference is dropped), or restores the device
// entries when the page did not move, then unlocks the page and drops the
// references the entries and the migrator held (the last calls PageFree).
//
// src words: MigratePfn(dpfn, true) | kMigratePfnMigrate for a collected
// page, 0 otherwise (free, busy, or locked by someone else). dst words:
// system frames only (MigratePfn(pfn, false)); anything else, or no dst,
// leaves the page where it is.
//
// Locking: none held on entry; the calls take, per address space, the
// page table's free lock (shared; keeps tables from being freed by a
// concurrent munmap) and then page table locks, and the pagemap's rmap
// lock inside those (mmap lock -> page-table free lock -> page table
// lock -> rmap lock). Address spaces are kept alive by the strong
// references of RmapSnapshot while used. Mappings created after Setup
// (a fork copying a migration entry) are found through the rmap too.
// Every successful MigrateDevicePfns must be finalized.
#ifndef USVM_MM_MIGRATE_DEVICE_H_
#define USVM_MM_MIGRATE_DEVICE_H_

#include <cstdint>

#include "usvm/base/result.h"
#include "usvm/mm/device_pagemap.h"
#include "usvm/mm/migrate.h"

namespace usvm::mm {

class FramePool;

// migrate_device_pfns. EINVAL: null arrays, n == 0, or a pfn that is not
// a page of `pgmap`. Clears dst.
Result<void> MigrateDevicePfns(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n,
                               uint64_t* src, uint64_t* dst);
// migrate_device_range: pages [first, first + n) of pgmap (indices).
// EINVAL as above, or a range outside the pagemap.
Result<void> MigrateDeviceRange(DevicePagemap& pgmap, uint64_t first, uint64_t n, uint64_t* src,
                                uint64_t* dst);
// Pages and Finalize take src exactly as MigrateDevicePfns (or Range) of
// the same pgmap wrote it (not checked, as in the kernel), once.
//
// migrate_device_pages: clears kMigratePfnMigrate where dst is missing or
// not a system frame.
void MigrateDevicePages(DevicePagemap& pgmap, uint64_t* src, const uint64_t* dst, uint64_t n);
// migrate_device_finalize. `pool` is the frame pool the dst frames come
// from, which every address space mapping the pages uses (one simulated
// machine); it may be null only if no dst word is valid. Consumes the
// caller's reference on every valid dst frame.
void MigrateDeviceFinalize(DevicePagemap& pgmap, FramePool* pool, const uint64_t* src,
                           const uint64_t* dst, uint64_t n);

// drm_pagemap_evict_to_ram: the sequence above for `pfns`, copying with
// pgmap.ops().CopyToRam into frames of the mappers' pool. Returns the
// number of pages moved; pages that were busy, free, unmapped, or whose
// copy failed stay. ENOMEM: no system frame for a page (the pages not yet
// copied stay on the device; the rest are finalized). EINVAL as
// MigrateDevicePfns.
Result<uint64_t> EvictDevicePages(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n);

}  // namespace usvm::mm

#endif  // USVM_MM_MIGRATE_DEVICE_H_
