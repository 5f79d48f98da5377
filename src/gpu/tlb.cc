#include "usvm/gpu/tlb.h"

#include <algorithm>

namespace usvm::gpu {

namespace {
constexpr uint32_t kMaxEntries = 4096;
constexpr uint32_t kShifts[3] = {12, 16, 21};
}  // namespace

bool Tlb::Shootdown::Drained(uint64_t target) const {
  for (const Slot& s : slots)
    if (s.seen.load(std::memory_order_seq_cst) < target) return false;
  return true;
}

Result<std::unique_ptr<Tlb>> Tlb::TryCreate(const TlbConfig& config, uint32_t walkers,
                                            const LatencyModel& latency, Env& env) {
  if (config.ways == 0 || config.ways > 64) return Err(Errc::kInval, "TLB ways out of [1, 64]");
  if (config.entries_4k > kMaxEntries || config.entries_64k > kMaxEntries || config.entries_2m > kMaxEntries)
    return Err(Errc::kInval, "too many TLB entries");
  if (walkers == 0 || walkers > 256) return Err(Errc::kInval, "walkers out of [1, 256]");
  return std::unique_ptr<Tlb>(new Tlb(config, walkers, latency, env));
}

Tlb::Tlb(const TlbConfig& config, uint32_t walkers, const LatencyModel& latency, Env& env)
    : latency_(latency), env_(env), shootdown_(std::make_shared<Shootdown>(walkers)) {
  SpinLockGuard l(lock_);
  const uint32_t entries[3] = {config.entries_4k, config.entries_64k, config.entries_2m};
  for (int i = 0; i < 3; ++i) {
    SizeClass& c = classes_[i];
    c.shift = kShifts[i];
    if (entries[i] == 0) continue;
    c.ways = std::min(config.ways, entries[i]);
    c.sets = std::max<uint32_t>(1, entries[i] / c.ways);
    c.entries.assign(size_t{c.sets} * c.ways, Entry{});
    c.next_way.assign(c.sets, 0);
  }
}

Tlb::~Tlb() = default;

std::optional<Mapping> Tlb::Lookup(uint64_t va) {
  SpinLockGuard l(lock_);
  for (int i = 2; i >= 0; --i) {
    SizeClass& c = classes_[i];
    if (c.sets == 0) continue;
    const uint64_t tag = (va >> c.shift) + 1;
    const uint64_t set = (va >> c.shift) % c.sets;
    for (uint32_t w = 0; w < c.ways; ++w) {
      const Entry& e = c.entries[set * c.ways + w];
      if (e.tag == tag) {
        ++stats_.hits;
        const uint64_t bytes = uint64_t{1} << c.shift;
        return Mapping{va & ~(bytes - 1), bytes, e.pte};
      }
    }
  }
  ++stats_.misses;
  return std::nullopt;
}

void Tlb::Fill(const Mapping& m, uint64_t gen) {
  SpinLockGuard l(lock_);
  if (shootdown_->gen.load(std::memory_order_relaxed) != gen) {
    ++stats_.stale_fills_dropped;
    return;
  }
  const int i = m.size == k2M ? 2 : m.size == k64K ? 1 : 0;
  SizeClass& c = classes_[i];
  if (c.sets == 0) return;
  const uint64_t tag = (m.va >> c.shift) + 1;
  const uint64_t set = (m.va >> c.shift) % c.sets;
  Entry* slot = nullptr;
  for (uint32_t w = 0; w < c.ways; ++w) {
    Entry& e = c.entries[set * c.ways + w];
    if (e.tag == tag || e.tag == 0) {
      slot = &e;
      break;
    }
  }
  if (!slot) {
    slot = &c.entries[set * c.ways + c.next_way[set]];
    c.next_way[set] = static_cast<uint8_t>((c.next_way[set] + 1) % c.ways);
  }
  slot->tag = tag;
  slot->pte = m.pte;
  ++stats_.fills;
}

Fence Tlb::InvalidateLocked(uint64_t start, uint64_t end) {
  // The bump comes first: a walker that read the old table and fills
  // after this point is refused (Fill checks the generation under lock_).
  const uint64_t target = shootdown_->gen.fetch_add(1, std::memory_order_seq_cst) + 1;
  ++stats_.invalidations;
  for (SizeClass& c : classes_) {
    const uint64_t bytes = uint64_t{1} << c.shift;
    for (Entry& e : c.entries) {
      if (e.tag == 0) continue;
      const uint64_t va = (e.tag - 1) << c.shift;
      if (va < end && va + bytes > start) {
        e.tag = 0;
        ++stats_.entries_invalidated;
      }
    }
  }
  std::shared_ptr<Shootdown> sd = shootdown_;
  return Fence::CreatePolled(env_, env_.NowNs() + latency_.tlb_invalidate_ns,
                             [sd, target] { return sd->Drained(target); });
}

Result<Fence> Tlb::Invalidate(uint64_t va, uint64_t size) {
  if (size == 0) return Err(Errc::kInval, "empty range");
  if ((va | size) & (kPageSize - 1)) return Err(Errc::kInval, "range not 4 KiB aligned");
  if (va >= kVaLimit || size > kVaLimit - va) return Err(Errc::kInval, "range beyond 48 bits");
  SpinLockGuard l(lock_);
  return InvalidateLocked(va, va + size);
}

Fence Tlb::InvalidateAll() {
  SpinLockGuard l(lock_);
  return InvalidateLocked(0, kVaLimit);
}

uint64_t Tlb::Enter(uint32_t slot) {
  // Dekker against InvalidateLocked: publish, then re-check the counter.
  std::atomic<uint64_t>& seen = shootdown_->slots[slot].seen;
  for (;;) {
    const uint64_t g = shootdown_->gen.load(std::memory_order_seq_cst);
    seen.store(g, std::memory_order_seq_cst);
    if (shootdown_->gen.load(std::memory_order_seq_cst) == g) return g;
  }
}

TlbStats Tlb::Stats() const {
  SpinLockGuard l(lock_);
  return stats_;
}

}  // namespace usvm::gpu
