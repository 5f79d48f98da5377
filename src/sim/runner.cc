// The scenario runner (runner.h): the machine, the timeline, the
// reference model and the checks.
#include "usvm/sim/runner.h"

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <thread>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/driver/driver.h"
#include "usvm/driver/events.h"
#include "usvm/driver/frame_memory.h"
#include "usvm/gpu/gpu.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/types.h"
#include "usvm/sim/report.h"
#include "usvm/sim/trace.h"

namespace usvm::sim {

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t k2M = uint64_t{2} << 20;
constexpr uint64_t kBufferBase = uint64_t{0x200000000000};

// The word a CPU fill with `seed` writes at buffer offset `off`.
uint64_t Word(uint64_t seed, uint64_t off) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + off;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z | 1;
}

// "(density)": the policy behind an event, if any.
std::string PolicySuffix(const driver::Event& e) { return e.policy ? fmt::format("({})", e.policy) : ""; }

// Collects the driver's events (installed as the process's observer while
// a run lasts).
class Collector final : public driver::EventObserver {
 public:
  void OnEvent(const driver::Event& e) override {
    MutexLock l(mu_);
    events_.push_back(e);
  }
  std::vector<driver::Event> Take() {
    MutexLock l(mu_);
    return std::move(events_);
  }

 private:
  Mutex mu_;
  std::vector<driver::Event> events_ USVM_GUARDED_BY(mu_);
};

class ObserverScope {
 public:
  explicit ObserverScope(driver::EventObserver* o) { prev_ = driver::SetEventObserver(o); }
  ~ObserverScope() { driver::SetEventObserver(prev_); }

 private:
  driver::EventObserver* prev_;
};

enum PageState : uint8_t { kUnmapped = 0, kKnown = 1, kUnknown = 2 };

struct Buf {
  const BufferSpec* spec = nullptr;
  uint64_t va = 0;        // current start (mremap may move it)
  uint64_t slot = 0;      // the fixed address of its first mapping
  std::vector<uint8_t> ref;
  std::vector<uint8_t> state;     // per page
  std::vector<uint8_t> prot;      // per page (mm::kProt*)
  std::vector<uint32_t> last;     // per page: executed step number (0: none)
  uint64_t size() const { return ref.size(); }
  uint64_t pages() const { return ref.size() / kPage; }
};

// A GPU kernel launched and not yet finished (async), or being finished.
struct Pending {
  const Step* st = nullptr;
  std::string phase;
  uint32_t seq = 0;
  std::string desc;
  size_t buf = 0;  // index in bufs_
  uint64_t off = 0, len = 0, va = 0;
  uint64_t k0 = 0;
  Result<gpu::Launch> launch = usvm::Unexpected(Error(Errc::kInval, "not launched"));
  bool writes = false;
  // Another step used its span while it ran (an async kernel): its
  // result cannot be predicted (written pages become unknown, a read
  // kernel's checksum is not checked).
  bool raced = false;
};

struct ForkChild {
  std::shared_ptr<mm::AddressSpace> as;
  std::vector<Buf> snapshot;
  std::string step;
};

// Stops the run with a mismatch, or with an error (a hang).
struct Stop {
  std::optional<Mismatch> mismatch;
  std::string error;
};

class Run {
 public:
  Run(const Scenario& s, const RunOptions& o) : s_(s), o_(o) {}
  Expected<RunResult, std::string> Go();

 private:
  // Setup / teardown.
  std::string Setup();
  void Teardown();
  // The timeline.
  std::optional<Stop> RunSteps(const std::vector<Step>& steps, const std::string& phase);
  std::optional<Stop> DoStep(const Step& st, const std::string& phase);
  std::optional<Stop> Compute(const Step& st, const std::string& phase);
  // Waits for a kernel and brings the reference up to date.
  std::optional<Stop> FinishKernel(Pending& k);
  // Waits for every async kernel, in launch order.
  std::optional<Stop> WaitAll() {
    std::optional<Stop> stop;
    for (Pending& k : pending_)
      if (auto s = FinishKernel(k); s && !stop) stop = s;
    pending_.clear();
    return stop;
  }
  // A step about to change the bytes of [off, off + len) of buffer `b`:
  // the async kernels on them race with it. (A step that only reads, or
  // moves pages without changing them -- a prefetch, a migration on a CPU
  // touch -- does not: the kernel's result stays predictable; the step's
  // own comparisons skip pages being written, see InFlightWrite.)
  void Conflict(const Buf& b, uint64_t off, uint64_t len) {
    for (Pending& k : pending_)
      if (&bufs_[k.buf] == &b && off < k.off + k.len && k.off < off + len) k.raced = true;
  }
  // Whether an async kernel writing page `p` of `b` runs now.
  bool InFlightWrite(const Buf& b, uint64_t p) const {
    for (const Pending& k : pending_)
      if (&bufs_[k.buf] == &b && k.writes && p * kPage < k.off + k.len && k.off < (p + 1) * kPage) return true;
    return false;
  }
  // Runs fn(first, last) over [0, n) split into `threads` contiguous
  // parts, each on a CPU thread of its own (inline for one), with a trace
  // span per thread.
  template <typename Fn>
  void ParallelPages(uint32_t threads, uint64_t n, const std::string& name, Fn fn);
  // CPU writes of words at buffer offset `off` (reference follows).
  bool CpuWriteWords(Buf& b, uint64_t off, const std::vector<uint64_t>& w, uint32_t seq);
  // The word at `off` of the reference.
  static uint64_t RefWord(const Buf& b, uint64_t off) {
    uint64_t v;
    std::memcpy(&v, &b.ref[off], 8);
    return v;
  }
  static void SetRefWord(Buf& b, uint64_t off, uint64_t v) { std::memcpy(&b.ref[off], &v, 8); }
  std::optional<Stop> VerifyAll(const std::string& when);
  std::optional<Stop> VerifyBuf(mm::AddressSpace& as, const Buf& b, const std::string& view, const std::string& when);
  // Helpers.
  Buf& BufOf(const std::string& name);
  std::string Describe(const Step& st, const std::string& phase) const;
  void Touch(Buf& b, uint64_t off, uint64_t len, uint32_t seq);
  void Fault(const Step& st, const std::string& phase, const std::string& err, bool expected);
  driver::Vm& VmOf(uint32_t gpu) { return *svm_->vm(gpu); }
  std::optional<Stop> WaitKernel(const Step& st, const std::string& phase, Result<gpu::Launch> l, uint64_t t0,
                                 gpu::LaunchStats* stats, bool* cancelled);
  uint64_t Now() const { return env_->NowNs(); }
  std::string SpanName(const Buf& b, uint64_t off, uint64_t len) const {
    return fmt::format("{}[{:#x}+{:#x}]", b.spec->name, off, len);
  }

  const Scenario& s_;
  const RunOptions& o_;
  RunResult res_;
  Collector collector_;
  std::vector<SimSpan> spans_;
  uint64_t t0_ = 0;

  std::unique_ptr<Env> env_;
  std::unique_ptr<mm::FramePool> pool_;
  std::unique_ptr<driver::FrameMemory> sysmem_;
  std::vector<std::unique_ptr<driver::Device>> devs_;
  std::shared_ptr<mm::AddressSpace> as_;
  std::unique_ptr<driver::Svm> svm_;
  char owner_token_ = 0;

  std::vector<Buf> bufs_;
  std::vector<ForkChild> children_;
  std::vector<Pending> pending_;  // async kernels in flight, in launch order
  std::map<std::tuple<uint32_t, std::string, uint64_t>, uint64_t> binds_;  // (gpu, buffer, offset) -> handle
  // Executed steps that touched memory: number -> description.
  std::map<uint32_t, std::string> touched_by_;
  uint32_t seq_ = 0;
  std::vector<uint64_t> kernel_ns_;
  uint32_t cpu_thread_ = 0;
  // For the report: VRAM in use after each step, and every place a buffer
  // has lived.
  std::vector<ResidencySample> residency_;
  std::vector<BufferExtent> extents_;
  void Sample() {
    if (o_.report_path.empty()) return;
    ResidencySample s;
    s.t_ns = Now();
    for (auto& d : devs_) s.vram_used.push_back(d->vram_stats().bytes_used);
    residency_.push_back(std::move(s));
  }
};

