// Shared helpers for the driver tests: a simulated machine (frame pool,
// FrameMemory, N Devices, address spaces each with an Svm attached to some
// of the devices), buffers with a byte-exact host reference, and CPU / GPU
// fill and check helpers.
//
// Data pattern: every 8-byte word at virtual address va written with seed s
// holds Word(s, va), so a reference can be computed for any span without
// keeping state, and a stale or misplaced page shows up as a mismatch.
#ifndef USVM_TESTS_DRIVER_DRIVER_TEST_UTIL_H_
#define USVM_TESTS_DRIVER_DRIVER_TEST_UTIL_H_

// ASSERT / EXPECT that a Result is a success, printing the error otherwise.
#define USVM_ASSERT_OK(expr)                                                        \
  do {                                                                              \
    auto _usvm_r = (expr);                                                          \
    ASSERT_TRUE(_usvm_r.has_value()) << #expr << ": " << _usvm_r.error().ToString(); \
  } while (0)
#define USVM_EXPECT_OK(expr)                                                        \
  do {                                                                              \
    auto _usvm_r = (expr);                                                          \
    EXPECT_TRUE(_usvm_r.has_value()) << #expr << ": " << _usvm_r.error().ToString(); \
  } while (0)

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <optional>
#include <thread>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gpu/gpu_test_util.h"
#include "usvm/base/env.h"
#include "usvm/driver/driver.h"
#include "usvm/driver/frame_memory.h"
#include "usvm/gpu/gpu.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/types.h"

namespace usvm::driver::testing {

using gpu::testing::Eventually;
using mm::AddressSpace;

inline constexpr uint32_t kRW = mm::kProtRead | mm::kProtWrite;
inline constexpr uint32_t kAnonPrivate = mm::kMapPrivate | mm::kMapAnonymous;

// The word at `va` for fill seed `seed` (never 0 for seed != 0, so it differs
// from untouched memory).
inline uint64_t Word(uint64_t seed, uint64_t va) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + va;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z | 1;
}

// Host-side reference of [va, va + len): exactly the bytes the simulated
// memory must hold.
struct Ref {
  uint64_t va = 0;
  std::vector<uint8_t> bytes;

  Ref() = default;
  Ref(uint64_t va_, uint64_t len) : va(va_), bytes(len, 0) {}
  uint64_t len() const { return bytes.size(); }
  uint64_t end() const { return va + bytes.size(); }
  // The reference after a Fill(seed) of [a, a + n) (8-byte aligned).
  void Fill(uint64_t a, uint64_t n, uint64_t seed) {
    for (uint64_t x = a; x < a + n; x += 8) Set64(x, Word(seed, x));
  }
  void Zero(uint64_t a, uint64_t n) { std::memset(&bytes[a - va], 0, n); }
  void Set64(uint64_t a, uint64_t v) { std::memcpy(&bytes[a - va], &v, 8); }
  uint64_t Get64(uint64_t a) const {
    uint64_t v;
    std::memcpy(&v, &bytes[a - va], 8);
    return v;
  }
};

// First mismatch between `got` (bytes of [va, va + got.size())) and the
// reference, as a message; "" when equal.
inline std::string Diff(uint64_t va, const uint8_t* got, const uint8_t* want, uint64_t n) {
  if (std::memcmp(got, want, n) == 0) return "";
  uint64_t i = 0;
  while (got[i] == want[i]) ++i;
  uint64_t bad = 0;
  for (uint64_t j = i; j < n; ++j) bad += got[j] != want[j];
  char buf[200];
  snprintf(buf, sizeof buf, "first mismatch at va %#llx (offset %#llx): got %#x want %#x; %llu bytes differ",
           (unsigned long long)(va + i), (unsigned long long)i, got[i], want[i],
           (unsigned long long)bad);
  return buf;
}

// ---- CPU side ---------------------------------------------------------------

