// Report: a self-contained HTML page (no scripts, no network: inline SVG)
// for one run -- the summary, VRAM residency over time per GPU, the GPU
// fault service latency histogram, bytes moved over time each way, and the
// hottest ranges with why they moved.
#ifndef USVM_SIM_REPORT_H_
#define USVM_SIM_REPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "usvm/driver/events.h"
#include "usvm/sim/runner.h"

namespace usvm::sim {

struct ResidencySample {
  uint64_t t_ns = 0;
  std::vector<uint64_t> vram_used;  // per GPU, bytes
};

struct BufferExtent {
  std::string name;
  uint64_t va = 0, size = 0;
};

struct ReportData {
  const RunResult* result = nullptr;
  uint64_t t0_ns = 0;
  std::vector<ResidencySample> residency;
  std::vector<driver::Event> events;
  std::vector<BufferExtent> buffers;  // for naming ranges (every place a buffer lived)
};

// The page as text.
std::string ReportHtml(const ReportData& d);
// Writes it; false (and `err`) when the file cannot be written.
bool WriteReport(const std::string& path, const ReportData& d, std::string* err);

}  // namespace usvm::sim

#endif  // USVM_SIM_REPORT_H_