std::string Run::Setup() {
  env_ = std::make_unique<Env>(std::make_unique<RealClock>(), s_.seed);
  auto pool = mm::FramePool::TryCreate(s_.machine.system_memory_bytes, *env_);
  if (!pool) return "cannot create system memory: " + pool.error().ToString();
  pool_ = std::move(*pool);
  sysmem_ = std::make_unique<driver::FrameMemory>(*pool_);
  for (uint32_t i = 0; i < s_.machine.gpus; ++i) {
    driver::DeviceConfig dc;
    dc.gpu.vram_bytes = s_.machine.vram_bytes;
    dc.gpu.exec_threads = s_.machine.exec_threads;
    dc.gpu.copy_engines = s_.machine.copy_engines;
    dc.gpu.fault_buffer_entries = s_.machine.fault_buffer_entries;
    dc.gpu.latency = s_.machine.latency == "default" ? gpu::LatencyModel::Default() : gpu::LatencyModel::Zero();
    if (s_.machine.tlb_flush_ns >= 0) dc.gpu.latency.tlb_invalidate_ns = uint64_t(s_.machine.tlb_flush_ns);
    if (s_.machine.fault_latency_ns >= 0) dc.gpu.latency.fault_service_ns = uint64_t(s_.machine.fault_latency_ns);
    if (s_.machine.link_bandwidth >= 0) dc.gpu.latency.link_bandwidth_bytes_per_s = uint64_t(s_.machine.link_bandwidth);
    dc.fault_batch = s_.machine.fault_batch;
    dc.eviction = s_.framework.eviction;
    dc.gpu.access_counters.enabled = s_.framework.access_counters != "off";
    dc.gpu.access_counters.threshold = s_.framework.access_counter_threshold;
    dc.gpu.access_counters.granularity = s_.framework.access_counter_granularity;
    dc.owner = s_.machine.shared_owner ? static_cast<const void*>(&owner_token_) : nullptr;
    auto d = driver::Device::TryCreate(i, dc, sysmem_.get(), *env_);
    if (!d) return fmt::format("cannot create GPU {}: {}", i, d.error().ToString());
    devs_.push_back(std::move(*d));
  }
  if (s_.machine.peer_access)
    for (size_t i = 0; i < devs_.size(); ++i)
      for (size_t j = i + 1; j < devs_.size(); ++j) (void)devs_[i]->EnablePeerAccess(*devs_[j]);
  auto as = mm::AddressSpace::TryCreate(*pool_, {}, *env_);
  if (!as) return "cannot create the address space: " + as.error().ToString();
  as_ = std::move(*as);
  driver::SvmConfig sc;
  sc.name = s_.name;
  sc.notifier_size = s_.framework.notifier_size;
  sc.chunk_sizes = s_.framework.chunk_sizes;
  sc.check_pages_threshold = s_.framework.check_pages_threshold;
  sc.invalidation = s_.framework.invalidation == "single_pass" ? driver::InvalidationMode::kSinglePass
                                                               : driver::InvalidationMode::kTwoPass;
  sc.placement = s_.framework.placement == "system" ? driver::Placement::kSystem : driver::Placement::kFaultingGpu;
  sc.peer_policy = s_.framework.peer_policy == "migrate"  ? driver::PeerPolicy::kMigrate
                   : s_.framework.peer_policy == "system" ? driver::PeerPolicy::kSystem
                                                          : driver::PeerPolicy::kMapRemote;
  sc.atomic_timeslice_ms = s_.framework.atomic_timeslice_ms;
  sc.atomic_tries = s_.framework.atomic_tries;
  sc.migration = s_.framework.migration;
  sc.thrashing = s_.framework.thrashing;
  sc.access_counters = s_.framework.access_counters;
  sc.policy = s_.framework.policy;
  sc.env = env_.get();
  auto svm = driver::Svm::TryCreate(as_, sc);
  if (!svm) return "cannot create the SVM: " + svm.error().ToString();
  svm_ = std::move(*svm);
  for (auto& d : devs_)
    if (auto v = svm_->Attach(*d); !v) return fmt::format("cannot attach GPU {}: {}", d->id(), v.error().ToString());
  // Buffers: each at its own 2 MiB aligned slot with a guard gap.
  uint64_t at = kBufferBase;
  for (const BufferSpec& spec : s_.buffers) {
    Buf b;
    b.spec = &spec;
    b.slot = at;
    at += (spec.size + k2M - 1) / k2M * k2M + k2M;
    b.ref.assign(spec.size, 0);
    b.state.assign(spec.size / kPage, kUnmapped);
    b.prot.assign(spec.size / kPage, 0);
    b.last.assign(spec.size / kPage, 0);
    if (spec.mapped) {
      auto r = as_->Mmap(b.slot, spec.size, mm::kProtRead | mm::kProtWrite,
                         mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed);
      if (!r) return fmt::format("mmap of buffer '{}': {}", spec.name, r.error().ToString());
      b.va = *r;
      extents_.push_back({spec.name, b.va, spec.size});
      std::fill(b.state.begin(), b.state.end(), kKnown);
      std::fill(b.prot.begin(), b.prot.end(), mm::kProtRead | mm::kProtWrite);
      if (spec.hugepage) (void)as_->Madvise(b.va, spec.size, mm::kMadvHugePage);
    }
    bufs_.push_back(std::move(b));
  }
  return "";
}

void Run::Teardown() {
  for (auto& c : children_) c.as->Exit();
  children_.clear();
  if (svm_) {
    for (auto& [k, h] : binds_) (void)svm_->vm(std::get<0>(k))->Unbind(h);
    svm_.reset();
  }
  if (as_) as_->Exit();
  devs_.clear();
}

Buf& Run::BufOf(const std::string& name) {
  for (Buf& b : bufs_)
    if (b.spec->name == name) return b;
  return bufs_.front();  // CheckScenario guarantees the name
}

std::string Run::Describe(const Step& st, const std::string& phase) const {
  std::string d = fmt::format("phase '{}' line {} {}", phase, st.line, StepKindName(st.kind));
  if (st.kind == StepKind::kGpuKernel) d += fmt::format(" {} on gpu{}", PatternName(st.pattern), st.gpu);
  else if (st.kind == StepKind::kGpuAtomic || st.kind == StepKind::kPrefetch || st.kind == StepKind::kBind)
    d += fmt::format(" gpu{}", st.gpu);
  if (!st.buffer.empty()) d += " " + st.buffer;
  d += fmt::format(" (step #{})", seq_);
  return d;
}

void Run::Touch(Buf& b, uint64_t off, uint64_t len, uint32_t seq) {
  for (uint64_t p = off / kPage; p < (off + len + kPage - 1) / kPage && p < b.pages(); ++p) b.last[p] = seq;
}

void Run::Fault(const Step& st, const std::string& phase, const std::string& err, bool expected) {
  res_.metrics.runtime_faults.push_back({Describe(st, phase), err, expected});
  if (!expected) ++res_.metrics.unexpected_faults;
}

