// Simulated address space benchmarks (issue 2), each beside the same work
// on the real kernel in the same run, with a sim/real ratio table printed
// at the end (medians when --benchmark_repetitions > 1).
//
//   BM_FirstTouch4K/sim    8-byte CPU write to each page of a fresh 64 MiB
//   BM_FirstTouch4K/real   private anonymous mapping: one allocating fault
//                          per 4 KiB page (real: MADV_NOHUGEPAGE mmap).
//   BM_FirstTouch2M/sim    the same over a 128 MiB MADV_HUGEPAGE region, one
//   BM_FirstTouch2M/real   write per 2 MiB: one THP fault each (the real one
//                          reports thp_frac, the fraction that really got a
//                          huge page).
//   BM_Read4K/sim/ws:N     page-sized, page-aligned accesses walking a
//   BM_Read4K/real/ws:N    populated working set of N bytes: sim = Read()
//   BM_Write4K/sim/ws:N    / Write() through the simulated MMU; real =
//   BM_Write4K/real/ws:N   memcpy out of / into real memory.
//   BM_MmapMunmap/sim/vmas:N   mmap(64 KiB, RW, private anon) + munmap with
//   BM_MmapMunmap/real/vmas:N  N other VMAs present (alternating PROT_NONE
//                          and PROT_READ pages, so they cannot merge). The
//                          real one needs vm.max_map_count > N plus the
//                          process's own maps, and is skipped otherwise.
//   BM_Fork64M/sim         fork of a space holding a populated 64 MiB
//   BM_Fork64M/real        private region + the child's exit (real: fork(),
//                          child _exit(0), waitpid).
//
// First-touch benchmarks use manual time: only the touching loop is timed;
// the mmap before it and the munmap after it (which returns every frame to
// the pool) are not. Each simulated benchmark owns a lazily committed 16 GiB
// FramePool, destroyed when it ends, so the real fork benchmark does not
// copy page tables of some other benchmark's pool. A first untimed batch
// commits the arena pages that later batches reuse, so the figures are the
// steady state (frames are re-zeroed by memset on reuse, as the kernel
// zeroes the pages it hands out).
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "median_reporter.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::mm {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kPoolBytes = uint64_t{16} << 30;
constexpr uint64_t kTouch4KPages = 16384;  // 64 MiB per batch
constexpr uint64_t kTouch2MPages = 64;     // 128 MiB per batch
constexpr uint64_t kForkBytes = uint64_t{64} << 20;
constexpr uint64_t kMapLen = 16 * kPageSize;
constexpr uint64_t kHugeBase = uint64_t{1} << 33;  // 2 MiB-aligned sim address

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A FramePool and one address space on it (the space dies first).
struct Sim {
  std::unique_ptr<FramePool> pool;
  std::shared_ptr<AddressSpace> as;

  bool Init(benchmark::State& state) {
    auto p = FramePool::TryCreate(kPoolBytes);
    if (!p) {
      state.SkipWithError(("FramePool: " + p.error().ToString()).c_str());
      return false;
    }
    pool = std::move(*p);
    auto a = AddressSpace::TryCreate(*pool);
    if (!a) {
      state.SkipWithError(("AddressSpace: " + a.error().ToString()).c_str());
      return false;
    }
    as = std::move(*a);
    return true;
  }
};

template <typename T>
bool Check(benchmark::State& state, const Result<T>& r, const char* what) {
  if (r) return true;
  state.SkipWithError((std::string(what) + ": " + r.error().ToString()).c_str());
  return false;
}

// A real anonymous private mapping of `len` bytes aligned to `align`.
struct RealMap {
  void* raw = MAP_FAILED;
  size_t raw_len = 0;
  std::byte* p = nullptr;

  bool Map(benchmark::State& state, size_t len, size_t align, int advice) {
    raw_len = len + (align > kPageSize ? align : 0);
    raw = mmap(nullptr, raw_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      state.SkipWithError("real mmap failed");
      return false;
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw);
    p = reinterpret_cast<std::byte*>((a + align - 1) & ~uintptr_t(align - 1));
    if (madvise(p, len, advice) != 0) {
      state.SkipWithError("real madvise failed");
      return false;
    }
    return true;
  }
  void Unmap() {
    if (raw != MAP_FAILED) munmap(raw, raw_len);
    raw = MAP_FAILED;
  }
  ~RealMap() { Unmap(); }
};

// kB of AnonHugePages of this process (smaps_rollup), or -1.
long AnonHugeKb() {
  std::ifstream f("/proc/self/smaps_rollup");
  std::string line;
  while (std::getline(f, line)) {
    long kb;
    if (std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) return kb;
  }
  return -1;
}

// ===== first touch ============================================================

