// Trace: the events of a run in the Chrome / Perfetto trace-event JSON
// format (opens in ui.perfetto.dev and chrome://tracing). One process per
// GPU (faults, migrations with their reason, TLB flushes, evictions,
// kernels) and one for the CPU (its threads: the scenario's steps, and the
// invalidations they cause).
#ifndef USVM_SIM_TRACE_H_
#define USVM_SIM_TRACE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "usvm/driver/events.h"

namespace usvm::sim {

// A span the runner itself records (a kernel, a CPU step, a phase).
struct SimSpan {
  std::string name;
  std::string category;   // "kernel", "cpu", "phase"
  uint32_t gpu = UINT32_MAX;  // kernels: the GPU
  uint32_t thread = 0;
  uint64_t begin_ns = 0, end_ns = 0;
  std::string args;       // a JSON object's text, or ""
};

// Writes the trace to `path`. `t0_ns`: the run's start on the same clock.
// False (and `err`) when the file cannot be written.
bool WriteTrace(const std::string& path, uint64_t t0_ns, uint32_t gpus,
                const std::vector<driver::Event>& events, const std::vector<SimSpan>& spans,
                std::string* err);

}  // namespace usvm::sim

#endif  // USVM_SIM_TRACE_H_