std::optional<Stop> Run::WaitKernel(const Step& st, const std::string& phase, Result<gpu::Launch> l, uint64_t t0,
                                    gpu::LaunchStats* stats, bool* cancelled) {
  *cancelled = false;
  if (!l) {
    Fault(st, phase, l.error().ToString(), st.expect_fault);
    *cancelled = true;
    return std::nullopt;
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(o_.kernel_timeout_s);
  while (!l->fence().IsSignalled()) {
    if (std::chrono::steady_clock::now() > end)
      return Stop{std::nullopt, fmt::format("{}: the kernel did not finish in {} s (hang)", Describe(st, phase),
                                            o_.kernel_timeout_s)};
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  const uint64_t t1 = Now();
  auto r = l->Wait();
  *stats = l->stats();
  kernel_ns_.push_back(t1 - t0);
  res_.metrics.kernels++;
  res_.metrics.kernel_ns += t1 - t0;
  auto& pg = res_.metrics.per_gpu[st.gpu];
  pg.kernels++;
  pg.kernel_ns += t1 - t0;
  spans_.push_back({st.kind == StepKind::kGpuCompute
                        ? fmt::format("{} {}->{}", ComputeName(st.compute), st.a, st.c)
                        : fmt::format("{} {}", st.kind == StepKind::kGpuAtomic ? "atomic" : PatternName(st.pattern), st.buffer),
                    "kernel", st.gpu, 0, t0, t1,
                    fmt::format("{{\"faults\":{},\"stall_ns\":{},\"accesses\":{},\"step\":\"{}\"}}", stats->faults,
                                stats->stall_ns, stats->accesses, Describe(st, phase))});
  if (!r) {
    Fault(st, phase, r.error().ToString(), st.expect_fault);
    *cancelled = true;
  } else if (st.expect_fault) {
    Fault(st, phase, "expected a fault, the kernel completed", false);
  }
  return std::nullopt;
}

std::optional<Stop> Run::RunSteps(const std::vector<Step>& steps, const std::string& phase) {
  for (const Step& st : steps) {
    if (st.kind == StepKind::kLoop) {
      for (uint32_t i = 0; i < st.repeat; ++i)
        if (auto stop = RunSteps(st.steps, phase)) return stop;
      continue;
    }
    ++seq_;
    auto stop = DoStep(st, phase);
    Sample();
    if (stop) return stop;
  }
  return std::nullopt;
}

std::optional<Stop> Run::DoStep(const Step& st, const std::string& phase) {
  const uint32_t seq = seq_;
  const uint64_t t0 = Now();
  if (st.kind == StepKind::kFork) {
    auto child = as_->Fork();
    if (!child) {
      Fault(st, phase, child.error().ToString(), false);
      return std::nullopt;
    }
    children_.push_back({std::move(*child), bufs_, Describe(st, phase)});
    for (Buf& sb : children_.back().snapshot)
      for (uint64_t p = 0; p < sb.pages(); ++p)
        if (sb.state[p] == kKnown && InFlightWrite(bufs_[&sb - children_.back().snapshot.data()], p))
          sb.state[p] = kUnknown;
    spans_.push_back({"fork", "cpu", UINT32_MAX, cpu_thread_, t0, Now(), ""});
    return std::nullopt;
  }
  if (st.kind == StepKind::kGpuCompute) return Compute(st, phase);
  if (st.kind == StepKind::kWait) return WaitAll();
  Buf& b = BufOf(st.buffer);
  uint64_t off = st.offset;
  uint64_t len = st.size ? st.size : (off < b.size() ? b.size() - off : 0);
  if (off + len > b.size()) len = off < b.size() ? b.size() - off : 0;  // the buffer shrank
  if (len == 0 && st.kind != StepKind::kMmap && st.kind != StepKind::kMremap) {
    Fault(st, phase, "the span is outside the buffer (it shrank)", st.expect_fault);
    return std::nullopt;
  }
  const uint64_t va = b.va + off;
  const std::string desc = Describe(st, phase);
  {
    const bool remaps = st.kind == StepKind::kMmap || st.kind == StepKind::kMremap;
    const bool writes = remaps || st.kind == StepKind::kCpuWrite || st.kind == StepKind::kCpuAtomic ||
                        st.kind == StepKind::kMunmap || st.kind == StepKind::kMadvise ||
                        st.kind == StepKind::kGpuAtomic ||
                        (st.kind == StepKind::kGpuKernel && (st.pattern == PatternKind::kStreamWrite ||
                                                              st.pattern == PatternKind::kReadModifyWrite));
    if (remaps) Conflict(b, 0, UINT64_MAX / 2);
    else if (writes && (st.kind != StepKind::kMadvise || st.str == "dontneed")) Conflict(b, off, len);
  }
  auto all_pages = [&](auto pred) {
    for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
      if (!pred(p)) return false;
    return true;
  };
  auto cpu_span = [&](const char* what) {
    spans_.push_back({fmt::format("{} {}", what, SpanName(b, off, len)), "cpu", UINT32_MAX, cpu_thread_, t0, Now(), ""});
  };
  Metrics& m = res_.metrics;
  switch (st.kind) {
    case StepKind::kCpuWrite: {
      ++m.cpu_steps;
      const uint64_t seed = st.seed ? st.seed : s_.seed * 1000003 + seq;
      std::vector<uint64_t> w(len / 8);
      for (uint64_t i = 0; i < w.size(); ++i) w[i] = Word(seed, off + i * 8);
      const bool writable = all_pages([&](uint64_t p) { return b.state[p] != kUnmapped && (b.prot[p] & mm::kProtWrite); });
      if (writable) {
        // One write per CPU thread, each over its part of the span.
        std::vector<Result<void>> parts(std::max<uint32_t>(st.threads, 1), Result<void>{});
        std::atomic<uint32_t> next{0};
        ParallelPages(st.threads, len / kPage, fmt::format("cpu_write {}", SpanName(b, off, len)),
                      [&](uint64_t first, uint64_t last) {
                        const uint32_t slot = next.fetch_add(1);
                        if (last > first)
                          parts[slot] = as_->Write(va + first * kPage, &w[first * kPage / 8], (last - first) * kPage);
                      });
        Result<void> r;
        for (auto& x : parts)
          if (!x) r = x;
        if (!r) {
          Fault(st, phase, r.error().ToString(), st.expect_fault);
          // Which pages got written is unknown: write them page by page below.
        } else {
          std::memcpy(&b.ref[off], w.data(), len);
          for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) b.state[p] = kKnown;
          Touch(b, off, len, seq);
          touched_by_[seq] = desc;
          m.cpu_bytes += len;
          if (st.expect_fault) Fault(st, phase, "expected a fault, the write succeeded", false);
          cpu_span("cpu_write");
          return std::nullopt;
        }
      }
      // Page by page (some pages are not writable, or the whole write
      // failed part-way): the pages that can be written are; one that
      // cannot keeps its bytes -- unknown if the failed whole write may
      // have reached it. (The whole write's fault is reported already.)
      bool faulted = false;
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) {
        auto r = as_->Write(b.va + p * kPage, &w[(p * kPage - off) / 8], kPage);
        if (!r) {
          if (!faulted && !writable)
            Fault(st, phase, fmt::format("{} at {:#x}", r.error().ToString(), b.va + p * kPage), st.expect_fault);
          if (writable && b.state[p] == kKnown) b.state[p] = kUnknown;
          faulted = true;
          continue;
        }
        std::memcpy(&b.ref[p * kPage], &w[(p * kPage - off) / 8], kPage);
        b.state[p] = kKnown;
        b.last[p] = seq;
        m.cpu_bytes += kPage;
      }
      touched_by_[seq] = desc;
      if (!faulted && st.expect_fault) Fault(st, phase, "expected a fault, the write succeeded", false);
      cpu_span("cpu_write");
      return std::nullopt;
    }
    case StepKind::kCpuRead: {
      ++m.cpu_steps;
      // Every page is read (by `threads` CPU threads, each a part), then
      // compared in order: mapped, readable ones with the reference; the
      // others must fault.
      const uint64_t np = len / kPage;
      std::vector<uint8_t> all(len);
      std::vector<Result<void>> res(np, Result<void>{});
      ParallelPages(st.threads, np, fmt::format("cpu_read {}", SpanName(b, off, len)),
                    [&](uint64_t first, uint64_t last) {
                      for (uint64_t i = first; i < last; ++i)
                        res[i] = as_->Read(va + i * kPage, &all[i * kPage], kPage);
                    });
      bool faulted = false;
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) {
        const uint8_t* got = &all[(p - off / kPage) * kPage];
        const Result<void>& r = res[p - off / kPage];
        if (b.state[p] == kUnmapped || !(b.prot[p] & mm::kProtRead)) {
          if (!r && !faulted) Fault(st, phase, fmt::format("{} at {:#x}", r.error().ToString(), b.va + p * kPage), st.expect_fault);
          if (r && b.state[p] == kUnmapped) Fault(st, phase, fmt::format("read of an unmapped page at {:#x} succeeded", b.va + p * kPage), false);
          faulted |= !r.has_value();
          continue;
        }
        if (!r) {
          if (!faulted) Fault(st, phase, fmt::format("{} at {:#x}", r.error().ToString(), b.va + p * kPage), st.expect_fault);
          faulted = true;
          continue;
        }
        m.cpu_bytes += kPage;
        if (b.state[p] != kKnown || !s_.verify || InFlightWrite(b, p)) continue;
        ++m.checks;
        m.bytes_verified += kPage;
        if (std::memcmp(got, &b.ref[p * kPage], kPage) != 0) {
          uint64_t i = 0;
          while (got[i] == b.ref[p * kPage + i]) ++i;
          Mismatch mm;
          mm.buffer = b.spec->name;
          mm.offset = p * kPage + i;
          mm.va = b.va + mm.offset;
          mm.got = got[i];
          mm.want = b.ref[p * kPage + i];
          for (uint64_t j = i; j < kPage; ++j) mm.bytes_differ += got[j] != b.ref[p * kPage + j];
          mm.view = "cpu_read";
          mm.when = desc;
          mm.last_step = b.last[p] ? touched_by_[b.last[p]] : "(none: never written)";
          return Stop{mm, ""};
        }
      }
      cpu_span("cpu_read");
      return std::nullopt;
    }
    case StepKind::kCpuAtomic: {
      ++m.cpu_steps;
      const uint64_t words = len / 8;
      for (uint64_t i = 0; i < st.count; ++i) {
        const uint64_t o = off + (i % words) * 8;
        const uint64_t p = o / kPage;
        auto r = as_->AtomicFetchAdd(b.va + o, st.value);
        if (!r) {
          Fault(st, phase, fmt::format("{} at {:#x}", r.error().ToString(), b.va + o), st.expect_fault);
          break;
        }
        uint64_t v;
        std::memcpy(&v, &b.ref[o], 8);
        if (b.state[p] == kKnown && s_.verify && v != *r && !InFlightWrite(b, p)) {
          ++m.checks;
          Mismatch mm;
          mm.buffer = b.spec->name;
          mm.offset = o;
          mm.va = b.va + o;
          uint64_t got = *r;
          for (int k = 0; k < 8; ++k) {
            if (((got >> (8 * k)) & 0xff) != ((v >> (8 * k)) & 0xff)) {
              mm.offset = o + k;
              mm.va = b.va + o + k;
              mm.got = (got >> (8 * k)) & 0xff;
              mm.want = (v >> (8 * k)) & 0xff;
              break;
            }
          }
          mm.bytes_differ = 1;
          mm.view = "cpu_atomic (old value)";
          mm.when = desc;
          mm.last_step = b.last[p] ? touched_by_[b.last[p]] : "(none: never written)";
          return Stop{mm, ""};
        }
        v += st.value;
        std::memcpy(&b.ref[o], &v, 8);
        b.last[p] = seq;
      }
      touched_by_[seq] = desc;
      cpu_span("cpu_atomic");
      return std::nullopt;
    }
    case StepKind::kMmap: {
      ++m.cpu_steps;
      // A fresh mapping of the whole buffer at its slot (what was mapped
      // there goes first).
      if (b.va && std::any_of(b.state.begin(), b.state.end(), [](uint8_t x) { return x != kUnmapped; }))
        (void)as_->Munmap(b.va, b.size());
      const uint64_t size = b.spec->size;
      auto r = as_->Mmap(b.slot, size, mm::kProtRead | mm::kProtWrite,
                         mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed);
      if (!r) {
        Fault(st, phase, r.error().ToString(), false);
        return std::nullopt;
      }
      b.va = *r;
      extents_.push_back({b.spec->name, b.va, size});
      b.ref.assign(size, 0);
      b.state.assign(size / kPage, kKnown);
      b.prot.assign(size / kPage, mm::kProtRead | mm::kProtWrite);
      b.last.assign(size / kPage, seq);
      if (b.spec->hugepage) (void)as_->Madvise(b.va, size, mm::kMadvHugePage);
      touched_by_[seq] = desc;
      cpu_span("mmap");
      return std::nullopt;
    }
    case StepKind::kMunmap: {
      ++m.cpu_steps;
      auto r = as_->Munmap(va, len);
      if (!r) {
        Fault(st, phase, r.error().ToString(), false);
        return std::nullopt;
      }
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) {
        b.state[p] = kUnmapped;
        b.prot[p] = 0;
        std::memset(&b.ref[p * kPage], 0, kPage);
      }
      Touch(b, off, len, seq);
      touched_by_[seq] = desc;
      cpu_span("munmap");
      return std::nullopt;
    }
    case StepKind::kMprotect: {
      ++m.cpu_steps;
      const uint32_t prot = st.str == "none" ? mm::kProtNone
                            : st.str == "r"  ? mm::kProtRead
                                             : mm::kProtRead | mm::kProtWrite;
      auto r = as_->Mprotect(va, len, prot);
      if (!r) {
        Fault(st, phase, r.error().ToString(), false);
        return std::nullopt;
      }
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
        if (b.state[p] != kUnmapped) b.prot[p] = prot;
      cpu_span("mprotect");
      return std::nullopt;
    }
    case StepKind::kMadvise: {
      ++m.cpu_steps;
      const int adv = st.str == "dontneed"     ? int(mm::kMadvDontNeed)
                      : st.str == "hugepage"   ? int(mm::kMadvHugePage)
                      : st.str == "nohugepage" ? int(mm::kMadvNoHugePage)
                                               : int(mm::kMadvNormal);
      auto r = as_->Madvise(va, len, adv);
      if (!r) {
        Fault(st, phase, r.error().ToString(), false);
        return std::nullopt;
      }
      if (adv == mm::kMadvDontNeed) {
        // Private anonymous memory reads back as zeros.
        for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
          if (b.state[p] != kUnmapped) {
            std::memset(&b.ref[p * kPage], 0, kPage);
            b.state[p] = kKnown;
            b.last[p] = seq;
          }
        touched_by_[seq] = desc;
      }
      cpu_span("madvise");
      return std::nullopt;
    }
    case StepKind::kMremap: {
      ++m.cpu_steps;
      auto r = as_->Mremap(b.va, b.size(), st.new_size, mm::kMremapMayMove);
      if (!r) {
        Fault(st, phase, r.error().ToString(), false);
        return std::nullopt;
      }
      const uint64_t old = b.size();
      b.va = *r;
      extents_.push_back({b.spec->name, b.va, st.new_size});
      b.ref.resize(st.new_size, 0);
      b.state.resize(st.new_size / kPage, kKnown);
      b.prot.resize(st.new_size / kPage, old ? b.prot[old / kPage - 1] : mm::kProtRead | mm::kProtWrite);
      b.last.resize(st.new_size / kPage, seq);
      touched_by_[seq] = desc;
      cpu_span("mremap");
      return std::nullopt;
    }
    case StepKind::kGpuKernel:
    case StepKind::kGpuAtomic: {
      Pending k;
      k.st = &st;
      k.phase = phase;
      k.seq = seq;
      k.desc = desc;
      k.buf = static_cast<size_t>(&b - bufs_.data());
      k.off = off;
      k.len = len;
      k.va = va;
      k.writes = st.kind == StepKind::kGpuAtomic || st.pattern == PatternKind::kStreamWrite ||
                 st.pattern == PatternKind::kReadModifyWrite;
      k.k0 = Now();
      // A read kernel over pages an async kernel is writing: its checksum
      // cannot be predicted.
      if (!k.writes)
        for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) k.raced |= InFlightWrite(b, p);
      if (st.kind == StepKind::kGpuKernel) {
        gpu::PatternParams pp;
        pp.pattern = static_cast<gpu::Pattern>(st.pattern);
        pp.va = va;
        pp.length = len;
        pp.stride = st.stride;
        pp.count = st.count;
        pp.value = st.value;
        pp.seed = st.seed;
        pp.iterations = st.iterations;
        pp.threads = st.threads;
        k.launch = VmOf(st.gpu).LaunchPattern(pp);
      } else {
        const uint64_t words = len / 8;
        const uint64_t count = st.count, value = st.value;
        auto fn = [va, words, count, value](gpu::KernelContext& kc) {
          for (uint64_t i = 0; i < count && !kc.cancelled(); ++i)
            kc.AtomicAdd(va + ((uint64_t{kc.thread_id()} * count + i) % words) * 8, value);
        };
        k.launch = VmOf(st.gpu).LaunchKernel(fn, {.threads = st.threads});
      }
      if (st.async && k.launch) {
        pending_.push_back(std::move(k));
        return std::nullopt;
      }
      return FinishKernel(k);
    }
    case StepKind::kPrefetch: {
      driver::Location loc = driver::Location::System();
      if (st.str == "gpu") loc = driver::Location::Device(st.gpu);
      else if (st.str != "system") loc = driver::Location::Device(uint32_t(st.str[3] - '0'));
      auto r = VmOf(st.gpu).Prefetch(va, len, loc);
      if (!r) Fault(st, phase, r.error().ToString(), false);
      spans_.push_back({fmt::format("prefetch {} -> {}", SpanName(b, off, len), st.str), "cpu", UINT32_MAX,
                        cpu_thread_, t0, Now(), ""});
      return std::nullopt;
    }
    case StepKind::kAdvise: {
      driver::AttributeUpdate u;
      if (!st.str.empty())
        u.preferred = st.str == "default"  ? driver::Location::Default()
                      : st.str == "system" ? driver::Location::System()
                                           : driver::Location::Device(uint32_t(st.str[3] - '0'));
      if (!st.atomic_mode.empty())
        u.atomic = st.atomic_mode == "device"   ? driver::AtomicMode::kDevice
                   : st.atomic_mode == "global" ? driver::AtomicMode::kGlobal
                   : st.atomic_mode == "cpu"    ? driver::AtomicMode::kCpu
                                                : driver::AtomicMode::kUndefined;
      if (st.access_in_place >= 0) u.access_in_place = st.access_in_place == 1;
      auto r = svm_->SetAttributes(va, len, u);
      if (!r) Fault(st, phase, r.error().ToString(), false);
      cpu_span("advise");
      return std::nullopt;
    }
    case StepKind::kBind: {
      auto r = VmOf(st.gpu).Bind(va, len, {.read_only = st.read_only, .userptr = st.userptr});
      if (!r) Fault(st, phase, r.error().ToString(), false);
      else binds_[{st.gpu, st.buffer, st.offset}] = *r;
      cpu_span("bind");
      return std::nullopt;
    }
    case StepKind::kUnbind: {
      auto it = binds_.find({st.gpu, st.buffer, st.offset});
      if (it == binds_.end()) {
        Fault(st, phase, "no bind of that span on that GPU", false);
        return std::nullopt;
      }
      auto r = VmOf(st.gpu).Unbind(it->second);
      binds_.erase(it);
      if (!r) Fault(st, phase, r.error().ToString(), false);
      cpu_span("unbind");
      return std::nullopt;
    }
    case StepKind::kFork:
    case StepKind::kGpuCompute:
    case StepKind::kWait:
    case StepKind::kLoop:
      break;
  }
  return std::nullopt;
}

