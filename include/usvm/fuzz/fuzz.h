// The fuzzer: random programs over the whole stack (CPU accesses, address
// space layout changes, fork, GPU kernels through the driver on several
// GPUs, prefetch, attributes, binds and userptrs, pins, eviction) checked
// against a flat reference model of every byte and permission
// (model.h). docs/fuzz.md has the op list, the model's rules and what the
// injected failures return.
//
// A run is driven by a seed. With one thread it is deterministic: the op
// list depends only on the seed and the model, so a failing run can be
// replayed (ReplayOps) and shrunk (ShrinkOps) on fresh machines. With K
// threads each thread owns its own slots (disjoint data) and its own model,
// so what every thread sees is still deterministic whatever the
// interleaving; the end of the run checks the invariants that need no
// interleaving (no GPU mapping left, no frame or VRAM block leaked, no
// device page reachable after eviction).
//
// Thread-safety: RunFuzz / ReplayOps / ShrinkOps build their own machine
// and may be called concurrently with each other.
#ifndef USVM_FUZZ_FUZZ_H_
#define USVM_FUZZ_FUZZ_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "usvm/base/result.h"

namespace usvm::fuzz {

enum class OpKind : uint8_t {
  kCpuWrite,    // slot, off, len pages; value: fill seed (child: arg = child + 1)
  kCpuRead,     // slot, off, len (child: arg = child + 1)
  kCpuAtomic,   // slot, off, len; count fetch-adds of value, round robin
  kMmap,        // slot, off, len; arg 1: MAP_SHARED (else private); FIXED, rw
  kMunmap,      // slot, off, len
  kMprotect,    // slot, off, len; arg: prot (0 none, 1 r, 3 rw)
  kMadvise,     // slot, off, len; arg: 0 DONTNEED, 1 FREE, 2 HUGEPAGE
  kMremap,      // slot, off, len -> len2 pages; arg 0: in place (no flags),
                // 1: MAYMOVE|FIXED to slot2, 2: MAYMOVE|FIXED|DONTUNMAP to slot2
  kFork,        // a child (at most two alive)
  kChildExit,   // arg: child
  kGpuKernel,   // gpu, slot, off, len; arg 0 read, 1 write (word i = value + i),
                // 2 read-modify-write (+= value); count: kernel threads
  kGpuAtomic,   // gpu, slot, off, len; count adds of value per thread (4 threads)
  kPrefetch,    // gpu, slot, off, len; arg 0 system, g+1: GPU g
  kAdvise,      // slot, off, len; arg: preferred (0 default, 1 system, g+2: GPU g);
                // value: atomic mode (0 undefined, 1 device, 2 global); count: in place
  kBind,        // gpu, slot, off, len; arg bit 0 read-only, bit 1 userptr
  kUnbind,      // gpu, slot, off (the bind starting there)
  kEvict,       // gpu; arg 0: EvictAll, 1: EvictFor(len pages)
  kPin,         // slot, off; arg 1: for writing (pin_user_pages LONGTERM)
  kUnpin,       // slot, off
  kReclaim,     // reclaim lazy-free pages of every address space
  kCheck,       // compare every mapped byte of every address space
};

struct Op {
  OpKind kind = OpKind::kCheck;
  uint8_t slot = 0;
  uint8_t slot2 = 0;
  uint8_t gpu = 0;
  uint8_t arg = 0;
  uint32_t off = 0;   // pages from the slot's start
  uint32_t len = 0;   // pages
  uint32_t len2 = 0;  // pages (mremap's new length)
  uint32_t count = 0;
  uint64_t value = 0;
};

const char* OpKindName(OpKind k);
// "gpu_kernel gpu1 slot2[+0x3000 +0x2000] write value=0x..." (one line).
std::string OpToString(const Op& op);

struct FuzzConfig {
  uint64_t seed = 1;
  uint64_t ops = 10000;      // total over all threads (0: only the time limit)
  double time_s = 0;         // stop after this long (0: no limit)
  uint32_t gpus = 2;         // [1, 8]
  uint32_t threads = 1;      // [1, 16]
  double inject = 0;         // probability per call of every injection site, [0, 1]
  std::vector<std::string> inject_sites;  // only these sites (empty: every one)
  uint32_t slots = 6;        // address-space slots (each thread owns slots t, t+K...)
  uint32_t slot_pages = 256; // initial mapping of a slot (4 KiB pages; max 1024)
  uint64_t vram_bytes = uint64_t{8} << 20;  // per GPU (small: eviction under pressure)
  uint32_t check_every = 200;  // full comparison every N ops per thread (0: end only)
  bool check_gpu_ptes = true;  // after munmap / DONTNEED / mprotect: no stale GPU PTE
  bool shrink = true;          // shrink a failing op list (single-threaded)
  double shrink_time_s = 60;
  uint32_t hang_s = 20;         // an op running longer is a hang (printed, exit 1)
  // A racer thread beside the workers: data-preserving operations that
  // invalidate GPU mappings at random times over every slot (prefetch to
  // system or a GPU, CPU reads that bring device pages home, evictions,
  // fork with an exiting child), so invalidations land between a fault's
  // get-pages and its commit. The workers' checks are unchanged (the
  // racer moves bytes, never changes them); runs are not reproducible op
  // for op. Not with --inject.
  bool racer = false;
  // Debugging: after every op that changed it, print what the model, the
  // CPU page table and each GPU hold at this address (0: off).
  uint64_t watch_va = 0;
  bool verbose = false;
};

struct FuzzResult {
  uint64_t ops_done = 0;
  uint64_t ops_skipped = 0;      // no defined outcome in that state (docs/fuzz.md)
  uint64_t mismatches = 0;       // 0 or 1: the run stops at the first
  uint64_t checks = 0;           // pages compared (reads and full checks)
  uint64_t injected_failures = 0;  // operations that failed from an injected fault
  uint64_t atomic_no_vram = 0;  // GPU atomics refused with EACCES (no device memory)
  uint64_t racer_ops = 0;       // operations the racer ran (--racer)
  std::map<std::string, uint64_t> injected_by_site;  // site -> failures it reported
  std::map<std::string, uint64_t> injected_errors;   // "op: ERRNO" -> count
  double seconds = 0;
  // The first mismatch: the seed, the thread, the op and what differed.
  std::string failure;
  uint64_t failing_op_index = 0;  // in that thread's op list
  std::vector<Op> failing_ops;    // that thread's ops up to the failure
  std::vector<Op> shrunk;         // the shrunk reproducer (empty: not shrunk)
  std::string shrunk_failure;     // what the shrunk list reports
  // The shrunk reproducer as a scenario (`usvm run`); empty when an op has
  // no scenario equivalent (repro_note says which).
  std::string repro_yaml;
  std::string repro_note;
};

// EINVAL: a bad config (gpus, threads, inject, slots, slot_pages out of range).
Result<FuzzResult> RunFuzz(const FuzzConfig& config);

// Runs `ops` single-threaded on a fresh machine (config's gpus, sizes and
// injection). The first mismatch ("" if none); *index the op it happened at.
std::string ReplayOps(const FuzzConfig& config, const std::vector<Op>& ops, uint64_t* index = nullptr);

// Delta debugging: a smallest-found sublist of `ops` that still reports a
// mismatch under ReplayOps, within the config's shrink time.
std::vector<Op> ShrinkOps(const FuzzConfig& config, std::vector<Op> ops);

// A scenario YAML replaying `ops` (one phase, each op a step), or "" with
// *why set when an op has no scenario equivalent.
std::string ToScenarioYaml(const FuzzConfig& config, const std::vector<Op>& ops, std::string* why);

// The injection sites the fuzzer arms (Env::ShouldFail names).
std::vector<std::string> InjectionSites();

}  // namespace usvm::fuzz

#endif  // USVM_FUZZ_FUZZ_H_
