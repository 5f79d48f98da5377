// Names of driver events (events.h).
#include "usvm/driver/events.h"

namespace usvm::driver {

const char* EventKindName(EventKind k) {
  switch (k) {
    case EventKind::kGpuFault: return "gpu_fault";
    case EventKind::kMigrateToVram: return "migrate_to_vram";
    case EventKind::kMigrateToRam: return "migrate_to_ram";
    case EventKind::kInvalidate: return "invalidate";
    case EventKind::kTlbFlush: return "tlb_flush";
    case EventKind::kTlbWait: return "tlb_wait";
    case EventKind::kEviction: return "eviction";
    case EventKind::kThrottle: return "throttle";
    case EventKind::kPin: return "pin";
    case EventKind::kAccessCounter: return "access_counter";
  }
  return "?";
}

const char* MigrateReasonName(MigrateReason r) {
  switch (r) {
    case MigrateReason::kNone: return "none";
    case MigrateReason::kGpuFault: return "gpu_fault";
    case MigrateReason::kGpuAtomic: return "gpu_atomic";
    case MigrateReason::kPrefetch: return "prefetch";
    case MigrateReason::kCpuFault: return "cpu_fault";
    case MigrateReason::kEviction: return "eviction";
    case MigrateReason::kPartialUnmap: return "partial_unmap";
    case MigrateReason::kPeer: return "peer";
    case MigrateReason::kPolicyPrefetch: return "policy_prefetch";
    case MigrateReason::kAccessCounter: return "access_counter";
  }
  return "?";
}

}  // namespace usvm::driver
