// The runner under ThreadSanitizer (label `concurrency`): a scenario with
// two GPUs, CPU steps, migrations both ways, invalidations and a fork,
// while the driver reports its events to the runner's collector from its
// fault threads, the collector worker and the CPU thread. (A CPU read of
// bytes a running kernel writes is a race of the simulated program itself
// -- the mm's memcpy against the GPU's atomic stores -- so the async
// kernels here run beside CPU work on other buffers.)
#include <gtest/gtest.h>

#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

namespace usvm::sim {
namespace {

TEST(SimConcurrency, TwoGpusAndTheCpuWithEventsOn) {
  auto s = ParseScenarioString(R"(
machine: {gpus: 2, vram: 4MiB, system_memory: 64MiB, exec_threads: 2}
buffers:
  - {name: a, size: 6MiB}
  - {name: c, size: 8KiB}
phases:
  - name: p
    repeat: 2
    steps:
      - cpu_write: {buffer: a, threads: 2}
      - gpu_kernel: {gpu: 0, buffer: a, pattern: read_modify_write, threads: 4}
      - gpu_kernel: {gpu: 1, buffer: a, pattern: stream_read, threads: 4}
      - gpu_kernel: {gpu: 0, buffer: a, pattern: read_modify_write, async: true}
      - cpu_read: {buffer: c, threads: 2}
      - gpu_kernel: {gpu: 1, buffer: c, pattern: stream_read, async: true}
      - wait: {}
      - cpu_read: {buffer: a, threads: 3}
      - gpu_atomic: {gpu: 0, buffer: c, count: 200}
      - gpu_atomic: {gpu: 1, buffer: c, count: 200}
      - fork: {}
      - cpu_atomic: {buffer: c, count: 50}
      - munmap: {buffer: a, offset: 1MiB, size: 1MiB}
      - gpu_kernel: {gpu: 1, buffer: a, size: 1MiB, pattern: read_modify_write}
      - mmap: {buffer: a}
)",
                               "tsan.yaml");
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  RunOptions o;
  o.trace_path = ::testing::TempDir() + "/usvm_tsan_trace.json";
  auto r = RunScenario(*s, o);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_FALSE(r->mismatch.has_value()) << r->mismatch->ToString();
  EXPECT_TRUE(r->metrics.verified);
  EXPECT_EQ(r->metrics.unexpected_faults, 0u);
  EXPECT_GT(r->metrics.migrations_to_vram, 0u);
}

}  // namespace
}  // namespace usvm::sim