template <typename Fn>
void Run::ParallelPages(uint32_t threads, uint64_t n, const std::string& name, Fn fn) {
  threads = static_cast<uint32_t>(std::clamp<uint64_t>(threads, 1, std::max<uint64_t>(n, 1)));
  if (threads == 1) {
    fn(uint64_t{0}, n);
    return;
  }
  std::vector<SimSpan> sp(threads);
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      const uint64_t first = n * t / threads, last = n * (t + 1) / threads;
      sp[t] = {fmt::format("{} (thread {} of {})", name, t, threads), "cpu", UINT32_MAX, driver::EventThreadId(), Now(), 0, ""};
      fn(first, last);
      sp[t].end_ns = Now();
    });
  for (auto& t : ts) t.join();
  for (auto& s : sp) spans_.push_back(std::move(s));
}

bool Run::CpuWriteWords(Buf& b, uint64_t off, const std::vector<uint64_t>& w, uint32_t seq) {
  const uint64_t len = w.size() * 8;
  if (!as_->Write(b.va + off, w.data(), len)) return false;
  std::memcpy(&b.ref[off], w.data(), len);
  // Pages wholly written are known now.
  for (uint64_t p = (off + kPage - 1) / kPage; p < (off + len) / kPage; ++p) b.state[p] = kKnown;
  Touch(b, off, len, seq);
  return true;
}

