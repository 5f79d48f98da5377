#include "usvm/gpu/page_table.h"

#include <algorithm>
#include <cstring>

namespace usvm::gpu {

// A table page: 512 entries. An entry is 0 (empty), a leaf Pte (bit 0
// set) or a pointer to the next-level Table (bit 0 clear, non-zero).
struct PageTable::Table {
  uint64_t e[512];
  uint32_t used;  // non-empty entries
};

namespace {

constexpr int kLevels = 4;
constexpr uint64_t kCachedTables = 64;

constexpr uint32_t Shift(int level) { return 12 + 9 * level; }
constexpr uint64_t Span(int level) { return uint64_t{1} << Shift(level); }
constexpr uint32_t Index(uint64_t va, int level) { return (va >> Shift(level)) & 511; }
constexpr bool IsLeaf(uint64_t e) { return e & 1; }

// The level whose entries are leaves of `size`.
constexpr int LeafLevel(PageSize size) { return size == PageSize::k2M ? 1 : 0; }

Result<void> CheckRange(uint64_t start, uint64_t size) {
  if (size == 0) return Err(Errc::kInval, "empty range");
  if ((start | size) & (kPageSize - 1)) return Err(Errc::kInval, "range not 4 KiB aligned");
  if (start >= kVaLimit || size > kVaLimit - start) return Err(Errc::kInval, "range beyond 48 bits");
  return {};
}

}  // namespace

PageTable::PageTable(uint32_t gpu_id, Env& env, PhysCheck check, uint64_t max_table_pages)
    : gpu_id_(gpu_id), env_(env), check_(std::move(check)), max_table_pages_(max_table_pages) {}

PageTable::~PageTable() {
  WriteLock l(lock_);
  if (root_) {
    ClearLocked(root_, kLevels - 1, 0, 0, kVaLimit, /*free_tables=*/true);
    FreeTableLocked(root_);
    root_ = nullptr;
  }
  for (Table* t : free_tables_) delete t;
  free_tables_.clear();
}

Result<PageTable::Table*> PageTable::AllocTableLocked() {
  if (max_table_pages_ && table_pages_ >= max_table_pages_)
    return Err(Errc::kNoMem, "page-table page limit reached");
  if (env_.ShouldFail("gpu.pt_alloc")) return Err(Errc::kNoMem, "injected page-table allocation failure");
  Table* t;
  if (!free_tables_.empty()) {
    t = free_tables_.back();
    free_tables_.pop_back();
  } else {
    t = new (std::nothrow) Table;
    if (!t) return Err(Errc::kNoMem, "out of memory for a page-table page");
  }
  std::memset(t, 0, sizeof(*t));
  ++table_pages_;
  return t;
}

void PageTable::FreeTableLocked(Table* t) {
  --table_pages_;
  if (free_tables_.size() < kCachedTables) free_tables_.push_back(t); else delete t;
}

std::optional<Mapping> PageTable::FindLeafLocked(uint64_t va) const {
  const Table* t = root_;
  for (int level = kLevels - 1; t && level >= 0; --level) {
    const uint32_t idx = Index(va, level);
    const uint64_t e = t->e[idx];
    if (e == 0) return std::nullopt;
    if (!IsLeaf(e)) {
      t = reinterpret_cast<const Table*>(e);
      continue;
    }
    const Pte pte(e);
    const uint64_t bytes = level == 1 ? k2M : PageBytes(pte.size());
    const uint64_t base = va & ~(bytes - 1);
    if (bytes == k64K) return Mapping{base, bytes, Pte(t->e[idx & ~15u])};
    return Mapping{base, bytes, pte};
  }
  return std::nullopt;
}

bool PageTable::AnyLeafLocked(const Table* t, int level, uint64_t base, uint64_t start, uint64_t end) const {
  const uint64_t span = Span(level);
  const uint64_t first = start <= base ? 0 : (start - base) / span;
  for (uint64_t i = first; i < 512; ++i) {
    const uint64_t eb = base + i * span;
    if (eb >= end) break;
    const uint64_t e = t->e[i];
    if (e == 0) continue;
    if (IsLeaf(e)) return true;
    if (AnyLeafLocked(reinterpret_cast<const Table*>(e), level - 1, eb, std::max(start, eb),
                      std::min(end, eb + span)))
      return true;
  }
  return false;
}

void PageTable::ClearLocked(Table* t, int level, uint64_t base, uint64_t start, uint64_t end,
                            bool free_tables) {
  const uint64_t span = Span(level);
  const uint64_t first = start <= base ? 0 : (start - base) / span;
  for (uint64_t i = first; i < 512; ++i) {
    const uint64_t eb = base + i * span;
    if (eb >= end) break;
    uint64_t& e = t->e[i];
    if (e == 0) continue;
    if (IsLeaf(e)) {
      e = 0;
      --t->used;
      continue;
    }
    Table* child = reinterpret_cast<Table*>(e);
    ClearLocked(child, level - 1, eb, std::max(start, eb), std::min(end, eb + span), free_tables);
    if (free_tables && child->used == 0) {
      FreeTableLocked(child);
      e = 0;
      --t->used;
    }
  }
}

Result<void> PageTable::CheckRangesLocked(std::span<const VaRange> ranges) const {
  if (ranges.empty()) return Err(Errc::kInval, "no ranges");
  for (const VaRange& r : ranges) {
    USVM_TRY(CheckRange(r.start, r.size));
    if (auto m = FindLeafLocked(r.start); m && m->va < r.start)
      return Err(Errc::kInval, "range splits a large page");
    const uint64_t end = r.start + r.size;
    if (auto m = FindLeafLocked(end - 1); m && m->va + m->size > end)
      return Err(Errc::kInval, "range splits a large page");
  }
  return {};
}

Result<PageTable::Table*> PageTable::EnsurePathLocked(uint64_t va, int leaf_level,
                                                      std::vector<NewTable>* created) {
  if (!root_) {
    root_ = USVM_TRY(AllocTableLocked());
    created->push_back({nullptr, 0});
  }
  Table* t = root_;
  for (int level = kLevels - 1; level > leaf_level; --level) {
    const uint32_t idx = Index(va, level);
    uint64_t& e = t->e[idx];
    if (e == 0) {
      Table* child = USVM_TRY(AllocTableLocked());
      e = reinterpret_cast<uint64_t>(child);
      ++t->used;
      created->push_back({t, idx});
    } else if (IsLeaf(e)) {
      return Err(Errc::kInval, "bind splits a large page");  // excluded by validation
    }
    t = reinterpret_cast<Table*>(e);
  }
  return t;
}

Result<void> PageTable::Bind(std::span<const BindOp> ops, BindMode mode) {
  if (ops.empty()) return Err(Errc::kInval, "no bind ops");
  if (mode != BindMode::kNoReplace && mode != BindMode::kReplace) return Err(Errc::kInval, "bad bind mode");
  // 1. Arguments.
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  spans.reserve(ops.size());
  for (const BindOp& op : ops) {
    if (static_cast<uint8_t>(op.size) > static_cast<uint8_t>(PageSize::k2M))
      return Err(Errc::kInval, "bad page size");
    const uint64_t bytes = PageBytes(op.size);
    if (op.va & (bytes - 1)) return Err(Errc::kInval, "va not aligned to the page size");
    if (op.va >= kVaLimit || bytes > kVaLimit - op.va) return Err(Errc::kInval, "va beyond 48 bits");
    if (op.pa.addr & (bytes - 1)) return Err(Errc::kInval, "physical address not aligned to the page size");
    if (op.pa.kind != MemKind::kSystem && op.pa.kind != MemKind::kVram)
      return Err(Errc::kInval, "bad memory kind");
    if (op.pa.kind == MemKind::kVram && op.pa.gpu >= kMaxGpus) return Err(Errc::kInval, "bad GPU id");
    if (op.prot & ~uint32_t(kProtWrite | kProtAtomic)) return Err(Errc::kInval, "bad protection bits");
    if (op.pa.addr > UINT64_MAX - bytes) return Err(Errc::kInval, "physical range overflows");
    if (check_) USVM_TRY(check_(op.pa, bytes));
    spans.emplace_back(op.va, op.va + bytes);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return Err(Errc::kInval, "bind ops overlap");

  WriteLock l(lock_);
  // 2. Conflicts with existing leaves.
  for (const BindOp& op : ops) {
    const uint64_t bytes = PageBytes(op.size);
    if (mode == BindMode::kNoReplace) {
      if (root_ && AnyLeafLocked(root_, kLevels - 1, 0, op.va, op.va + bytes))
        return Err(Errc::kExist, "range already mapped");
    } else if (auto m = FindLeafLocked(op.va); m && (m->va < op.va || m->va + m->size > op.va + bytes)) {
      return Err(Errc::kInval, "bind splits a large page");
    }
  }
  // 3. Table pages; undone on failure, so nothing has changed.
  std::vector<NewTable> created;
  std::vector<Table*> leaf_tables;
  leaf_tables.reserve(ops.size());
  for (const BindOp& op : ops) {
    Result<Table*> t = EnsurePathLocked(op.va, LeafLevel(op.size), &created);
    if (!t) {
      for (auto it = created.rbegin(); it != created.rend(); ++it) {
        if (!it->parent) {
          FreeTableLocked(root_);
          root_ = nullptr;
        } else {
          FreeTableLocked(reinterpret_cast<Table*>(it->parent->e[it->index]));
          it->parent->e[it->index] = 0;
          --it->parent->used;
        }
      }
      return Err(t.error());
    }
    leaf_tables.push_back(*t);
  }
  // 4. Leaves. Cannot fail.
  for (size_t i = 0; i < ops.size(); ++i) {
    const BindOp& op = ops[i];
    Table* t = leaf_tables[i];
    const PteKind kind = op.pa.kind == MemKind::kSystem ? PteKind::kSystem
                         : op.pa.gpu == gpu_id_       ? PteKind::kLocalVram
                                                      : PteKind::kPeerVram;
    const uint32_t peer = kind == PteKind::kPeerVram ? op.pa.gpu : 0;
    const int level = LeafLevel(op.size);
    const uint32_t idx = Index(op.va, level);
    const uint32_t n = op.size == PageSize::k64K ? 16 : 1;
    for (uint32_t j = 0; j < n; ++j) {
      uint64_t& e = t->e[idx + j];
      if (e != 0 && !IsLeaf(e)) {  // a 2 MiB leaf replaces a level-0 table
        Table* child = reinterpret_cast<Table*>(e);
        ClearLocked(child, 0, op.va, op.va, op.va + k2M, true);
        FreeTableLocked(child);
        e = 0;
        --t->used;
      }
      if (e == 0) ++t->used;
      e = Pte::Make(kind, peer, op.pa.addr + j * kPageSize, op.size, op.prot).raw();
    }
  }
  return {};
}

Result<void> PageTable::Zap(std::span<const VaRange> ranges) {
  WriteLock l(lock_);
  USVM_TRY(CheckRangesLocked(ranges));
  if (!root_) return {};
  for (const VaRange& r : ranges) ClearLocked(root_, kLevels - 1, 0, r.start, r.start + r.size, false);
  return {};
}

Result<void> PageTable::Unbind(std::span<const VaRange> ranges) {
  WriteLock l(lock_);
  USVM_TRY(CheckRangesLocked(ranges));
  if (!root_) return {};
  for (const VaRange& r : ranges) ClearLocked(root_, kLevels - 1, 0, r.start, r.start + r.size, true);
  if (root_->used == 0) {
    FreeTableLocked(root_);
    root_ = nullptr;
  }
  return {};
}

Result<Mapping> PageTable::Walk(uint64_t va) const {
  if (va >= kVaLimit) return Err(Errc::kInval, "va beyond 48 bits");
  ReadLock l(lock_);
  auto m = FindLeafLocked(va);
  if (!m) return Err(Errc::kNoEnt, "not mapped");
  return *m;
}

uint64_t PageTable::table_pages() const {
  ReadLock l(lock_);
  return table_pages_;
}

void PageTable::CollectLocked(const Table* t, int level, uint64_t base, std::vector<Mapping>* out) const {
  for (uint32_t i = 0; i < 512; ++i) {
    const uint64_t e = t->e[i];
    const uint64_t eb = base + i * Span(level);
    if (e == 0) continue;
    if (!IsLeaf(e)) {
      CollectLocked(reinterpret_cast<const Table*>(e), level - 1, eb, out);
      continue;
    }
    const Pte pte(e);
    if (level == 1) {
      out->push_back({eb, k2M, pte});
    } else if (pte.size() == PageSize::k64K) {
      if (i % 16 == 0) out->push_back({eb, k64K, pte});
    } else {
      out->push_back({eb, kPageSize, pte});
    }
  }
}

std::vector<Mapping> PageTable::DebugMappings() const {
  std::vector<Mapping> out;
  ReadLock l(lock_);
  if (root_) CollectLocked(root_, kLevels - 1, 0, &out);
  return out;
}

Result<void> PageTable::CheckTableLocked(const Table* t, int level) const {
  uint32_t used = 0;
  for (uint32_t i = 0; i < 512; ++i) {
    const uint64_t e = t->e[i];
    if (e == 0) continue;
    ++used;
    if (IsLeaf(e)) {
      const Pte pte(e);
      if (level >= 2) return Err(Errc::kIo, "leaf above level 1");
      if (level == 1 && pte.size() != PageSize::k2M) return Err(Errc::kIo, "level-1 leaf not 2 MiB");
      if (level == 0 && pte.size() == PageSize::k2M) return Err(Errc::kIo, "2 MiB leaf at level 0");
      if (level == 0 && pte.size() == PageSize::k64K) {
        const Pte head(t->e[i & ~15u]);
        if (!head.valid() || head.size() != PageSize::k64K ||
            pte.phys() != head.phys() + (i % 16) * kPageSize ||
            (pte.raw() & 0xfff) != (head.raw() & 0xfff))
          return Err(Errc::kIo, "broken 64 KiB leaf");
      }
      continue;
    }
    if (level == 0) return Err(Errc::kIo, "table pointer at level 0");
    USVM_TRY(CheckTableLocked(reinterpret_cast<const Table*>(e), level - 1));
  }
  if (used != t->used) return Err(Errc::kIo, "used count mismatch");
  return {};
}

Result<void> PageTable::DebugCheck() const {
  ReadLock l(lock_);
  if (!root_) return table_pages_ == 0 ? Result<void>() : Err(Errc::kIo, "pages counted without a root");
  return CheckTableLocked(root_, kLevels - 1);
}

}  // namespace usvm::gpu
