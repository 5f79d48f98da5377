// LatencyModel: the time the software GPU charges for its work.
//
// Devices do not sleep to model time; they stamp each piece of work
// (a copy, a TLB invalidation, a fault replay) with a deadline on the
// Env's clock, and the Fence of that work signals only once the clock has
// reached it. With a ManualClock, waiting on a fence advances the clock, so
// tests are deterministic and take no real time; with the real clock the
// modelled latencies are real.
//
// Zero() is the zero-latency model: every deadline is "now", so only the
// framework's own overhead is measured.
#ifndef USVM_GPU_LATENCY_MODEL_H_
#define USVM_GPU_LATENCY_MODEL_H_

#include <cstdint>

namespace usvm::gpu {

struct LatencyModel {
  // Hardware cost of one replayable fault round trip (delivery + replay),
  // charged to the faulting thread on top of the driver's service time.
  uint64_t fault_service_ns = 0;
  // Time for a TLB invalidation to be acknowledged.
  uint64_t tlb_invalidate_ns = 0;
  // System <-> VRAM and peer VRAM <-> VRAM link (PCIe / NVLink-like).
  uint64_t link_bandwidth_bytes_per_s = 0;  // 0: infinite
  uint64_t link_latency_ns = 0;
  // Local VRAM <-> VRAM copies.
  uint64_t vram_bandwidth_bytes_per_s = 0;  // 0: infinite
  // Every Nth store or atomic of an execution thread stays in flight for
  // inflight_store_ns of real time between its translation and its write
  // (a slow memory access). A TLB shootdown must wait for it: tests set
  // this to catch an invalidation that lets the old page go too early.
  // 0: never.
  uint32_t inflight_store_every = 0;
  uint64_t inflight_store_ns = 0;

  static constexpr LatencyModel Zero() { return {}; }
  // Round numbers of a PCIe 4.0 x16 discrete GPU.
  static constexpr LatencyModel Default() {
    return {.fault_service_ns = 20'000,
            .tlb_invalidate_ns = 2'000,
            .link_bandwidth_bytes_per_s = 25'000'000'000,
            .link_latency_ns = 1'000,
            .vram_bandwidth_bytes_per_s = 1'000'000'000'000};
  }

  // Time to move `bytes` over a link of `bandwidth` after `latency`.
  static constexpr uint64_t TransferNs(uint64_t bytes, uint64_t bandwidth, uint64_t latency) {
    if (bandwidth == 0) return latency;
    return latency + static_cast<uint64_t>(static_cast<unsigned __int128>(bytes) * 1'000'000'000 /
                                           bandwidth);
  }
};

}  // namespace usvm::gpu

#endif  // USVM_GPU_LATENCY_MODEL_H_
