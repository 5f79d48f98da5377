// Metrics of one scenario run: what the summary table, --json and
// --compare show. Filled by the runner from the driver's stats() and its
// events (events.h); a plain value.
#ifndef USVM_SIM_METRICS_H_
#define USVM_SIM_METRICS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace usvm::sim {

// The first byte that differs from the reference.
struct Mismatch {
  std::string buffer;
  uint64_t va = 0;
  uint64_t offset = 0;        // in the buffer
  uint32_t got = 0, want = 0; // the byte values (kernel checksums: 0)
  uint64_t bytes_differ = 0;  // in the span checked
  std::string view;           // "cpu", "gpu0 checksum", "fork child" ...
  std::string when;           // "after phase 'x'", "step ..."
  std::string last_step;      // the last step that touched the byte
  std::string ToString() const;
};

// A fault the scenario ran into: a kernel cancelled, a CPU access that
// got EFAULT, a prefetch or bind refused.
struct RuntimeFault {
  std::string step;     // which step (phase, index, action)
  std::string error;    // "ENOENT: driver: no VMA"
  bool expected = false;
};

struct PerGpuMetrics {
  uint64_t faults = 0;            // faults handled
  uint64_t faults_cancelled = 0;
  uint64_t migrations_to_vram = 0;   // ranges
  uint64_t bytes_to_vram = 0;
  uint64_t bytes_to_ram = 0;
  uint64_t evictions = 0;
  uint64_t bytes_evicted = 0;
  uint64_t tlb_invalidations = 0;
  uint64_t prefetches = 0;
  uint64_t peer_maps = 0;
  uint64_t vram_bytes = 0;
  uint64_t kernels = 0;
  uint64_t kernel_ns = 0;         // sum of launch-to-done times
};

struct Metrics {
  std::string scenario;
  std::string setting;            // --compare: the setting's name
  uint64_t seed = 0;
  uint32_t gpus = 0;
  double wall_s = 0;
  // GPU faults.
  uint64_t gpu_faults = 0;
  uint64_t gpu_faults_cancelled = 0;
  uint64_t fault_latency_p50_ns = 0;  // fetch-to-serviced per fault
  uint64_t fault_latency_p99_ns = 0;
  uint64_t fault_latency_max_ns = 0;
  // Migrations (copies) each way, with bytes, and by reason.
  uint64_t migrations_to_vram = 0, migrations_to_ram = 0;
  uint64_t bytes_to_vram = 0, bytes_to_ram = 0;
  std::vector<std::pair<std::string, uint64_t>> migrations_by_reason;  // reason -> count
  // Invalidations.
  uint64_t invalidations = 0;         // callbacks that reached the driver
  uint64_t ranges_zapped = 0;
  uint64_t tlb_flushes = 0;
  uint64_t two_pass_finishes = 0;
  // TLB flushes of invalidations: their summed modelled latency (the wait
  // one GPU at a time) and the time actually blocked on them; two-pass
  // saved the difference (two_pass_saved_ns()).
  uint64_t tlb_flush_serial_ns = 0;
  uint64_t tlb_wait_ns = 0;
  uint64_t two_pass_saved_ns() const {
    return tlb_flush_serial_ns > tlb_wait_ns ? tlb_flush_serial_ns - tlb_wait_ns : 0;
  }
  uint64_t invalidation_ns = 0;       // time spent in callbacks, finish passes included
  uint64_t invalidation_p50_ns = 0;   // per callback (finish pass included)
  uint64_t invalidation_p99_ns = 0;
  // Policies (driver/policy.h): their names, ranges the migration policy
  // brought along with faults (bytes), and the thrashing policy's
  // throttles, pins and faults served remotely because pinned.
  std::string migration_policy, eviction_policy, thrashing_policy;
  uint64_t policy_prefetches = 0, policy_prefetch_bytes = 0;
  uint64_t throttles = 0, pins = 0, pinned_faults = 0;
  // Access counters: the policy (off | on), notifications serviced, the
  // migrations they caused (ranges, bytes), notifications left alone
  // because the thrashing policy throttled or pinned the block, and
  // notifications lost to a full buffer (the default context's).
  std::string access_counter_policy = "off";
  uint64_t ac_notifications = 0, ac_migrations = 0, ac_migrated_bytes = 0, ac_thrashing_skips = 0, ac_dropped = 0;
  // Eviction and collection.
  uint64_t evictions = 0, bytes_evicted = 0;
  uint64_t ranges_collected = 0, gc_runs = 0;
  // Kernels.
  uint64_t kernels = 0;
  uint64_t kernel_ns = 0;
  uint64_t kernel_p50_ns = 0, kernel_max_ns = 0;
  // CPU.
  uint64_t cpu_steps = 0;
  uint64_t cpu_bytes = 0;
  // Verification.
  bool verify = true;
  uint64_t checks = 0;               // reference comparisons made
  uint64_t bytes_verified = 0;
  uint64_t checksums_verified = 0;   // GPU read kernels checked
  bool verified = false;             // every check passed (and verify on)
  // Faults the scenario ran into.
  std::vector<RuntimeFault> runtime_faults;
  uint64_t unexpected_faults = 0;
  std::vector<PerGpuMetrics> per_gpu;
};

// Value at quantile q in [0, 1] of `v` (sorted in place); 0 when empty.
uint64_t Percentile(std::vector<uint64_t>& v, double q);

// The metrics (and mismatch, if any) as a JSON document.
std::string MetricsJson(const Metrics& m, const Mismatch* mismatch);
// A JSON array of several runs (--compare).
std::string MetricsJsonArray(const std::vector<const Metrics*>& runs, const std::vector<const Mismatch*>& mm);

}  // namespace usvm::sim

#endif  // USVM_SIM_METRICS_H_