std::optional<Stop> Run::Compute(const Step& st, const std::string& phase) {
  const uint32_t seq = seq_;
  const std::string desc = Describe(st, phase);
  Buf& A = BufOf(st.a);
  Buf* B = st.b.empty() ? nullptr : &BufOf(st.b);
  Buf& C = BufOf(st.c);
  uint64_t need_a, need_b, need_c;
  ComputeFootprint(st, &need_a, &need_b, &need_c);
  Conflict(A, 0, need_a);  // spmv / bfs write a; stencil may
  Conflict(C, 0, need_c);
  if (B) {
    for (uint64_t p = 0; p < need_b / kPage; ++p)
      if (InFlightWrite(*B, p)) {
        Fault(st, phase, "an input is being written by an async kernel: not modelled", false);
        return std::nullopt;
      }
  }
  // Usable: big enough (a buffer may have shrunk) and mapped; the result
  // can be predicted only from known inputs.
  auto usable = [](const Buf& b, uint64_t len, bool* known) {
    if (len > b.size()) return false;
    for (uint64_t p = 0; p < (len + kPage - 1) / kPage; ++p) {
      if (b.state[p] == kUnmapped) return false;
      if (b.state[p] != kKnown) *known = false;
    }
    return true;
  };
  // Inputs whose bytes the result depends on: gemm a, b; spmv b (x);
  // stencil a; bfs none (the step writes the graph and the levels).
  bool known = true, ignored = true;
  const bool a_in = st.compute == ComputeKind::kGemm || st.compute == ComputeKind::kStencil;
  if (!usable(A, need_a, a_in ? &known : &ignored) || (B && !usable(*B, need_b, &known)) ||
      !usable(C, need_c, &ignored)) {
    Fault(st, phase, "a buffer of the kernel is unmapped or too small", st.expect_fault);
    return std::nullopt;
  }
  const uint64_t n = st.n, k = st.k;
  const uint64_t a = A.va, c = C.va, bva = B ? B->va : 0;
  driver::Vm& vm = VmOf(st.gpu);
  touched_by_[seq] = desc;
  // Marks the outputs unknown (a cancelled or unpredictable kernel).
  auto outputs_unknown = [&] {
    for (uint64_t p = 0; p < (need_c + kPage - 1) / kPage; ++p)
      if (C.state[p] == kKnown) C.state[p] = kUnknown;
    if (st.compute == ComputeKind::kStencil)
      for (uint64_t p = 0; p < (need_a + kPage - 1) / kPage; ++p)
        if (A.state[p] == kKnown) A.state[p] = kUnknown;
  };
  // One launch, waited for; false when it was cancelled (or refused).
  auto launch = [&](gpu::KernelFn fn, std::optional<Stop>* stop) {
    gpu::LaunchStats ls;
    bool cancelled = false;
    *stop = WaitKernel(st, phase, vm.LaunchKernel(std::move(fn), {.threads = st.threads}), Now(), &ls, &cancelled);
    return !*stop && !cancelled;
  };
  std::optional<Stop> stop;
  Rng rng(st.seed * 0x9E3779B97F4A7C15ull + s_.seed);
  switch (st.compute) {
    case ComputeKind::kGemm: {
      auto fn = [a, bva, c, n](gpu::KernelContext& kc) {
        constexpr uint64_t T = 8;
        for (uint64_t ib = uint64_t{kc.thread_id()} * T; ib < n; ib += uint64_t{kc.num_threads()} * T)
          for (uint64_t jb = 0; jb < n; jb += T) {
            uint64_t acc[T][T] = {};
            const uint64_t ie = std::min(ib + T, n), je = std::min(jb + T, n);
            for (uint64_t kb = 0; kb < n; kb += T) {
              const uint64_t ke = std::min(kb + T, n);
              for (uint64_t i = ib; i < ie; ++i)
                for (uint64_t kk = kb; kk < ke; ++kk) {
                  const uint64_t av = kc.Load(a + (i * n + kk) * 8);
                  for (uint64_t j = jb; j < je; ++j) acc[i - ib][j - jb] += av * kc.Load(bva + (kk * n + j) * 8);
                }
              if (kc.cancelled()) return;
            }
            for (uint64_t i = ib; i < ie; ++i)
              for (uint64_t j = jb; j < je; ++j) kc.Store(c + (i * n + j) * 8, acc[i - ib][j - jb]);
          }
      };
      if (!launch(fn, &stop)) break;
      if (!known) {
        outputs_unknown();
        break;
      }
      std::vector<uint64_t> out(n * n, 0);
      for (uint64_t i = 0; i < n; ++i)
        for (uint64_t kk = 0; kk < n; ++kk) {
          const uint64_t av = RefWord(A, (i * n + kk) * 8);
          for (uint64_t j = 0; j < n; ++j) out[i * n + j] += av * RefWord(*B, (kk * n + j) * 8);
        }
      std::memcpy(&C.ref[0], out.data(), n * n * 8);
      Touch(C, 0, need_c, seq);
      return stop;
    }
    case ComputeKind::kSpmv: {
      // The CSR matrix, written by the CPU: row_ptr, col, val.
      std::vector<uint64_t> m(n + 1 + 2 * n * k);
      for (uint64_t i = 0; i <= n; ++i) m[i] = i * k;
      for (uint64_t e = 0; e < n * k; ++e) {
        m[n + 1 + e] = rng.Uniform(n);
        m[n + 1 + n * k + e] = rng.Next() | 1;
      }
      if (!CpuWriteWords(A, 0, m, seq)) {
        Fault(st, phase, "the CPU could not write the matrix", st.expect_fault);
        outputs_unknown();
        break;
      }
      auto fn = [a, bva, c, n, k](gpu::KernelContext& kc) {
        const uint64_t col = a + (n + 1) * 8, val = col + n * k * 8;
        for (uint64_t i = kc.thread_id(); i < n && !kc.cancelled(); i += kc.num_threads()) {
          uint64_t y = 0;
          const uint64_t lo = kc.Load(a + i * 8), hi = kc.Load(a + (i + 1) * 8);
          for (uint64_t e = lo; e < hi && e < n * k; ++e) y += kc.Load(val + e * 8) * kc.Load(bva + kc.Load(col + e * 8) % n * 8);
          kc.Store(c + i * 8, y);
        }
      };
      if (!launch(fn, &stop)) break;
      if (!known) {
        outputs_unknown();
        break;
      }
      for (uint64_t i = 0; i < n; ++i) {
        uint64_t y = 0;
        for (uint64_t e = m[i]; e < m[i + 1]; ++e) y += m[n + 1 + n * k + e] * RefWord(*B, m[n + 1 + e] * 8);
        SetRefWord(C, i * 8, y);
      }
      Touch(C, 0, need_c, seq);
      return stop;
    }
    case ComputeKind::kBfs: {
      std::vector<uint64_t> g(n + 1 + n * k);
      for (uint64_t i = 0; i <= n; ++i) g[i] = i * k;
      for (uint64_t e = 0; e < n * k; ++e) g[n + 1 + e] = rng.Uniform(n);
      std::vector<uint64_t> lv(n, UINT64_MAX);
      lv[0] = 0;
      if (!CpuWriteWords(A, 0, g, seq) || !CpuWriteWords(C, 0, lv, seq)) {
        Fault(st, phase, "the CPU could not write the graph", st.expect_fault);
        outputs_unknown();
        break;
      }
      auto changed = std::make_shared<std::atomic<bool>>(false);
      for (uint64_t level = 0; level < n; ++level) {
        changed->store(false);
        auto fn = [a, c, n, k, level, changed](gpu::KernelContext& kc) {
          const uint64_t adj = a + (n + 1) * 8;
          for (uint64_t v = kc.thread_id(); v < n && !kc.cancelled(); v += kc.num_threads()) {
            if (kc.Load(c + v * 8) != level) continue;
            for (uint64_t e = v * k; e < (v + 1) * k; ++e) {
              const uint64_t u = kc.Load(adj + e * 8) % n;
              if (kc.Load(c + u * 8) == UINT64_MAX) {
                kc.Store(c + u * 8, level + 1);
                changed->store(true, std::memory_order_relaxed);
              }
            }
          }
        };
        if (!launch(fn, &stop)) {
          outputs_unknown();
          return stop;
        }
        if (!changed->load()) break;
      }
      // The CPU's BFS: levels are unique whatever the order.
      std::vector<uint64_t> q{0};
      for (size_t qi = 0; qi < q.size(); ++qi) {
        const uint64_t v = q[qi];
        for (uint64_t e = v * k; e < (v + 1) * k; ++e) {
          const uint64_t u = g[n + 1 + e];
          if (lv[u] == UINT64_MAX) lv[u] = lv[v] + 1, q.push_back(u);
        }
      }
      std::memcpy(&C.ref[0], lv.data(), n * 8);
      return stop;
    }
    case ComputeKind::kStencil: {
      for (uint32_t it = 0; it < st.iterations; ++it) {
        const uint64_t src = it % 2 == 0 ? a : c, dst = it % 2 == 0 ? c : a;
        auto fn = [src, dst, n](gpu::KernelContext& kc) {
          for (uint64_t i = kc.thread_id(); i < n && !kc.cancelled(); i += kc.num_threads())
            for (uint64_t j = 0; j < n; ++j) {
              uint64_t v = 2 * kc.Load(src + (i * n + j) * 8);
              if (i > 0) v += kc.Load(src + ((i - 1) * n + j) * 8);
              if (i + 1 < n) v += kc.Load(src + ((i + 1) * n + j) * 8);
              if (j > 0) v += kc.Load(src + (i * n + j - 1) * 8);
              if (j + 1 < n) v += kc.Load(src + (i * n + j + 1) * 8);
              kc.Store(dst + (i * n + j) * 8, v);
            }
        };
        if (!launch(fn, &stop)) {
          outputs_unknown();
          return stop;
        }
      }
      if (!known) {
        outputs_unknown();
        break;
      }
      std::vector<uint64_t> g0(n * n), g1(n * n);
      for (uint64_t x = 0; x < n * n; ++x) g0[x] = RefWord(A, x * 8);
      for (uint32_t it = 0; it < st.iterations; ++it) {
        std::vector<uint64_t>& s0 = it % 2 == 0 ? g0 : g1;
        std::vector<uint64_t>& d0 = it % 2 == 0 ? g1 : g0;
        if (it == 0)
          for (uint64_t x = 0; x < n * n; ++x) g1[x] = RefWord(C, x * 8);
        for (uint64_t i = 0; i < n; ++i)
          for (uint64_t j = 0; j < n; ++j) {
            uint64_t v = 2 * s0[i * n + j];
            if (i > 0) v += s0[(i - 1) * n + j];
            if (i + 1 < n) v += s0[(i + 1) * n + j];
            if (j > 0) v += s0[i * n + j - 1];
            if (j + 1 < n) v += s0[i * n + j + 1];
            d0[i * n + j] = v;
          }
      }
      std::memcpy(&C.ref[0], g1.data(), n * n * 8);
      if (st.iterations >= 2) {
        std::memcpy(&A.ref[0], g0.data(), n * n * 8);
        Touch(A, 0, need_a, seq);
      }
      Touch(C, 0, need_c, seq);
      return stop;
    }
  }
  if (stop) return stop;
  // Cancelled or refused: what the kernel wrote is unknown.
  outputs_unknown();
  return std::nullopt;
}

