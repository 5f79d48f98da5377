// Driver events: a small hook through which the driver reports what it
// does, one record per event, for tools (the sim layer's metrics and
// traces). Counters live in stats(); this is for per-event data the
// counters cannot give: fault service latencies, the reason of each
// migration, when each invalidation and TLB flush ran and on which thread.
//
// One observer per process (SetEventObserver). With none installed an
// event costs one relaxed atomic load at its call site. The observer is
// called on the thread that did the work (a GPU's fault thread, a CPU
// thread touching a device page, the garbage collector...), possibly with
// driver locks held (the notifier lock in invalidation callbacks): it must
// be thread-safe, must not block for long, and must not call back into the
// driver or the address space.
//
// Lifetime: the caller keeps the observer alive until it has been replaced
// (SetEventObserver(nullptr)) and no event can still be in flight, i.e.
// until the devices and Svms that might report have been destroyed.
#ifndef USVM_DRIVER_EVENTS_H_
#define USVM_DRIVER_EVENTS_H_

#include <atomic>
#include <cstdint>

namespace usvm {
class Env;
}

namespace usvm::driver {

enum class EventKind : uint8_t {
  kGpuFault,      // one fault serviced: [begin, end) = batch start to done
  kMigrateToVram, // a copy system memory -> VRAM (bytes), or peer -> VRAM
  kMigrateToRam,  // a copy VRAM -> system memory (bytes)
  kInvalidate,    // an invalidation callback over [va, va + len)
  kTlbFlush,      // one GPU's TLB invalidation started
  kTlbWait,       // the two-pass finish: waiting for every GPU's flush
  kEviction,      // an eviction of one VRAM allocation (bytes); `policy`
                  // names the eviction policy that chose it
  kThrottle,      // the thrashing policy throttled a fault of [va, va + len)
                  // (the span is the nap)
  kPin,           // the thrashing policy pinned the block [va, va + len)
                  // in system memory, mapped remotely (an instant)
  kAccessCounter, // a GPU's access counter notification for the region
                  // [va, va + len) was serviced (an instant); detail: 1 if
                  // the access counter policy migrated it, else 0; policy:
                  // the access counter policy ("off", "access_counters")
};

// Why a migration ran: set on the migrating thread by the code that
// decided it (MigrationReasonScope); a copy with no reason in scope is
// attributed to a CPU touch (to RAM) or a GPU fault (to VRAM).
enum class MigrateReason : uint8_t {
  kNone,
  kGpuFault,   // a GPU fault chose device memory (placement / attribute)
  kGpuAtomic,  // a GPU atomic needs device memory
  kPrefetch,   // an explicit prefetch
  kCpuFault,   // the CPU touched a device-private page
  kEviction,   // VRAM full: least recently used allocation went home
  kPartialUnmap,  // the collector evicted a partially unmapped range
  kPeer,       // another GPU's device pages were migrated to this GPU
  kPolicyPrefetch,  // the migration policy brought it along with a fault
                    // (`policy` names it: density, tree)
  kAccessCounter,   // a GPU's access counters found the remotely mapped
                    // region hot (`policy`: "access_counters")
};

struct Event {
  EventKind kind = EventKind::kGpuFault;
  MigrateReason reason = MigrateReason::kNone;
  uint32_t gpu = UINT32_MAX;  // UINT32_MAX: not one GPU
  // kGpuFault: the access bits; kInvalidate: the mm::NotifyEvent;
  // kAccessCounter: 1 if migrated; else 0.
  uint32_t detail = 0;
  int32_t result = 0;     // 0, or the errno of a failed fault
  uint64_t va = 0;        // copies, evictions: the start of the range the
                          // VRAM allocation holds; 0 when unknown
  uint64_t len = 0;       // VA span, or bytes for copies and evictions
  uint64_t begin_ns = 0;  // on the Env clock of the reporting object
  uint64_t end_ns = 0;
  uint32_t thread = 0;    // a small per-thread number (EventThreadId)
  // The policy behind the event (a static string: "density", "lru",
  // "uvm"...), or null: copies and evictions, throttles and pins.
  const char* policy = nullptr;
};

class EventObserver {
 public:
  virtual ~EventObserver() = default;
  virtual void OnEvent(const Event& e) = 0;
};

namespace detail {
inline std::atomic<EventObserver*> g_event_observer{nullptr};
inline thread_local MigrateReason tls_migrate_reason = MigrateReason::kNone;
inline thread_local const char* tls_migrate_policy = nullptr;
inline std::atomic<uint32_t> g_next_thread_id{1};
}  // namespace detail

// Installs `o` (null: none). Returns the previous observer.
inline EventObserver* SetEventObserver(EventObserver* o) {
  return detail::g_event_observer.exchange(o, std::memory_order_acq_rel);
}
inline bool EventsEnabled() {
  return detail::g_event_observer.load(std::memory_order_relaxed) != nullptr;
}
// A small number naming the calling thread, stable for its lifetime.
inline uint32_t EventThreadId() {
  thread_local uint32_t id = detail::g_next_thread_id.fetch_add(1, std::memory_order_relaxed);
  return id;
}
inline void EmitEvent(Event e) {
  EventObserver* o = detail::g_event_observer.load(std::memory_order_acquire);
  if (!o) return;
  e.thread = EventThreadId();
  o->OnEvent(e);
}

// The reason (and the policy that decided, a static string or null) of
// migrations started on this thread while in scope (nests).
class MigrationReasonScope {
 public:
  explicit MigrationReasonScope(MigrateReason r, const char* policy = nullptr)
      : prev_(detail::tls_migrate_reason), prev_policy_(detail::tls_migrate_policy) {
    detail::tls_migrate_reason = r;
    detail::tls_migrate_policy = policy;
  }
  ~MigrationReasonScope() {
    detail::tls_migrate_reason = prev_;
    detail::tls_migrate_policy = prev_policy_;
  }
  MigrationReasonScope(const MigrationReasonScope&) = delete;
  MigrationReasonScope& operator=(const MigrationReasonScope&) = delete;

