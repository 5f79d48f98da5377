#include "usvm/gpu/execution_engine.h"

#include <chrono>
#include <thread>

namespace usvm::gpu {

namespace detail {

struct LaunchState {
  LaunchState(uint64_t i, KernelFn f, uint32_t n, Fence fe)
      : id(i), fn(std::move(f)), threads(n), fence(std::move(fe)) {}

  // Constant after construction.
  const uint64_t id;
  const KernelFn fn;
  const uint32_t threads;
  const Fence fence;

  // Guarded by the engine's lock_ (the run queue).
  uint32_t next_thread = 0;

  // Atomic: kernel threads finished; the last one signals the fence.
  std::atomic<uint32_t> finished{0};
  // Atomic: set once by the first cancel, after `error` is stored.
  std::atomic<bool> cancelled{false};
  Mutex error_lock;
  Error error USVM_GUARDED_BY(error_lock){Errc::kOk};

  // Atomic counters, summed from every kernel thread.
  std::atomic<uint64_t> accesses{0}, faults{0}, stalls{0}, stall_ns{0}, checksum{0};
};

}  // namespace detail

uint64_t Launch::id() const { return s_ ? s_->id : 0; }

const Fence& Launch::fence() const {
  static const Fence kDone;
  return s_ ? s_->fence : kDone;
}

LaunchStats Launch::stats() const {
  if (!s_) return {};
  return {s_->accesses.load(), s_->faults.load(), s_->stalls.load(), s_->stall_ns.load(),
          s_->checksum.load()};
}

bool KernelContext::cancelled() const {
  return cancelled_ || launch_.cancelled.load(std::memory_order_acquire);
}

Error KernelContext::error() const {
  if (!cancelled()) return Error(Errc::kOk);
  MutexLock l(launch_.error_lock);
  return launch_.error;
}

void KernelContext::InFlightSlow() { exec_.HoldInFlight(utlb_); }

std::byte* KernelContext::TranslateSlow(uint64_t va, uint8_t access, uint64_t align_mask) {
  return exec_.TranslateSlow(*this, va, access, align_mask);
}

ExecutionEngine::ExecutionEngine(uint32_t threads, PageTable& pt, Tlb& tlb, FaultUnit& faults,
                                 HostResolver resolve, const LatencyModel& latency, Env& env,
                                 AccessCounters* counters)
    : pt_(pt), tlb_(tlb), faults_(faults), resolve_(std::move(resolve)), latency_(latency), env_(env),
      counters_(counters && counters->enabled() ? counters : nullptr) {
  for (uint32_t i = 0; i < threads; ++i) {
    utlbs_.push_back(std::make_unique<detail::MicroTlb>());
    if (latency_.inflight_store_every) utlbs_.back()->inflight_countdown = latency_.inflight_store_every;
  }
  for (uint32_t i = 0; i < threads; ++i) threads_.emplace_back([this, i] { Run(i); });
}

ExecutionEngine::~ExecutionEngine() {
  {
    MutexLock l(lock_);
    stop_ = true;
    for (auto& launch : queue_) CancelLaunch(*launch, Error(Errc::kCanceled, "GPU shut down"));
  }
  stopping_.store(true, std::memory_order_release);
  work_.WakeAll();
  for (std::thread& t : threads_) t.join();
}

void ExecutionEngine::CancelLaunch(detail::LaunchState& l, Error e) {
  MutexLock g(l.error_lock);
  if (l.cancelled.load(std::memory_order_relaxed)) return;
  l.error = e;
  l.cancelled.store(true, std::memory_order_release);
}

Result<Launch> ExecutionEngine::Submit(KernelFn fn, const LaunchParams& params) {
  if (!fn) return Err(Errc::kInval, "empty kernel");
  if (params.threads == 0 || params.threads > (1u << 20)) return Err(Errc::kInval, "threads out of [1, 2^20]");
  MutexLock l(lock_);
  if (stop_) return Err(Errc::kCanceled, "GPU shut down");
  auto s = std::make_shared<detail::LaunchState>(next_launch_id_++, std::move(fn), params.threads,
                                                 Fence::CreatePending(env_, 0));
  queue_.push_back(s);
  queued_.fetch_add(1, std::memory_order_release);
  work_.WakeAll();
  return Launch(std::move(s));
}

void ExecutionEngine::Run(uint32_t index) {
  detail::MicroTlb& utlb = *utlbs_[index];
  for (;;) {
    work_.Wait([this] {
      return queued_.load(std::memory_order_acquire) != 0 || stopping_.load(std::memory_order_acquire);
    });
    std::shared_ptr<detail::LaunchState> launch;
    uint32_t tid = 0;
    {
      MutexLock l(lock_);
      if (queue_.empty()) {
        if (stop_) return;
        continue;
      }
      launch = queue_.front();
      tid = launch->next_thread++;
      if (launch->next_thread == launch->threads) {
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_release);
      }
    }
    if (!launch->cancelled.load(std::memory_order_acquire)) {
      KernelContext ctx(*this, *launch, utlb, tlb_.generation(), counters_, index, tid, launch->threads,
                        launch->id);
      const uint64_t g = tlb_.Enter(index);
      if (g != utlb.gen) {
        utlb.Flush();
        utlb.gen = g;
      }
      launch->fn(ctx);
      tlb_.Leave(index);
      launch->accesses.fetch_add(ctx.accesses_, std::memory_order_relaxed);
      launch->faults.fetch_add(ctx.faults_, std::memory_order_relaxed);
      launch->stalls.fetch_add(ctx.stalls_, std::memory_order_relaxed);
      launch->stall_ns.fetch_add(ctx.stall_ns_, std::memory_order_relaxed);
      launch->checksum.fetch_add(ctx.checksum_, std::memory_order_relaxed);
    }
    if (launch->finished.fetch_add(1, std::memory_order_acq_rel) + 1 == launch->threads) {
      Result<void> r;
      if (launch->cancelled.load(std::memory_order_acquire)) {
        MutexLock g(launch->error_lock);
        r = Err(launch->error);
      }
      launch->fence.Signal(r);
    }
  }
}