// One batch: map `len` at `addr` (0 = anywhere), optionally MADV_HUGEPAGE,
// time one 8-byte write every `stride` bytes, unmap. Returns the seconds
// of the writes, or a negative value after SkipWithError.
double SimTouchBatch(benchmark::State& state, Sim& s, uint64_t addr, uint64_t len,
                     uint64_t stride, bool huge) {
  const uint32_t flags = kMapPrivate | kMapAnonymous | (addr ? kMapFixed : 0u);
  auto m = s.as->Mmap(addr, len, kProtRead | kProtWrite, flags);
  if (!Check(state, m, "Mmap")) return -1;
  if (huge && !Check(state, s.as->Madvise(*m, len, kMadvHugePage), "Madvise")) return -1;
  const auto t0 = Clock::now();
  for (uint64_t off = 0; off < len; off += stride) {
    const uint64_t v = off;
    if (auto r = s.as->Write(*m + off, &v, sizeof v); !r) {
      Check(state, r, "Write");
      return -1;
    }
  }
  const double secs = SecondsSince(t0);
  if (!Check(state, s.as->Munmap(*m, len), "Munmap")) return -1;
  return secs;
}

void BM_FirstTouchSim(benchmark::State& state, uint64_t page, uint64_t pages) {
  Sim s;
  if (!s.Init(state)) return;
  const bool huge = page == kHugePageSize;
  const uint64_t len = page * pages;
  const uint64_t addr = huge ? kHugeBase : 0;
  if (SimTouchBatch(state, s, addr, len, page, huge) < 0) return;  // commits the arena
  const uint64_t faults0 = s.as->GetStats().faults;
  const uint64_t huge0 = s.as->GetStats().huge_faults;
  for (auto _ : state) {
    const double secs = SimTouchBatch(state, s, addr, len, page, huge);
    if (secs < 0) return;
    state.SetIterationTime(secs);
  }
  const auto st = s.as->GetStats();
  const double n = double(state.iterations()) * double(pages);
  state.SetItemsProcessed(int64_t(n));
  state.SetBytesProcessed(int64_t(n * double(page)));
  state.counters["faults_per_touch"] = double(st.faults - faults0) / n;
  if (huge) state.counters["thp_frac"] = double(st.huge_faults - huge0) / n;
}

