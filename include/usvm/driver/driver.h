// The SVM driver: the glue between the gpusvm framework and the software
// GPUs (the role xe and i915 play in the seeds). ../../docs/driver.md has
// the flows as sequence diagrams and the locking.
//
// Objects:
//   - Device: one GPU (gpu::Gpu), its VRAM registered as device-private
//     pages (gpusvm::Pagemap) with a VRAM manager that evicts the least
//     recently used allocation when VRAM is full, and a fault-servicing
//     thread that fetches fault batches and hands each fault to the Vm
//     of the address space the GPU runs.
//   - Svm: one address space's shared virtual memory: one gpusvm::GpuSvm
//     whose ranges are shared by every GPU attached (each range keeps
//     per-GPU present / invalidated masks, as xe's per-tile masks), the
//     madvise-style attributes of VA spans, the garbage collector worker,
//     and the invalidation callbacks (two-pass across GPUs, or single-pass
//     for comparison).
//   - Vm: one (Device, Svm) pair: the GPU fault handler of that GPU in that
//     address space, prefetch, explicit binds and userptrs.
//
// Usage:
//   auto dev = Device::TryCreate(0, {}, &sysmem, env).value();
//   auto svm = Svm::TryCreate(address_space, {}).value();
//   Vm* vm = svm->Attach(*dev).value();
//   dev->gpu().LaunchKernel(...);   // GPU accesses fault; the driver serves
//
// Lifetime: Devices and Svms may go in either order (a Device detaches
// itself from the Svms it is attached to; an Svm's Close detaches every
// Device). An Svm keeps its address space structure alive (shared_ptr to
// the mm::Mm). Neither may be destroyed while another thread uses it.
//
// Locking (outer to inner; docs/driver.md has the details):
//   1. a Device's attach lock (an rwsem): held for read by its fault thread
//      while it serves a batch, for write by attach and detach;
//   2. the Svm driver lock (the GpuSvm's DriverLock; xe's vm->lock): held by
//      the fault handler for a whole batch, by prefetch, binds, attribute
//      changes, detach and the garbage collector;
//   3. the migrate lock (xe's): around "EBUSY -> evict -> migrate again";
//   4. the mmap lock (taken inside gpusvm and mm calls);
//   5. the GpuSvm notifier lock (write in invalidation callbacks and in the
//      driver's own invalidations; read to commit GPU PTEs), and the binds'
//      notifier lock likewise;
//   6. leaf locks: a GPU page table's, the VRAM manager's, the collector
//      queue's, the attribute map's.
// Invalidation callbacks never take the driver lock. TLB fences are waited
// for under the notifier lock (write) by the single-pass callback, by the
// driver's own invalidations (before a migration, on an attribute change)
// and by the bind callbacks -- as the kernel's single-pass drivers do --
// and under the attach and driver locks by detach and close. The two-pass
// callback waits in its finish pass, with no lock of this layer held.
#ifndef USVM_DRIVER_DRIVER_H_
#define USVM_DRIVER_DRIVER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/result.h"
#include "usvm/driver/policy_params.h"
#include "usvm/gpu/gpu.h"

namespace usvm::mm {
class Mm;
}
namespace usvm::gpusvm {
class Pagemap;
}

namespace usvm::driver {

class Device;
class Svm;
class Vm;

inline constexpr uint64_t k4K = uint64_t{1} << 12;
inline constexpr uint64_t k64K = uint64_t{1} << 16;
inline constexpr uint64_t k2M = uint64_t{1} << 21;

enum class InvalidationMode : uint8_t {
  kTwoPass,     // zap every GPU, start every TLB flush, wait in the finish pass
  kSinglePass,  // each GPU in turn: zap, flush, wait (N drivers, one notifier each)
};

// Where a range goes on a GPU fault when no preferred-location attribute
// says otherwise.
enum class Placement : uint8_t {
  kFaultingGpu,  // migrate to the VRAM of the GPU that faulted (xe's default)
  kSystem,       // stay in system memory; map it (atomics still migrate)
};

// What a GPU does with device-private pages of another GPU it touches.
enum class PeerPolicy : uint8_t {
  kMapRemote,  // map the other GPU's VRAM over the peer link when allowed
               // (same owner and peer access), else migrate to system memory
  kMigrate,    // migrate the range to the faulting GPU's VRAM
  kSystem,     // migrate the range to system memory
};

// madvise atomic mode (xe: DRM_XE_ATOMIC_*).
enum class AtomicMode : uint8_t {
  kUndefined,  // GPU atomics need device memory (migrate)
  kDevice,     // likewise
  kGlobal,     // likewise (CPU and GPU atomics; the CPU faults it back)
  kCpu,        // GPU atomics are refused (EACCES)
};

struct Location {
  enum class Kind : uint8_t { kDefault, kSystem, kDevice };
  Kind kind = Kind::kDefault;
  uint32_t gpu = 0;  // kDevice: the GPU id

