#include "usvm/gpu/access_counters.h"

namespace usvm::gpu {

Result<std::unique_ptr<AccessCounters>> AccessCounters::TryCreate(const AccessCounterConfig& c) {
  if (c.granularity != k64K && c.granularity != k2M)
    return Err(Errc::kInval, "access counter granularity must be 64 KiB or 2 MiB");
  if (c.threshold < 1 || c.threshold > 65535) return Err(Errc::kInval, "access counter threshold out of [1, 65535]");
  if (c.buffer_entries == 0) return Err(Errc::kInval, "access counter buffer needs at least one entry");
  return std::unique_ptr<AccessCounters>(new AccessCounters(c));
}

AccessCounters::~AccessCounters() = default;

AccessCounters::Slot* AccessCounters::SlotFor(uint64_t va, MemKind aperture, uint32_t peer) {
  if (!config_.enabled || va >= kVaLimit) return nullptr;
  const uint64_t base = va & ~(config_.granularity - 1);
  Slot* s;
  {
    MutexLock l(lock_);
    auto [it, fresh] = slots_.try_emplace(base);
    if (fresh) {
      it->second = std::make_unique<Slot>();
      it->second->base = base;
      ++stats_.regions;
    }
    s = it->second.get();
  }
  s->aperture.store(uint8_t(aperture), std::memory_order_relaxed);
  s->peer.store(uint8_t(peer), std::memory_order_relaxed);
  return s;
}

void AccessCounters::Notify(Slot* s) {
  {
    MutexLock l(lock_);
    if (queue_.size() >= config_.buffer_entries) {
      // Overflow: the notification is lost; the region starts counting
      // again so it can notify once there is room.
      ++stats_.dropped;
      s->count.store(0, std::memory_order_relaxed);
      return;
    }
    AccessCounterNotification n;
    n.va = s->base;
    n.size = config_.granularity;
    n.count = config_.threshold;
    n.aperture = MemKind(s->aperture.load(std::memory_order_relaxed));
    n.peer = s->peer.load(std::memory_order_relaxed);
    queue_.push_back(n);
    ++stats_.notifications;
  }
  if (doorbell_) doorbell_();
}

std::vector<AccessCounterNotification> AccessCounters::TryFetch(size_t max) {
  std::vector<AccessCounterNotification> out;
  MutexLock l(lock_);
  while (!queue_.empty() && out.size() < max) {
    out.push_back(queue_.front());
    queue_.pop_front();
    ++stats_.fetched;
  }
  return out;
}

Result<void> AccessCounters::Clear(uint64_t va) {
  if (va >= kVaLimit) return Err(Errc::kInval, "va beyond 48 bits");
  MutexLock l(lock_);
  auto it = slots_.find(va & ~(config_.granularity - 1));
  if (it == slots_.end()) return Err(Errc::kNoEnt, "region never counted");
  it->second->count.store(0, std::memory_order_relaxed);
  ++stats_.clears;
  return {};
}

void AccessCounters::ClearAll() {
  MutexLock l(lock_);
  for (auto& [base, s] : slots_) s->count.store(0, std::memory_order_relaxed);
  ++stats_.clears;
}

AccessCounterStats AccessCounters::Stats() const {
  MutexLock l(lock_);
  return stats_;
}

size_t AccessCounters::pending() const {
  MutexLock l(lock_);
  return queue_.size();
}

uint32_t AccessCounters::DebugCount(uint64_t va) const {
  MutexLock l(lock_);
  auto it = slots_.find(va & ~(config_.granularity - 1));
  return it == slots_.end() ? 0 : it->second->count.load(std::memory_order_relaxed);
}

}  // namespace usvm::gpu