// CPU writes Word(seed, x) at every word of [va, va + len).
inline Result<void> CpuFill(AddressSpace& as, uint64_t va, uint64_t len, uint64_t seed) {
  std::vector<uint64_t> w(len / 8);
  for (uint64_t i = 0; i < w.size(); ++i) w[i] = Word(seed, va + i * 8);
  return as.Write(va, w.data(), len);
}
inline Result<std::vector<uint8_t>> CpuRead(AddressSpace& as, uint64_t va, uint64_t len) {
  std::vector<uint8_t> b(len);
  auto r = as.Read(va, b.data(), len);
  if (!r) return Unexpected(r.error());
  return b;
}
// Compares [ref.va, ref.end()) as the CPU reads it with the reference
// (a CPU read migrates device pages home: use after device-side checks).
inline ::testing::AssertionResult CpuMatches(AddressSpace& as, const Ref& ref) {
  auto got = CpuRead(as, ref.va, ref.len());
  if (!got) return ::testing::AssertionFailure() << "CPU read failed: " << got.error().ToString();
  std::string d = Diff(ref.va, got->data(), ref.bytes.data(), ref.len());
  if (!d.empty()) return ::testing::AssertionFailure() << "CPU view: " << d;
  return ::testing::AssertionSuccess();
}
inline ::testing::AssertionResult CpuMatchesSpan(AddressSpace& as, const Ref& ref, uint64_t a, uint64_t n) {
  auto got = CpuRead(as, a, n);
  if (!got) return ::testing::AssertionFailure() << "CPU read failed: " << got.error().ToString();
  std::string d = Diff(a, got->data(), ref.bytes.data() + (a - ref.va), n);
  if (!d.empty()) return ::testing::AssertionFailure() << "CPU view: " << d;
  return ::testing::AssertionSuccess();
}

// ---- GPU side ---------------------------------------------------------------

// Kernel threads for `words` words: at most 16, each a contiguous chunk.
inline uint32_t ThreadsFor(uint64_t words) { return static_cast<uint32_t>(std::clamp<uint64_t>(words / 512, 1, 16)); }

template <typename F>
inline Result<gpu::Launch> LaunchWords(Vm& vm, uint64_t va, uint64_t len, F per_word, bool through_vm = true) {
  const uint64_t words = len / 8;
  const uint32_t threads = ThreadsFor(words);
  auto fn = [=](gpu::KernelContext& k) {
    const uint64_t chunk = (words + k.num_threads() - 1) / k.num_threads();
    const uint64_t b = std::min<uint64_t>(words, uint64_t{k.thread_id()} * chunk);
    const uint64_t e = std::min<uint64_t>(words, b + chunk);
    for (uint64_t i = b; i < e; ++i) {
      if (k.cancelled()) return;
      per_word(k, i, va + i * 8);
    }
  };
  if (through_vm) return vm.LaunchKernel(fn, {.threads = threads});
  return vm.context().LaunchKernel(fn, {.threads = threads});
}

