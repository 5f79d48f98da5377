// Runner: executes a Scenario on a simulated machine (frame pool, N
// Devices, one address space with an Svm attached to every GPU) and keeps
// a reference model of every buffer's bytes.
//
// The reference: for each buffer, the bytes it must hold, and per 4 KiB
// page its state (unmapped / known / unknown) and the last step that
// touched it. Every step updates it as Linux semantics say (munmap: gone;
// madvise DONTNEED: zeros; mremap: moved, grown with zeros; fork: the
// child keeps a snapshot). A kernel cancelled part-way leaves the bytes it
// may have written unknown (not checked) until something rewrites them.
//
// Verification (on by default): after each phase and at the end every
// known byte is read back through the CPU and compared; GPU read kernels
// are checked by their checksums; fork children against their snapshot.
// The first difference stops the run: RunResult::mismatch names the byte's
// address, buffer and the last step that touched it.
//
// Async kernels (`async: true`) run while the next steps do, until a
// `wait` step or the end of their phase; their reference update is applied
// when they are waited for. A step that changes bytes of a running
// kernel's span makes its result unknown; CPU reads of pages a running
// kernel writes are not compared.
//
// Faults the scenario runs into (a kernel on freed memory, a write to a
// read-only buffer) are results (Metrics::runtime_faults), not errors.
//
// Events: while it runs, the runner installs a driver EventObserver
// (events.h; one per process), so one Run at a time per process.
//
// Thread-safety: RunScenario is not reentrant (see Events). CPU steps run
// on the calling thread (a cpu_write / cpu_read with `threads` on that many
// threads, each on its own part and its own result slots, joined before the
// step ends); GPU work on the GPUs' threads. A kernel's duration is launch
// to the moment the runner sees it done (for an async kernel: its wait).
#ifndef USVM_SIM_RUNNER_H_
#define USVM_SIM_RUNNER_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "usvm/sim/metrics.h"
#include "usvm/sim/scenario.h"

namespace usvm::sim {

struct RunOptions {
  // Chrome / Perfetto trace-event JSON written here when not empty.
  std::string trace_path;
  // A self-contained HTML report (report.h) written here when not empty.
  std::string report_path;
  // A progress line on stderr (the CLI sets it on a terminal).
  bool progress = false;
  // Tests: after phase `corrupt_after_phase` (0-based) flip one byte of
  // the reference of `corrupt_buffer` at `corrupt_offset`, so the check
  // that follows must catch it.
  int corrupt_after_phase = -1;
  // ... or before phase `corrupt_before_phase` runs (its steps see it).
  int corrupt_before_phase = -1;
  std::string corrupt_buffer;
  uint64_t corrupt_offset = 0;
  // Kernels that run longer than this are a hang: the run stops with an
  // error.
  uint64_t kernel_timeout_s = 300;
};

struct RunResult {
  Metrics metrics;
  std::optional<Mismatch> mismatch;
};

// Runs `s`. The error (setup failed: not enough memory for the machine,
// a trace file that cannot be written, a hang) is one line.
Expected<RunResult, std::string> RunScenario(const Scenario& s, const RunOptions& opts = {});

// The summary table of one run, and of several side by side (--compare;
// rows whose values differ are marked).
std::string SummaryTable(const RunResult& r);
std::string CompareTable(const std::vector<const RunResult*>& runs);

}  // namespace usvm::sim

#endif  // USVM_SIM_RUNNER_H_