void ExecutionEngine::HoldInFlight(detail::MicroTlb& utlb) {
  const uint32_t every = latency_.inflight_store_every;
  utlb.inflight_countdown = every ? every : UINT32_MAX;
  if (every && latency_.inflight_store_ns)
    std::this_thread::sleep_for(std::chrono::nanoseconds(latency_.inflight_store_ns));
}

std::byte* ExecutionEngine::TranslateSlow(KernelContext& ctx, uint64_t va, uint8_t access,
                                          uint64_t align_mask) {
  if (ctx.cancelled_) return nullptr;
  if (ctx.launch_.cancelled.load(std::memory_order_acquire)) {
    ctx.MarkCancelled();
    return nullptr;
  }
  if ((va & align_mask) != 0 || va >= kVaLimit) {
    CancelLaunch(ctx.launch_, Error(va >= kVaLimit ? Errc::kFault : Errc::kInval,
                                    va >= kVaLimit ? "access beyond 48 bits" : "misaligned access"));
    ctx.MarkCancelled();
    return nullptr;
  }
  detail::MicroTlb& utlb = ctx.utlb_;
  const uint64_t vpn = va >> kPageShift;
  const uint64_t off = va & (kPageSize - 1);
  const uint32_t slot = ctx.engine_;
  for (;;) {
    const uint64_t g = tlb_.generation().load(std::memory_order_acquire);
    if (g != utlb.gen) {
      // Every access before this one is complete: drop the micro-TLB and
      // tell pending shootdowns so.
      utlb.Flush();
      utlb.gen = g;
      tlb_.Publish(slot, g);
    }
    detail::MicroTlb::Entry& e = utlb.e_[vpn & (detail::MicroTlb::kEntries - 1)];
    if (e.vpn == vpn && (e.perms & access) == access) {
      if (e.counter) counters_->Count(e.counter);
      return e.host + off;
    }

    std::optional<Mapping> m = tlb_.Lookup(va);
    if (!m || (m->pte.perms() & access) != access) {
      // Miss, or a cached entry without the permission: walk (a rebind
      // may have upgraded it; hardware re-walks before faulting).
      Result<Mapping> w = pt_.Walk(va);
      if (w) {
        m = *w;
        tlb_.Fill(*m, g);
      } else {
        m.reset();
      }
    }
    if (m && (m->pte.perms() & access) == access) {
      std::byte* host = resolve_(*m, va & ~(kPageSize - 1));
      if (!host) {
        CancelLaunch(ctx.launch_, Error(Errc::kFault, "mapped memory unreachable"));
        ctx.MarkCancelled();
        return nullptr;
      }
      e.vpn = vpn;
      e.host = host;
      e.perms = m->pte.perms();
      e.counter = nullptr;
      if (counters_ && m->pte.kind() != PteKind::kLocalVram) {
        // A remote mapping: this access and the entry's later hits count.
        e.counter = counters_->SlotFor(va, m->pte.kind() == PteKind::kSystem ? MemKind::kSystem : MemKind::kVram,
                                       m->pte.peer());
        if (e.counter) counters_->Count(e.counter);
      }
      return host + off;
    }

    // Replayable fault: block this thread (outside the shootdown domain)
    // until the driver answers.
    ++ctx.faults_;
    ++ctx.stalls_;
    tlb_.Leave(slot);
    const uint64_t t0 = env_.NowNs();
    Result<void> r = faults_.Raise(va, access, slot, ctx.launch_id_);
    if (r && latency_.fault_service_ns) env_.SleepNs(latency_.fault_service_ns);
    ctx.stall_ns_ += env_.NowNs() - t0;
    const uint64_t g2 = tlb_.Enter(slot);
    if (g2 != utlb.gen) {
      utlb.Flush();
      utlb.gen = g2;
    }
    if (!r) {
      CancelLaunch(ctx.launch_, r.error());
      ctx.MarkCancelled();
      return nullptr;
    }
    if (ctx.launch_.cancelled.load(std::memory_order_acquire)) {
      ctx.MarkCancelled();
      return nullptr;
    }
  }
}

