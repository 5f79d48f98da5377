#include "page_table.h"

namespace usvm::mm {

PageTable::~PageTable() {
  for (auto& pg : pgd_) {
    PudTable* pud = pg.load(std::memory_order_relaxed);
    if (!pud) continue;
    for (auto& pe : pud->e) {
      PmdTable* pmd = pe.load(std::memory_order_relaxed);
      if (!pmd) continue;
      for (auto& slot : pmd->slot) {
        slot.lock.Lock();
        delete slot.table;
        slot.table = nullptr;
        slot.lock.Unlock();
      }
      delete pmd;
    }
    delete pud;
  }
}

PmdSlot* PageTable::Ensure(uint64_t addr) {
  auto& pg = pgd_[addr >> 39];
  PudTable* pud = pg.load(std::memory_order_acquire);
  if (!pud) {
    auto* fresh = new PudTable();
    if (pg.compare_exchange_strong(pud, fresh, std::memory_order_acq_rel)) {
      pud = fresh;
      tables_.fetch_add(1, std::memory_order_relaxed);
    } else {
      delete fresh;  // another fault installed one; pud now holds it
    }
  }
  auto& pe = pud->e[(addr >> 30) & 511];
  PmdTable* pmd = pe.load(std::memory_order_acquire);
  if (!pmd) {
    auto* fresh = new PmdTable();
    if (pe.compare_exchange_strong(pmd, fresh, std::memory_order_acq_rel)) {
      pmd = fresh;
      tables_.fetch_add(1, std::memory_order_relaxed);
    } else {
      delete fresh;
    }
  }
  return &pmd->slot[(addr >> kHugeShift) & 511];
}

void PageTable::InstallTableLocked(PmdSlot& slot) {
  auto* t = new PteTable();
  const uint64_t h = slot.huge.load(std::memory_order_relaxed);
  if (h != 0) {
    // Split: 512 entries for the same frames with the same bits.
    const Pfn base = pte::PfnOf(h);
    const uint64_t flags = h & pte::kFlagsMask;
    for (unsigned i = 0; i < kEntriesPerTable; ++i)
      t->e[i].store(pte::Make(pte::KindOf(h), base + i, flags & ~pte::kKindMask),
                    std::memory_order_relaxed);
    slot.huge.store(0, std::memory_order_relaxed);
  }
  slot.table = t;
  tables_.fetch_add(1, std::memory_order_relaxed);
}

void PageTable::ReplaceTableLocked(PmdSlot& slot, uint64_t huge) {
  delete slot.table;
  slot.table = nullptr;
  tables_.fetch_sub(1, std::memory_order_relaxed);
  slot.huge.store(huge, std::memory_order_relaxed);
}

void PageTable::FreeEmpty(uint64_t start, uint64_t end) {
  WriteLock fl(free_lock_);
  // PTE tables of the 2 MiB regions the range touches.
  ForEachSlot(start, end, [&](uint64_t, PmdSlot& slot) {
    slot.lock.Lock();
    if (slot.table) {
      bool empty = true;
      for (auto& e : slot.table->e)
        if (e.load(std::memory_order_relaxed) != 0) {
          empty = false;
          break;
        }
      if (empty) {
        delete slot.table;
        slot.table = nullptr;
        tables_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    slot.lock.Unlock();
  });
  // PMD tables (and then PUD tables) only for 1 GiB regions the range
  // covers whole, like free_pgtables' floor/ceiling: a partial unmap leaves
  // the upper levels for the neighbours.
  constexpr uint64_t kGiB = uint64_t{1} << 30;
  const uint64_t lo = (start + kGiB - 1) & ~(kGiB - 1);
  const uint64_t hi = end & ~(kGiB - 1);
  for (uint64_t a = lo; a < hi; a += kGiB) {
    auto& pg = pgd_[a >> 39];
    PudTable* pud = pg.load(std::memory_order_relaxed);
    if (!pud) continue;
    auto& pe = pud->e[(a >> 30) & 511];
    PmdTable* pmd = pe.load(std::memory_order_relaxed);
    if (!pmd) continue;
    bool empty = true;
    for (auto& slot : pmd->slot) {
      slot.lock.Lock();
      if (slot.table || slot.huge.load(std::memory_order_relaxed) != 0) empty = false;
      slot.lock.Unlock();
      if (!empty) break;
    }
    if (!empty) continue;
    pe.store(nullptr, std::memory_order_relaxed);
    delete pmd;
    tables_.fetch_sub(1, std::memory_order_relaxed);
    bool pud_empty = true;
    for (auto& x : pud->e)
      if (x.load(std::memory_order_relaxed)) {
        pud_empty = false;
        break;
      }
    if (pud_empty) {
      pg.store(nullptr, std::memory_order_relaxed);
      delete pud;
      tables_.fetch_sub(1, std::memory_order_relaxed);
    }
  }
}

}  // namespace usvm::mm