 private:
  MigrateReason prev_;
  const char* prev_policy_;
};
inline MigrateReason CurrentMigrateReason() { return detail::tls_migrate_reason; }
inline const char* CurrentMigratePolicy() { return detail::tls_migrate_policy; }
// The reason in scope, or `fallback` when none is.
inline MigrateReason MigrateReasonOr(MigrateReason fallback) {
  return detail::tls_migrate_reason == MigrateReason::kNone ? fallback : detail::tls_migrate_reason;
}

// Reports an event spanning its lifetime (begin at construction, end at
// destruction) when an observer is installed. `now` reads the clock.
template <typename Clock>
class EventSpan {
 public:
  EventSpan(const Clock& clock, Event e) : clock_(clock), on_(EventsEnabled()), e_(e) {
    if (on_) e_.begin_ns = clock_.NowNs();
  }
  ~EventSpan() {
    if (!on_) return;
    e_.end_ns = clock_.NowNs();
    EmitEvent(e_);
  }
  Event& event() { return e_; }
  EventSpan(const EventSpan&) = delete;
  EventSpan& operator=(const EventSpan&) = delete;

 private:
  const Clock& clock_;
  const bool on_;
  Event e_;
};

// A TLB invalidation of [lo, hi) started on GPU `gpu` (an instant).
template <typename Clock>
inline void EmitTlbFlush(const Clock& clock, uint32_t gpu, uint64_t lo, uint64_t hi) {
  if (!EventsEnabled()) return;
  const uint64_t now = clock.NowNs();
  EmitEvent({.kind = EventKind::kTlbFlush, .gpu = gpu, .va = lo, .len = hi - lo, .begin_ns = now, .end_ns = now});
}

const char* EventKindName(EventKind k);
const char* MigrateReasonName(MigrateReason r);

}  // namespace usvm::driver

#endif  // USVM_DRIVER_EVENTS_H_