std::optional<Stop> Run::FinishKernel(Pending& k) {
  const Step& st = *k.st;
  const std::string& phase = k.phase;
  const uint32_t seq = k.seq;
  const std::string& desc = k.desc;
  Buf& b = bufs_[k.buf];
  const uint64_t va = k.va;
  // The buffer may have shrunk (mremap) while an async kernel ran.
  const uint64_t off = std::min(k.off, b.size());
  const uint64_t len = std::min(k.len, b.size() - off);
  Metrics& m = res_.metrics;
  auto all_pages = [&](auto pred) {
    for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
      if (!pred(p)) return false;
    return true;
  };
  if (off != k.off || len != k.len) k.raced = true;
  gpu::LaunchStats ls;
  bool cancelled = false;
  if (auto stop = WaitKernel(st, phase, std::move(k.launch), k.k0, &ls, &cancelled)) return stop;
  if (k.raced && k.writes) {
    // Another step used its pages while it ran: what they hold is unknown.
    Touch(b, off, len, seq);
    touched_by_[seq] = desc;
    for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
      if (b.state[p] == kKnown) b.state[p] = kUnknown;
    return std::nullopt;
  }
  if (st.kind == StepKind::kGpuAtomic) {
    const uint64_t words = len / 8, count = st.count, value = st.value;
    Touch(b, off, len, seq);
    touched_by_[seq] = desc;
    if (cancelled) {
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
        if (b.state[p] == kKnown) b.state[p] = kUnknown;
      return std::nullopt;
    }
    for (uint32_t t = 0; t < st.threads; ++t)
      for (uint64_t i = 0; i < count; ++i) {
        const uint64_t o = off + ((uint64_t{t} * count + i) % words) * 8;
        uint64_t v;
        std::memcpy(&v, &b.ref[o], 8);
        v += value;
        std::memcpy(&b.ref[o], &v, 8);
      }
    return std::nullopt;
  }
  if (k.writes) {
    Touch(b, off, len, seq);
    touched_by_[seq] = desc;
  }
  if (cancelled) {
    // What it wrote before the cancel is unknown.
    if (k.writes)
      for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p)
        if (b.state[p] == kKnown) b.state[p] = kUnknown;
    return std::nullopt;
  }
  const uint64_t words = len / 8;
  if (st.pattern == PatternKind::kStreamWrite) {
    for (uint64_t w = 0; w < words; ++w) {
      const uint64_t v = st.value + w;
      std::memcpy(&b.ref[off + w * 8], &v, 8);
    }
    for (uint64_t p = off / kPage; p < (off + len) / kPage; ++p) b.state[p] = kKnown;
  } else if (st.pattern == PatternKind::kReadModifyWrite) {
    for (uint64_t w = 0; w < words; ++w) {
      uint64_t v;
      std::memcpy(&v, &b.ref[off + w * 8], 8);
      v += st.value * st.iterations;
      std::memcpy(&b.ref[off + w * 8], &v, 8);
    }
  } else if (s_.verify && !k.raced && all_pages([&](uint64_t p) { return b.state[p] == kKnown; })) {
    // A read kernel: its checksum is the sum of the words it loaded.
    auto word = [&](uint64_t w) {
      uint64_t v;
      std::memcpy(&v, &b.ref[off + w * 8], 8);
      return v;
    };
    uint64_t want = 0;
    if (st.pattern == PatternKind::kStreamRead) {
      for (uint64_t w = 0; w < words; ++w) want += word(w);
      want *= st.iterations;
    } else if (st.pattern == PatternKind::kStride) {
      const uint64_t units = (len + st.stride - 1) / st.stride;
      for (uint64_t i = 0; i < units; ++i) want += word(i * st.stride / 8);
      want *= st.iterations;
    } else {
      for (uint32_t t = 0; t < st.threads; ++t)
        for (uint32_t it = 0; it < st.iterations; ++it) {
          Rng rng(st.seed * 0x9E3779B97F4A7C15ull + env_->seed() + t * 7919 + it);
          for (uint64_t i = 0; i < st.count; ++i) want += word(rng.Uniform(words));
        }
    }
    ++m.checks;
    ++m.checksums_verified;
    if (ls.checksum != want) {
      // Where does the GPU's view differ? The same GPU copies the span
      // out word by word; the first byte that differs is named (if the
      // copy matches, the span's start is).
      Mismatch mm;
      mm.buffer = b.spec->name;
      mm.va = va;
      mm.offset = off;
      mm.view = fmt::format("gpu{} {} checksum (got {:#x}, want {:#x})", st.gpu, PatternName(st.pattern),
                            ls.checksum, want);
      mm.when = desc;
      auto host = std::make_shared<std::vector<uint64_t>>(words);
      uint64_t* out = host->data();
      auto copy = VmOf(st.gpu).LaunchKernel(
          [va, words, out](gpu::KernelContext& k) {
            for (uint64_t w = k.thread_id(); w < words && !k.cancelled(); w += k.num_threads())
              out[w] = k.Load(va + w * 8);
          },
          {.threads = 4});
      if (copy && copy->Wait()) {
        const auto* got = reinterpret_cast<const uint8_t*>(host->data());
        const uint8_t* want_bytes = &b.ref[off];
        uint64_t i = 0;
        while (i < len && got[i] == want_bytes[i]) ++i;
        if (i < len) {
          mm.offset = off + i;
          mm.va = va + i;
          mm.got = got[i];
          mm.want = want_bytes[i];
          for (uint64_t j = i; j < len; ++j) mm.bytes_differ += got[j] != want_bytes[j];
          mm.view = fmt::format("gpu{} (its {} checksum differed; a copy-out kernel found the byte)", st.gpu,
                                PatternName(st.pattern));
        }
      }
      const uint32_t last = b.last[mm.offset / kPage];
      mm.last_step = last ? touched_by_[last] : "(none: never written)";
      return Stop{mm, ""};
    }
  }
  return std::nullopt;
}