  static constexpr Location Default() { return {}; }
  static constexpr Location System() { return {Kind::kSystem, 0}; }
  static constexpr Location Device(uint32_t gpu) { return {Kind::kDevice, gpu}; }
  friend bool operator==(const Location&, const Location&) = default;
};

// The attributes of a VA span (madvise). Defaults: no preferred location
// (the Placement policy decides), atomic mode undefined, no access in place.
struct Attributes {
  Location preferred;
  AtomicMode atomic = AtomicMode::kUndefined;
  // A peer GPU maps the pages where they are (over the link) instead of
  // following the PeerPolicy (KFD's ACCESS_IN_PLACE).
  bool access_in_place = false;
  friend bool operator==(const Attributes&, const Attributes&) = default;
};

// Which attributes an update sets; the others keep their values.
struct AttributeUpdate {
  std::optional<Location> preferred = std::nullopt;
  std::optional<AtomicMode> atomic = std::nullopt;
  std::optional<bool> access_in_place = std::nullopt;
};

struct AttributeSpan {
  uint64_t start = 0;
  uint64_t end = 0;
  Attributes attrs;
};

struct SvmConfig {
  std::string name = "svm";
  uint64_t notifier_size = uint64_t{512} << 20;
  std::vector<uint64_t> chunk_sizes{k2M, k64K, k4K};
  uint64_t check_pages_threshold = k64K;
  InvalidationMode invalidation = InvalidationMode::kTwoPass;
  Placement placement = Placement::kFaultingGpu;
  PeerPolicy peer_policy = PeerPolicy::kMapRemote;
  // Device memory an atomic fault migrates to stays at least this long
  // against CPU touches; doubled on each retry (xe: 5 ms).
  uint64_t atomic_timeslice_ms = 5;
  uint32_t atomic_tries = 3;
  // Retries of a fault whose get-pages failed with EFAULT or EPERM (the
  // range was unmapped or changed under it).
  uint32_t fault_retry_budget = 8;
  // The GPU-visible window of the address space.
  uint64_t va_start = 0;
  uint64_t va_size = uint64_t{1} << 47;
  // Skip MIGRATE invalidations of migrations this driver started (it
  // invalidated the range on every GPU itself first).
  bool ignore_own_migrate = true;
  // Run the garbage collector on its own thread (else only the fault
  // handler and CollectGarbage run it).
  bool gc_worker = true;
  // Testing: every Nth GPU fault (0: none) sleeps `commit_window_ns` of
  // real time between its get-pages and its commit check, widening the
  // window in which an invalidation must make the commit retry (usvm fuzz
  // --racer). Off, it costs nothing on the fault path.
  uint32_t commit_window_every = 0;
  uint64_t commit_window_ns = 0;
  // Policies by name (policy.h; EINVAL when unknown): the migration
  // policy (fault-only | density | tree) and the thrashing policy (none |
  // uvm), with their tunables. The defaults are the driver's behaviour
  // without policies.
  std::string migration = "fault-only";
  std::string thrashing = "none";
  // What the driver does with its GPUs' access counter notifications
  // (policy.h: off | on; the GPU counts only when its DeviceConfig's
  // gpu.access_counters.enabled): on migrates hot remotely mapped regions
  // to the notifying GPU's VRAM.
  std::string access_counters = "off";
  PolicyParams policy;
  Env* env = nullptr;  // null: Env::Default()
};

struct DeviceConfig {
  gpu::GpuConfig gpu;
  // Devices sharing an owner see each other's device pages (and may map
  // them over a peer link once peer access is enabled); null: this device
  // alone.
  const void* owner = nullptr;
  uint32_t fault_batch = 256;     // faults fetched at once (UVM: 256)
  bool fault_thread = true;       // serve faults on a thread of the device
  // Which allocation leaves when VRAM is full (policy.h: lru | lfu |
  // pseudo-lru; EINVAL when unknown).
  std::string eviction = "lru";
};

// Counters per range size (index: 0 = 4 KiB, 1 = 64 KiB, 2 = 2 MiB).
struct SizeCounters {
  uint64_t faults = 0;        // faults serviced in a range of this size
  uint64_t valid_faults = 0;  // ... that found the range already valid
  uint64_t migrations = 0;    // ranges migrated to VRAM
  uint64_t get_pages = 0;
  uint64_t binds = 0;         // GPU PTE commits
  uint64_t bytes_copied = 0;  // bytes migrated to VRAM
  uint64_t tlb_invalidations = 0;
};

struct VmStats {
  std::array<SizeCounters, 3> by_size{};
  uint64_t faults = 0;            // faults handled (all outcomes)
  uint64_t faults_cancelled = 0;  // unserviceable: the kernel was cancelled
  uint64_t commit_retries = 0;    // pages invalidated between get and commit
  uint64_t race_replays = 0;      // faults that kept racing (EAGAIN): replayed, not cancelled
  uint64_t evict_retries = 0;     // EOPNOTSUPP / foreign pages: evicted, again
  uint64_t migrate_failures = 0;  // migrations that failed (fell back / retried)
  uint64_t leaves_4k = 0, leaves_64k = 0, leaves_2m = 0;  // PTE leaves written
  uint64_t peer_maps = 0;         // ranges mapped over the peer link
  uint64_t prefetches = 0;        // ranges prefetched
  uint64_t binds = 0, unbinds = 0, rebinds = 0;  // explicit binds and userptrs
  uint64_t bind_invalidations = 0;
  uint64_t commit_flushes = 0;    // TLB flushes of a commit replacing this GPU's mapping
  // Policies (policy.h): ranges the migration policy brought along with a
  // fault (and their bytes); faults the thrashing policy throttled; pins
  // it started; faults served remotely because their block was pinned.
  uint64_t policy_prefetches = 0, policy_prefetch_bytes = 0;
  uint64_t throttles = 0, pins = 0, pinned_faults = 0;
  // Access counters: notifications serviced; those the policy migrated
  // (ranges and bytes moved to this GPU's VRAM); those it left because the
  // thrashing policy throttles or pins their block.
  uint64_t ac_notifications = 0, ac_migrations = 0, ac_migrated_bytes = 0, ac_thrashing_skips = 0;
};

struct SvmStats {
  uint64_t invalidations = 0;         // range-level callbacks
  uint64_t ranges_zapped = 0;         // (range, GPU) pairs zapped
  uint64_t tlb_flushes = 0;           // TLB invalidations started
  uint64_t two_pass_finishes = 0;     // finish passes run
  uint64_t single_pass_fallbacks = 0; // two-pass mode without a finish object
  uint64_t own_migrate_ignored = 0;   // MIGRATE events of our own migrations
  uint64_t pending_flush_waits = 0;   // another invalidation's in-flight flush waited for
  // Time of the TLB flushes invalidation callbacks started: tlb_flush_ns
  // sums, per flush, the time from its start to its modelled completion
  // (what waiting for them one GPU at a time costs at least); tlb_wait_ns
  // is the time callbacks and their finish passes were blocked on flushes.
  // Two-pass saves the difference: flushes overlap each other and the
  // mm's work between the two passes.
  uint64_t tlb_flush_ns = 0;
  uint64_t tlb_wait_ns = 0;
  uint64_t unmap_events = 0;
  uint64_t gc_runs = 0;
  uint64_t ranges_collected = 0;
  uint64_t gc_evictions = 0;          // partially unmapped ranges evicted
  uint64_t attribute_invalidations = 0;
  uint64_t ranges = 0;                // live ranges (gpusvm)
  uint64_t notifiers = 0;
};

struct VramStats {
  uint64_t bytes_total = 0;
  uint64_t bytes_used = 0;        // allocated blocks
  uint64_t allocations = 0;       // live allocations (Devmem)
  uint64_t evictions = 0;         // LRU evictions that freed memory
  uint64_t evict_failures = 0;
  uint64_t bytes_evicted = 0;
  uint64_t bytes_to_vram = 0;     // copied in (migrations)
  uint64_t bytes_to_ram = 0;      // copied out (CPU touch, eviction)
};

// One GPU.
class Device {
 public:
  // EINVAL: bad id or config; ENOMEM: VRAM or pagemap.
  static Result<std::unique_ptr<Device>> TryCreate(uint32_t id, const DeviceConfig& config,
                                                   gpu::SystemMemory* sysmem, Env& env);
  // Detaches from every Svm still attached (Svm::Detach), stops the fault
  // thread, evicts every allocation (no device page survives), then
  // destroys the GPU.
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  uint32_t id() const;
  gpu::Gpu& gpu();
  gpusvm::Pagemap& pagemap();
  const void* owner() const;
  const DeviceConfig& config() const;

