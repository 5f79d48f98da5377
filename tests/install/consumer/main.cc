// Runs a small scenario through the installed library and checks it.
#include <cstdio>

#include "usvm/driver/driver.h"
#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

int main() {
  auto s = usvm::sim::ParseScenarioString(R"(
machine: {gpus: 2, vram: 4MiB, system_memory: 32MiB}
buffers: [{name: a, size: 8MiB}]
phases:
  - steps:
      - cpu_write: {buffer: a}
      - gpu_kernel: {gpu: 0, buffer: a, pattern: read_modify_write}
      - gpu_kernel: {gpu: 1, buffer: a, pattern: stream_read}
)",
                                          "consumer");
  if (!s) {
    std::printf("parse: %s\n", s.error().ToString().c_str());
    return 2;
  }
  auto r = usvm::sim::RunScenario(*s);
  if (!r || r->mismatch || !r->metrics.verified) {
    std::printf("run failed\n");
    return 1;
  }
  std::printf("consumer ok: %llu faults, %s invalidation\n", (unsigned long long)r->metrics.gpu_faults,
              usvm::driver::InvalidationModeName(usvm::driver::SvmConfig{}.invalidation));
  return 0;
}