std::optional<Stop> Run::VerifyBuf(mm::AddressSpace& as, const Buf& b, const std::string& view,
                                   const std::string& when) {
  Metrics& m = res_.metrics;
  std::vector<uint8_t> got;
  const uint64_t n = b.pages();
  uint64_t p = 0;
  while (p < n) {
    // A run of known, readable pages.
    if (b.state[p] != kKnown || !(b.prot[p] & mm::kProtRead)) {
      ++p;
      continue;
    }
    uint64_t q = p;
    while (q < n && q - p < 512 && b.state[q] == kKnown && (b.prot[q] & mm::kProtRead)) ++q;
    const uint64_t len = (q - p) * kPage;
    got.resize(len);
    auto r = as.Read(b.va + p * kPage, got.data(), len);
    ++m.checks;
    Mismatch mm;
    mm.buffer = b.spec->name;
    mm.view = view;
    mm.when = when;
    if (!r) {
      mm.offset = p * kPage;
      mm.va = b.va + mm.offset;
      mm.view = view + " (read failed: " + r.error().ToString() + ")";
      mm.last_step = b.last[p] ? touched_by_[b.last[p]] : "(none)";
      return Stop{mm, ""};
    }
    m.bytes_verified += len;
    if (std::memcmp(got.data(), &b.ref[p * kPage], len) != 0) {
      uint64_t i = 0;
      while (got[i] == b.ref[p * kPage + i]) ++i;
      mm.offset = p * kPage + i;
      mm.va = b.va + mm.offset;
      mm.got = got[i];
      mm.want = b.ref[mm.offset];
      for (uint64_t j = i; j < len; ++j) mm.bytes_differ += got[j] != b.ref[p * kPage + j];
      const uint32_t last = b.last[mm.offset / kPage];
      auto it = touched_by_.find(last);
      mm.last_step = last && it != touched_by_.end() ? it->second : "(none: never written)";
      return Stop{mm, ""};
    }
    p = q;
  }
  return std::nullopt;
}

std::optional<Stop> Run::VerifyAll(const std::string& when) {
  if (!s_.verify) return std::nullopt;
  const uint64_t t0 = Now();
  for (const Buf& b : bufs_)
    if (auto stop = VerifyBuf(*as_, b, "cpu", when)) return stop;
  for (ForkChild& c : children_)
    for (const Buf& b : c.snapshot)
      if (auto stop = VerifyBuf(*c.as, b, "fork child (forked at " + c.step + ")", when)) return stop;
  spans_.push_back({"verify", "verify", UINT32_MAX, cpu_thread_, t0, Now(), ""});
  return std::nullopt;
}