void BM_FirstTouchReal(benchmark::State& state, uint64_t page, uint64_t pages) {
  const bool huge = page == kHugePageSize;
  const uint64_t len = page * pages;
  double thp_frac = -1;
  bool first = true;
  for (auto _ : state) {
    RealMap m;
    if (!m.Map(state, len, huge ? kHugePageSize : kPageSize,
               huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
      return;
    const long kb0 = first && huge ? AnonHugeKb() : 0;
    const auto t0 = Clock::now();
    for (uint64_t off = 0; off < len; off += page)
      *reinterpret_cast<volatile uint64_t*>(m.p + off) = off;
    state.SetIterationTime(SecondsSince(t0));
    if (first && huge) {
      const long kb1 = AnonHugeKb();
      if (kb0 >= 0 && kb1 >= 0) thp_frac = double(kb1 - kb0) * 1024 / double(len);
    }
    first = false;
    m.Unmap();
  }
  const double n = double(state.iterations()) * double(pages);
  state.SetItemsProcessed(int64_t(n));
  state.SetBytesProcessed(int64_t(n * double(page)));
  if (huge) state.counters["thp_frac"] = thp_frac;
}

// ===== page-sized access throughput ==========================================

void BM_AccessSim(benchmark::State& state, bool write, uint64_t ws) {
  Sim s;
  if (!s.Init(state)) return;
  auto m = s.as->Mmap(0, ws, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  if (!Check(state, m, "Mmap")) return;
  std::vector<std::byte> buf(kPageSize, std::byte{0x5a});
  for (uint64_t off = 0; off < ws; off += kPageSize)
    if (!Check(state, s.as->Write(*m + off, buf.data(), kPageSize), "Write")) return;
  const uint64_t mask = ws / kPageSize - 1;  // ws is a power of two
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t a = *m + ((i++ & mask) << kPageShift);
    auto r = write ? s.as->Write(a, buf.data(), kPageSize) : s.as->Read(a, buf.data(), kPageSize);
    if (!r) {
      Check(state, r, "access");
      return;
    }
    benchmark::DoNotOptimize(buf.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
  state.SetBytesProcessed(int64_t(state.iterations() * kPageSize));
}

void BM_AccessReal(benchmark::State& state, bool write, uint64_t ws) {
  RealMap m;
  if (!m.Map(state, ws, kPageSize, MADV_NOHUGEPAGE)) return;
  std::memset(m.p, 0x5a, ws);
  std::vector<std::byte> buf(kPageSize, std::byte{0x5a});
  const uint64_t mask = ws / kPageSize - 1;
  uint64_t i = 0;
  for (auto _ : state) {
    std::byte* p = m.p + ((i++ & mask) << kPageShift);
    if (write)
      std::memcpy(p, buf.data(), kPageSize);
    else
      std::memcpy(buf.data(), p, kPageSize);
    benchmark::DoNotOptimize(buf.data());
    benchmark::DoNotOptimize(p);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
  state.SetBytesProcessed(int64_t(state.iterations() * kPageSize));
}

// ===== mmap + munmap with many VMAs ===========================================

void BM_MmapMunmapSim(benchmark::State& state, uint64_t nvmas) {
  Sim s;
  if (!s.Init(state)) return;
  // nvmas pages of PROT_NONE; every odd page made PROT_READ: nvmas VMAs.
  auto base = s.as->Mmap(0, nvmas * kPageSize, kProtNone, kMapPrivate | kMapAnonymous);
  if (!Check(state, base, "Mmap")) return;
  for (uint64_t i = 1; i < nvmas; i += 2)
    if (!Check(state, s.as->Mprotect(*base + i * kPageSize, kPageSize, kProtRead), "Mprotect"))
      return;
  if (s.as->VmaCount() != nvmas) {
    state.SkipWithError("unexpected VMA count");
    return;
  }
  for (auto _ : state) {
    auto m = s.as->Mmap(0, kMapLen, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
    if (!Check(state, m, "Mmap")) return;
    if (!Check(state, s.as->Munmap(*m, kMapLen), "Munmap")) return;
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
  state.counters["vmas"] = double(s.as->VmaCount());
}

uint64_t ReadUint(const char* path) {
  std::ifstream f(path);
  uint64_t v = 0;
  f >> v;
  return v;
}

uint64_t CountOwnMaps() {
  std::ifstream f("/proc/self/maps");
  std::string line;
  uint64_t n = 0;
  while (std::getline(f, line)) ++n;
  return n;
}

void BM_MmapMunmapReal(benchmark::State& state, uint64_t nvmas) {
  const uint64_t max = ReadUint("/proc/sys/vm/max_map_count");
  const uint64_t need = nvmas + CountOwnMaps() + 64;
  if (max < need) {
    const std::string msg = "vm.max_map_count=" + std::to_string(max) + " < " +
                            std::to_string(need) + " needed (sysctl -w vm.max_map_count=262144)";
    state.SkipWithError(msg.c_str());
    return;
  }
  const size_t len = nvmas * kPageSize;
  void* base = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    state.SkipWithError("real mmap failed");
    return;
  }
  auto* b = static_cast<std::byte*>(base);
  for (uint64_t i = 1; i < nvmas; i += 2) {
    if (mprotect(b + i * kPageSize, kPageSize, PROT_READ) != 0) {
      munmap(base, len);
      state.SkipWithError("real mprotect failed");
      return;
    }
  }
  for (auto _ : state) {
    void* p = mmap(nullptr, kMapLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      state.SkipWithError("real mmap failed");
      break;
    }
    munmap(p, kMapLen);
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
  state.counters["vmas"] = double(CountOwnMaps());
  munmap(base, len);
}

// ===== fork =====================================================================

void BM_ForkSim(benchmark::State& state) {
  Sim s;
  if (!s.Init(state)) return;
  auto m = s.as->Mmap(0, kForkBytes, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  if (!Check(state, m, "Mmap")) return;
  std::vector<std::byte> page(kPageSize, std::byte{0x11});
  for (uint64_t off = 0; off < kForkBytes; off += kPageSize)
    if (!Check(state, s.as->Write(*m + off, page.data(), kPageSize), "Write")) return;
  for (auto _ : state) {
    auto child = s.as->Fork();
    if (!Check(state, child, "Fork")) return;
    (*child)->Exit();
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
}

void BM_ForkReal(benchmark::State& state) {
  RealMap m;
  if (!m.Map(state, kForkBytes, kPageSize, MADV_NOHUGEPAGE)) return;
  std::memset(m.p, 0x11, kForkBytes);
  for (auto _ : state) {
    const pid_t pid = fork();
    if (pid < 0) {
      state.SkipWithError("fork failed");
      return;
    }
    if (pid == 0) _exit(0);
    int status = 0;
    waitpid(pid, &status, 0);
  }
  state.SetItemsProcessed(int64_t(state.iterations()));
}

// ===== registration and the ratio table ======================================

struct Pair {
  std::string label, sim, real, counter;
  double goal;  // minimum sim/real; 0 = none
};

std::vector<Pair>& Pairs() {
  static std::vector<Pair> pairs;
  return pairs;
}

void RegisterAll() {
  using benchmark::RegisterBenchmark;
  auto pair = [](std::string label, std::string sim, std::string real, std::string counter,
                 double goal) { Pairs().push_back({label, sim, real, counter, goal}); };

  RegisterBenchmark("BM_FirstTouch4K/sim", BM_FirstTouchSim, kPageSize, kTouch4KPages)
      ->UseManualTime()->Unit(benchmark::kMillisecond);
  RegisterBenchmark("BM_FirstTouch4K/real", BM_FirstTouchReal, kPageSize, kTouch4KPages)
      ->UseManualTime()->Unit(benchmark::kMillisecond);
  pair("FirstTouch4K faults", "BM_FirstTouch4K/sim", "BM_FirstTouch4K/real",
       "items_per_second", 1.0);
  RegisterBenchmark("BM_FirstTouch2M/sim", BM_FirstTouchSim, kHugePageSize, kTouch2MPages)
      ->UseManualTime()->Unit(benchmark::kMillisecond);
  RegisterBenchmark("BM_FirstTouch2M/real", BM_FirstTouchReal, kHugePageSize, kTouch2MPages)
      ->UseManualTime()->Unit(benchmark::kMillisecond);
  pair("FirstTouch2M faults", "BM_FirstTouch2M/sim", "BM_FirstTouch2M/real",
       "items_per_second", 1.0);

  for (uint64_t ws : {uint64_t{256} << 10, uint64_t{64} << 20}) {
    const std::string w = ws >= (1 << 20) ? std::to_string(ws >> 20) + "M"
                                          : std::to_string(ws >> 10) + "K";
    for (bool write : {false, true}) {
      const std::string op = write ? "BM_Write4K" : "BM_Read4K";
      const std::string sim = op + "/sim/ws:" + w, real = op + "/real/ws:" + w;
      RegisterBenchmark(sim.c_str(), BM_AccessSim, write, ws);
      RegisterBenchmark(real.c_str(), BM_AccessReal, write, ws);
      pair(op.substr(3) + " ws:" + w + " (real=memcpy)", sim, real, "bytes_per_second", 0.30);
    }
  }

  for (uint64_t n : {uint64_t{100000}, uint64_t{50000}}) {
    const std::string sim = "BM_MmapMunmap/sim/vmas:" + std::to_string(n);
    const std::string real = "BM_MmapMunmap/real/vmas:" + std::to_string(n);
    RegisterBenchmark(sim.c_str(), BM_MmapMunmapSim, n);
    RegisterBenchmark(real.c_str(), BM_MmapMunmapReal, n);
    pair("MmapMunmap vmas:" + std::to_string(n) + " mmap+munmap", sim, real, "items_per_second", 0);
  }

  RegisterBenchmark("BM_Fork64M/sim", BM_ForkSim)->Unit(benchmark::kMicrosecond)->UseRealTime();
  RegisterBenchmark("BM_Fork64M/real", BM_ForkReal)->Unit(benchmark::kMicrosecond)->UseRealTime();
  pair("Fork64M fork+exit", "BM_Fork64M/sim", "BM_Fork64M/real", "items_per_second", 0);
}

// The console reporter, plus a sim/real table at the end built from each
// benchmark's median (or its single run without repetitions).
class RatioReporter : public usvm::bench::MedianReporter {
 public:
  void Finalize() override {
    std::ostream& out = GetOutputStream();
    out << "\nsim/real (" << (AnyMedian() ? "medians" : "single runs") << "):\n";
    for (const Pair& p : Pairs()) {
      const double s = Get(p.sim, p.counter), r = Get(p.real, p.counter);
      char line[256];
      if (s <= 0 && r <= 0) continue;  // filtered out
      if (s <= 0 || r <= 0) {
        std::snprintf(line, sizeof line, "  %-40s  (no ratio: the %s side did not run)\n",
                      p.label.c_str(), s <= 0 ? "sim" : "real");
      } else {
        const double ratio = s / r;
        std::snprintf(line, sizeof line, "  %-40s  sim %12s  real %12s  sim/real %7.3f%s\n",
                      p.label.c_str(), Human(s, p.counter).c_str(), Human(r, p.counter).c_str(), ratio,
                      p.goal <= 0 ? "" : (ratio >= p.goal ? "  (goal met)" : "  (GOAL MISSED)"));
      }
      out << line;
    }
    ConsoleReporter::Finalize();
  }

 private:
  static std::string Human(double v, const std::string& counter) {
    return MedianReporter::Human(v, counter, "/s");
  }
};

}  // namespace
}  // namespace usvm::mm

int main(int argc, char** argv) {
  // The ratio table only in the default console format (looked at before
  // Initialize consumes the flag).
  const bool console = usvm::bench::ConsoleFormat(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  usvm::mm::RegisterAll();
  if (console) {
    usvm::mm::RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
