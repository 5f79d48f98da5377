// Scenario: what `usvm run` executes -- a simulated machine (GPUs, VRAM,
// system memory, latency model), the framework's settings, named buffers
// and a timeline of phases whose steps are CPU actions (mmap, munmap,
// mprotect, madvise, mremap, fork, reads, writes, atomics) and GPU actions
// (pattern kernels, atomics kernels, prefetch, attributes, binds), with
// loops. docs/scenarios.md documents the YAML format.
//
// A Scenario is a plain value: parsing (ParseScenario*) checks every field
// and reports the first error with its file, line and field; the runner
// (runner.h) executes it. Overrides (`--set key=value`) edit a parsed
// Scenario by dotted key (ApplyOverride), with the same checks.
//
// Thread-safety: a value type; no shared state.
#ifndef USVM_SIM_SCENARIO_H_
#define USVM_SIM_SCENARIO_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "usvm/driver/policy_params.h"
#include "usvm/sim/expected.h"

namespace usvm::sim {

// A schema or value error: "FILE:LINE: FIELD: MESSAGE".
struct ParseError {
  std::string file;
  int line = 0;       // 1-based; 0 when unknown (an override)
  std::string field;  // dotted path, e.g. "phases[1].steps[0].gpu_kernel.pattern"
  std::string message;
  std::string ToString() const;
};

template <typename T>
using ParseResult = Expected<T, ParseError>;

struct MachineSpec {
  uint32_t gpus = 1;                          // [1, 8]
  uint64_t vram_bytes = uint64_t{64} << 20;   // per GPU, a multiple of 2 MiB
  uint64_t system_memory_bytes = uint64_t{1} << 30;  // the frame pool
  uint32_t exec_threads = 2;                  // per GPU
  uint32_t copy_engines = 1;
  uint32_t fault_batch = 256;
  uint32_t fault_buffer_entries = 0;          // 0: unbounded
  std::string latency = "zero";               // "zero" | "default"
  // Overrides of the chosen model's figures (-1: keep the model's).
  int64_t tlb_flush_ns = -1;
  int64_t fault_latency_ns = -1;
  int64_t link_bandwidth = -1;                // bytes per second, 0: infinite
  bool shared_owner = true;                   // the GPUs see each other's pages
  bool peer_access = true;                    // ... and may map them
};

struct FrameworkSpec {
  uint64_t notifier_size = uint64_t{512} << 20;
  std::vector<uint64_t> chunk_sizes{uint64_t{2} << 20, uint64_t{64} << 10, uint64_t{4} << 10};
  uint64_t check_pages_threshold = uint64_t{64} << 10;
  std::string invalidation = "two_pass";      // two_pass | single_pass
  std::string placement = "faulting_gpu";     // faulting_gpu | system
  std::string peer_policy = "map_remote";     // map_remote | migrate | system
  uint64_t atomic_timeslice_ms = 5;
  uint32_t atomic_tries = 3;
  // Policies by name (driver/policy.h) and their tunables.
  std::string migration = "fault-only";       // fault-only | density | tree
  std::string eviction = "lru";               // lru | lfu | pseudo-lru
  std::string thrashing = "none";             // none | uvm
  // Access counters (gpu/access_counters.h, driver/policy.h): on makes
  // every GPU count its remote accesses and the driver migrate hot regions.
  std::string access_counters = "off";        // off | on
  uint32_t access_counter_threshold = 256;    // [1, 65535] (UVM: 256)
  uint64_t access_counter_granularity = uint64_t{64} << 10;  // 64KiB | 2MiB
  driver::PolicyParams policy;
};

struct BufferSpec {
  std::string name;
  uint64_t size = 0;     // page multiple
  bool mapped = true;    // mmap'ed before the first phase
  bool hugepage = false; // madvise(MADV_HUGEPAGE) after mmap
  int line = 0;
};

enum class StepKind : uint8_t {
  // CPU
  kCpuWrite,    // Word(seed, offset) at every word of the span
  kCpuRead,     // reads the span and checks it against the reference
  kCpuAtomic,   // `count` fetch-adds of `value` on the span's words, round robin
  kMmap,        // maps the buffer (again) at a fresh address
  kMunmap,      // unmaps a span of the buffer
  kMprotect,    // prot: "none" | "r" | "rw"
  kMadvise,     // advice: "dontneed" | "free" | "hugepage" | "nohugepage"
  kMremap,      // new size; the buffer may move
  kFork,        // fork; the child is checked at the end of the phase
  // GPU
  kGpuKernel,   // a pattern kernel over the span
  kGpuAtomic,   // `count` atomic adds of `value` per thread over the span
  kPrefetch,    // to: "system" | "gpuN"
  kAdvise,      // preferred / atomic / access_in_place attributes
  kBind,        // an explicit bind (or userptr) of the span on `gpu`
  kUnbind,      // removes that bind
  kGpuCompute,  // a real kernel (ComputeKind) over named buffers, checked
                // against the same computation on the CPU
  kWait,        // waits for every async kernel
  kLoop,        // `repeat` times `steps`
};

// The compute kernels of kGpuCompute (64-bit integer arithmetic, so the
// GPU's result and the CPU's are bit-identical whatever the order):
//   gemm     c = a * b, n x n matrices of words, tiled
//   spmv     y (c) = M (a) * x (b): M is an n x n CSR matrix with k entries
//            per row that the step generates into a (row_ptr[n+1],
//            col[n*k], val[n*k]); x is whatever b holds
//   bfs      levels (c) of a BFS from vertex 0 over a random graph of n
//            vertices and degree k that the step generates into a
//            (row_ptr[n+1], adj[n*k]); one kernel launch per level
//   stencil  `iterations` sweeps of a 5-point stencil over an n x n grid,
//            a -> c, then c -> a, ... (the result is in c after an odd
//            number of sweeps, in a after an even one)
enum class ComputeKind : uint8_t { kGemm, kSpmv, kBfs, kStencil };

enum class PatternKind : uint8_t { kStreamRead, kStreamWrite, kStride, kRandomGather, kReadModifyWrite };

struct Step {
  StepKind kind = StepKind::kCpuRead;
  int line = 0;
  std::string buffer;
  uint64_t offset = 0;
  uint64_t size = 0;          // 0: to the end of the buffer
  uint32_t gpu = 0;
  // kCpuWrite: fill seed (0: the scenario seed + step number);
  // kGpuKernel random_gather: the generator seed.
  uint64_t seed = 0;
  uint64_t value = 1;         // stream_write base, rmw / atomic addend
  uint64_t count = 0;         // random_gather loads per thread; atomic ops
  uint64_t stride = 64;       // kStride
  uint32_t threads = 4;       // GPU kernel threads; cpu_write / cpu_read: CPU threads (1)
  uint32_t iterations = 1;
  PatternKind pattern = PatternKind::kStreamRead;
  std::string str;            // prot / advice / prefetch target / preferred
  std::string atomic_mode;    // kAdvise: "" | undefined | device | global | cpu
  int access_in_place = -1;   // kAdvise: -1 unchanged, 0, 1
  bool read_only = false;     // kBind
  bool userptr = false;       // kBind
  // kGpuKernel / kGpuAtomic / kCpu*: a fault is the expected outcome (the
  // memory is gone or protected); counted, not an error either way.
  bool expect_fault = false;
  // kGpuKernel / kGpuAtomic: launch and go on; the kernel runs while the
  // next steps do, until a `wait` step or the end of the phase.
  bool async = false;
  uint64_t new_size = 0;      // kMremap
  // kGpuCompute: the kernel, its buffers (a, b, c; see ComputeKind),
  // the problem size n and the per-row count k.
  ComputeKind compute = ComputeKind::kGemm;
  std::string a, b, c;
  uint64_t n = 0, k = 0;
  uint32_t repeat = 1;        // kLoop
  std::vector<Step> steps;    // kLoop
};

struct Phase {
  std::string name;
  uint32_t repeat = 1;
  std::vector<Step> steps;
  int line = 0;
};

struct Scenario {
  std::string name = "scenario";
  std::string description;
  std::string file = "<string>";  // where it was parsed from
  uint64_t seed = 1;
  bool verify = true;             // the reference check after each phase and at the end
  MachineSpec machine;
  FrameworkSpec framework;
  std::vector<BufferSpec> buffers;
  std::vector<Phase> phases;
  // Named settings for --compare: a name -> overrides (key=value) to apply.
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> settings;
};

// Parses YAML text; `file` names it in errors.
ParseResult<Scenario> ParseScenarioString(const std::string& text, const std::string& file);
// Reads and parses a file (a missing or unreadable file is an error too).
ParseResult<Scenario> ParseScenarioFile(const std::string& path);

// Sets one field by dotted key (seed, verify, machine.gpus,
// framework.invalidation, buffers.NAME.size ...) from its text form.
// Errors name the key ("unknown key", or the value's problem).
ParseResult<void> ApplyOverride(Scenario& s, const std::string& key, const std::string& value);
// "key=value" form.
ParseResult<void> ApplyOverride(Scenario& s, const std::string& assignment);
// The keys ApplyOverride accepts (buffer keys as buffers.<name>.size).
std::vector<std::string> OverrideKeys();

// Cross-field checks after parsing or overriding (buffer names referenced
// by steps, GPU ids within machine.gpus, spans inside buffers...).
ParseResult<void> CheckScenario(const Scenario& s);

// The built-in scenario `usvm run` runs with no file.
const char* DefaultScenarioYaml();

// "4MiB" / "64KiB" / "1GiB" / "4096" -> bytes. False on a malformed size.
bool ParseSize(const std::string& text, uint64_t* out);
std::string FormatBytes(uint64_t bytes);

const char* StepKindName(StepKind k);
const char* PatternName(PatternKind p);
const char* ComputeName(ComputeKind c);
// Bytes a compute step needs in buffer a, b and c.
void ComputeFootprint(const Step& st, uint64_t* a, uint64_t* b, uint64_t* c);

}  // namespace usvm::sim

#endif  // USVM_SIM_SCENARIO_H_
