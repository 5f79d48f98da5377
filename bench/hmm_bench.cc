// HMM benchmarks (issue 4): range fault and device-memory migration through
// the test mirror device (tests/mm/dmirror.h), with a plain memcpy of the
// same bytes in the same run and a ratio table at the end (medians when
// --benchmark_repetitions > 1).
//
//   BM_Snapshot/4K, /2M      range fault with no fault requested over a
//                            populated 32 MiB region mapped with 4 KiB
//                            pages, or with 2 MiB THPs (pages/s).
//   BM_FaultIn/populated     range fault with REQ_FAULT | REQ_WRITE over the
//                            same populated 4 KiB region: nothing to fault,
//                            every entry checked (pages/s).
//   BM_FaultIn/fresh         the same over a freshly mapped region: every
//                            page takes an allocating write fault (pages/s;
//                            the munmap and mmap around it are not timed).
//   BM_MigrateToDevice/C     MigrateVma setup/copy/pages/finalize of the
//   BM_MigrateToSystem/C     32 MiB region in chunks of C (64K or 2M), system
//                            -> device or device -> system; the other
//                            direction runs untimed between iterations.
//   BM_Memcpy/C              memcpy of 32 MiB between two warm buffers, in
//                            C-sized pieces: the bound a migration's copy
//                            would reach.
//   BM_Migrate2M{ToDevice,ToSystem}/{compound,4K}
//                            a 32 MiB MADV_HUGEPAGE region of THPs moved in
//                            2 MiB calls through the 2 MiB test device
//                            (tests/mm/huge_device.h): each 2 MiB as one
//                            compound page (kMigrateSelectCompound), or split
//                            into 512 4 KiB pages.
//   BM_EvictDevice/1G-4AS    device-frame eviction (EvictDevicePages: no
//                            mmap lock, every mapper found through the
//                            device rmap) of 1 GiB of device memory whose
//                            pages are each mapped by 4 address spaces (a
//                            parent and 3 forked children); re-migrating to
//                            the device and forking run untimed (bytes/s of
//                            device memory evicted; unmap_ms, copy_ms and
//                            remap_ms split each iteration into
//                            MigrateDevicePfns, the copy into fresh system
//                            frames, and MigrateDevicePages + Finalize).
//   BM_Memcpy/1G             memcpy of the same 1 GiB in 4 KiB pieces.
// Goals (issue 4): 2 MiB migrations >= 70% of memcpy; snapshot >= 20M
// pages/s. Issue 8: compound migration >= 0.8x memcpy and >= 2x the 4 KiB
// path.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../tests/mm/dmirror.h"
#include "../tests/mm/huge_device.h"
#include "median_reporter.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/migrate_device.h"

namespace usvm::mm {
namespace {

using Clock = std::chrono::steady_clock;
using testing::DMirror;

constexpr uint64_t kPoolBytes = uint64_t{4} << 30;
constexpr uint64_t kRegion = uint64_t{32} << 20;
constexpr uint64_t kRegionPages = kRegion / kPageSize;
constexpr uint64_t kBase = uint64_t{1} << 36;  // 2 MiB-aligned sim address

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

template <typename T>
bool Check(benchmark::State& state, const Result<T>& r, const char* what) {
  if (r) return true;
  state.SkipWithError((std::string(what) + ": " + r.error().ToString()).c_str());
  return false;
}

// A pool, an address space with a populated region at kBase, and a mirror
// device watching it with room for the whole region.
struct Sim {
  std::unique_ptr<FramePool> pool;
  std::shared_ptr<AddressSpace> as;
  std::unique_ptr<DMirror> dev;

