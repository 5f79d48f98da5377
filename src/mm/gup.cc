// Lookups for callers that hold the mmap lock (vma_lookup, find_vma) and
// short-term get_user_pages (mm/gup.c without FOLL_PIN / FOLL_LONGTERM).
// Long-term pins are PinUserPages in fault.cc.
#include "address_space_impl.h"

namespace usvm::mm {

namespace {
// As fault.cc: a page that keeps changing under us reports EIO.
constexpr int kMaxGupRetries = 1000;
}  // namespace

// ---- vma_lookup / find_vma under the caller's lock ------------------------------

std::optional<VmaInfo> AddressSpace::VmaLookupLocked(uint64_t addr) const {
  impl_->mmap_lock_.AssertReaderHeld();  // the caller's mmap_lock_, seen through Impl
  const Vma* v = impl_->FindVmaLocked(addr);
  if (!v || v->start > addr) return std::nullopt;
  return v->Info();
}

std::optional<VmaInfo> AddressSpace::FindVmaLocked(uint64_t addr) const {
  impl_->mmap_lock_.AssertReaderHeld();
  const Vma* v = impl_->FindVmaLocked(addr);
  if (!v) return std::nullopt;
  return v->Info();
}

// ---- get_user_pages -------------------------------------------------------------

Result<void> AddressSpace::GetUserPages(uint64_t addr, uint64_t npages, bool write, Pfn* out) {
  if (!IsPageAligned(addr) || npages == 0 || !out)
    return Err(Errc::kInval, "gup: unaligned address, zero pages or null output");
  if (npages > (~uint64_t{0} - addr) >> kPageShift) return Err(Errc::kInval, "gup: range overflows");
  ReadLock l(mmap_lock_);
  impl_->mmap_lock_.AssertReaderHeld();
  return impl_->GupLocked(addr, npages, write, out);
}

void AddressSpace::PutUserPage(Pfn pfn) { impl_->PutGupPage(pfn); }

void AddressSpace::Impl::PutGupPage(Pfn pfn) {
  if (pfn == FramePool::kZeroPfn || pfn == kInvalidPfn) return;
  // A frame nobody holds is not ours to put: ignored rather than freed twice.
  if (pfn < pool_.frames()) {
    if (pool_.RefCount(pfn) > 0) pool_.Put(pfn);
    return;
  }
  if (DevicePagemap* pm = DevicePagemap::Lookup(pfn))
    if (pm->RefCount(pm->IndexOf(pfn)) > 0) pm->Put(pm->IndexOf(pfn));
}

Result<void> AddressSpace::Impl::GupLocked(uint64_t addr, uint64_t npages, bool write, Pfn* out) {
  USVM_TRY(CheckAliveLocked());
  uint64_t got = 0;
  auto unwind = [&] {
    for (uint64_t i = 0; i < got; ++i) PutGupPage(out[i]);
  };
  while (got < npages) {
    const uint64_t a = addr + (got << kPageShift);
    for (int tries = 0;; ++tries) {
      if (tries == kMaxGupRetries) {
        unwind();
        return Err(Errc::kIo, "gup: fault made no progress");
      }
      // follow_page: a present entry with the access rights we need is
      // used as is; anything else (none, device-private, migration,
      // exclusive, read-only for a write, PROT_NONE) goes through the
      // fault handler, which also applies the VMA's rules (EFAULT).
      const uint64_t e = ReadEntryLocked(a);
      const bool ok = pte::IsPresent(e) && (e & pte::kRead) && (!write || (e & pte::kWrite));
      if (!ok) {
        auto r = HandleFaultLocked(a, write ? AccessKind::kWrite : AccessKind::kRead);
        if (!r) {
          unwind();
          return Err(r.error());
        }
        continue;
      }
      // Take the reference under the page table lock, if the entry is
      // still the one we looked at.
      PmdSlot* slot = pt_.Lookup(a);
      if (!slot) continue;
      ReadLock sl(slot->lock);
      const uint64_t h = slot->huge.load(std::memory_order_relaxed);
      // A 2 MiB entry is compared as its 4 KiB view, as ReadEntryLocked
      // returns it.
      const uint64_t cur =
          h != 0 ? pte::SubEntry(h, a)
                 : (slot->table ? slot->table->e[PageTable::PteIndex(a)].load(std::memory_order_relaxed) : 0);
      if (cur != e) continue;
      Pfn pfn;
      if (e & pte::kZero) {
        pfn = FramePool::kZeroPfn;  // never freed: no reference needed
      } else if (e & pte::kDevice) {
        // Device-coherent memory: returned where it is (only long-term
        // pins move it home).
        pfn = pte::PfnOf(e);
        DevicePagemap* pm = DevicePagemap::Lookup(pfn);
        if (!pm) continue;
        pm->Get(pm->IndexOf(pfn));
      } else {
        pfn = pte::PfnOf(e);
        pool_.Get(pfn);
      }
      out[got++] = pfn;
      break;
    }
  }
  return {};
}

}  // namespace usvm::mm
