// GpuSvm benchmarks (issue 9), zero-latency device, framework cost only.
//
//   BM_FaultIn2M/{4K,THP}   one 2 MiB range of a populated region, the
//                           whole driver cycle: FindOrInsert + GetPages +
//                           UnmapPages + RangeRemove (µs per range; the
//                           region is backed by 4 KiB pages or by THPs).
//   BM_FaultIn4K            the same for 4 KiB ranges (chunk sizes {4K}).
//   BM_Invalidate/1M/{window,per-range}
//                           one invalidation (InvalidateRangeStart + End
//                           under the mmap lock, as a MADV_DONTNEED of one
//                           page makes) hitting one range among 1M 4 KiB
//                           ranges, with 512 MiB notifier windows or one
//                           notifier per range. Also reports the heap bytes
//                           per range the 1M ranges cost (bytes_per_range:
//                           Range, Pages without a page array, notifier
//                           share, interval-tree and list links).
// Goals: <= 10 µs per 2 MiB range, <= 1 µs per 4 KiB range, invalidation
// <= 2 µs, <= 512 bytes of metadata per range plus its page array.
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "median_reporter.h"
#include "usvm/gpusvm/gpusvm.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::gpusvm {
namespace {

using mm::AddressSpace;
using mm::FramePool;

constexpr uint64_t kBase = uint64_t{1} << 32;
constexpr uint32_t kRW = mm::kProtRead | mm::kProtWrite;
constexpr uint32_t kAnon = mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed;

struct BenchRange final : Range {
  Pages pages;
};

class BenchOps final : public GpuSvmOps {
 public:
  Range* RangeAlloc() override { return new BenchRange; }
  void RangeFree(Range* r) override {
    auto* b = static_cast<BenchRange*>(r);
    r->gpusvm()->FreePages(&b->pages);
    delete b;
  }
  void Invalidate(GpuSvm& svm, Notifier& n, const mm::NotifierRange& range) override {
    Ctx c;
    c.in_notifier = true;
    GpuSvm::ForEachRangeSafe(&n, range.start, range.end, [&](Range* r) {
      if (r->pages()) svm.UnmapPages(r->pages(), c);
      ++hits;
    });
  }
  uint64_t hits = 0;
};

struct Setup {
  std::unique_ptr<FramePool> pool;
  std::shared_ptr<AddressSpace> as;
  BenchOps ops;
  std::unique_ptr<GpuSvm> svm;