Expected<RunResult, std::string> Run::Go() {
  Metrics& m = res_.metrics;
  m.scenario = s_.name;
  m.seed = s_.seed;
  m.migration_policy = s_.framework.migration;
  m.eviction_policy = s_.framework.eviction;
  m.thrashing_policy = s_.framework.thrashing;
  m.access_counter_policy = s_.framework.access_counters;
  m.gpus = s_.machine.gpus;
  m.verify = s_.verify;
  m.per_gpu.resize(s_.machine.gpus);
  ObserverScope obs(&collector_);
  cpu_thread_ = driver::EventThreadId();
  const auto wall0 = std::chrono::steady_clock::now();
  if (std::string err = Setup(); !err.empty()) {
    Teardown();
    return MakeUnexpected(err);
  }
  t0_ = Now();
  Sample();
  std::optional<Stop> stop;
  const bool tty_progress = o_.progress;
  size_t total = 0;
  for (const Phase& p : s_.phases) total += p.repeat;
  size_t done = 0;
  for (size_t pi = 0; pi < s_.phases.size() && !stop; ++pi) {
    const Phase& ph = s_.phases[pi];
    for (uint32_t r = 0; r < ph.repeat && !stop; ++r) {
      // The bar appears once the run has lasted a second.
      if (tty_progress && std::chrono::steady_clock::now() - wall0 > std::chrono::seconds(1)) {
        const int width = 30;
        const int filled = int(width * done / std::max<size_t>(total, 1));
        fmt::print(stderr, "\r[{}{}] {}/{} {:<24}", std::string(filled, '#'), std::string(width - filled, '.'), done,
                   total, ph.name.substr(0, 24));
      }
      const uint64_t p0 = Now();
      auto corrupt = [&] {
        for (Buf& b : bufs_)
          if (b.spec->name == o_.corrupt_buffer && o_.corrupt_offset < b.size()) b.ref[o_.corrupt_offset] ^= 0x5a;
      };
      if (int(pi) == o_.corrupt_before_phase && r == 0) corrupt();
      stop = RunSteps(ph.steps, ph.name);
      // Async kernels end with their phase.
      if (auto w = WaitAll(); w && !stop) stop = w;
      if (!stop && int(pi) == o_.corrupt_after_phase && r == 0) corrupt();
      if (!stop) stop = VerifyAll(fmt::format("after phase '{}'", ph.name));
      spans_.push_back({ph.name, "phase", UINT32_MAX, cpu_thread_, p0, Now(), ""});
      ++done;
      // Fork children live until the end of their phase.
      if (!stop) {
        for (auto& c : children_) c.as->Exit();
        children_.clear();
      }
    }
  }
  if (tty_progress) fmt::print(stderr, "\r{:<70}\r", "");
  if (!stop) stop = VerifyAll("at the end");
  // Counters, then teardown.
  for (uint32_t g = 0; g < devs_.size(); ++g) {
    driver::Vm* vm = svm_->vm(g);
    const driver::VmStats vs = vm->stats();
    const driver::VramStats vr = devs_[g]->vram_stats();
    PerGpuMetrics& pg = m.per_gpu[g];
    pg.faults = vs.faults;
    pg.faults_cancelled = vs.faults_cancelled;
    for (const auto& sc : vs.by_size) {
      pg.migrations_to_vram += sc.migrations;
      pg.tlb_invalidations += sc.tlb_invalidations;
    }
    pg.prefetches = vs.prefetches;
    pg.peer_maps = vs.peer_maps;
    pg.bytes_to_vram = vr.bytes_to_vram;
    pg.bytes_to_ram = vr.bytes_to_ram;
    pg.evictions = vr.evictions;
    pg.bytes_evicted = vr.bytes_evicted;
    pg.vram_bytes = vr.bytes_total;
    m.gpu_faults += vs.faults;
    m.gpu_faults_cancelled += vs.faults_cancelled;
    m.policy_prefetches += vs.policy_prefetches;
    m.policy_prefetch_bytes += vs.policy_prefetch_bytes;
    m.throttles += vs.throttles;
    m.pins += vs.pins;
    m.pinned_faults += vs.pinned_faults;
    m.ac_notifications += vs.ac_notifications;
    m.ac_migrations += vs.ac_migrations;
    m.ac_migrated_bytes += vs.ac_migrated_bytes;
    m.ac_thrashing_skips += vs.ac_thrashing_skips;
    m.ac_dropped += devs_[g]->gpu().access_counters().Stats().dropped;
    m.evictions += vr.evictions;
    m.bytes_evicted += vr.bytes_evicted;
  }
  const driver::SvmStats ss = svm_->stats();
  // The collector may still hold ranges: run it so the count is final.
  (void)svm_->CollectGarbage();
  const driver::SvmStats ss2 = svm_->stats();
  m.invalidations = ss.invalidations;
  m.ranges_zapped = ss.ranges_zapped;
  m.tlb_flushes = ss.tlb_flushes;
  m.two_pass_finishes = ss.two_pass_finishes;
  m.tlb_flush_serial_ns = ss.tlb_flush_ns;
  m.tlb_wait_ns = ss.tlb_wait_ns;
  m.ranges_collected = ss2.ranges_collected;
  m.gc_runs = ss2.gc_runs;
  const uint64_t t_end = Now();
  Teardown();
  m.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();

  // Per-event figures (events up to the end of the timeline: teardown's
  // evictions are not the workload's).
  std::vector<driver::Event> events = collector_.Take();
  std::vector<uint64_t> fault_lat, inval;
  // A callback's duration: its span, plus the two-pass finish wait that
  // follows it on the same thread over the same range.
  std::map<std::pair<uint32_t, uint64_t>, size_t> open_inval;  // (thread, va) -> index in inval
  std::map<std::string, uint64_t> reasons;
  for (const driver::Event& e : events) {
    if (e.begin_ns > t_end) continue;
    switch (e.kind) {
      case driver::EventKind::kGpuFault: fault_lat.push_back(e.end_ns - e.begin_ns); break;
      case driver::EventKind::kMigrateToVram:
        ++m.migrations_to_vram;
        m.bytes_to_vram += e.len;
        ++reasons[fmt::format("to_vram:{}{}", driver::MigrateReasonName(e.reason), PolicySuffix(e))];
        break;
      case driver::EventKind::kMigrateToRam:
        ++m.migrations_to_ram;
        m.bytes_to_ram += e.len;
        ++reasons[fmt::format("to_ram:{}{}", driver::MigrateReasonName(e.reason), PolicySuffix(e))];
        break;
      case driver::EventKind::kInvalidate:
        m.invalidation_ns += e.end_ns - e.begin_ns;
        open_inval[{e.thread, e.va}] = inval.size();
        inval.push_back(e.end_ns - e.begin_ns);
        break;
      case driver::EventKind::kTlbWait: {
        m.invalidation_ns += e.end_ns - e.begin_ns;
        auto it = open_inval.find({e.thread, e.va});
        if (it != open_inval.end()) inval[it->second] += e.end_ns - e.begin_ns;
        break;
      }
      default: break;
    }
  }
  m.migrations_by_reason.assign(reasons.begin(), reasons.end());
  m.fault_latency_p50_ns = Percentile(fault_lat, 0.50);
  m.fault_latency_p99_ns = Percentile(fault_lat, 0.99);
  m.fault_latency_max_ns = Percentile(fault_lat, 1.0);
  m.invalidation_p50_ns = Percentile(inval, 0.50);
  m.invalidation_p99_ns = Percentile(inval, 0.99);
  m.kernel_p50_ns = Percentile(kernel_ns_, 0.5);
  m.kernel_max_ns = Percentile(kernel_ns_, 1.0);
  if (stop && !stop->error.empty()) return MakeUnexpected(stop->error);
  if (stop) res_.mismatch = stop->mismatch;
  m.verified = s_.verify && !res_.mismatch;
  if (!o_.trace_path.empty()) {
    std::string err;
    if (!WriteTrace(o_.trace_path, t0_, s_.machine.gpus, events, spans_, &err)) return MakeUnexpected(err);
  }
  if (!o_.report_path.empty()) {
    std::vector<driver::Event> in_run;
    for (const driver::Event& e : events)
      if (e.begin_ns <= t_end) in_run.push_back(e);
    ReportData d{&res_, t0_, std::move(residency_), std::move(in_run), std::move(extents_)};
    std::string err;
    if (!WriteReport(o_.report_path, d, &err)) return MakeUnexpected(err);
  }
  return std::move(res_);
}

}  // namespace

Expected<RunResult, std::string> RunScenario(const Scenario& s, const RunOptions& opts) {
  if (auto c = CheckScenario(s); !c) return MakeUnexpected(c.error().ToString());
  Run run(s, opts);
  return run.Go();
}

}  // namespace usvm::sim
