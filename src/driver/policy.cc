// The shipped policies (policy.h) and their registry by name.
#include "usvm/driver/policy.h"

#include <algorithm>
#include <map>

namespace usvm::driver {

namespace {

constexpr uint64_t kPage = uint64_t{1} << 12;

// Pages set in b within [first, first + n).
uint32_t CountIn(const std::bitset<kBlockPages>& b, uint32_t first, uint32_t n) {
  uint32_t c = 0;
  for (uint32_t i = first; i < first + n; ++i) c += b[i];
  return c;
}

// The largest aligned subtree of the block, of at least `min_pages` pages,
// around page `leaf` whose share of `bits` exceeds threshold%: its span
// clamped to [b.lo, b.hi), or empty.
VaSpan LargestDenseSubtree(const BlockState& b, const std::bitset<kBlockPages>& bits, uint32_t leaf,
                           uint32_t min_pages, uint32_t threshold) {
  VaSpan best;
  for (uint32_t size = min_pages; size <= kBlockPages; size *= 2) {
    const uint32_t first = leaf & ~(size - 1);
    // uvm_perf_prefetch.c: counter * 100 > subregion_pages * threshold.
    if (uint64_t{CountIn(bits, first, size)} * 100 > uint64_t{size} * threshold)
      best = {b.start + first * kPage, b.start + (first + size) * kPage};
  }
  if (best.empty()) return best;
  best.start = std::max(best.start, b.lo);
  best.end = std::min(best.end, b.hi);
  return best;
}

uint32_t LeafOf(const BlockState& b) {
  return static_cast<uint32_t>(((b.fault_va & ~(kPage - 1)) - b.start) / kPage) % kBlockPages;
}

}  // namespace

// ---- migration ----------------------------------------------------------------

VaSpan DensityMigration::Expand(const BlockState& b) const {
  const uint32_t leaf = LeafOf(b);
  std::bitset<kBlockPages> bits = b.resident;
  bits.set(leaf);  // the faulting page counts (UVM: resident or faulted)
  return LargestDenseSubtree(b, bits, leaf, 1, threshold_);
}

VaSpan TreeMigration::Expand(const BlockState& b) const {
  const uint32_t leaf = LeafOf(b);
  const uint32_t first = leaf & ~(kLeafPages - 1);
  // The faulting page's 64 KiB basic block comes whole ...
  std::bitset<kBlockPages> bits = b.resident;
  for (uint32_t i = first; i < first + kLeafPages; ++i) bits.set(i);
  VaSpan s = LargestDenseSubtree(b, bits, leaf, 2 * kLeafPages, threshold_);
  const VaSpan basic{std::max(b.start + first * kPage, b.lo), std::min(b.start + (first + kLeafPages) * kPage, b.hi)};
  // ... and a denser node above it, if any.
  if (s.empty()) return basic;
  return {std::min(s.start, basic.start), std::max(s.end, basic.end)};
}

// ---- eviction ------------------------------------------------------------------

size_t LfuEviction::PickVictim(std::span<const EvictCandidate> c) const {
  size_t best = 0;
  for (size_t i = 1; i < c.size(); ++i)
    if (c[i].uses < c[best].uses) best = i;  // strict: ties keep the list (LRU) order
  return best;
}

size_t PseudoLruEviction::PickVictim(std::span<const EvictCandidate> c) const {
  struct Root {
    uint64_t bytes = 0;
    uint64_t populated = 0;  // last population in it
  };
  std::map<uint64_t, Root> roots;
  for (const EvictCandidate& e : c) {
    Root& r = roots[e.vram_offset / kRootChunk];
    r.bytes += e.size;
    r.populated = std::max(r.populated, e.populated);
  }
  // Unused (not full) root chunks first, then used ones; oldest first.
  uint64_t pick = 0;
  bool have = false, pick_unused = false;
  uint64_t pick_pop = 0;
  for (const auto& [idx, r] : roots) {
    const bool unused = r.bytes < kRootChunk;
    if (!have || (unused && !pick_unused) || (unused == pick_unused && r.populated < pick_pop)) {
      pick = idx;
      pick_unused = unused;
      pick_pop = r.populated;
      have = true;
    }
  }
  size_t best = c.size();
  for (size_t i = 0; i < c.size(); ++i) {
    if (c[i].vram_offset / kRootChunk != pick) continue;
    if (best == c.size() || c[i].populated < c[best].populated) best = i;
  }
  return best == c.size() ? 0 : best;
}

// ---- thrashing ------------------------------------------------------------------

ThrashDecision UvmThrashing::OnMigrate(uint64_t block, uint32_t first_page, uint32_t npages, uint32_t gpu,
                                       uint64_t now_ns) {
  (void)gpu;
  MutexLock l(lock_);
  Block& b = blocks_[block];
  if (b.pinned_until > now_ns) {
    ++stats_.pinned_faults;
    return {ThrashAction::kPin, 0, false};
  }
  const uint64_t epoch = uint64_t{p_.epoch_lapses} * p_.lapse_ns;
  if (b.in.none() || now_ns - b.epoch_start >= epoch) {
    // A new epoch: counts start again.
    b = Block{};
    b.epoch_start = now_ns;
  }
  bool back = false;
  for (uint32_t i = first_page; i < first_page + npages && i < kBlockPages; ++i) {
    back |= b.in[i];
    b.in.set(i);
  }
  if (!back) return {};
  // A thrashing event: pages this epoch already brought to a GPU came back.
  ++b.events;
  ++stats_.events;
  if (b.events < p_.thrashing_threshold) return {};
  if (b.throttles >= p_.pin_threshold) {
    b.pinned_until = now_ns + uint64_t{p_.pin_lapses} * p_.lapse_ns;
    b.events = 0;
    b.throttles = 0;
    b.in.reset();
    ++stats_.pins;
    ++stats_.pinned_faults;
    return {ThrashAction::kPin, 0, true};
  }
  ++b.throttles;
  ++stats_.throttles;
  const uint64_t nap = uint64_t{p_.nap_lapses} * p_.lapse_ns;
  b.throttled_until = now_ns + nap;
  return {ThrashAction::kThrottle, nap, false};
}

void UvmThrashing::NoteMigrated(uint64_t block, uint32_t first_page, uint32_t npages, uint64_t now_ns) {
  MutexLock l(lock_);
  Block& b = blocks_[block];
  const uint64_t epoch = uint64_t{p_.epoch_lapses} * p_.lapse_ns;
  if (b.pinned_until <= now_ns && (b.in.none() || now_ns - b.epoch_start >= epoch)) {
    const uint64_t pinned = b.pinned_until;
    b = Block{};
    b.pinned_until = pinned;
    b.epoch_start = now_ns;
  }
  for (uint32_t i = first_page; i < first_page + npages && i < kBlockPages; ++i) b.in.set(i);
}

ThrashAction UvmThrashing::Hint(uint64_t block, uint64_t now_ns) const {
  MutexLock l(lock_);
  auto it = blocks_.find(block);
  if (it == blocks_.end()) return ThrashAction::kNone;
  if (it->second.pinned_until > now_ns) return ThrashAction::kPin;
  if (it->second.throttled_until > now_ns) return ThrashAction::kThrottle;
  return ThrashAction::kNone;
}

ThrashStats UvmThrashing::stats() const {
  MutexLock l(lock_);
  return stats_;
}

bool UvmThrashing::Pinned(uint64_t block, uint64_t now_ns) const {
  MutexLock l(lock_);
  auto it = blocks_.find(block);
  return it != blocks_.end() && it->second.pinned_until > now_ns;
}

// ---- by name ------------------------------------------------------------------------

std::vector<std::string> MigrationPolicyNames() { return {"fault-only", "density", "tree"}; }
std::vector<std::string> EvictionPolicyNames() { return {"lru", "lfu", "pseudo-lru"}; }
std::vector<std::string> ThrashingPolicyNames() { return {"none", "uvm"}; }
std::vector<std::string> AccessCounterPolicyNames() { return {"off", "on"}; }

Result<std::unique_ptr<MigrationPolicy>> MakeMigrationPolicy(std::string_view name, const PolicyParams& p) {
  if (p.density_threshold < 1 || p.density_threshold > 100 || p.tree_threshold < 1 || p.tree_threshold > 100)
    return Err(Errc::kInval, "driver: migration policy thresholds must be 1..100");
  if (name == "fault-only") return std::unique_ptr<MigrationPolicy>(new FaultOnlyMigration);
  if (name == "density") return std::unique_ptr<MigrationPolicy>(new DensityMigration(p.density_threshold));
  if (name == "tree") return std::unique_ptr<MigrationPolicy>(new TreeMigration(p.tree_threshold));
  return Err(Errc::kInval, "driver: unknown migration policy (fault-only, density, tree)");
}

Result<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name) {
  if (name == "lru") return std::unique_ptr<EvictionPolicy>(new LruEviction);
  if (name == "lfu") return std::unique_ptr<EvictionPolicy>(new LfuEviction);
  if (name == "pseudo-lru") return std::unique_ptr<EvictionPolicy>(new PseudoLruEviction);
  return Err(Errc::kInval, "driver: unknown eviction policy (lru, lfu, pseudo-lru)");
}

Result<std::unique_ptr<ThrashingPolicy>> MakeThrashingPolicy(std::string_view name, const PolicyParams& p) {
  if (p.thrashing_threshold == 0 || p.lapse_ns == 0 || p.epoch_lapses == 0 || p.pin_lapses == 0)
    return Err(Errc::kInval, "driver: thrashing threshold, lapse, epoch and pin must be non-zero");
  if (name == "none") return std::unique_ptr<ThrashingPolicy>(new NoThrashing);
  if (name == "uvm") return std::unique_ptr<ThrashingPolicy>(new UvmThrashing(p));
  return Err(Errc::kInval, "driver: unknown thrashing policy (none, uvm)");
}

Result<std::unique_ptr<AccessCounterPolicy>> MakeAccessCounterPolicy(std::string_view name) {
  if (name == "off") return std::unique_ptr<AccessCounterPolicy>(new NoAccessCounterMigration);
  if (name == "on") return std::unique_ptr<AccessCounterPolicy>(new UvmAccessCounterMigration);
  return Err(Errc::kInval, "driver: unknown access counter policy (off, on)");
}

}  // namespace usvm::driver