  Setup(uint64_t pool_bytes, std::vector<uint64_t> chunks,
        NotifierMode mode = NotifierMode::kWindow) {
    pool = std::move(*FramePool::TryCreate(pool_bytes));
    as = *AddressSpace::TryCreate(*pool);
    GpuSvmConfig c;
    c.name = "bench";
    c.mm = as;
    c.mm_range = uint64_t{1} << 47;
    c.notifier_size = uint64_t{512} << 20;
    c.ops = &ops;
    c.chunk_sizes = std::move(chunks);
    c.notifier_mode = mode;
    c.device = &ops;
    svm = std::move(*GpuSvm::TryCreate(std::move(c)));
  }
  ~Setup() {
    svm.reset();
    as->Exit();
  }
};

// One driver cycle over the range at addr.
inline void Cycle(GpuSvm& svm, uint64_t addr) {
  DriverLockGuard g(svm.driver_lock());
  Range* r = *svm.FindOrInsert(addr, 0, ~uint64_t{0}, Ctx{});
  auto* b = static_cast<BenchRange*>(r);
  svm.InitPages(&b->pages, r);
  if (!svm.GetPages(r, Ctx{})) std::abort();
  svm.UnmapPages(&b->pages, Ctx{});
  if (!svm.RangeRemove(r)) std::abort();
}

void BM_FaultIn2M(benchmark::State& state) {
  const bool thp = state.range(0) == 1;
  constexpr uint64_t kLen = uint64_t{64} << 20;
  Setup s(uint64_t{256} << 20, {kSize2M, kSize64K, kSize4K});
  (void)s.as->Mmap(kBase, kLen + kSize2M, kRW, kAnon);
  if (thp) (void)s.as->Madvise(kBase, kLen, mm::kMadvHugePage);
  (void)s.as->Populate(kBase, kLen + kSize2M, true);
  // A range that stays, so the notifier is not removed and re-inserted.
  {
    DriverLockGuard g(s.svm->driver_lock());
    (void)s.svm->FindOrInsert(kBase + kLen, 0, ~uint64_t{0}, Ctx{});
  }
  uint64_t i = 0;
  for (auto _ : state) {
    Cycle(*s.svm, kBase + (i % (kLen / kSize2M)) * kSize2M);
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(i));
}
BENCHMARK(BM_FaultIn2M)->Arg(0)->Arg(1)->ArgName("thp")->Unit(benchmark::kMicrosecond);

void BM_FaultIn4K(benchmark::State& state) {
  constexpr uint64_t kLen = uint64_t{16} << 20;
  Setup s(uint64_t{128} << 20, {kSize4K});
  (void)s.as->Mmap(kBase, kLen + kSize4K, kRW, kAnon);
  (void)s.as->Populate(kBase, kLen + kSize4K, true);
  {
    DriverLockGuard g(s.svm->driver_lock());
    (void)s.svm->FindOrInsert(kBase + kLen, 0, ~uint64_t{0}, Ctx{});
  }
  uint64_t i = 0;
  for (auto _ : state) {
    Cycle(*s.svm, kBase + (i % (kLen / kSize4K)) * kSize4K);
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(i));
}
BENCHMARK(BM_FaultIn4K)->Unit(benchmark::kNanosecond);

void BM_Invalidate(benchmark::State& state) {
  const uint64_t nranges = static_cast<uint64_t>(state.range(0));
  const auto mode = state.range(1) == 0 ? NotifierMode::kWindow : NotifierMode::kPerRange;
  const uint64_t len = nranges * kSize4K;
  Setup s(uint64_t{64} << 20, {kSize4K}, mode);
  if (auto m = s.as->Mmap(kBase, len, kRW, kAnon); !m) {
    state.SkipWithError(m.error().ToString().c_str());
    return;
  }
  const size_t heap0 = mallinfo2().uordblks;
  {
    DriverLockGuard g(s.svm->driver_lock());
    for (uint64_t a = kBase; a < kBase + len; a += kSize4K) {
      if (auto r = s.svm->FindOrInsert(a, 0, ~uint64_t{0}, Ctx{}); !r) {
        state.SkipWithError(r.error().ToString().c_str());
        return;
      }
    }
  }
  const size_t heap1 = mallinfo2().uordblks;
  state.counters["bytes_per_range"] =
      static_cast<double>(heap1 - heap0) / static_cast<double>(nranges);
  // The range in the middle of the notifier holding it.
  const uint64_t addr = kBase + (nranges / 2 + 17) * kSize4K;
  mm::NotifierRange range{s.as.get(), addr, addr + kSize4K, mm::NotifyEvent::kClear, nullptr,
                          true};
  const uint64_t hits0 = s.ops.hits;
  for (auto _ : state) {
    ReadLock l(s.as->mmap_lock());
    if (!s.as->notifiers().InvalidateRangeStart(range)) std::abort();
    s.as->notifiers().InvalidateRangeEnd(range);
  }
  if (s.ops.hits - hits0 != static_cast<uint64_t>(state.iterations())) {
    std::fprintf(stderr, "hits %lu iterations %lu\n", (unsigned long)(s.ops.hits - hits0), (unsigned long)state.iterations());
    std::abort();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_Invalidate)
    ->Args({1 << 20, 0})
    ->Args({1 << 20, 1})
    ->ArgNames({"ranges", "per_range"})
    ->Unit(benchmark::kNanosecond);

}  // namespace
}  // namespace usvm::gpusvm

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  usvm::bench::MedianReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