Result<Launch> ExecutionEngine::SubmitPattern(const PatternParams& p) {
  if (p.pattern < Pattern::kStreamRead || p.pattern > Pattern::kReadModifyWrite)
    return Err(Errc::kInval, "bad pattern");
  if ((p.va | p.length) & 7) return Err(Errc::kInval, "va or length not 8-byte aligned");
  if (p.length == 0) return Err(Errc::kInval, "zero length");
  if (p.va >= kVaLimit || p.length > kVaLimit - p.va) return Err(Errc::kInval, "range beyond 48 bits");
  if (p.iterations == 0) return Err(Errc::kInval, "zero iterations");
  if (p.threads == 0 || p.threads > (1u << 20)) return Err(Errc::kInval, "threads out of [1, 2^20]");
  if (p.pattern == Pattern::kStride && (p.stride == 0 || p.stride % 8 != 0))
    return Err(Errc::kInval, "stride not a non-zero multiple of 8");
  if (p.pattern == Pattern::kRandomGather && p.count == 0) return Err(Errc::kInval, "zero gather count");

  const uint64_t seed = p.seed;
  const uint64_t env_seed = env_.seed();
  KernelFn fn = [p, seed, env_seed](KernelContext& ctx) {
    const uint64_t words = p.length / 8;
    const uint64_t units = p.pattern == Pattern::kStride ? (p.length + p.stride - 1) / p.stride : words;
    const uint64_t per = (units + ctx.num_threads() - 1) / ctx.num_threads();
    const uint64_t begin = std::min(units, per * ctx.thread_id());
    const uint64_t end = std::min(units, begin + per);
    uint64_t sum = 0;
    for (uint32_t it = 0; it < p.iterations && !ctx.cancelled(); ++it) {
      switch (p.pattern) {
        case Pattern::kStreamRead:
          for (uint64_t w = begin; w < end; ++w) {
            sum += ctx.Load(p.va + w * 8);
            if ((w & 511) == 511 && ctx.cancelled()) break;
          }
          break;
        case Pattern::kStreamWrite:
          for (uint64_t w = begin; w < end; ++w) {
            ctx.Store(p.va + w * 8, p.value + w);
            if ((w & 511) == 511 && ctx.cancelled()) break;
          }
          break;
        case Pattern::kStride:
          for (uint64_t i = begin; i < end; ++i) {
            sum += ctx.Load(p.va + i * p.stride);
            if ((i & 511) == 511 && ctx.cancelled()) break;
          }
          break;
        case Pattern::kRandomGather: {
          Rng rng(seed * 0x9E3779B97F4A7C15ull + env_seed + ctx.thread_id() * 7919 + it);
          for (uint64_t i = 0; i < p.count; ++i) {
            sum += ctx.Load(p.va + rng.Uniform(words) * 8);
            if ((i & 511) == 511 && ctx.cancelled()) break;
          }
          break;
        }
        case Pattern::kReadModifyWrite:
          for (uint64_t w = begin; w < end; ++w) {
            const uint64_t a = p.va + w * 8;
            ctx.Store(a, ctx.Load(a) + p.value);
            if ((w & 511) == 511 && ctx.cancelled()) break;
          }
          break;
      }
    }
    ctx.checksum_ += sum;
  };
  return Submit(std::move(fn), LaunchParams{p.threads});
}

}  // namespace usvm::gpu
