// The built-in scenario of `usvm run` (and `make run`): two GPUs whose
// working set is twice their VRAM, CPU and GPUs sharing buffers, a
// prefetch, an atomic phase, and a fork and a partial munmap in the middle.
#include "usvm/sim/scenario.h"

namespace usvm::sim {

const char* DefaultScenarioYaml() {
  return R"yaml(
name: default
description: >
  Two GPUs share one address space with the CPU. Each GPU's working set is
  twice its VRAM (eviction), a buffer ping-pongs between the GPUs and the
  CPU, one is prefetched, counters take atomics from both GPUs and the CPU,
  and the process forks and unmaps part of a buffer while GPUs use it.
seed: 42
machine:
  gpus: 2
  vram: 16MiB              # per GPU; 'data' alone is twice that
  system_memory: 256MiB
  exec_threads: 2
  latency: default         # PCIe-like copies, 2 us TLB flushes
framework:
  notifier_size: 512MiB
  chunk_sizes: [2MiB, 64KiB, 4KiB]
  invalidation: two_pass
  placement: faulting_gpu
buffers:
  - {name: data, size: 32MiB}
  - {name: shared, size: 8MiB}
  - {name: counters, size: 64KiB}
settings:                  # for --compare
  two_pass: {framework.invalidation: two_pass}
  single_pass: {framework.invalidation: single_pass}
  system: {framework.placement: system}
  vram: {framework.placement: faulting_gpu}
phases:
  - name: init
    steps:
      - cpu_write: {buffer: data, threads: 2}
      - cpu_write: {buffer: shared}
  - name: oversubscribe
    steps:
      - gpu_kernel: {gpu: 0, buffer: data, pattern: read_modify_write, value: 3}
      - gpu_kernel: {gpu: 1, buffer: data, pattern: stream_read}
      - gpu_kernel: {gpu: 1, buffer: shared, pattern: read_modify_write, value: 5}
      - gpu_kernel: {gpu: 0, buffer: shared, pattern: random_gather, count: 4096}
  - name: prefetch
    steps:
      - prefetch: {gpu: 1, buffer: shared, to: gpu1}
      - gpu_kernel: {gpu: 1, buffer: shared, pattern: stream_read}
      - cpu_read: {buffer: shared, offset: 1MiB, size: 1MiB}
      - gpu_kernel: {gpu: 0, buffer: shared, pattern: stride, stride: 4KiB}
  - name: atomics
    steps:
      - advise: {buffer: counters, atomic: device}
      - gpu_atomic: {gpu: 0, buffer: counters, count: 2000, threads: 4}
      - gpu_atomic: {gpu: 1, buffer: counters, count: 2000, threads: 4}
      - cpu_atomic: {buffer: counters, count: 512, value: 7}
      - gpu_atomic: {gpu: 0, buffer: counters, count: 1000, threads: 2, value: 2}
  - name: fork_and_munmap
    steps:
      - gpu_kernel: {gpu: 0, buffer: data, size: 8MiB, pattern: stream_write, value: 100}
      - fork: {}
      - munmap: {buffer: data, offset: 3MiB, size: 2MiB}
      - gpu_kernel: {gpu: 1, buffer: data, offset: 3MiB, size: 2MiB, pattern: stream_write, expect: fault}
      - gpu_kernel: {gpu: 0, buffer: data, size: 3MiB, pattern: read_modify_write, value: 1}
      - cpu_write: {buffer: shared, size: 2MiB}
      - gpu_kernel: {gpu: 1, buffer: shared, pattern: read_modify_write, value: 9}
  - name: ping_pong
    steps:
      - loop:
          repeat: 3
          steps:
            - gpu_kernel: {gpu: 0, buffer: data, offset: 6MiB, size: 4MiB, pattern: read_modify_write, value: 1}
            - cpu_read: {buffer: data, offset: 6MiB, size: 4MiB, threads: 2}
            - gpu_kernel: {gpu: 1, buffer: data, offset: 6MiB, size: 4MiB, pattern: read_modify_write, value: 2}
            - cpu_atomic: {buffer: data, offset: 8MiB, size: 4KiB, count: 16}
)yaml";
}

}  // namespace usvm::sim
