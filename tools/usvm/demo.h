// `usvm demo`: the end-to-end demonstration of the layers built so far.
#ifndef USVM_TOOLS_USVM_DEMO_H_
#define USVM_TOOLS_USVM_DEMO_H_

#include <cstdint>

namespace usvm::tools {

struct DemoOptions {
  uint64_t buffer_mib = 8;  // shared buffer size
  uint32_t gpu_threads = 2;
  bool verbose = false;
};

// Returns the process exit code; prints a report to stdout.
int RunDemo(const DemoOptions& opts);

}  // namespace usvm::tools

#endif  // USVM_TOOLS_USVM_DEMO_H_