  // Lets the two GPUs map and copy each other's VRAM (gpu::Gpu peer
  // access). EINVAL itself; EEXIST already enabled.
  Result<void> EnablePeerAccess(Device& other);
  // Whether this GPU may map `other`'s VRAM directly: same device, or the
  // same owner with peer access enabled.
  bool CanMapVramOf(const Device& other) const;

  // Fault servicing of the default context without the thread
  // (config.fault_thread false): fetch one batch (waiting up to timeout_ns
  // for the first fault) and serve it, then the access counter
  // notifications queued. The faults answered (0 when only the access
  // counters' doorbell rang); ETIME if nothing came; ECANCELED after
  // shutdown.
  Result<size_t> ServiceFaults(uint64_t timeout_ns);

  // Evicts allocations, least recently used first, until `bytes` are free
  // in one block of that size, or nothing is left to evict (ENOMEM).
  Result<void> EvictFor(uint64_t bytes);
  // Evicts every allocation (of `mm` only when not null). The allocations
  // that stayed (busy).
  uint64_t EvictAll(const mm::Mm* mm = nullptr);

  VramStats vram_stats() const;

  class Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Device(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One address space's SVM.
class Svm {
 public:
  // EINVAL: null mm, bad chunk sizes / notifier size / window (as
  // gpusvm::GpuSvm::TryCreate).
  static Result<std::unique_ptr<Svm>> TryCreate(std::shared_ptr<mm::Mm> mm, const SvmConfig& config);
  // Close().
  ~Svm();
  Svm(const Svm&) = delete;
  Svm& operator=(const Svm&) = delete;

  // The VM of `dev` in this address space. The first address space a GPU
  // runs gets its default context (served by the device's fault thread);
  // others get a context of their own (Vm::context(), with a fault thread
  // of their own). EEXIST: a GPU with this id is already attached;
  // EINVAL: closed.
  Result<Vm*> Attach(Device& dev);
  // Unbinds everything of the device's Vm, zaps its page table and detaches
  // it. ENOENT: not attached.
  Result<void> Detach(Device& dev);
  // The Vm of GPU `gpu_id`, or null.
  Vm* vm(uint32_t gpu_id) const;

  // madvise: sets attributes on [start, start + len) (page aligned). Ranges
  // whose effective attributes changed are invalidated on every GPU (their
  // placement is decided again on the next fault); unchanged: nothing.
  // EINVAL: unaligned, empty, outside the window, a kDevice location of a
  // GPU not attached; ENOLINK: (not used: every attached GPU may be named).
  Result<void> SetAttributes(uint64_t start, uint64_t len, const AttributeUpdate& update);
  // The attribute spans covering [start, start + len), in address order,
  // gaps filled with defaults. EINVAL as above.
  Result<std::vector<AttributeSpan>> QueryAttributes(uint64_t start, uint64_t len) const;

  // Runs the garbage collector now (what the worker and the fault handler
  // do). The error state if a collection failed.
  Result<void> CollectGarbage();
  // The VM error state: set when the collector failed; every later fault
  // is cancelled with it. Success when healthy.
  Result<void> error() const;

  // VM close: stops the collector, finishes the gpusvm (every range
  // unmapped and removed, on every GPU), removes binds and userptrs, and
  // evicts every device page of this address space. Idempotent.
  void Close();

  const SvmConfig& config() const;
  mm::Mm& mm() const;
  SvmStats stats() const;

  class Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Svm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct BindFlags {
  bool read_only = false;
  // A userptr (seed 003): after an invalidation it is revalidated before
  // the next launch through this Vm (LaunchKernel / LaunchPattern) --
  // and on a GPU fault. A plain bind (seed 001) is revalidated on the
  // next GPU fault only.
  bool userptr = false;
};

// One GPU in one address space.
class Vm {
 public:
  Device& device() const;
  Svm& svm() const;
  uint32_t gpu_id() const;

  // The fault handler for one GPU access (what the device's fault thread
  // runs per fault): success means the page is mapped as `access` needs.
  // Errors (the kernel is cancelled with them): EINVAL outside the GPU VA
  // window; ENOENT no VMA; EPERM write to a read-only mapping; EACCES an
  // atomic under AtomicMode::kCpu, or one that cannot get device memory;
  // EFAULT the address space is gone or the range kept being unmapped;
  // ENOMEM; ENODEV the Vm was detached; the VM error state.
  Result<void> HandleFault(uint64_t va, uint8_t access);

  // Moves [start, start + len) to `where` (kDefault: the preferred
  // location attribute, else the Placement policy for this GPU) and maps
  // it on this GPU; ranges already valid there are skipped. Page aligned.
  // Errors as HandleFault, plus EINVAL for a GPU not attached.
  Result<void> Prefetch(uint64_t start, uint64_t len, Location where);

  // Explicit bind (seed 001) or userptr (seed 003) of [start, start + len)
  // on this GPU: faults the pages in (read_begin / range fault /
  // read_retry) and maps them, before any GPU fault. Its own interval
  // notifier: an invalidation zaps it. Faults of this GPU inside it are
  // served by revalidating it, never by SVM ranges. Returns a handle.
  // EINVAL: unaligned, empty or outside the window; EEXIST: overlaps
  // another bind of this Vm; EFAULT: a page without a VMA (as pinning a
  // userptr); EPERM: a writable bind of a read-only mapping; ENOMEM.
  Result<uint64_t> Bind(uint64_t start, uint64_t len, BindFlags flags = {});
  // ENOENT: no such handle.
  Result<void> Unbind(uint64_t handle);
  // Revalidates every invalidated userptr (what the launch calls do).
  Result<void> RevalidateUserptrs();
  // Whether the bind is mapped (not invalidated since its last validation).
  Result<bool> BindValid(uint64_t handle) const;

  // The GPU context this address space runs in on the GPU (the GPU's
  // default context for the first address space attached, a context of
  // its own for others). Launch through it (or the calls below).
  gpu::GpuContext& context() const;
  // Fault servicing without threads (DeviceConfig::fault_thread false):
  // one batch of this Vm's context, then its access counter
  // notifications. The faults answered (0: only notifications); ETIME if
  // nothing came within timeout_ns.
  Result<size_t> ServiceFaults(uint64_t timeout_ns);

  // Launch through this Vm: userptrs are revalidated first.
  Result<gpu::Launch> LaunchKernel(gpu::KernelFn fn, const gpu::LaunchParams& params = {});
  Result<gpu::Launch> LaunchPattern(const gpu::PatternParams& params);

  VmStats stats() const;

  class Impl;
  Impl& impl() { return *impl_; }

 private:
  friend class Svm;
  explicit Vm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;

 public:
  ~Vm();
};

const char* InvalidationModeName(InvalidationMode m);
const char* PlacementName(Placement p);
const char* PeerPolicyName(PeerPolicy p);
const char* AtomicModeName(AtomicMode m);

}  // namespace usvm::driver

#endif  // USVM_DRIVER_DRIVER_H_