// Waits for a launch; a launch that has not finished after 30 s is a hang:
// the test binary aborts with a message (rather than blocking ctest).
inline Result<void> WaitLaunch(const gpu::Launch& l) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!l.fence().IsSignalled()) {
    if (std::chrono::steady_clock::now() > end) {
      fprintf(stderr, "FATAL: GPU launch %llu did not finish in 30 s (hang)\n",
              (unsigned long long)l.id());
      std::abort();
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return l.Wait();
}
inline Result<void> Wait(Result<gpu::Launch> l) {
  if (!l) return Unexpected(l.error());
  return WaitLaunch(*l);
}

// GPU stores Word(seed, x) at every word of [va, va + len).
inline Result<void> GpuFill(Vm& vm, uint64_t va, uint64_t len, uint64_t seed) {
  return Wait(LaunchWords(vm, va, len, [seed](gpu::KernelContext& k, uint64_t, uint64_t a) {
    k.Store(a, Word(seed, a));
  }));
}
// GPU loads [va, va + len) into a host vector.
inline Result<std::vector<uint8_t>> GpuRead(Vm& vm, uint64_t va, uint64_t len) {
  auto out = std::make_shared<std::vector<uint64_t>>(len / 8);
  uint64_t* p = out->data();
  auto r = Wait(LaunchWords(vm, va, len, [p](gpu::KernelContext& k, uint64_t i, uint64_t a) {
    p[i] = k.Load(a);
  }));
  if (!r) return Unexpected(r.error());
  std::vector<uint8_t> b(len);
  std::memcpy(b.data(), out->data(), len);
  return b;
}
// GPU adds `v` to every word (load + store, not atomic).
inline Result<void> GpuAdd(Vm& vm, uint64_t va, uint64_t len, uint64_t v) {
  return Wait(LaunchWords(vm, va, len, [v](gpu::KernelContext& k, uint64_t, uint64_t a) {
    k.Store(a, k.Load(a) + v);
  }));
}
// The same, except for the 4 KiB page at `skip_off` of every `skip_every`
// bytes: pages a CPU thread reads meanwhile. (A CPU read of a word the GPU
// writes at the same time through a remote mapping is a data race of the
// simulated program, which TSan reports; the pages around them still move
// with their ranges.)
inline Result<void> GpuAddExcept(Vm& vm, uint64_t va, uint64_t len, uint64_t v, uint64_t skip_every,
                                 uint64_t skip_off) {
  return Wait(LaunchWords(vm, va, len, [=](gpu::KernelContext& k, uint64_t, uint64_t a) {
    const uint64_t off = (a - va) % skip_every;
    if (off >= skip_off && off < skip_off + 4096) return;
    k.Store(a, k.Load(a) + v);
  }));
}
inline ::testing::AssertionResult GpuMatches(Vm& vm, const Ref& ref) {
  auto got = GpuRead(vm, ref.va, ref.len());
  if (!got) return ::testing::AssertionFailure() << "GPU read failed: " << got.error().ToString();
  std::string d = Diff(ref.va, got->data(), ref.bytes.data(), ref.len());
  if (!d.empty()) return ::testing::AssertionFailure() << "GPU " << vm.gpu_id() << " view: " << d;
  return ::testing::AssertionSuccess();
}
inline ::testing::AssertionResult GpuMatchesSpan(Vm& vm, const Ref& ref, uint64_t a, uint64_t n) {
  auto got = GpuRead(vm, a, n);
  if (!got) return ::testing::AssertionFailure() << "GPU read failed: " << got.error().ToString();
  std::string d = Diff(a, got->data(), ref.bytes.data() + (a - ref.va), n);
  if (!d.empty()) return ::testing::AssertionFailure() << "GPU " << vm.gpu_id() << " view: " << d;
  return ::testing::AssertionSuccess();
}

// The error code of a failed result (kOk on success).
template <typename T>
inline Errc Code(const Result<T>& r) {
  return r ? Errc::kOk : r.error().code();
}

// Where the CPU page table says the page at va lives.
inline bool InDeviceMemory(AddressSpace& as, uint64_t va) {
  return as.QueryPte(va).kind == mm::PteInfo::Kind::kDevicePrivate;
}
// Pages of [va, va + len) that are device-private entries.
inline uint64_t DevicePages(AddressSpace& as, uint64_t va, uint64_t len) {
  uint64_t n = 0;
  for (uint64_t a = va; a < va + len; a += mm::kPageSize) n += InDeviceMemory(as, a);
  return n;
}
// The GPU PTE kind at va in the Vm's GPU context, or nullopt when nothing
// is mapped.
inline std::optional<gpu::PteKind> GpuPteKind(Vm& vm, uint64_t va) {
  auto m = vm.context().page_table().Walk(va);
  if (!m) return std::nullopt;
  return m->pte.kind();
}
// The same in the device's default context (the first address space
// attached), usable after the Vm is gone.
inline std::optional<gpu::PteKind> GpuPteKind(Device& d, uint64_t va) {
  auto m = d.gpu().page_table().Walk(va);
  if (!m) return std::nullopt;
  return m->pte.kind();
}

// ---- the machine ------------------------------------------------------------

struct MachineConfig {
  uint64_t pool_bytes = uint64_t{1} << 30;
  gpu::LatencyModel latency = gpu::LatencyModel::Zero();
  uint32_t gpus = 1;
  uint64_t vram_bytes = uint64_t{64} << 20;
  uint32_t exec_threads = 2;
  bool shared_owner = false;  // every device shares one owner
  bool peer_access = false;   // every pair of devices has peer access
  bool fault_thread = true;   // DeviceConfig::fault_thread
  uint32_t fault_batch = 256;            // DeviceConfig::fault_batch
  uint32_t fault_buffer_entries = 0;     // GpuConfig::fault_buffer_entries
  std::string eviction = "lru";          // DeviceConfig::eviction
  gpu::AccessCounterConfig access_counters;  // GpuConfig::access_counters
  // A ManualClock (advance it with Machine::AdvanceClock) instead of the
  // real one: for policies that count time (thrashing pins).
  bool manual_clock = false;
  // One address space with an Svm attached to every device (false: none;
  // the test adds its own with AddProcess).
  bool default_process = true;
  SvmConfig svm;
};

class Machine {
 public:
  struct Process {
    std::shared_ptr<AddressSpace> as;
    std::unique_ptr<Svm> svm;
  };

  explicit Machine(const MachineConfig& c = {}) : config_(c), env_(MakeEnv(c, &clock_)) {
    pool_ = std::move(mm::FramePool::TryCreate(c.pool_bytes, *env_).value());
    baseline_free_frames_ = pool_->GetStats().free_frames;
    sysmem_ = std::make_unique<FrameMemory>(*pool_);
    for (uint32_t i = 0; i < c.gpus; ++i) {
      DeviceConfig dc;
      dc.gpu.vram_bytes = c.vram_bytes;
      dc.gpu.exec_threads = c.exec_threads;
      dc.gpu.copy_engines = 2;
      dc.gpu.latency = c.latency;
      dc.fault_thread = c.fault_thread;
      dc.fault_batch = c.fault_batch;
      dc.gpu.fault_buffer_entries = c.fault_buffer_entries;
      dc.eviction = c.eviction;
      dc.gpu.access_counters = c.access_counters;
      dc.owner = c.shared_owner ? static_cast<const void*>(&owner_token_) : nullptr;
      auto d = Device::TryCreate(i, dc, sysmem_.get(), *env_);
      EXPECT_TRUE(d.has_value()) << "Device::TryCreate: " << d.error().ToString();
      if (!d) return;
      devs_.push_back(std::move(*d));
    }
    if (c.peer_access)
      for (uint32_t i = 0; i < devs_.size(); ++i)
        for (uint32_t j = i + 1; j < devs_.size(); ++j) {
          auto r = devs_[i]->EnablePeerAccess(*devs_[j]);
          EXPECT_TRUE(r.has_value()) << r.error().ToString();
        }
    if (c.default_process) {
      std::vector<uint32_t> all;
      for (uint32_t i = 0; i < devs_.size(); ++i) all.push_back(i);
      AddProcess(all, c.svm);
    }
  }

  ~Machine() { Teardown(); }

  // Closes and destroys every Svm, exits every address space, destroys the
  // devices. Idempotent.
  void Teardown() {
    for (Process& p : procs_) p.svm.reset();
    for (Process& p : procs_)
      if (p.as) p.as->Exit();
    procs_.clear();
    for (auto& as : extra_spaces_) as->Exit();
    extra_spaces_.clear();
    devs_.clear();
  }

  // A new address space with an Svm attached to devices `gpus`.
  Process& AddProcess(const std::vector<uint32_t>& gpus, SvmConfig sc = {}) {
    auto as = AddressSpace::TryCreate(*pool_, {}, *env_);
    EXPECT_TRUE(as.has_value());
    return AddProcess(std::move(*as), gpus, sc);
  }
  Process& AddProcess(std::shared_ptr<AddressSpace> as, const std::vector<uint32_t>& gpus, SvmConfig sc = {}) {
    if (!sc.env) sc.env = env_.get();
    Process p;
    p.as = std::move(as);
    auto svm = Svm::TryCreate(p.as, sc);
    EXPECT_TRUE(svm.has_value()) << "Svm::TryCreate: " << svm.error().ToString();
    if (svm) {
      p.svm = std::move(*svm);
      for (uint32_t g : gpus) {
        auto vm = p.svm->Attach(*devs_.at(g));
        EXPECT_TRUE(vm.has_value()) << "Attach " << g << ": " << vm.error().ToString();
      }
    }
    procs_.push_back(std::move(p));
    return procs_.back();
  }
  // Destroys device i before the Svms (Device's destructor detaches it).
  void DestroyDevice(uint32_t i) { devs_.at(i).reset(); }
  // Keeps an address space (a fork child) alive until teardown.
  void Keep(std::shared_ptr<AddressSpace> as) { extra_spaces_.push_back(std::move(as)); }

  Env& env() { return *env_; }
  // REQUIRES: MachineConfig::manual_clock.
  void AdvanceClock(uint64_t ns) { clock_->Advance(ns); }
  mm::FramePool& pool() { return *pool_; }
  FrameMemory& sysmem() { return *sysmem_; }
  Device& dev(uint32_t i = 0) { return *devs_.at(i); }
  uint32_t gpus() const { return static_cast<uint32_t>(devs_.size()); }
  Process& proc(uint32_t i = 0) { return procs_.at(i); }
  AddressSpace& as(uint32_t p = 0) { return *procs_.at(p).as; }
  Svm& svm(uint32_t p = 0) { return *procs_.at(p).svm; }
  Vm& vm(uint32_t gpu = 0, uint32_t p = 0) {
    Vm* v = procs_.at(p).svm->vm(gpu);
    EXPECT_NE(v, nullptr) << "no Vm for GPU " << gpu;
    return *v;
  }
  uint64_t baseline_free_frames() const { return baseline_free_frames_; }
  const void* owner_token() const { return &owner_token_; }

  // mmap(2) of an anonymous private buffer (address chosen by the kernel,
  // or fixed when `at` is non-zero).
  uint64_t Mmap(uint64_t len, uint64_t at = 0, uint32_t prot = kRW, uint32_t flags = kAnonPrivate,
                uint32_t p = 0) {
    if (at) flags |= mm::kMapFixed;
    auto r = procs_.at(p).as->Mmap(at, len, prot, flags);
    EXPECT_TRUE(r.has_value()) << "mmap: " << r.error().ToString();
    return r.value_or(0);
  }
  // A free 2 MiB aligned VA span of len bytes (nothing is mapped there).
  uint64_t ReserveVa(uint64_t len) {
    const uint64_t at = next_fixed_;
    next_fixed_ += (len + k2M - 1) / k2M * k2M + k2M;  // a guard gap between buffers
    return at;
  }
  // A 2 MiB aligned anonymous private buffer of len bytes.
  uint64_t MmapAligned(uint64_t len, uint32_t p = 0) {
    return Mmap(len, ReserveVa(len), kRW, kAnonPrivate, p);
  }

 private:
  static std::unique_ptr<Env> MakeEnv(const MachineConfig& c, ManualClock** clock) {
    if (!c.manual_clock) return std::make_unique<Env>();
    auto mc = std::make_unique<ManualClock>(1'000'000'000);
    *clock = mc.get();
    return std::make_unique<Env>(std::move(mc), 1);
  }

  MachineConfig config_;
  ManualClock* clock_ = nullptr;  // owned by env_; set when manual_clock
  std::unique_ptr<Env> env_;
  std::unique_ptr<mm::FramePool> pool_;
  uint64_t baseline_free_frames_ = 0;
  std::unique_ptr<FrameMemory> sysmem_;
  std::vector<std::unique_ptr<Device>> devs_;
  // procs_ destroyed before devs_ (declared after): Svms go first.
  std::deque<Process> procs_;
  std::vector<std::shared_ptr<AddressSpace>> extra_spaces_;
  uint64_t next_fixed_ = uint64_t{0x200000000000};
  char owner_token_ = 0;
};

}  // namespace usvm::driver::testing

#endif  // USVM_TESTS_DRIVER_DRIVER_TEST_UTIL_H_
