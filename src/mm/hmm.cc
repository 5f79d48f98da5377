// hmm_range_fault and its caller loop.
#include "usvm/mm/hmm.h"

#include <algorithm>

#include "usvm/mm/device_pagemap.h"

#include "address_space_impl.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm {

Result<void> AddressSpace::RangeFault(HmmRange& r) {
  if (!r.notifier || !r.hmm_pfns) return Err(Errc::kInval, "range fault: null notifier or pfns");
  if (!IsPageAligned(r.start) || !IsPageAligned(r.end) || r.start >= r.end)
    return Err(Errc::kInval, "range fault: bad range");
  if (r.start < r.notifier->start() || r.end > r.notifier->end())
    return Err(Errc::kInval, "range fault: range outside the notifier");
  // hmm_range_fault works on range->notifier->mm: a notifier of another
  // address space (or none) cannot describe this one.
  if (r.notifier->mm() != this)
    return Err(Errc::kInval, "range fault: notifier belongs to another address space");
  impl_->mmap_lock_.AssertReaderHeld();  // the caller's mmap_lock_, seen through Impl
  return impl_->RangeFaultLocked(r);
}

Result<void> AddressSpace::Impl::RangeFaultLocked(HmmRange& r) {
  USVM_TRY(CheckAliveLocked());
  uint64_t addr = r.start;
  for (;;) {
    // A walk restarts after every fault; an invalidation since ReadBegin
    // makes the whole snapshot stale.
    if (r.notifier->CheckRetry(r.notifier_seq)) return Err(Errc::kBusy, "range fault: notifier sequence moved");
    bool faulted = false;
    while (addr < r.end && !faulted) {
      uint64_t& word = r.hmm_pfns[(addr - r.start) >> kPageShift];
      const uint64_t req = (r.default_flags | (word & r.pfn_flags_mask)) & (kPfnReqFault | kPfnReqWrite);
      // hmm_pte_need_fault: nothing is faulted without kPfnReqFault;
      // kPfnReqWrite alone asks for nothing.
      const bool want_fault = req & kPfnReqFault;
      const bool want_write = want_fault && (req & kPfnReqWrite);
      const Vma* vma = FindVmaLocked(addr);
      if (!vma || vma->start > addr) {
        // A hole: up to the next VMA (or the end of the range).
        if (want_fault) return Err(Errc::kFault, "range fault: no mapping");
        const uint64_t stop = vma ? std::min(vma->start, r.end) : r.end;
        for (; addr < stop; addr += kPageSize) r.hmm_pfns[(addr - r.start) >> kPageShift] = kPfnError;
        continue;
      }
      if (vma->prot == kProtNone) {
        if (want_fault) return Err(Errc::kFault, "range fault: PROT_NONE mapping");
        const uint64_t stop = std::min(vma->end, r.end);
        for (; addr < stop; addr += kPageSize) r.hmm_pfns[(addr - r.start) >> kPageShift] = kPfnError;
        continue;
      }
      if (want_write && !(vma->prot & kProtWrite))
        return Err(Errc::kPerm, "range fault: write requested on a read-only mapping");

      // Fast path: a run of ordinary entries of one 2 MiB region, under one
      // acquisition of its page table lock. It stops at the first entry
      // that needs the per-page path below (a fault, a device, migration
      // or exclusive entry), which then takes that entry alone.
      if (PmdSlot* slot = pt_.Lookup(addr)) {
        const uint64_t first = addr;
        const uint64_t run_end = std::min({vma->end, r.end, (addr | (kHugePageSize - 1)) + 1});
        ReadLock l(slot->lock);
        const uint64_t h = slot->huge.load(std::memory_order_relaxed);
        const unsigned run_order = h != 0 ? kHugeShift - kPageShift : 0;
        while (addr < run_end && (h != 0 || slot->table)) {
          uint64_t& w = r.hmm_pfns[(addr - r.start) >> kPageShift];
          const uint64_t rq =
              (r.default_flags | (w & r.pfn_flags_mask)) & (kPfnReqFault | kPfnReqWrite);
          const bool wf = rq & kPfnReqFault;
          const bool ww = wf && (rq & kPfnReqWrite);
          const uint64_t pe = h != 0 ? pte::SubEntry(h, addr)
                                     : slot->table->e[PageTable::PteIndex(addr)].load(
                                           std::memory_order_relaxed);
          if (pte::KindOf(pe) == pte::kDevicePrivate || pte::IsExclusive(pe) ||
              pte::KindOf(pe) == pte::kMigration)
            break;
          const bool ok = pte::IsPresent(pe) && (pe & pte::kRead);
          const bool wr = ok && (pe & pte::kWrite);
          if ((wf && !ok) || (ww && !wr)) break;
          w = ok ? (kPfnValid | (wr ? kPfnWrite : 0) | (uint64_t{run_order} << kPfnOrderShift) |
                    ((pe & pte::kDevice) ? kPfnDevice : 0) | pte::PfnOf(pe))
                 : 0;
          addr += kPageSize;
        }
        if (addr != first) continue;
      }

      // Read the entry under its page table lock.
      uint64_t e = 0;
      unsigned order = 0;
      Pfn pfn = 0;
      if (PmdSlot* slot = pt_.Lookup(addr)) {
        ReadLock l(slot->lock);
        const uint64_t h = slot->huge.load(std::memory_order_relaxed);
        if (h != 0) {
          e = pte::SubEntry(h, addr);  // this page's view of the 2 MiB entry
          order = kHugeShift - kPageShift;
          pfn = pte::PfnOf(e);
        } else if (slot->table) {
          e = slot->table->e[PageTable::PteIndex(addr)].load(std::memory_order_relaxed);
          pfn = pte::PfnOf(e);
        }
      }
      if (pte::KindOf(e) == pte::kDevicePrivate) {
        DevicePagemap* pm = DevicePagemap::Lookup(pte::PfnOf(e));
        const bool mine = pm && r.dev_private_owner && pm->owner() == r.dev_private_owner;
        const bool dev_writable = e & pte::kWrite;
        if (mine) {
          // hmm_vma_handle_pte: the caller's own device page is reported
          // as it is, even read-only under a write request; the driver
          // sees no kPfnWrite and decides (nothing is migrated home).
          word = kPfnValid | kPfnDevice | (dev_writable ? kPfnWrite : 0) |
                 (uint64_t{order} << kPfnOrderShift) | pfn;
          addr += kPageSize;
          continue;
        }
        if (want_fault) {
          // Someone else's device memory: its owner migrates it to RAM.
          USVM_TRY(DeviceFaultLocked(addr, e));
          faulted = true;
          continue;
        }
        word = 0;
        addr += kPageSize;
        continue;
      }
      if (pte::IsExclusive(e)) {
        if (want_fault) {
          RestoreExclusiveLocked(addr, e);
          faulted = true;
          continue;
        }
        word = 0;
        addr += kPageSize;
        continue;
      }
      if (pte::KindOf(e) == pte::kMigration) {
        if (want_fault) {
          WaitMigrationLocked(addr, e);
          faulted = true;
          continue;
        }
        word = 0;
        addr += kPageSize;
        continue;
      }
      const bool valid = pte::IsPresent(e) && (e & pte::kRead);
      const bool writable = valid && (e & pte::kWrite);
      if ((want_fault && !valid) || (want_write && !writable)) {
        USVM_TRY(HandleFaultLocked(addr, want_write ? AccessKind::kWrite : AccessKind::kRead));
        faulted = true;  // look at this page again after the retry check
        continue;
      }
      if (!valid) {
        // Snapshot of an absent page (or one under migration).
        word = 0;
      } else {
        word = kPfnValid | (writable ? kPfnWrite : 0) | (uint64_t{order} << kPfnOrderShift) |
               ((e & pte::kDevice) ? kPfnDevice : 0) | pfn;
      }
      addr += kPageSize;
    }
    if (!faulted) return {};
  }
}

Result<void> RangeFaultAndCommit(AddressSpace& as, HmmRange& range,
                                 const std::function<Result<bool>(HmmRange&)>& commit,
                                 uint64_t timeout_ns) {
  if (!range.notifier) return Err(Errc::kInval, "range fault: null notifier");
  Env& env = as.env();
  const uint64_t deadline = env.NowNs() + timeout_ns;
  for (;;) {
    if (env.NowNs() > deadline) return Err(Errc::kTime, "range fault: timed out retrying");
    range.notifier_seq = range.notifier->ReadBegin();
    Result<void> r;
    {
      ReadLock l(as.mmap_lock());
      r = as.RangeFault(range);
    }
    if (!r) {
      if (r.error() == Errc::kBusy) continue;
      return r;
    }
    if (USVM_TRY(commit(range))) return {};
  }
}

}  // namespace usvm::mm
