// `usvm demo`: one simulated process and one software GPU share a buffer.
//
// The GPU has no mapping to start with: its kernels fault, a driver thread
// services the faults through an interval notifier mirror (ReadBegin ->
// fault the CPU page in -> snapshot the CPU page table -> driver lock ->
// ReadRetry -> bind into the GPU page table -> replay), and every CPU-side
// change (fork, mprotect, madvise, mremap, munmap) reaches the mirror's
// invalidation callback first, which zaps the GPU page table and waits for
// the TLB shootdown. The gpusvm framework and the driver layer will replace
// this hand-written mirror; until then it is the most complete end-to-end
// run the stack can do, and every result is checked.
#include "demo.h"

#include <fmt/core.h>

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/gpu/gpu.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/mmu_interval_notifier.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::tools {
namespace {

using mm::kHugePageSize;
using mm::kPageSize;

// The GPU reaches system memory through the machine's frame pool.
class PoolMemory final : public gpu::SystemMemory {
 public:
  explicit PoolMemory(mm::FramePool& pool) : pool_(pool) {}
  uint64_t frame_count() const override { return pool_.frames(); }
  std::byte* FrameData(uint64_t pfn) override { return pool_.Data(pfn); }

 private:
  mm::FramePool& pool_;
};

// The mirror: GPU page table entries for [start, end) of the process,
// kept coherent by an interval notifier.
class Mirror final : public mm::MmuIntervalNotifierOps {
 public:
  Mirror(mm::AddressSpace& as, gpu::Gpu& g) : as_(as), gpu_(g) {}

  bool Invalidate(mm::MmuIntervalNotifier* sub, const mm::NotifierRange& r,
                  uint64_t cur_seq) override {
    MutexLock l(lock_);
    sub->SetSeq(cur_seq);
    const uint64_t s = std::max(r.start, sub->start()), e = std::min(r.end, sub->end());
    // The security rule: no GPU mapping survives an invalidation.
    if (gpu_.page_table().Zap(s, e - s).has_value()) {
      auto fence = gpu_.InvalidateTlb(s, e - s);
      if (fence) (void)fence->Wait();
    }
    events_[mm::NotifyEventName(r.event)]++;
    return true;
  }

  // Services one GPU fault; false if it cannot be (the kernel is cancelled).
  Result<void> Service(const gpu::Fault& f) {
    const bool write = f.access & (gpu::kAccessWrite | gpu::kAccessAtomic);
    for (int tries = 0; tries < 100; ++tries) {
      const uint64_t seq = sub_.ReadBegin();
      USVM_TRY(as_.Populate(f.va, kPageSize, write));
      const mm::PteInfo pte = as_.QueryPte(f.va);
      if (pte.kind != mm::PteInfo::Kind::kPresent) continue;  // zapped meanwhile
      MutexLock l(lock_);
      if (sub_.ReadRetry(seq)) continue;  // an invalidation ran: start again
      gpu::BindOp op;
      const uint64_t hbase = f.va & mm::kHugeMask;
      if (pte.huge && hbase >= sub_.start() && hbase + kHugePageSize <= sub_.end()) {
        op = {hbase, gpu::PageSize::k2M,
              gpu::PhysAddr::System(pte.pfn - ((f.va - hbase) >> mm::kPageShift)), 0};
        huge_binds_++;
      } else {
        op = {f.va, gpu::PageSize::k4K, gpu::PhysAddr::System(pte.pfn), 0};
        small_binds_++;
      }
      op.prot = pte.writable ? (gpu::kProtWrite | gpu::kProtAtomic) : gpu::kProtRead;
      const bool existed = gpu_.page_table().Walk(f.va).has_value();
      USVM_TRY(gpu_.page_table().Bind(op, gpu::BindMode::kReplace));
      if (existed) USVM_TRY(USVM_TRY(gpu_.InvalidateTlb(op.va, gpu::PageBytes(op.size))).Wait());
      return {};
    }
    return Err(Errc::kBusy, "fault kept colliding with invalidations");
  }

  mm::MmuIntervalNotifier& sub() { return sub_; }
  std::map<std::string, uint64_t> events() {
    MutexLock l(lock_);
    return events_;
  }
  uint64_t huge_binds() {
    MutexLock l(lock_);
    return huge_binds_;
  }
  uint64_t small_binds() {
    MutexLock l(lock_);
    return small_binds_;
  }

 private:
  mm::AddressSpace& as_;
  gpu::Gpu& gpu_;
  mm::MmuIntervalNotifier sub_;
  Mutex lock_;  // the driver lock: guards the GPU page table for this range
  std::map<std::string, uint64_t> events_ USVM_GUARDED_BY(lock_);
  uint64_t huge_binds_ USVM_GUARDED_BY(lock_) = 0;
  uint64_t small_binds_ USVM_GUARDED_BY(lock_) = 0;
};

struct Failure {
  std::string what;
};

#define DEMO_CHECK(cond, ...)                                     \
  do {                                                            \
    if (!(cond)) throw Failure{fmt::format(__VA_ARGS__)};         \
  } while (0)

template <typename T>
T Must(Result<T> r, const char* what) {
  if (!r) throw Failure{fmt::format("{}: {}", what, r.error().ToString())};
  return std::move(*r);
}
void Must(Result<void> r, const char* what) {
  if (!r) throw Failure{fmt::format("{}: {}", what, r.error().ToString())};
}

uint64_t Pattern(uint64_t i) { return (i + 1) * 0x9E3779B97F4A7C15ull; }

int Run(const DemoOptions& opts) {
  Env env;
  const uint64_t len = opts.buffer_mib << 20;
  auto pool = Must(mm::FramePool::TryCreate(uint64_t{4} << 30, env), "frame pool");
  auto as = Must(mm::AddressSpace::TryCreate(*pool, {}, env), "address space");
  PoolMemory sysmem(*pool);
  gpu::GpuConfig gcfg;
  gcfg.exec_threads = opts.gpu_threads;
  auto g = Must(gpu::Gpu::TryCreate(0, gcfg, &sysmem, env), "gpu");

  const uint64_t buf = uint64_t{0x100000000000};
  Must(as->Mmap(buf, len, mm::kProtRead | mm::kProtWrite,
                mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed),
       "mmap");
  Must(as->Madvise(buf, len / 2, mm::kMadvHugePage), "madvise(HUGEPAGE)");
  std::vector<uint64_t> host(len / 8);
  for (uint64_t i = 0; i < host.size(); ++i) host[i] = Pattern(i);
  Must(as->Write(buf, host.data(), len), "CPU write");
  fmt::print("usvm demo: {} MiB buffer at {:#x}, first half MADV_HUGEPAGE; CPU wrote it "
             "({} huge faults, {} 4 KiB faults)\n",
             opts.buffer_mib, buf, as->GetStats().huge_faults, as->GetStats().anon_allocs);

  Mirror mirror(*as, *g);
  Must(as->notifiers().Insert(&mirror.sub(), buf, len, &mirror), "interval notifier insert");
  struct RemoveOnError {
    mm::MmuIntervalNotifier& sub;
    ~RemoveOnError() {
      if (sub.hub()) (void)sub.Remove();
    }
  } remove_on_error{mirror.sub()};
  std::atomic<uint64_t> serviced{0}, cancelled{0};
  std::thread driver([&] {
    for (;;) {
      auto batch = g->fault_unit().Fetch(64, 1'000'000);
      if (!batch) {
        if (batch.error() == Errc::kCanceled) return;
        continue;  // ETIME
      }
      for (const gpu::Fault& f : *batch) {
        auto r = mirror.Service(f);
        if (r) {
          (void)g->fault_unit().Replay(f.id);
          serviced++;
        } else {
          (void)g->fault_unit().Cancel(f.id, r.error());
          cancelled++;
        }
      }
    }
  });
  struct StopDriver {
    gpu::Gpu& g;
    std::thread& t;
    ~StopDriver() {
      g.fault_unit().Shutdown();
      t.join();
    }
  } stop{*g, driver};

  auto gpu_sum = [&](uint64_t va, uint64_t n) -> Result<uint64_t> {
    gpu::PatternParams p;
    p.pattern = gpu::Pattern::kStreamRead;
    p.va = va;
    p.length = n;
    auto l = USVM_TRY(g->LaunchPattern(p));
    USVM_TRY(l.Wait());
    return l.stats().checksum;
  };
  auto cpu_sum = [&](uint64_t va, uint64_t n) {
    std::vector<uint64_t> w(n / 8);
    Must(as->Read(va, w.data(), n), "CPU read");
    uint64_t s = 0;
    for (uint64_t x : w) s += x;
    return s;
  };

  // 1. The GPU reads the whole buffer: every page arrives by fault.
  uint64_t want = 0;
  for (uint64_t x : host) want += x;
  DEMO_CHECK(Must(gpu_sum(buf, len), "GPU read") == want, "GPU checksum differs from the CPU's");
  fmt::print("  1. GPU stream read of the buffer: checksum matches; {} faults serviced, "
             "{} 2 MiB + {} 4 KiB GPU mappings\n",
             serviced.load(), mirror.huge_binds(), mirror.small_binds());

  // 2. The GPU writes the second quarter; the CPU sees it.
  {
    gpu::PatternParams p;
    p.pattern = gpu::Pattern::kStreamWrite;
    p.va = buf + len / 4;
    p.length = len / 4;
    p.value = 0x5A5A5A5A5A5A5A5Aull;
    auto l = Must(g->LaunchPattern(p), "GPU write launch");
    Must(l.Wait(), "GPU write");
    std::vector<uint64_t> w(len / 4 / 8);
    Must(as->Read(buf + len / 4, w.data(), len / 4), "CPU read");
    // The stream-write pattern stores value + word index.
    for (uint64_t i = 0; i < w.size(); ++i) {
      DEMO_CHECK(w[i] == p.value + i, "CPU does not see the GPU's write at word {}", i);
      host[len / 4 / 8 + i] = w[i];
    }
    fmt::print("  2. GPU stream write of the second quarter: the CPU reads every word back\n");
  }

  // 3. fork: the parent's private pages are write-protected (PROTECTION_PAGE)
  //    so the GPU loses its writable mappings; the child's writes stay its own.
  {
    auto child = Must(as->Fork(), "fork");
    const uint64_t junk = ~uint64_t{0};
    for (uint64_t off = 0; off < len; off += kHugePageSize)
      Must(child->Write(buf + off, &junk, 8), "child write");
    child->Exit();
    DEMO_CHECK(Must(gpu_sum(buf, len), "GPU read after fork") == cpu_sum(buf, len),
               "GPU and CPU disagree after fork");
    fmt::print("  3. fork + child writes: parent data intact, GPU refaulted and agrees\n");
  }

  // 4. mprotect read-only: a GPU write there cannot be serviced; the kernel
  //    is cancelled and nothing else is affected.
  {
    Must(as->Mprotect(buf, 64 << 10, mm::kProtRead), "mprotect");
    gpu::PatternParams p;
    p.pattern = gpu::Pattern::kStreamWrite;
    p.va = buf;
    p.length = 64 << 10;
    p.value = 1;
    const uint64_t before = cpu_sum(buf, 64 << 10);
    auto l = Must(g->LaunchPattern(p), "GPU write launch");
    auto r = l.Wait();
    DEMO_CHECK(!r.has_value(), "a GPU write to read-only memory succeeded");
    DEMO_CHECK(cpu_sum(buf, 64 << 10) == before, "read-only memory was written");
    Must(as->Mprotect(buf, 64 << 10, mm::kProtRead | mm::kProtWrite), "mprotect");
    fmt::print("  4. mprotect(PROT_READ) then GPU write: kernel cancelled ({})\n",
               r.error().ToString());
  }

  // 5. madvise(DONTNEED): the CPU and the GPU both read zeros there.
  {
    const uint64_t z = buf + len / 2;
    Must(as->Madvise(z, 1 << 20, mm::kMadvDontNeed), "madvise(DONTNEED)");
    DEMO_CHECK(Must(gpu_sum(z, 1 << 20), "GPU read") == 0, "GPU still sees zapped data");
    fmt::print("  5. madvise(DONTNEED) of 1 MiB: GPU reads zeros after refault\n");
  }

  // 6. mremap moves the last MiB away (UNMAP of the old range), munmap
  //    removes the one before: GPU accesses there are fatal.
  {
    const uint64_t tail = buf + len - (1 << 20);
    const uint64_t moved = Must(as->Mremap(tail, 1 << 20, 1 << 20, mm::kMremapMayMove | mm::kMremapFixed,
                                         buf + (uint64_t{1} << 30)),
                              "mremap");
    Must(as->Munmap(tail - (1 << 20), 1 << 20), "munmap");
    DEMO_CHECK(!gpu_sum(tail, 1 << 20).has_value(), "GPU read of a moved-away range succeeded");
    DEMO_CHECK(!gpu_sum(tail - (1 << 20), 1 << 20).has_value(), "GPU read of unmapped memory succeeded");
    uint64_t first = 0;
    Must(as->Read(moved, &first, 8), "CPU read of the moved range");
    DEMO_CHECK(first == host[(len - (1 << 20)) / 8], "mremap lost data");
    fmt::print("  6. mremap + munmap: the GPU faults fatally on the old ranges; the data "
               "moved with the mapping\n");
  }

  // Driver teardown: drop the GPU mappings, then the subscription.
  Must(g->page_table().Unbind(buf, len), "GPU unbind");
  Must(Must(g->InvalidateTlb(buf, len), "TLB invalidate").Wait(), "TLB invalidate");
  Must(mirror.sub().Remove(), "interval notifier remove");
  fmt::print("invalidations seen by the GPU mirror:");
  for (const auto& [ev, n] : mirror.events()) fmt::print(" {}={}", ev, n);
  const auto st = as->GetStats();
  fmt::print("\nGPU faults serviced={} cancelled={}; CPU faults={} cow_breaks={} thp_splits={}\n",
             serviced.load(), cancelled.load(), st.faults, st.cow_breaks, st.thp_splits);
  as->Exit();
  const auto ps = pool->GetStats();
  DEMO_CHECK(ps.free_frames == ps.total_frames - 1, "frames leaked: {} in use",
             ps.total_frames - 1 - ps.free_frames);
  fmt::print("teardown: every frame back in the pool. demo OK\n");
  return 0;
}

}  // namespace

int RunDemo(const DemoOptions& opts) {
  try {
    return Run(opts);
  } catch (const Failure& f) {
    fmt::print(stderr, "usvm: demo: {}\n", f.what);
    return 1;
  }
}

}  // namespace usvm::tools