  bool Init(benchmark::State& state, bool huge, bool populate = true) {
    auto p = FramePool::TryCreate(kPoolBytes);
    if (!Check(state, p, "FramePool")) return false;
    pool = std::move(*p);
    auto a = AddressSpace::TryCreate(*pool);
    if (!Check(state, a, "AddressSpace")) return false;
    as = std::move(*a);
    if (!MapRegion(state, huge)) return false;
    dev = DMirror::Create(as, kRegionPages);
    if (!dev) {
      state.SkipWithError("DMirror::Create failed");
      return false;
    }
    if (!Check(state, dev->Watch(kBase, kRegion), "Watch")) return false;
    if (populate) {
      std::vector<uint8_t> data(kRegion);
      for (uint64_t i = 0; i < kRegion; i += 64) data[i] = static_cast<uint8_t>(i >> 6);
      if (!Check(state, as->Write(kBase, data.data(), kRegion), "Write")) return false;
    }
    return true;
  }
  bool MapRegion(benchmark::State& state, bool huge) {
    auto m = as->Mmap(kBase, kRegion, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous | kMapFixed);
    if (!Check(state, m, "Mmap")) return false;
    return Check(state, as->Madvise(kBase, kRegion, huge ? kMadvHugePage : kMadvNoHugePage), "Madvise");
  }
  ~Sim() {
    dev.reset();
    if (as) as->Exit();
  }
};

// ===== range fault ============================================================

void BM_Snapshot(benchmark::State& state, bool huge) {
  Sim s;
  if (!s.Init(state, huge)) return;
  for (auto _ : state) {
    auto w = s.dev->Snapshot(kBase, kBase + kRegion);
    if (!Check(state, w, "Snapshot")) return;
    benchmark::DoNotOptimize(w->data());
  }
  state.SetItemsProcessed(int64_t(state.iterations() * kRegionPages));
}

void BM_FaultInPopulated(benchmark::State& state) {
  Sim s;
  if (!s.Init(state, false)) return;
  std::vector<uint64_t> words;
  for (auto _ : state) {
    if (!Check(state, s.dev->FaultIn(kBase, kBase + kRegion, true, &words), "FaultIn")) return;
    benchmark::DoNotOptimize(words.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations() * kRegionPages));
}

void BM_FaultInFresh(benchmark::State& state) {
  Sim s;
  if (!s.Init(state, false, false)) return;
  std::vector<uint64_t> words;
  // One untimed batch commits the arena pages later batches reuse.
  if (!Check(state, s.dev->FaultIn(kBase, kBase + kRegion, true, &words), "FaultIn")) return;
  for (auto _ : state) {
    if (!Check(state, s.as->Munmap(kBase, kRegion), "Munmap") || !s.MapRegion(state, false)) return;
    const auto t0 = Clock::now();
    if (!Check(state, s.dev->FaultIn(kBase, kBase + kRegion, true, &words), "FaultIn")) return;
    state.SetIterationTime(SecondsSince(t0));
  }
  state.SetItemsProcessed(int64_t(state.iterations() * kRegionPages));
}

// ===== migration ==============================================================

// Migrates the region chunk by chunk; false after SkipWithError.
bool MigrateAll(benchmark::State& state, DMirror& dev, uint64_t chunk, bool to_device) {
  for (uint64_t off = 0; off < kRegion; off += chunk) {
    auto r = to_device ? dev.MigrateToDevice(kBase + off, kBase + off + chunk)
                       : dev.MigrateToSystem(kBase + off, kBase + off + chunk);
    if (!Check(state, r, "migrate")) return false;
    if (*r != chunk / kPageSize) {
      state.SkipWithError("migration moved fewer pages than asked");
      return false;
    }
  }
  return true;
}

void BM_Migrate(benchmark::State& state, uint64_t chunk, bool to_device) {
  Sim s;
  if (!s.Init(state, false)) return;
  // A first untimed round trip commits the device and arena pages.
  if (!MigrateAll(state, *s.dev, chunk, true) || !MigrateAll(state, *s.dev, chunk, false)) return;
  for (auto _ : state) {
    if (!to_device && !MigrateAll(state, *s.dev, chunk, true)) return;
    const auto t0 = Clock::now();
    if (!MigrateAll(state, *s.dev, chunk, to_device)) return;
    state.SetIterationTime(SecondsSince(t0));
    if (to_device && !MigrateAll(state, *s.dev, chunk, false)) return;
  }
  state.SetBytesProcessed(int64_t(state.iterations() * kRegion));
  state.SetItemsProcessed(int64_t(state.iterations() * kRegionPages));
}

// 2 MiB units: the region as THPs, moved by the 2 MiB test device.
struct HugeSim {
  std::unique_ptr<FramePool> pool;
  std::shared_ptr<AddressSpace> as;
  std::unique_ptr<testing::HugeDevice> dev;
  bool Init(benchmark::State& state, DeviceMemoryKind kind) {
    auto p = FramePool::TryCreate(kPoolBytes);
    if (!Check(state, p, "FramePool")) return false;
    pool = std::move(*p);
    auto a = AddressSpace::TryCreate(*pool);
    if (!Check(state, a, "AddressSpace")) return false;
    as = *a;
    dev = testing::HugeDevice::Create(kRegion / kHugePageSize + 1, kind);
    if (!dev) {
      state.SkipWithError("HugeDevice");
      return false;
    }
    if (!Check(state, as->Mmap(kBase, kRegion, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous | kMapFixed),
               "Mmap") ||
        !Check(state, as->Madvise(kBase, kRegion, kMadvHugePage), "Madvise") ||
        !Check(state, as->Populate(kBase, kRegion, true), "Populate"))
      return false;
    return true;
  }
  bool MoveAll(benchmark::State& state, bool compound, bool to_device) {
    ReadLock l(as->mmap_lock());
    for (uint64_t off = 0; off < kRegion; off += kHugePageSize) {
      auto r = to_device ? dev->ToDevice(*as, kBase + off, kBase + off + kHugePageSize, compound)
                         : dev->ToRam(*as, kBase + off, kBase + off + kHugePageSize, compound);
      if (!Check(state, r, "migrate")) return false;
      if (*r != kPagesPerHuge) {
        state.SkipWithError("migration moved fewer pages than asked");
        return false;
      }
    }
    return true;
  }
  ~HugeSim() {
    dev.reset();
    if (as) as->Exit();
  }
};

void BM_Migrate2M(benchmark::State& state, bool compound, bool to_device) {
  HugeSim s;
  if (!s.Init(state, DeviceMemoryKind::kPrivate)) return;
  if (!s.MoveAll(state, compound, true) || !s.MoveAll(state, compound, false)) return;
  for (auto _ : state) {
    if (!to_device && !s.MoveAll(state, compound, true)) return;
    const auto t0 = Clock::now();
    if (!s.MoveAll(state, compound, to_device)) return;
    state.SetIterationTime(SecondsSince(t0));
    if (to_device && !s.MoveAll(state, compound, false)) return;
  }
  state.SetBytesProcessed(int64_t(state.iterations() * kRegion));
  state.SetItemsProcessed(int64_t(state.iterations() * kRegionPages));
}

void BM_Memcpy(benchmark::State& state, uint64_t chunk, uint64_t bytes) {
  std::vector<std::byte> src(bytes, std::byte{1}), dst(bytes, std::byte{0});
  for (auto _ : state) {
    for (uint64_t off = 0; off < bytes; off += chunk) std::memcpy(dst.data() + off, src.data() + off, chunk);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations() * bytes));
  state.SetItemsProcessed(int64_t(state.iterations() * (bytes / kPageSize)));
}

// ===== device-frame eviction ====================================================

constexpr uint64_t kEvictBytes = uint64_t{1} << 30;
constexpr uint64_t kEvictPages = kEvictBytes / kPageSize;
constexpr int kEvictSpaces = 4;  // the parent and 3 forked children

void BM_EvictDevice(benchmark::State& state) {
  auto p = FramePool::TryCreate(kPoolBytes);
  if (!Check(state, p, "FramePool")) return;
  std::unique_ptr<FramePool> pool = std::move(*p);
  auto a = AddressSpace::TryCreate(*pool);
  if (!Check(state, a, "AddressSpace")) return;
  std::shared_ptr<AddressSpace> as = *a;
  std::unique_ptr<DMirror> dev = DMirror::Create(as, kEvictPages);
  if (!dev) {
    state.SkipWithError("DMirror::Create failed");
    return;
  }
  auto m = as->Mmap(kBase, kEvictBytes, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous | kMapFixed);
  if (!Check(state, m, "Mmap") || !Check(state, as->Madvise(kBase, kEvictBytes, kMadvNoHugePage), "Madvise") ||
      !Check(state, dev->Watch(kBase, kEvictBytes), "Watch"))
    return;
  // Real bytes, so every frame is committed before the timed runs (a
  // populated but never written frame would be committed by the copy).
  {
    std::vector<uint8_t> data(kHugePageSize);
    for (uint64_t i = 0; i < data.size(); i += 64) data[i] = static_cast<uint8_t>(i >> 6);
    for (uint64_t off = 0; off < kEvictBytes; off += kHugePageSize)
      if (!Check(state, as->Write(kBase + off, data.data(), data.size()), "Write")) return;
  }
  std::vector<DevicePfn> pfns(kEvictPages);
  for (uint64_t i = 0; i < kEvictPages; ++i) pfns[i] = dev->pagemap().PfnOf(i);
  std::vector<uint64_t> src(kEvictPages), dst(kEvictPages);
  double unmap_s = 0, copy_s = 0, remap_s = 0;
  // One untimed round trip commits the frames the timed rounds reuse.
  for (uint64_t off = 0; off < kEvictBytes; off += kHugePageSize)
    if (!Check(state, dev->MigrateToDevice(kBase + off, kBase + off + kHugePageSize), "MigrateToDevice")) return;
  if (!Check(state, EvictDevicePages(dev->pagemap(), pfns.data(), kEvictPages), "EvictDevicePages")) return;
  for (auto _ : state) {
    // Untimed: everything to the device, then fork so that 4 spaces map
    // every device page.
    for (uint64_t off = 0; off < kEvictBytes; off += kHugePageSize) {
      auto r = dev->MigrateToDevice(kBase + off, kBase + off + kHugePageSize);
      if (!Check(state, r, "MigrateToDevice")) return;
      if (*r != kPagesPerHuge) {
        state.SkipWithError("migration to the device moved fewer pages than asked");
        return;
      }
    }
    std::vector<std::shared_ptr<AddressSpace>> children;
    for (int c = 1; c < kEvictSpaces; ++c) {
      auto ch = as->Fork();
      if (!Check(state, ch, "Fork")) return;
      children.push_back(std::move(*ch));
    }
    // Timed: what EvictDevicePages does, phase by phase.
    DevicePagemap& pm = dev->pagemap();
    const auto t0 = Clock::now();
    if (!Check(state, MigrateDevicePfns(pm, pfns.data(), kEvictPages, src.data(), dst.data()),
               "MigrateDevicePfns"))
      return;
    const auto t1 = Clock::now();
    uint64_t moved = 0;
    for (uint64_t i = 0; i < kEvictPages; ++i) {
      if (!(src[i] & kMigratePfnMigrate)) continue;
      auto f = pool->AllocPage(FramePool::Zero::kNo);
      if (!f) break;
      if (!dev->CopyToRam(pm, i, pool->Data(*f))) {
        pool->Put(*f);
        continue;
      }
      dst[i] = MigratePfn(*f, false);
      ++moved;
    }
    const auto t2 = Clock::now();
    MigrateDevicePages(pm, src.data(), dst.data(), kEvictPages);
    MigrateDeviceFinalize(pm, pool.get(), src.data(), dst.data(), kEvictPages);
    const auto t3 = Clock::now();
    state.SetIterationTime(std::chrono::duration<double>(t3 - t0).count());
    unmap_s += std::chrono::duration<double>(t1 - t0).count();
    copy_s += std::chrono::duration<double>(t2 - t1).count();
    remap_s += std::chrono::duration<double>(t3 - t2).count();
    if (moved != kEvictPages || dev->device_pages_in_use() != 0) {
      state.SkipWithError("eviction moved fewer pages than asked");
      return;
    }
    for (auto& ch : children) ch->Exit();
  }
  const double it = double(state.iterations());
  state.counters["unmap_ms"] = 1e3 * unmap_s / it;
  state.counters["copy_ms"] = 1e3 * copy_s / it;
  state.counters["remap_ms"] = 1e3 * remap_s / it;
  state.SetBytesProcessed(int64_t(state.iterations() * kEvictBytes));
  state.SetItemsProcessed(int64_t(state.iterations() * kEvictPages));
  dev.reset();
  as->Exit();
}

// ===== registration and the ratio table =========================================

using Pair = usvm::bench::RatioPair;
struct Absolute {
  std::string label, name, counter;
  double goal;  // minimum value
};
std::vector<Pair>& Pairs() {
  static std::vector<Pair> p;
  return p;
}
std::vector<Absolute>& Absolutes() {
  static std::vector<Absolute> a;
  return a;
}

void RegisterAll() {
  using benchmark::RegisterBenchmark;
  RegisterBenchmark("BM_Snapshot/4K", BM_Snapshot, false)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_Snapshot/2M", BM_Snapshot, true)->Unit(benchmark::kMicrosecond);
  Absolutes().push_back({"Snapshot 4K pages", "BM_Snapshot/4K", "items_per_second", 20e6});
  Absolutes().push_back({"Snapshot 2M pages", "BM_Snapshot/2M", "items_per_second", 20e6});
  RegisterBenchmark("BM_FaultIn/populated", BM_FaultInPopulated)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("BM_FaultIn/fresh", BM_FaultInFresh)->UseManualTime()->Unit(benchmark::kMicrosecond);
  Absolutes().push_back({"FaultIn populated", "BM_FaultIn/populated", "items_per_second", 0});
  Absolutes().push_back({"FaultIn fresh (allocating)", "BM_FaultIn/fresh", "items_per_second", 0});
  for (uint64_t chunk : {uint64_t{64} << 10, kHugePageSize}) {
    const std::string c = chunk == kHugePageSize ? "2M" : "64K";
    const double goal = chunk == kHugePageSize ? 0.70 : 0;
    const std::string memcpy_name = "BM_Memcpy/" + c;
    const std::string to_dev = "BM_MigrateToDevice/" + c, to_sys = "BM_MigrateToSystem/" + c;
    RegisterBenchmark(memcpy_name.c_str(), BM_Memcpy, chunk, kRegion)->Unit(benchmark::kMicrosecond);
    RegisterBenchmark(to_dev.c_str(), BM_Migrate, chunk, true)->UseManualTime()->Unit(benchmark::kMicrosecond);
    RegisterBenchmark(to_sys.c_str(), BM_Migrate, chunk, false)->UseManualTime()->Unit(benchmark::kMicrosecond);
    Pairs().push_back({"system->device " + c + " chunks", to_dev, memcpy_name, "bytes_per_second", goal});
    Pairs().push_back({"device->system " + c + " chunks", to_sys, memcpy_name, "bytes_per_second", goal});
  }
  RegisterBenchmark("BM_Memcpy/1G", BM_Memcpy, kPageSize, kEvictBytes)->Unit(benchmark::kMillisecond)->Iterations(2);
  RegisterBenchmark("BM_EvictDevice/1G-4AS", BM_EvictDevice)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(2);
  Pairs().push_back({"evict 1 GiB by frame, 4 spaces", "BM_EvictDevice/1G-4AS", "BM_Memcpy/1G", "bytes_per_second", 0});
}

void RegisterCompound() {
  using benchmark::RegisterBenchmark;
  for (bool to_device : {true, false}) {
    const std::string dir = to_device ? "ToDevice" : "ToSystem";
    const std::string arrow = to_device ? "system->device" : "device->system";
    const std::string comp = "BM_Migrate2M" + dir + "/compound", small = "BM_Migrate2M" + dir + "/4K";
    RegisterBenchmark(comp.c_str(), BM_Migrate2M, true, to_device)->UseManualTime()->Unit(benchmark::kMicrosecond);
    RegisterBenchmark(small.c_str(), BM_Migrate2M, false, to_device)->UseManualTime()->Unit(benchmark::kMicrosecond);
    Pairs().push_back({arrow + " THP as 2M page", comp, "BM_Memcpy/2M", "bytes_per_second", 0.8});
    Pairs().push_back({arrow + " THP as 512x4K", small, "BM_Memcpy/2M", "bytes_per_second", 0});
    Pairs().push_back({arrow + " 2M page vs 512x4K", comp, small, "bytes_per_second", 2.0});
  }
}

class RatioReporter : public usvm::bench::MedianReporter {
 public:
  void Finalize() override {
    std::ostream& out = GetOutputStream();
    char line[256];
    out << "\nrates:\n";
    for (const Absolute& a : Absolutes()) {
      const double v = Get(a.name, a.counter);
      if (v <= 0) continue;
      std::snprintf(line, sizeof line, "  %-34s %12s%s\n", a.label.c_str(), Human(v, a.counter).c_str(),
                    a.goal <= 0 ? "" : (v >= a.goal ? "  (goal >= 20M pages/s met)" : "  (GOAL MISSED: 20M pages/s)"));
      out << line;
    }
    PrintRatios("migration / its baseline (memcpy of the same bytes, or the 4 KiB path):",
                Pairs(), " pages/s");
    ConsoleReporter::Finalize();
  }

 private:
  static std::string Human(double v, const std::string& counter) {
    return MedianReporter::Human(v, counter, " pages/s");
  }
};

}  // namespace
}  // namespace usvm::mm

int main(int argc, char** argv) {
  const bool console = usvm::bench::ConsoleFormat(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  usvm::mm::RegisterAll();
  usvm::mm::RegisterCompound();
  if (console) {
    usvm::mm::RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
