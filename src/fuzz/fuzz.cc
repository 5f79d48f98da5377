// The fuzzer (fuzz.h): machine, generator, executor against the model,
// invariants, shrinking and the scenario writer.
#include "usvm/fuzz/fuzz.h"

#include <fmt/core.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <unordered_map>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/driver/driver.h"
#include "usvm/driver/frame_memory.h"
#include "usvm/fuzz/model.h"
#include "usvm/gpu/gpu.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/types.h"

namespace usvm::fuzz {

namespace {

constexpr uint64_t kBase = uint64_t{0x100000000000};  // slot 0
constexpr uint64_t kSlotStride = uint64_t{8} << 20;  // 2 MiB aligned, room to grow
constexpr uint32_t kSlotMaxPages = 1024;             // ops address [0, 4 MiB) of a slot
constexpr uint32_t kMaxChildren = 2;
constexpr uint32_t kMaxPins = 8;
constexpr uint8_t kAllGpus = 0xff;

uint64_t SlotBase(uint32_t slot) { return kBase + uint64_t{slot} * kSlotStride; }

// The word a CPU fill with `seed` writes at slot offset `off` (the same as
// the scenario runner's cpu_write, so a reproducer writes the same bytes).
uint64_t Word(uint64_t seed, uint64_t off) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + off;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z | 1;
}

int Errno(const Error& e) { return e.errnum(); }
std::string ErrName(int e) { return e == 0 ? "ok" : std::string(ErrcName(static_cast<Errc>(e))); }

// The simulated machine: a frame pool, G GPUs, one address space with
// its SVM, every GPU attached.
struct Machine {
  std::unique_ptr<Env> env;
  std::unique_ptr<mm::FramePool> pool;
  std::unique_ptr<driver::FrameMemory> sysmem;
  std::vector<std::unique_ptr<driver::Device>> devs;
  std::shared_ptr<mm::AddressSpace> as;
  std::unique_ptr<driver::Svm> svm;
  char owner = 0;
  uint64_t free_frames_at_start = 0;

  std::string Setup(const FuzzConfig& c) {
    env = std::make_unique<Env>(std::make_unique<RealClock>(), c.seed);
    auto p = mm::FramePool::TryCreate(uint64_t{512} << 20, *env);
    if (!p) return "frame pool: " + p.error().ToString();
    pool = std::move(*p);
    sysmem = std::make_unique<driver::FrameMemory>(*pool);
    for (uint32_t i = 0; i < c.gpus; ++i) {
      driver::DeviceConfig dc;
      dc.gpu.vram_bytes = c.vram_bytes;
      dc.gpu.exec_threads = 2;
      dc.gpu.latency = gpu::LatencyModel::Zero();
      dc.owner = &owner;
      auto d = driver::Device::TryCreate(i, dc, sysmem.get(), *env);
      if (!d) return fmt::format("GPU {}: {}", i, d.error().ToString());
      devs.push_back(std::move(*d));
    }
    for (size_t i = 0; i < devs.size(); ++i)
      for (size_t j = i + 1; j < devs.size(); ++j) (void)devs[i]->EnablePeerAccess(*devs[j]);
    free_frames_at_start = pool->GetStats().free_frames;
    auto a = mm::AddressSpace::TryCreate(*pool, {}, *env);
    if (!a) return "address space: " + a.error().ToString();
    as = std::move(*a);
    driver::SvmConfig sc;
    sc.name = "fuzz";
    sc.env = env.get();
    if (c.racer) {
      // Every 4th fault waits 100 us between get-pages and commit: room
      // for the racer's invalidations to land where a commit must retry.
      sc.commit_window_every = 4;
      sc.commit_window_ns = 100'000;
    }
    auto s = driver::Svm::TryCreate(as, sc);
    if (!s) return "svm: " + s.error().ToString();
    svm = std::move(*s);
    for (auto& d : devs)
      if (auto v = svm->Attach(*d); !v) return "attach: " + v.error().ToString();
    return "";
  }
};

// What one worker (thread) knows: its slots, its model, its children,
// binds and pins.
struct Child {
  std::shared_ptr<mm::AddressSpace> as;
  SpaceModel model;
};
struct BindRec {
  uint64_t start = 0, end = 0;
  bool ro = false;
  bool userptr = false;
  uint64_t handle = 0;
};
struct PinRec {
  uint64_t va = 0;
  mm::Pfn pfn = 0;
  // Still the page mapped at va (no munmap, mmap, DONTNEED, mremap or
  // reclaim over it since): the pinned frame must hold what the process
  // sees there (a long-term pin follows the process's writes: fork copies
  // pinned pages for the child instead of sharing them copy-on-write).
  bool coherent = true;
};

// Per-op expectations for the scenario writer.
struct OpNote {
  bool fault = false;  // the op's accesses were expected to fault
};

class Worker {
 public:
  Worker(const FuzzConfig& c, Machine& m, uint32_t tid, bool single)
      : c_(c), m_(m), tid_(tid), single_(single), rng_(Word(c.seed, tid)) {
    for (uint32_t s = tid; s < c.slots; s += c.threads) slots_.push_back(s);
    next_obj_ = 1 + tid * 1000000;
  }

  // Maps every slot of this worker (the initial state of every run).
  std::string Init() {
    for (uint32_t s : slots_) {
      auto r = m_.as->Mmap(SlotBase(s), uint64_t{c_.slot_pages} * kPage, mm::kProtRead | mm::kProtWrite,
                           mm::kMapPrivate | mm::kMapAnonymous | mm::kMapFixed);
      if (!r) return "initial mmap: " + r.error().ToString();
      model_.Mmap(SlotBase(s), c_.slot_pages, false, &next_obj_);
    }
    return "";
  }

  Op Generate();
  // Runs one op against the machine and the model: "" or the mismatch.
  std::string Execute(const Op& op);
  // FuzzConfig::watch_va: after an op, prints the op and the page's state
  // at that address if it changed (stderr).
  void Watch(const Op& op) {
    if (!c_.watch_va) return;
    const uint64_t va = c_.watch_va & ~(kPage - 1);
    std::string d = Describe(model_, *m_.as, va);
    if (d == watched_) return;
    fmt::print(stderr, "watch #{} [{}]: {}\n", op_index_, OpToString(op), d);
    watched_ = std::move(d);
  }
  std::string FullCheck(const char* when);
  std::string CheckPin(const PinRec& pin, const Op* op);
  // Unpins, unbinds, ends the children (end of run).
  void Release();

  FuzzResult& res() { return res_; }
  std::vector<Op>& ops() { return ops_; }
  std::vector<OpNote>& notes() { return notes_; }
  const std::vector<uint32_t>& slots() const { return slots_; }

 private:
  // Span helpers.
  uint64_t Va(const Op& op) const { return SlotBase(op.slot) + uint64_t{op.off} * kPage; }
  bool OwnSlot(uint32_t s) const { return std::find(slots_.begin(), slots_.end(), s) != slots_.end(); }
  void RandSpan(Op& op, bool mapped_bias);
  uint32_t RandSlot() { return slots_[rng_.Uniform(slots_.size())]; }

  std::string Mismatch(const Op& op, const std::string& what) {
    return fmt::format("seed {} thread {} op #{} [{}]: {}", c_.seed, tid_, op_index_, OpToString(op), what);
  }
  // A failure the injector explains (the op's result is accepted): true
  // when injection is on.
  bool Injected(const Op& op, int err) {
    if (c_.inject <= 0) return false;
    ++res_.injected_failures;
    ++res_.injected_errors[fmt::format("{}: {}", OpKindName(op.kind), ErrName(err))];
    return true;
  }
  bool SvmBroken() const { return !m_.svm->error(); }
  // What the model, the CPU page table and each GPU's page table hold at
  // va (appended to data mismatches, to tell a stale mapping from a lost
  // write without replaying a long run).
  std::string Describe(const SpaceModel& model, mm::AddressSpace& as, uint64_t va) {
    std::string d;
    if (const ModelPage* mp = model.Find(va))
      d += fmt::format("model: kind {} prot {} known {} lazy {} huge {} obj {} pgoff {}", static_cast<int>(mp->kind),
                       mp->prot, mp->Known(), mp->lazy, mp->huge, mp->obj, mp->pgoff);
    else
      d += "model: unmapped";
    const mm::PteInfo pi = as.QueryPte(va);
    d += fmt::format("; cpu: kind {} pfn {:#x} r {} w {} dirty {} zero {} file {} huge {} lazy {} device {}",
                     static_cast<int>(pi.kind), pi.pfn, pi.readable, pi.writable, pi.dirty, pi.zero_page, pi.file,
                     pi.huge, pi.lazy_free, pi.device_memory);
    if (auto v = as.FindVma(va); v && v->start <= va)
      d += fmt::format(" vma [{:#x},{:#x}) prot {} flags {:#x}", v->start, v->end, v->prot, v->flags);
    if (&as == m_.as.get())
      for (uint32_t g = 0; g < c_.gpus; ++g) {
        driver::Vm* vm = m_.svm->vm(g);
        if (!vm) continue;
        auto mp = vm->context().page_table().Walk(va);
        if (mp && mp->pte.valid())
          d += fmt::format("; gpu{}: kind {} phys {:#x} w {} leaf {:#x}", g, static_cast<int>(mp->pte.kind()),
                           mp->pte.phys() + (va - mp->va), mp->pte.writable(), mp->size);
      }
    return d;
  }

  // CPU.
  std::string CpuWrite(const Op& op, mm::AddressSpace& as, SpaceModel& model);
  std::string CpuRead(const Op& op, mm::AddressSpace& as, SpaceModel& model);
  std::string CpuAtomic(const Op& op);
  std::string CheckPage(mm::AddressSpace& as, SpaceModel& model, uint64_t va, const Op* op, const char* when);
  std::string Layout(const Op& op);
  std::string StalePtes(const Op& op, uint64_t va, uint64_t n, bool writable_only);
  // GPU.
  std::string Gpu(const Op& op);
  std::string Bind(const Op& op);

  const FuzzConfig& c_;
  Machine& m_;
  const uint32_t tid_;
  const bool single_;  // single-threaded: fork, children and reclaim allowed
  Rng rng_;
  std::vector<uint32_t> slots_;
  SpaceModel model_;
  uint32_t next_obj_ = 1;
  std::vector<Child> children_;
  std::vector<BindRec> binds_[8];
  std::vector<PinRec> pins_;
  FuzzResult res_;
  std::vector<Op> ops_;
  std::vector<OpNote> notes_;
  uint64_t op_index_ = 0;
  std::string watched_;
  OpNote* note_ = nullptr;

 public:
  // Watchdog: bumped after every op; the op running now.
  std::atomic<uint64_t> progress{0};
};

// ---------------------------------------------------------------------------
// Generation

void Worker::RandSpan(Op& op, bool mapped_bias) {
  op.slot = static_cast<uint8_t>(RandSlot());
  const uint64_t r = rng_.Uniform(100);
  uint32_t len = r < 45 ? 1 + rng_.Uniform(8) : r < 75 ? 16 * (1 + rng_.Uniform(4)) : r < 92 ? 512 : 1 + rng_.Uniform(kSlotMaxPages);
  const uint32_t limit = mapped_bias && rng_.Uniform(10) < 8 ? c_.slot_pages : kSlotMaxPages;
  len = std::min(len, limit);
  uint32_t off = static_cast<uint32_t>(rng_.Uniform(limit - len + 1));
  if (rng_.OneIn(2)) {
    const uint32_t align = len >= 512 ? 512 : len >= 16 ? 16 : 1;
    off = off / align * align;
  }
  op.off = off;
  op.len = len;
}

Op Worker::Generate() {
  Op op;
  struct W {
    OpKind k;
    uint32_t w;
  };
  const bool fork_ok = single_;
  const W table[] = {
      {OpKind::kCpuWrite, 14}, {OpKind::kCpuRead, 8},  {OpKind::kCpuAtomic, 4}, {OpKind::kMmap, 4},
      {OpKind::kMunmap, 4},    {OpKind::kMprotect, 5}, {OpKind::kMadvise, 5},  {OpKind::kMremap, 4},
      {OpKind::kFork, fork_ok ? 2u : 0u}, {OpKind::kChildExit, fork_ok && !children_.empty() ? 1u : 0u},
      {OpKind::kGpuKernel, 24}, {OpKind::kGpuAtomic, 5}, {OpKind::kPrefetch, 4}, {OpKind::kAdvise, 3},
      {OpKind::kBind, 2},      {OpKind::kUnbind, 2},   {OpKind::kEvict, 2},     {OpKind::kPin, 1},
      {OpKind::kUnpin, 1},     {OpKind::kReclaim, fork_ok ? 1u : 0u},
  };
  uint32_t total = 0;
  for (const W& w : table) total += w.w;
  uint64_t x = rng_.Uniform(total);
  for (const W& w : table) {
    if (x < w.w) {
      op.kind = w.k;
      break;
    }
    x -= w.w;
  }
  op.gpu = static_cast<uint8_t>(rng_.Uniform(c_.gpus));
  op.value = rng_.Next() | 1;
  switch (op.kind) {
    case OpKind::kCpuWrite:
    case OpKind::kCpuRead:
      RandSpan(op, true);
      if (!children_.empty() && rng_.OneIn(3)) op.arg = static_cast<uint8_t>(1 + rng_.Uniform(children_.size()));
      if (op.len > 64 && rng_.OneIn(2)) op.len = 64;
      break;
    case OpKind::kCpuAtomic:
      RandSpan(op, true);
      op.len = std::min<uint32_t>(op.len, 4);
      op.count = 1 + static_cast<uint32_t>(rng_.Uniform(64));
      op.value = 1 + rng_.Uniform(1000);
      break;
    case OpKind::kMmap:
      RandSpan(op, true);
      if (rng_.OneIn(2)) {
        op.off = 0;
        op.len = c_.slot_pages;
      }
      op.arg = rng_.OneIn(4) ? 1 : 0;
      break;
    case OpKind::kMunmap:
    case OpKind::kMadvise:
      RandSpan(op, true);
      if (op.kind == OpKind::kMadvise) op.arg = static_cast<uint8_t>(rng_.Uniform(10) < 5 ? 0 : rng_.Uniform(10) < 7 ? 1 : 2);
      break;
    case OpKind::kMprotect: {
      RandSpan(op, true);
      const uint8_t prots[] = {0, 1, 3, 3};
      op.arg = prots[rng_.Uniform(4)];
      break;
    }
    case OpKind::kMremap: {
      op.slot = static_cast<uint8_t>(RandSlot());
      op.arg = static_cast<uint8_t>(rng_.Uniform(3));
      // Mostly the whole mapping from the slot's start.
      op.off = rng_.OneIn(3) ? static_cast<uint32_t>(rng_.Uniform(c_.slot_pages / 2)) : 0;
      op.len = rng_.OneIn(3) ? 1 + static_cast<uint32_t>(rng_.Uniform(c_.slot_pages)) : c_.slot_pages - op.off;
      const uint64_t r = rng_.Uniform(3);
      op.len2 = r == 0 ? op.len : r == 1 ? std::max<uint32_t>(1, op.len / 2) : std::min<uint32_t>(kSlotMaxPages - op.off, op.len * 2);
      if (op.arg == 2) op.len2 = op.len;
      if (slots_.size() < 2 && op.arg != 0) op.arg = 0;
      do op.slot2 = static_cast<uint8_t>(RandSlot());
      while (slots_.size() >= 2 && op.slot2 == op.slot);
      break;
    }
    case OpKind::kChildExit:
      op.arg = static_cast<uint8_t>(rng_.Uniform(std::max<size_t>(children_.size(), 1)));
      break;
    case OpKind::kGpuKernel:
      RandSpan(op, true);
      op.arg = static_cast<uint8_t>(rng_.Uniform(3));
      op.count = 1 + static_cast<uint32_t>(rng_.Uniform(4));
      break;
    case OpKind::kGpuAtomic:
      RandSpan(op, true);
      op.len = std::min<uint32_t>(op.len, 16);
      op.count = 1 + static_cast<uint32_t>(rng_.Uniform(32));
      op.value = 1 + rng_.Uniform(1000);
      break;
    case OpKind::kPrefetch:
      RandSpan(op, true);
      op.arg = static_cast<uint8_t>(rng_.Uniform(c_.gpus + 1));
      break;
    case OpKind::kAdvise:
      RandSpan(op, true);
      op.arg = static_cast<uint8_t>(rng_.Uniform(c_.gpus + 2));
      op.value = rng_.Uniform(3);
      op.count = static_cast<uint32_t>(rng_.Uniform(2));
      break;
    case OpKind::kBind:
      RandSpan(op, true);
      op.len = std::min<uint32_t>(op.len, 64);
      op.arg = static_cast<uint8_t>(rng_.Uniform(4));
      // A launch revalidates every userptr of its Vm, other threads' too:
      // with several threads, only plain binds (revalidated on a fault in
      // them) keep each thread's outcome its own.
      if (!single_) op.arg &= 1;
      break;
    case OpKind::kUnbind:
      if (!binds_[op.gpu].empty()) {
        const BindRec& b = binds_[op.gpu][rng_.Uniform(binds_[op.gpu].size())];
        op.slot = static_cast<uint8_t>((b.start - kBase) / kSlotStride);
        op.off = static_cast<uint32_t>((b.start - SlotBase(op.slot)) / kPage);
      } else {
        RandSpan(op, true);
      }
      break;
    case OpKind::kEvict:
      op.arg = static_cast<uint8_t>(rng_.Uniform(2));
      op.len = 512;
      if (rng_.OneIn(3)) op.gpu = kAllGpus;
      break;
    case OpKind::kPin:
      RandSpan(op, true);
      op.len = 1;
      op.arg = static_cast<uint8_t>(rng_.Uniform(2));
      break;
    case OpKind::kUnpin:
      if (!pins_.empty()) {
        const PinRec& p = pins_[rng_.Uniform(pins_.size())];
        op.slot = static_cast<uint8_t>((p.va - kBase) / kSlotStride);
        op.off = static_cast<uint32_t>((p.va - SlotBase(op.slot)) / kPage);
      }
      break;
    default:
      break;
  }
  return op;
}

// ---------------------------------------------------------------------------
// Execution

std::string Worker::CheckPage(mm::AddressSpace& as, SpaceModel& model, uint64_t va, const Op* op, const char* when) {
  alignas(8) uint8_t buf[kPage];
  auto r = as.Read(va, buf, kPage);
  ++res_.checks;
  ModelPage* p = model.Find(va);
  const bool readable = model.Readable(va);
  auto fail = [&](const std::string& what) {
    const std::string msg = fmt::format("{} at va {:#x}: {}", when, va, what);
    return op ? Mismatch(*op, msg) : fmt::format("seed {} thread {} after op #{}: {}", c_.seed, tid_, op_index_, msg);
  };
  if (!r) {
    if (!readable) return "";
    if (op && Injected(*op, Errno(r.error()))) return "";
    if (!op && c_.inject > 0) return "";  // a migration back failed on an injected fault
    return fail(fmt::format("CPU read failed with {}, the model says readable", r.error().ToString()));
  }
  if (!readable) return fail(p ? "CPU read succeeded on a page the model says is not readable"
                               : "CPU read succeeded on an unmapped page");
  if (!p->Known()) {
    std::memcpy(SpaceModel::MutableBytes(*p), buf, kPage);
    p->SetKnown(true);
    return "";
  }
  const uint8_t* want = SpaceModel::Bytes(*p);
  for (uint64_t i = 0; i < kPage; ++i) {
    const uint8_t w = want ? want[i] : 0;
    if (buf[i] != w) {
      uint64_t n = 0;
      for (uint64_t j = i; j < kPage; ++j) n += buf[j] != (want ? want[j] : 0);
      return fail(fmt::format("byte +{:#x} got {:#04x} want {:#04x} ({} bytes of the page differ) [{}]", i, buf[i],
                              w, n, Describe(model, as, va)));
    }
  }
  return "";
}

std::string Worker::CheckPin(const PinRec& pin, const Op* op) {
  if (!pin.coherent) return "";
  ModelPage* p = model_.Find(pin.va);
  if (!p || !p->Known() || p->lazy) return "";
  const auto* got = reinterpret_cast<const uint8_t*>(m_.as->pool().Data(pin.pfn));
  const uint8_t* want = SpaceModel::Bytes(*p);
  ++res_.checks;
  for (uint64_t i = 0; i < kPage; ++i)
    if (got[i] != (want ? want[i] : 0)) {
      const std::string what = fmt::format("the pinned frame of {:#x} holds {:#04x} at +{:#x}, the process sees {:#04x}",
                                           pin.va, got[i], i, want ? want[i] : 0);
      return op ? Mismatch(*op, what) : fmt::format("seed {} thread {} after op #{}: {}", c_.seed, tid_, op_index_, what);
    }
  return "";
}

std::string Worker::FullCheck(const char* when) {
  for (const PinRec& pin : pins_)
    if (auto e = CheckPin(pin, nullptr); !e.empty()) return e;
  for (uint32_t s : slots_)
    for (uint64_t i = 0; i < kSlotMaxPages; ++i) {
      const uint64_t va = SlotBase(s) + i * kPage;
      if (!model_.Find(va) && (i & 63) != 0) continue;  // holes: sampled
      if (auto e = CheckPage(*m_.as, model_, va, nullptr, when); !e.empty()) return e;
    }
  for (size_t ci = 0; ci < children_.size(); ++ci)
    for (auto& [va, pg] : children_[ci].model.pages())
      if (auto e = CheckPage(*children_[ci].as, children_[ci].model, va, nullptr, when); !e.empty())
        return fmt::format("child {}: {}", ci, e);
  return "";
}

std::string Worker::CpuWrite(const Op& op, mm::AddressSpace& as, SpaceModel& model) {
  const uint64_t va = Va(op), n = op.len;
  std::vector<uint64_t> w(n * kPage / 8);
  for (uint64_t i = 0; i < w.size(); ++i) w[i] = Word(op.value, uint64_t{op.off} * kPage + i * 8);
  bool all = true;
  for (uint64_t i = 0; i < n; ++i) all &= model.Writable(va + i * kPage);
  note_->fault = !all;
  auto apply = [&](uint64_t i) {
    ModelPage* p = model.Find(va + i * kPage);
    std::memcpy(SpaceModel::MutableBytes(*p), &w[i * kPage / 8], kPage);
    p->SetKnown(true);
    p->lazy = false;
  };
  if (all && c_.inject <= 0) {
    auto r = as.Write(va, w.data(), n * kPage);
    if (!r) return Mismatch(op, "CPU write failed with " + r.error().ToString() + ", the model says writable");
    for (uint64_t i = 0; i < n; ++i) apply(i);
    return "";
  }
  // Page by page: each page's result is exact.
  for (uint64_t i = 0; i < n; ++i) {
    auto r = as.Write(va + i * kPage, &w[i * kPage / 8], kPage);
    const bool want = model.Writable(va + i * kPage);
    if (r && !want) return Mismatch(op, fmt::format("CPU write of page {:#x} succeeded, the model says not writable", va + i * kPage));
    if (!r && want) {
      if (Injected(op, Errno(r.error()))) continue;
      return Mismatch(op, fmt::format("CPU write of page {:#x} failed with {}, the model says writable", va + i * kPage,
                                      r.error().ToString()));
    }
    if (r) apply(i);
  }
  return "";
}

std::string Worker::CpuRead(const Op& op, mm::AddressSpace& as, SpaceModel& model) {
  const uint64_t va = Va(op);
  bool all = true;
  for (uint64_t i = 0; i < op.len; ++i) all &= model.Readable(va + i * kPage);
  note_->fault = !all;
  for (uint64_t i = 0; i < op.len; ++i)
    if (auto e = CheckPage(as, model, va + i * kPage, &op, "CPU read"); !e.empty()) return e;
  return "";
}

std::string Worker::CpuAtomic(const Op& op) {
  const uint64_t va = Va(op), words = uint64_t{op.len} * kPage / 8;
  bool all = true;
  for (uint64_t i = 0; i < op.len; ++i) all &= model_.Writable(va + i * kPage);
  note_->fault = !all;
  for (uint64_t i = 0; i < op.count; ++i) {
    const uint64_t a = va + (i % words) * 8;
    const uint64_t pva = a & ~(kPage - 1);
    auto r = m_.as->AtomicFetchAdd(a, op.value);
    const bool want = model_.Writable(pva);
    if (!r) {
      if (!want) break;  // the scenario runner stops at the first fault too
      if (Injected(op, Errno(r.error()))) break;
      return Mismatch(op, fmt::format("CPU atomic at {:#x} failed with {}", a, r.error().ToString()));
    }
    if (!want) return Mismatch(op, fmt::format("CPU atomic at {:#x} succeeded, the model says not writable", a));
    ModelPage* p = model_.Find(pva);
    p->lazy = false;
    if (!p->Known()) continue;
    uint8_t* b = SpaceModel::MutableBytes(*p);
    uint64_t old;
    std::memcpy(&old, b + (a - pva), 8);
    ++res_.checks;
    if (old != *r) return Mismatch(op, fmt::format("CPU atomic at {:#x} returned old {:#x}, want {:#x}", a, *r, old));
    const uint64_t nv = old + op.value;
    std::memcpy(b + (a - pva), &nv, 8);
  }
  return "";
}

std::string Worker::StalePtes(const Op& op, uint64_t va, uint64_t n, bool writable_only) {
  if (!c_.check_gpu_ptes) return "";
  for (uint32_t g = 0; g < c_.gpus; ++g) {
    driver::Vm* vm = m_.svm->vm(g);
    if (!vm) continue;
    auto& pt = vm->context().page_table();
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t a = va + i * kPage;
      const mm::PteInfo before = c_.racer && !writable_only ? m_.as->QueryPte(a) : mm::PteInfo{};
      auto mp = pt.Walk(a);
      if (!mp || !mp->pte.valid()) continue;
      if (writable_only && !mp->pte.writable()) continue;
      if (c_.racer && !writable_only) {
        // The racer may have faulted the span in again (a prefetch maps
        // it): a GPU mapping is stale only if it names another page than
        // the CPU's. The CPU entry is read before and after the GPU's; if
        // it moved meanwhile (the racer migrating it), nothing is said.
        const mm::PteInfo after = m_.as->QueryPte(a);
        if (before.kind != after.kind || before.pfn != after.pfn) continue;
        const bool sys = mp->pte.kind() == gpu::PteKind::kSystem;
        const uint64_t gpu_pfn = (mp->pte.phys() + (a - mp->va)) >> gpu::kPageShift;
        const bool same = sys ? after.kind == mm::PteInfo::Kind::kPresent && !after.device_memory &&
                                    after.pfn == gpu_pfn
                              : after.device_memory;
        if (same) continue;
        return Mismatch(op, fmt::format("GPU {} maps {:#x} ({} {:#x}) where the CPU has {} {:#x} after the "
                                        "invalidation",
                                        g, a, sys ? "frame" : "VRAM", sys ? gpu_pfn : mp->pte.phys(),
                                        after.device_memory ? "device page" : "frame", after.pfn));
      }
      return Mismatch(op, fmt::format("GPU {} still maps {:#x} ({}) after the invalidation", g, a,
                                      writable_only ? "writable" : "present"));
    }
  }
  return "";
}

std::string Worker::Layout(const Op& op) {
  mm::AddressSpace& as = *m_.as;
  const uint64_t va = Va(op), len = uint64_t{op.len} * kPage;
  // Injected failures of a layout op leave the layout as it was: keep the
  // model to put back.
  std::optional<SpaceModel> saved;
  if (c_.inject > 0) saved = model_;
  int want = 0, got = 0;
  uint64_t ret_addr = 0;
  switch (op.kind) {
    case OpKind::kMmap: {
      want = model_.Mmap(va, op.len, op.arg == 1, &next_obj_);
      auto r = as.Mmap(va, len, mm::kProtRead | mm::kProtWrite,
                       (op.arg == 1 ? mm::kMapShared : mm::kMapPrivate) | mm::kMapAnonymous | mm::kMapFixed);
      got = r ? 0 : Errno(r.error());
      if (r) ret_addr = *r;
      if (r && *r != va) return Mismatch(op, fmt::format("MAP_FIXED mmap returned {:#x}", *r));
      break;
    }
    case OpKind::kMunmap: {
      want = model_.Munmap(va, op.len);
      auto r = as.Munmap(va, len);
      got = r ? 0 : Errno(r.error());
      break;
    }
    case OpKind::kMprotect: {
      want = model_.Mprotect(va, op.len, op.arg);
      auto r = as.Mprotect(va, len, op.arg);
      got = r ? 0 : Errno(r.error());
      break;
    }
    case OpKind::kMadvise: {
      const int adv = op.arg == 0 ? mm::kMadvDontNeed : op.arg == 1 ? mm::kMadvFree : mm::kMadvHugePage;
      want = model_.Madvise(va, op.len, op.arg);
      auto r = as.Madvise(va, len, adv);
      got = r ? 0 : Errno(r.error());
      break;
    }
    case OpKind::kMremap: {
      const uint64_t nw = SlotBase(op.slot2);
      want = model_.Mremap(va, op.len, op.len2, op.arg, nw);
      if (want == kSkip) {
        ++res_.ops_skipped;
        return "";
      }
      const uint32_t flags = op.arg == 0 ? 0u
                             : op.arg == 1 ? mm::kMremapMayMove | mm::kMremapFixed
                                           : mm::kMremapMayMove | mm::kMremapFixed | mm::kMremapDontUnmap;
      auto r = as.Mremap(va, len, uint64_t{op.len2} * kPage, flags, op.arg ? nw : 0);
      got = r ? 0 : Errno(r.error());
      if (r && want == 0 && *r != (op.arg ? nw : va))
        return Mismatch(op, fmt::format("mremap returned {:#x}, want {:#x}", *r, op.arg ? nw : va));
      break;
    }
    default:
      break;
  }
  (void)ret_addr;
  if (got != want) {
    if (got != 0 && want == 0 && saved && Injected(op, got)) {
      model_ = std::move(*saved);
      return "";
    }
    return Mismatch(op, fmt::format("returned {}, the model says {}", ErrName(got), ErrName(want)));
  }
  // Pins over pages this op replaced no longer name what is mapped there.
  if (op.kind != OpKind::kMprotect && !(op.kind == OpKind::kMadvise && op.arg != 0)) {
    const uint64_t span_end = va + uint64_t{std::max(op.len, op.len2)} * kPage;
    for (PinRec& p : pins_)
      if ((p.va >= va && p.va < span_end) ||
          (op.kind == OpKind::kMremap && p.va >= SlotBase(op.slot2) && p.va < SlotBase(op.slot2) + kSlotStride))
        p.coherent = false;
  }
  // No GPU mapping survives the invalidation.
  switch (op.kind) {
    case OpKind::kMunmap:
      return StalePtes(op, va, op.len, false);
    case OpKind::kMadvise:
      if (op.arg == 0) {
        // Private pages were dropped: no GPU PTE may still point at them.
        for (uint64_t i = 0; i < op.len; ++i) {
          const ModelPage* p = model_.Find(va + i * kPage);
          if (p && p->kind == PageKind::kPrivate)
            if (auto e = StalePtes(op, va + i * kPage, 1, false); !e.empty()) return e;
        }
      }
      return "";
    case OpKind::kMprotect:
      if (got == 0 && op.arg != 3) return StalePtes(op, va, op.len, op.arg == 1);
      return "";
    case OpKind::kMremap:
      if (got == 0 && op.arg != 0) return StalePtes(op, va, op.len, false);
      return "";
    default:
      return "";
  }
}

std::string Worker::Gpu(const Op& op) {
  if (op.gpu >= c_.gpus) return "";
  driver::Vm* vm = m_.svm->vm(op.gpu);
  const uint64_t va = Va(op), n = op.len, words = n * kPage / 8;
  const bool atomic = op.kind == OpKind::kGpuAtomic;
  const bool writes = atomic || op.arg != 0;
  const bool reads = atomic || op.arg != 1;
  // Expected outcome: every page of the span reachable for the access.
  bool ok = true, unsure = false;
  const uint32_t threads = atomic ? 4 : std::max<uint32_t>(1, op.count);
  const uint64_t value = op.value, count = op.count;
  // The pages the kernel touches (an atomic kernel only some words).
  std::vector<bool> touched(n, !atomic);
  if (atomic)
    for (uint64_t t = 0; t < threads; ++t)
      for (uint64_t i = 0; i < count; ++i) touched[(t * count + i) % words * 8 / kPage] = true;
  // A launch revalidates this GPU's invalidated userptrs first: one whose
  // pages are gone fails every launch (EFAULT).
  for (const BindRec& b : binds_[op.gpu])
    if (b.userptr)
      for (uint64_t p = b.start; p < b.end; p += kPage) ok &= model_.Readable(p);
  for (uint64_t i = 0; i < n; ++i) {
    if (!touched[i]) continue;
    const uint64_t p = va + i * kPage;
    ok &= writes ? model_.Writable(p) : model_.Readable(p);
    for (const BindRec& b : binds_[op.gpu])
      if (p >= b.start && p < b.end) {
        // An access in a bind revalidates the whole bind: every page of
        // it must be there (for a write: writable, and not a read-only
        // bind). Binds map system memory: no atomics there (EACCES).
        if (writes && b.ro) ok = false;
        if (atomic) ok = false;
        for (uint64_t q = b.start; q < b.end; q += kPage) ok &= writes ? model_.Writable(q) : model_.Readable(q);
      }
    if (atomic) {
      const ModelPage* mp = model_.Find(p);
      if (mp && mp->kind != PageKind::kPrivate) ok = false;  // no device memory for shared pages
      for (const PinRec& pin : pins_)
        if (pin.va == p) unsure = true;  // pinned pages do not migrate
    }
  }
  // A range (up to 2 MiB) whose pages include a SIGBUS tail (shared
  // memory grown beyond its object) fails its range fault as a whole, as
  // hmm_range_fault does for xe: an access to a good page of it may fail.
  for (uint64_t w = (va & ~((uint64_t{2} << 20) - 1)); w < va + n * kPage; w += kPage) {
    const ModelPage* mp = model_.Find(w);
    if (mp && mp->kind == PageKind::kSigbus) unsure = true;
    if (w >= va + n * kPage) break;
  }
  for (uint64_t w = va + n * kPage; (w & ((uint64_t{2} << 20) - 1)) != 0; w += kPage) {
    const ModelPage* mp = model_.Find(w);
    if (mp && mp->kind == PageKind::kSigbus) unsure = true;
  }
  if (SvmBroken()) unsure = true;
  note_->fault = !ok;
  std::vector<uint64_t> out(reads && !atomic ? words : 0);
  const uint8_t mode = op.arg;
  Result<gpu::Launch> l = Err(Errc::kInval);
  if (atomic) {
    l = vm->LaunchKernel(
        [va, words, count, value](gpu::KernelContext& kc) {
          for (uint64_t i = 0; i < count && !kc.cancelled(); ++i)
            kc.AtomicAdd(va + ((uint64_t{kc.thread_id()} * count + i) % words) * 8, value);
        },
        {.threads = threads});
  } else {
    uint64_t* o = out.data();
    l = vm->LaunchKernel(
        [va, words, value, mode, o](gpu::KernelContext& kc) {
          const uint64_t t = kc.thread_id(), T = kc.num_threads();
          for (uint64_t i = words * t / T; i < words * (t + 1) / T && !kc.cancelled(); ++i) {
            const uint64_t a = va + i * 8;
            if (mode == 0) o[i] = kc.Load(a);
            else if (mode == 1) kc.Store(a, value + i);
            else kc.Store(a, kc.Load(a) + value);
          }
        },
        {.threads = threads});
  }
  Result<void> r = l ? l->Wait() : Result<void>(Err(l.error()));
  auto unknown_span = [&] {
    if (!writes) return;
    for (uint64_t i = 0; i < n; ++i)
      if (ModelPage* p = touched[i] ? model_.Find(va + i * kPage) : nullptr) p->SetKnown(false);
  };
  if (!r) {
    if (ok && !unsure && atomic && r.error().code() == Errc::kAcces) {
      // "no device memory for a GPU atomic": VRAM could not be had (every
      // allocation busy, or the pages would not migrate). Allowed, counted.
      ++res_.atomic_no_vram;
      return "";
    }
    if (ok && !unsure) {
      if (Injected(op, Errno(r.error()))) {
        unknown_span();
        return "";
      }
      return Mismatch(op, fmt::format("GPU kernel failed with {}, the model says every page is accessible",
                                      r.error().ToString()));
    }
    unknown_span();  // cancelled part-way: what it wrote is unknown
    return "";
  }
  if (!ok && !unsure) return Mismatch(op, "GPU kernel succeeded, the model says a page is not accessible");
  // Success: bring the model along and compare what was read.
  if (atomic) {
    std::vector<uint64_t> adds(words, 0);
    for (uint64_t t = 0; t < threads; ++t)
      for (uint64_t i = 0; i < count; ++i) adds[(t * count + i) % words] += value;
    for (uint64_t w = 0; w < words; ++w) {
      if (!adds[w]) continue;
      ModelPage* p = model_.Find(va + w * 8 / kPage * kPage);
      if (!p->Known()) continue;
      uint8_t* b = SpaceModel::MutableBytes(*p);
      uint64_t v;
      std::memcpy(&v, b + (w * 8) % kPage, 8);
      v += adds[w];
      std::memcpy(b + (w * 8) % kPage, &v, 8);
    }
    return "";
  }
  for (uint64_t i = 0; i < n; ++i) {
    ModelPage* p = model_.Find(va + i * kPage);
    const uint64_t w0 = i * kPage / 8;
    if (mode == 0) {
      if (!p->Known()) continue;
      const uint8_t* b = SpaceModel::Bytes(*p);
      for (uint64_t k = 0; k < kPage / 8; ++k) {
        uint64_t want = 0;
        if (b) std::memcpy(&want, b + k * 8, 8);
        ++res_.checks;
        if (out[w0 + k] != want)
          return Mismatch(op, fmt::format("GPU load at {:#x} got {:#x} want {:#x} [{}]", va + (w0 + k) * 8,
                                          out[w0 + k], want, Describe(model_, *m_.as, va + i * kPage)));
      }
    } else if (mode == 1) {
      uint8_t* b = SpaceModel::MutableBytes(*p);
      for (uint64_t k = 0; k < kPage / 8; ++k) {
        const uint64_t v = value + w0 + k;
        std::memcpy(b + k * 8, &v, 8);
      }
      p->SetKnown(true);
    } else {
      if (!p->Known()) continue;
      uint8_t* b = SpaceModel::MutableBytes(*p);
      for (uint64_t k = 0; k < kPage / 8; ++k) {
        uint64_t v;
        std::memcpy(&v, b + k * 8, 8);
        v += value;
        std::memcpy(b + k * 8, &v, 8);
      }
    }
  }
  if (threads > 1) {
    // Two pages of the span that map one page of a shared object (mremap
    // DONTUNMAP leaves such aliases) are written by whichever GPU threads
    // hold them, in no defined order: that object page is unknown until
    // the next CPU read defines it.
    std::unordered_map<const PageBytes*, uint32_t> seen;
    for (uint64_t i = 0; i < n; ++i) {
      const ModelPage* p = model_.Find(va + i * kPage);
      if (p && p->kind == PageKind::kShared && p->data) ++seen[p->data.get()];
    }
    for (uint64_t i = 0; i < n; ++i) {
      ModelPage* p = model_.Find(va + i * kPage);
      if (p && p->kind == PageKind::kShared && p->data && seen[p->data.get()] > 1) p->SetKnown(false);
    }
  }
  return "";
}

std::string Worker::Bind(const Op& op) {
  if (op.gpu >= c_.gpus) return "";
  driver::Vm* vm = m_.svm->vm(op.gpu);
  const uint64_t va = Va(op), end = va + uint64_t{op.len} * kPage;
  const bool ro = op.arg & 1;
  // The errors the model allows, and whether it must succeed.
  bool exist = false, fault = false, perm = false;
  for (const BindRec& b : binds_[op.gpu]) exist |= va < b.end && b.start < end;
  for (uint64_t p = va; p < end; p += kPage) {
    if (!model_.Readable(p)) fault = true;
    else if (!ro && !model_.Writable(p)) perm = true;
  }
  auto r = vm->Bind(va, end - va, {.read_only = ro, .userptr = (op.arg & 2) != 0});
  const bool want_ok = !exist && !fault && !perm;
  if (r) {
    if (!want_ok)
      return Mismatch(op, fmt::format("bind succeeded, the model says {}", exist ? "EEXIST" : fault ? "EFAULT" : "EPERM"));
    binds_[op.gpu].push_back({va, end, ro, (op.arg & 2) != 0, *r});
    return "";
  }
  const int e = Errno(r.error());
  if (want_ok) {
    if (Injected(op, e) || SvmBroken()) return "";
    return Mismatch(op, "bind failed with " + r.error().ToString() + ", the model says it succeeds");
  }
  // Several reasons at once: which one is reported depends on the order
  // of the checks; any of them will do.
  if (e == EEXIST || e == EFAULT || e == EPERM) return "";
  if (c_.inject > 0 && Injected(op, e)) return "";
  return Mismatch(op, fmt::format("bind failed with {}, the model allows{}{}{}", r.error().ToString(), exist ? " EEXIST" : "",
                                  fault ? " EFAULT" : "", perm ? " EPERM" : ""));
}

std::string Worker::Execute(const Op& op) {
  ops_.push_back(op);
  notes_.emplace_back();
  note_ = &notes_.back();
  op_index_ = ops_.size() - 1;
  ++res_.ops_done;
  // Ops on slots of other workers, or beyond the space (a shrunk list may
  // hold them), are skipped.
  switch (op.kind) {
    case OpKind::kFork:
    case OpKind::kChildExit:
    case OpKind::kReclaim:
    case OpKind::kCheck:
    case OpKind::kEvict:
      break;
    default:
      if (!OwnSlot(op.slot) || op.off + std::max<uint32_t>(op.len, 1) > kSlotMaxPages ||
          (op.kind == OpKind::kMremap && (!OwnSlot(op.slot2) || op.off + op.len2 > kSlotMaxPages))) {
        ++res_.ops_skipped;
        return "";
      }
  }
  switch (op.kind) {
    case OpKind::kCpuWrite:
    case OpKind::kCpuRead: {
      mm::AddressSpace* as = m_.as.get();
      SpaceModel* model = &model_;
      if (op.arg) {
        if (op.arg > children_.size()) {
          ++res_.ops_skipped;
          return "";
        }
        as = children_[op.arg - 1].as.get();
        model = &children_[op.arg - 1].model;
      }
      return op.kind == OpKind::kCpuWrite ? CpuWrite(op, *as, *model) : CpuRead(op, *as, *model);
    }
    case OpKind::kCpuAtomic:
      return CpuAtomic(op);
    case OpKind::kMmap:
    case OpKind::kMunmap:
    case OpKind::kMprotect:
    case OpKind::kMadvise:
    case OpKind::kMremap:
      return Layout(op);
    case OpKind::kFork: {
      if (!single_ || children_.size() >= kMaxChildren) {
        ++res_.ops_skipped;
        return "";
      }
      auto r = m_.as->Fork();
      if (!r) {
        if (Injected(op, Errno(r.error()))) return "";
        return Mismatch(op, "fork failed with " + r.error().ToString());
      }
      children_.push_back({std::move(*r), model_.Fork()});
      return "";
    }
    case OpKind::kChildExit: {
      if (op.arg >= children_.size()) {
        ++res_.ops_skipped;
        return "";
      }
      children_[op.arg].as->Exit();
      children_.erase(children_.begin() + op.arg);
      return "";
    }
    case OpKind::kGpuKernel:
    case OpKind::kGpuAtomic:
      return Gpu(op);
    case OpKind::kPrefetch: {
      if (op.gpu >= c_.gpus || op.arg > c_.gpus) return "";
      const uint64_t va = Va(op);
      bool must = !SvmBroken();
      for (uint64_t i = 0; i < op.len; ++i) {
        const ModelPage* p = model_.Find(va + i * kPage);
        must &= p && p->kind == PageKind::kPrivate && p->prot == 3;
        for (const PinRec& pin : pins_) must &= pin.va != va + i * kPage;
        // In a bind of this GPU the bind is revalidated, whole: it fails
        // if any page of the bind is gone.
        for (const BindRec& b : binds_[op.gpu]) must &= !(va + i * kPage >= b.start && va + i * kPage < b.end);
      }
      const bool must_but_inject = must && c_.inject > 0;
      if (c_.inject > 0) must = false;
      auto loc = op.arg == 0 ? driver::Location::System() : driver::Location::Device(op.arg - 1u);
      auto r = m_.svm->vm(op.gpu)->Prefetch(va, uint64_t{op.len} * kPage, loc);
      if (!r && must) return Mismatch(op, "prefetch failed with " + r.error().ToString() + " on private read-write memory");
      if (!r && must_but_inject) Injected(op, Errno(r.error()));
      return "";
    }
    case OpKind::kAdvise: {
      driver::AttributeUpdate u;
      if (op.arg == 0) u.preferred = driver::Location::Default();
      else if (op.arg == 1) u.preferred = driver::Location::System();
      else if (op.arg - 2u < c_.gpus) u.preferred = driver::Location::Device(op.arg - 2u);
      u.atomic = op.value == 1 ? driver::AtomicMode::kDevice
                 : op.value == 2 ? driver::AtomicMode::kGlobal
                                 : driver::AtomicMode::kUndefined;
      u.access_in_place = op.count != 0;
      auto r = m_.svm->SetAttributes(Va(op), uint64_t{op.len} * kPage, u);
      if (!r) {
        if (Injected(op, Errno(r.error()))) return "";
        return Mismatch(op, "set attributes failed with " + r.error().ToString());
      }
      return "";
    }
    case OpKind::kBind:
      return Bind(op);
    case OpKind::kUnbind: {
      if (op.gpu >= c_.gpus) return "";
      auto& v = binds_[op.gpu];
      auto it = std::find_if(v.begin(), v.end(), [&](const BindRec& b) { return b.start == Va(op); });
      if (it == v.end()) {
        ++res_.ops_skipped;
        return "";
      }
      auto r = m_.svm->vm(op.gpu)->Unbind(it->handle);
      if (!r) return Mismatch(op, "unbind failed with " + r.error().ToString());
      // No PTE of the bind may stay (only where no SVM range could have
      // mapped since: the bind's span is this GPU's alone until now).
      const uint64_t s = it->start, e = it->end;
      v.erase(it);
      (void)s;
      (void)e;
      return "";
    }
    case OpKind::kEvict: {
      uint64_t stayed = 0;  // allocations EvictAll left (busy)
      for (uint32_t g = 0; g < c_.gpus; ++g) {
        if (op.gpu != kAllGpus && g != op.gpu) continue;
        if (op.arg == 1) (void)m_.devs[g]->EvictFor(uint64_t{op.len} * kPage);
        else stayed += m_.devs[g]->EvictAll(m_.as.get());
      }
      if (op.gpu == kAllGpus && op.arg == 0 && stayed == 0 && single_ && c_.inject <= 0 && !c_.racer) {
        // No device page is reachable once every GPU evicted everything.
        for (uint32_t s : slots_)
          for (uint64_t i = 0; i < kSlotMaxPages; ++i) {
            const uint64_t va = SlotBase(s) + i * kPage;
            if (!model_.Find(va)) continue;
            const mm::PteInfo pte = m_.as->QueryPte(va);
            if (pte.device_memory)
              return Mismatch(op, fmt::format("page {:#x} still maps device memory after every GPU evicted all", va));
          }
      }
      return "";
    }
    case OpKind::kPin: {
      if (pins_.size() >= kMaxPins) {
        ++res_.ops_skipped;
        return "";
      }
      const uint64_t va = Va(op);
      const bool want = op.arg ? model_.Writable(va) : model_.Readable(va);
      mm::Pfn pfn = 0;
      auto r = m_.as->PinUserPages(va, 1, op.arg != 0, &pfn);
      if (r && !want) return Mismatch(op, "pin succeeded, the model says the page is not accessible");
      if (!r && want) {
        if (Injected(op, Errno(r.error()))) return "";
        return Mismatch(op, "pin failed with " + r.error().ToString());
      }
      if (r) {
        pins_.push_back({va, pfn});
        // A read pin of a page shared with a fork child (or of the zero
        // page) unshared it first, so the pin sees the parent's later
        // writes as a write pin does (checked by CheckPin).
        if (op.arg) {
          // FOLL_WRITE broke COW: the page is this space's own now, still the same bytes.
          if (ModelPage* p = model_.Find(va)) p->lazy = false;
        }
      }
      return "";
    }
    case OpKind::kUnpin: {
      auto it = std::find_if(pins_.begin(), pins_.end(), [&](const PinRec& p) { return p.va == Va(op); });
      if (it == pins_.end()) {
        ++res_.ops_skipped;
        return "";
      }
      const std::string e = CheckPin(*it, &op);
      m_.as->UnpinUserPage(it->pfn);
      pins_.erase(it);
      if (!e.empty()) return e;
      return "";
    }
    case OpKind::kReclaim: {
      if (!single_) {
        ++res_.ops_skipped;
        return "";
      }
      for (PinRec& pin : pins_)
        if (const ModelPage* mp = model_.Find(pin.va); mp && mp->lazy) pin.coherent = false;
      (void)m_.as->ReclaimLazyFree();
      for (Child& c : children_) (void)c.as->ReclaimLazyFree();
      // A lazy page reads as itself or as zeros now; the read decides.
      // A page stays lazy until the CPU writes it (a read does not dirty
      // it): a later reclaim may still drop it.
      auto settle = [&](mm::AddressSpace& as, SpaceModel& model) -> std::string {
        for (auto& [va, p] : model.pages()) {
          if (!p.lazy) continue;
          alignas(8) uint8_t buf[kPage];
          auto r = as.Read(va, buf, kPage);
          if (!r) {
            if (!model.Readable(va)) {
              // PROT_NONE (or write-only): the page may have been dropped
              // and cannot be read to tell. Itself or zeros: unknown until
              // a CPU read can define it (found at op 761582 of --seed 1
              // --ops 1000000: a GPU read after mprotect rw saw the zeros).
              p.SetKnown(false);
              continue;
            }
            if (Injected(op, Errno(r.error()))) continue;
            return Mismatch(op, fmt::format("read of reclaimed page {:#x} failed: {}", va, r.error().ToString()));
          }
          bool zero = std::all_of(buf, buf + kPage, [](uint8_t b) { return b == 0; });
          if (zero) {
            p.data.reset();
            p.SetKnown(true);
            p.lazy = false;  // dropped: a fresh zero page from now on
          } else if (!p.Known()) {
            std::memcpy(SpaceModel::MutableBytes(p), buf, kPage);
            p.SetKnown(true);
          }
        }
        return "";
      };
      if (auto e = settle(*m_.as, model_); !e.empty()) return e;
      for (Child& c : children_)
        if (auto e = settle(*c.as, c.model); !e.empty()) return e;
      return "";
    }
    case OpKind::kCheck:
      return FullCheck("full check");
  }
  return "";
}

void Worker::Release() {
  for (const PinRec& p : pins_) m_.as->UnpinUserPage(p.pfn);
  pins_.clear();
  for (uint32_t g = 0; g < c_.gpus && g < 8; ++g) {
    for (const BindRec& b : binds_[g]) (void)m_.svm->vm(g)->Unbind(b.handle);
    binds_[g].clear();
  }
  for (Child& c : children_) c.as->Exit();
  children_.clear();
}

// Runs workers over a machine; single-threaded when threads == 1.
struct Outcome {
  FuzzResult res;
  std::vector<OpNote> notes;
};

std::string CheckInvariantsAndTearDown(const FuzzConfig& c, Machine& m) {
  std::string err;
  // Everything unmapped: no range, no GPU mapping, no VRAM in use.
  for (uint32_t s = 0; s < c.slots; ++s) (void)m.as->Munmap(SlotBase(s), kSlotStride);
  (void)m.svm->CollectGarbage();
  for (int i = 0; i < 200 && m.svm->stats().ranges != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    (void)m.svm->CollectGarbage();
  }
  if (auto st = m.svm->stats(); st.ranges != 0)
    err = fmt::format("{} SVM ranges left after everything was unmapped", st.ranges);
  for (uint32_t g = 0; g < c.gpus && err.empty(); ++g) {
    auto maps = m.svm->vm(g)->context().page_table().DebugMappings();
    for (const auto& mp : maps)
      if (mp.pte.valid()) {
        err = fmt::format("GPU {} still maps {:#x} (+{:#x}) after everything was unmapped", g, mp.va, mp.size);
        break;
      }
  }
  for (uint32_t g = 0; g < c.gpus && err.empty(); ++g) {
    auto vs = m.devs[g]->vram_stats();
    if (vs.bytes_used != 0 || vs.allocations != 0)
      err = fmt::format("GPU {} VRAM leak: {} bytes in {} allocations after everything was unmapped", g, vs.bytes_used,
                        vs.allocations);
  }
  m.svm->Close();
  m.svm.reset();
  m.as->Exit();
  m.as.reset();
  for (auto& d : m.devs) (void)d->EvictAll();
  m.devs.clear();
  if (err.empty()) {
    const uint64_t now = m.pool->GetStats().free_frames;
    if (now != m.free_frames_at_start)
      err = fmt::format("frame leak: {} frames free at the end, {} at the start", now, m.free_frames_at_start);
  }
  return err;
}

void ArmInjection(const FuzzConfig& c, Env& env) {
  if (c.inject <= 0) return;
  for (const std::string& s : InjectionSites()) {
    if (!c.inject_sites.empty() && std::find(c.inject_sites.begin(), c.inject_sites.end(), s) == c.inject_sites.end())
      continue;
    // The collector's failure is sticky (the VM error state cancels every
    // later fault), so it is armed at 1% of the rate unless named alone.
    env.faults().FailWithProbability(s, s == "driver.gc" && c.inject_sites.empty() ? c.inject / 100 : c.inject);
  }
}

void CollectInjection(Env& env, FuzzResult& r) {
  for (const std::string& s : InjectionSites())
    if (uint64_t n = env.faults().Failures(s)) r.injected_by_site[s] += n;
}

// The racer (FuzzConfig::racer): until `stop`, data-preserving operations
// over random spans of every slot, with short pauses so the workers go on.
// Each one invalidates GPU mappings (a migration, a CPU fault on device
// memory, an eviction, fork's write protection) and none changes a byte
// the workers' models hold. Results are ignored: the workers check.
uint64_t RunRacer(const FuzzConfig& c, Machine& m, const std::atomic<bool>& stop) {
  Rng rng(Word(c.seed, 0x7ace));
  uint64_t n = 0;
  while (!stop.load(std::memory_order_relaxed)) {
    const uint32_t slot = static_cast<uint32_t>(rng.Uniform(c.slots));
    const uint64_t pages = 1 + rng.Uniform(rng.OneIn(4) ? 512 : 16);
    const uint64_t off = rng.Uniform(kSlotMaxPages - pages + 1);
    const uint64_t va = SlotBase(slot) + off * kPage;
    const uint32_t g = static_cast<uint32_t>(rng.Uniform(c.gpus));
    const uint64_t x = rng.Uniform(100);
    if (x < 40) {
      const uint32_t to = static_cast<uint32_t>(rng.Uniform(c.gpus + 1));
      (void)m.svm->vm(g)->Prefetch(va, pages * kPage,
                                   to == 0 ? driver::Location::System() : driver::Location::Device(to - 1));
    } else if (x < 70) {
      // A CPU read fault of each page (get_user_pages: device pages come
      // home) without reading the bytes, which a worker's GPU kernel may
      // be writing (that would be the racer's own data race).
      for (uint64_t i = 0; i < std::min<uint64_t>(pages, 16); ++i) {
        mm::Pfn pfn;
        if (m.as->GetUserPages(va + i * kPage, 1, false, &pfn)) m.as->PutUserPage(pfn);
      }
    } else if (x < 85) {
      (void)m.devs[g]->EvictFor(uint64_t{2} << 20);
    } else if (x < 90) {
      (void)m.devs[g]->EvictAll(m.as.get());
    } else {
      // fork write-protects every private page (and copies pinned ones);
      // the child goes at once.
      if (auto child = m.as->Fork()) (*child)->Exit();
    }
    ++n;
    std::this_thread::sleep_for(std::chrono::microseconds(rng.Uniform(200)));
  }
  return n;
}

// One single-threaded run over a fixed op list (replay) or generated ops.
Outcome RunOne(const FuzzConfig& c, const std::vector<Op>* fixed, std::atomic<bool>* stop_flag) {
  Outcome out;
  Machine m;
  if (auto e = m.Setup(c); !e.empty()) {
    out.res.failure = "setup: " + e;
    out.res.mismatches = 1;
    return out;
  }
  ArmInjection(c, *m.env);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<Worker>> ws;
  for (uint32_t t = 0; t < c.threads; ++t) ws.push_back(std::make_unique<Worker>(c, m, t, c.threads == 1));
  std::string fail;
  uint32_t fail_tid = 0;
  for (auto& w : ws)
    if (auto e = w->Init(); !e.empty()) fail = e;
  auto body = [&](Worker& w, uint64_t budget) -> std::string {
    uint64_t since_check = 0;
    for (uint64_t i = 0; fixed ? i < fixed->size() : (budget == 0 || i < budget); ++i) {
      if (stop_flag && stop_flag->load(std::memory_order_relaxed)) break;
      if (!fixed && c.time_s > 0 && (i & 15) == 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > c.time_s)
        break;
      const Op op = fixed ? (*fixed)[i] : w.Generate();
      if (auto e = w.Execute(op); !e.empty()) return e;
      w.Watch(op);
      w.progress.fetch_add(1, std::memory_order_relaxed);
      if (c.check_every && ++since_check >= c.check_every) {
        since_check = 0;
        if (auto e = w.FullCheck("periodic full check"); !e.empty()) return e;
      }
    }
    return w.FullCheck("final full check");
  };
  // A hang (an op that never finishes: a lost fault, a deadlock) cannot be
  // unwound: the watchdog prints the seed, the op and the ops before it,
  // and ends the process (exit 1).
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    std::vector<uint64_t> last(ws.size(), UINT64_MAX);
    std::vector<int> still(ws.size(), 0);
    while (!done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      for (size_t t = 0; t < ws.size() && !done.load(); ++t) {
        const uint64_t p = ws[t]->progress.load();
        still[t] = p == last[t] ? still[t] + 1 : 0;
        last[t] = p;
        if (still[t] < static_cast<int>(5 * c.hang_s)) continue;
        auto& ops = ws[t]->ops();
        fmt::print(stderr, "usvm: fuzz hang: seed {} thread {} op #{} [{}] has not finished in {} s; the ops:\n", c.seed, t,
                   ops.size() - 1, ops.empty() ? "" : OpToString(ops.back()), c.hang_s);
        for (size_t i = 0; i < ops.size(); ++i) fmt::print(stderr, "  #{} {}\n", i, OpToString(ops[i]));
        std::fflush(stderr);
        std::_Exit(1);
      }
    }
  });
  std::atomic<bool> racer_stop{false};
  uint64_t racer_ops = 0;
  std::thread racer;
  if (c.racer && fail.empty()) racer = std::thread([&] { racer_ops = RunRacer(c, m, racer_stop); });
  if (fail.empty()) {
    if (c.threads == 1) {
      fail = body(*ws[0], c.ops);
    } else {
      std::vector<std::string> errs(c.threads);
      std::atomic<bool> stop{false};
      std::atomic<bool>* sf = stop_flag ? stop_flag : &stop;
      std::vector<std::thread> th;
      const uint64_t per = c.ops ? (c.ops + c.threads - 1) / c.threads : 0;
      for (uint32_t t = 0; t < c.threads; ++t)
        th.emplace_back([&, t] {
          errs[t] = body(*ws[t], per);
          if (!errs[t].empty()) sf->store(true);
        });
      for (auto& x : th) x.join();
      for (uint32_t t = 0; t < c.threads; ++t)
        if (!errs[t].empty() && fail.empty()) {
          fail = errs[t];
          fail_tid = t;
        }
    }
  }
  racer_stop.store(true);
  if (racer.joinable()) racer.join();
  out.res.racer_ops = racer_ops;
  done.store(true);
  watchdog.join();
  out.res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& w : ws) {
    FuzzResult& r = w->res();
    out.res.ops_done += r.ops_done;
    out.res.ops_skipped += r.ops_skipped;
    out.res.checks += r.checks;
    out.res.injected_failures += r.injected_failures;
    out.res.atomic_no_vram += r.atomic_no_vram;
    for (auto& [k, v] : r.injected_errors) out.res.injected_errors[k] += v;
  }
  CollectInjection(*m.env, out.res);
  if (!fail.empty()) {
    out.res.mismatches = 1;
    out.res.failure = fail;
    out.res.failing_ops = ws[fail_tid]->ops();
    out.res.failing_op_index = ws[fail_tid]->ops().empty() ? 0 : ws[fail_tid]->ops().size() - 1;
    out.notes = ws[fail_tid]->notes();
    // Leave the machine without the invariant checks (its state is wrong).
    for (auto& w : ws) w->Release();
    m.env->faults().ClearAll();
    m.svm->Close();
    return out;
  }
  out.notes = ws[0]->notes();
  m.env->faults().ClearAll();
  for (auto& w : ws) w->Release();
  if (auto e = CheckInvariantsAndTearDown(c, m); !e.empty()) {
    out.res.mismatches = 1;
    out.res.failure = fmt::format("seed {}: invariant at the end: {}", c.seed, e);
    out.res.failing_ops = ws[0]->ops();
    out.res.failing_op_index = out.res.failing_ops.empty() ? 0 : out.res.failing_ops.size() - 1;
  }
  return out;
}

}  // namespace

const char* OpKindName(OpKind k) {
  switch (k) {
    case OpKind::kCpuWrite: return "cpu_write";
    case OpKind::kCpuRead: return "cpu_read";
    case OpKind::kCpuAtomic: return "cpu_atomic";
    case OpKind::kMmap: return "mmap";
    case OpKind::kMunmap: return "munmap";
    case OpKind::kMprotect: return "mprotect";
    case OpKind::kMadvise: return "madvise";
    case OpKind::kMremap: return "mremap";
    case OpKind::kFork: return "fork";
    case OpKind::kChildExit: return "child_exit";
    case OpKind::kGpuKernel: return "gpu_kernel";
    case OpKind::kGpuAtomic: return "gpu_atomic";
    case OpKind::kPrefetch: return "prefetch";
    case OpKind::kAdvise: return "advise";
    case OpKind::kBind: return "bind";
    case OpKind::kUnbind: return "unbind";
    case OpKind::kEvict: return "evict";
    case OpKind::kPin: return "pin";
    case OpKind::kUnpin: return "unpin";
    case OpKind::kReclaim: return "reclaim";
    case OpKind::kCheck: return "check";
  }
  return "?";
}

std::string OpToString(const Op& op) {
  std::string s = OpKindName(op.kind);
  const std::string span = fmt::format(" slot{}[+{:#x} +{:#x}]", op.slot, uint64_t{op.off} * kPage, uint64_t{op.len} * kPage);
  switch (op.kind) {
    case OpKind::kCpuWrite:
      return s + (op.arg ? fmt::format(" child{}", op.arg - 1) : "") + span + fmt::format(" seed={:#x}", op.value);
    case OpKind::kCpuRead:
      return s + (op.arg ? fmt::format(" child{}", op.arg - 1) : "") + span;
    case OpKind::kCpuAtomic:
      return s + span + fmt::format(" count={} value={}", op.count, op.value);
    case OpKind::kMmap:
      return s + span + (op.arg == 1 ? " shared" : " private");
    case OpKind::kMunmap:
      return s + span;
    case OpKind::kMprotect:
      return s + span + (op.arg == 0 ? " none" : op.arg == 1 ? " r" : " rw");
    case OpKind::kMadvise:
      return s + span + (op.arg == 0 ? " dontneed" : op.arg == 1 ? " free" : " hugepage");
    case OpKind::kMremap:
      return s + span + fmt::format(" -> +{:#x}", uint64_t{op.len2} * kPage) +
             (op.arg == 0 ? " in place" : op.arg == 1 ? fmt::format(" fixed to slot{}", op.slot2)
                                                      : fmt::format(" dontunmap to slot{}", op.slot2));
    case OpKind::kFork:
    case OpKind::kReclaim:
    case OpKind::kCheck:
      return s;
    case OpKind::kChildExit:
      return s + fmt::format(" child{}", op.arg);
    case OpKind::kGpuKernel:
      return s + fmt::format(" gpu{}", op.gpu) + span +
             (op.arg == 0 ? " read" : op.arg == 1 ? " write" : " rmw") + fmt::format(" value={:#x} threads={}", op.value, op.count);
    case OpKind::kGpuAtomic:
      return s + fmt::format(" gpu{}", op.gpu) + span + fmt::format(" count={} value={}", op.count, op.value);
    case OpKind::kPrefetch:
      return s + fmt::format(" gpu{}", op.gpu) + span + (op.arg == 0 ? " to system" : fmt::format(" to gpu{}", op.arg - 1));
    case OpKind::kAdvise:
      return s + span + fmt::format(" preferred={} atomic={} in_place={}",
                                    op.arg == 0 ? "default" : op.arg == 1 ? "system" : fmt::format("gpu{}", op.arg - 2),
                                    op.value == 1 ? "device" : op.value == 2 ? "global" : "undefined", op.count);
    case OpKind::kBind:
      return s + fmt::format(" gpu{}", op.gpu) + span + ((op.arg & 1) ? " ro" : " rw") + ((op.arg & 2) ? " userptr" : "");
    case OpKind::kUnbind:
      return s + fmt::format(" gpu{}", op.gpu) + span;
    case OpKind::kEvict:
      return s + (op.gpu == kAllGpus ? std::string(" all gpus") : fmt::format(" gpu{}", op.gpu)) +
             (op.arg == 0 ? " all" : fmt::format(" for {:#x}", uint64_t{op.len} * kPage));
    case OpKind::kPin:
      return s + span + (op.arg ? " write" : " read");
    case OpKind::kUnpin:
      return s + span;
  }
  return s;
}

std::vector<std::string> InjectionSites() {
  return {"frame_pool.alloc",   "frame_pool.alloc_huge", "gpu.pt_alloc",   "gpu.vram_alloc", "gpu.copy",
          "gpusvm.notifier_alloc", "gpusvm.range_alloc", "gpusvm.device_map", "gpusvm.dma_map", "driver.gc"};
}

std::string ReplayOps(const FuzzConfig& config, const std::vector<Op>& ops, uint64_t* index) {
  FuzzConfig c = config;
  c.threads = 1;
  c.shrink = false;
  c.time_s = 0;
  Outcome o = RunOne(c, &ops, nullptr);
  if (index) *index = o.res.failing_op_index;
  return o.res.failure;
}

std::vector<Op> ShrinkOps(const FuzzConfig& config, std::vector<Op> ops) {
  const auto t0 = std::chrono::steady_clock::now();
  auto time_left = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < config.shrink_time_s;
  };
  uint64_t idx = 0;
  if (ReplayOps(config, ops, &idx).empty()) return {};
  if (idx + 1 < ops.size()) ops.resize(idx + 1);
  // ddmin: remove chunks while the failure stays.
  size_t n = 2;
  while (ops.size() >= 2 && time_left()) {
    const size_t chunk = (ops.size() + n - 1) / n;
    bool reduced = false;
    for (size_t start = 0; start < ops.size() && time_left(); start += chunk) {
      std::vector<Op> cand;
      cand.insert(cand.end(), ops.begin(), ops.begin() + start);
      cand.insert(cand.end(), ops.begin() + std::min(ops.size(), start + chunk), ops.end());
      if (cand.empty()) continue;
      uint64_t ci = 0;
      if (!ReplayOps(config, cand, &ci).empty()) {
        if (ci + 1 < cand.size()) cand.resize(ci + 1);
        ops = std::move(cand);
        n = std::max<size_t>(n - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (n >= ops.size()) break;
      n = std::min(ops.size(), n * 2);
    }
  }
  return ops;
}

std::string ToScenarioYaml(const FuzzConfig& c, const std::vector<Op>& ops, std::string* why) {
  // The notes (which accesses were expected to fault) come from a replay.
  FuzzConfig rc = c;
  rc.threads = 1;
  Outcome o = RunOne(rc, &ops, nullptr);
  auto no = [&](const Op& op, const char* reason) {
    if (why) *why = fmt::format("op [{}] has no scenario equivalent ({})", OpToString(op), reason);
    return std::string();
  };
  std::string steps;
  auto span = [&](const Op& op) {
    return fmt::format("buffer: slot{}, offset: {}, size: {}", op.slot, uint64_t{op.off} * kPage, uint64_t{op.len} * kPage);
  };
  bool forked = false;
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    const bool fault = i < o.notes.size() && o.notes[i].fault;
    const std::string expect = fault ? ", expect: fault" : "";
    if (op.kind != OpKind::kFork && op.kind != OpKind::kReclaim && op.kind != OpKind::kCheck &&
        op.kind != OpKind::kChildExit && op.kind != OpKind::kEvict &&
        (op.slot >= c.slots || op.off + op.len > c.slot_pages))
      return no(op, "its span leaves the slot's initial mapping (a scenario buffer)");
    switch (op.kind) {
      case OpKind::kCpuWrite:
        if (op.arg) return no(op, "a write in a fork child");
        steps += fmt::format("      - cpu_write: {{{}, seed: {}{}}}\n", span(op), op.value, expect);
        break;
      case OpKind::kCpuRead:
        if (op.arg) return no(op, "a read in a fork child");
        steps += fmt::format("      - cpu_read: {{{}{}}}\n", span(op), expect);
        break;
      case OpKind::kCpuAtomic:
        steps += fmt::format("      - cpu_atomic: {{{}, count: {}, value: {}{}}}\n", span(op), op.count, op.value, expect);
        break;
      case OpKind::kMmap:
        if (op.arg == 1 || op.off != 0 || op.len != c.slot_pages) return no(op, "only whole private buffers are mapped");
        steps += fmt::format("      - mmap: {{buffer: slot{}}}\n", op.slot);
        break;
      case OpKind::kMunmap:
        steps += fmt::format("      - munmap: {{{}}}\n", span(op));
        break;
      case OpKind::kMprotect:
        steps += fmt::format("      - mprotect: {{{}, prot: {}}}\n", span(op), op.arg == 0 ? "none" : op.arg == 1 ? "r" : "rw");
        break;
      case OpKind::kMadvise:
        steps += fmt::format("      - madvise: {{{}, advice: {}}}\n", span(op),
                             op.arg == 0 ? "dontneed" : op.arg == 1 ? "free" : "hugepage");
        break;
      case OpKind::kFork:
        if (forked) return no(op, "a second fork");
        forked = true;
        steps += "      - fork: {}\n";
        break;
      case OpKind::kGpuKernel:
        steps += fmt::format("      - gpu_kernel: {{gpu: {}, {}, pattern: {}, value: {}, threads: {}{}}}\n", op.gpu, span(op),
                             op.arg == 0 ? "stream_read" : op.arg == 1 ? "stream_write" : "read_modify_write", op.value,
                             std::max<uint32_t>(1, op.count), expect);
        break;
      case OpKind::kGpuAtomic:
        steps += fmt::format("      - gpu_atomic: {{gpu: {}, {}, count: {}, value: {}, threads: 4{}}}\n", op.gpu, span(op),
                             op.count, op.value, expect);
        break;
      case OpKind::kPrefetch:
        steps += fmt::format("      - prefetch: {{gpu: {}, {}, to: {}}}\n", op.gpu, span(op),
                             op.arg == 0 ? std::string("system") : fmt::format("gpu{}", op.arg - 1));
        break;
      case OpKind::kAdvise:
        steps += fmt::format("      - advise: {{{}, preferred: {}, atomic: {}, access_in_place: {}}}\n", span(op),
                             op.arg == 0 ? std::string("default") : op.arg == 1 ? std::string("system") : fmt::format("gpu{}", op.arg - 2),
                             op.value == 1 ? "device" : op.value == 2 ? "global" : "undefined", op.count ? "true" : "false");
        break;
      case OpKind::kBind:
        steps += fmt::format("      - bind: {{gpu: {}, {}, read_only: {}, userptr: {}}}\n", op.gpu, span(op),
                             (op.arg & 1) ? "true" : "false", (op.arg & 2) ? "true" : "false");
        break;
      case OpKind::kUnbind:
        steps += fmt::format("      - unbind: {{gpu: {}, buffer: slot{}, offset: {}}}\n", op.gpu, op.slot, uint64_t{op.off} * kPage);
        break;
      case OpKind::kCheck:
        break;
      case OpKind::kMremap:
        return no(op, "scenario mremap only resizes a whole buffer");
      case OpKind::kChildExit:
        return no(op, "a child exits only at the end of a scenario phase");
      case OpKind::kEvict:
        return no(op, "no eviction step");
      case OpKind::kPin:
      case OpKind::kUnpin:
        return no(op, "no pin step");
      case OpKind::kReclaim:
        return no(op, "no reclaim step");
    }
  }
  std::string y = fmt::format(
      "name: fuzz-repro-seed{}\n"
      "description: shrunk reproducer written by usvm fuzz (seed {}, {} ops)\n"
      "seed: {}\n"
      "machine:\n  gpus: {}\n  vram: {}MiB\n  system_memory: 512MiB\n  exec_threads: 2\n  latency: zero\n"
      "buffers:\n",
      c.seed, c.seed, ops.size(), c.seed, c.gpus, c.vram_bytes >> 20);
  for (uint32_t s = 0; s < c.slots; ++s) y += fmt::format("  - {{name: slot{}, size: {}}}\n", s, uint64_t{c.slot_pages} * kPage);
  y += "phases:\n  - name: repro\n    steps:\n" + steps;
  return y;
}

Result<FuzzResult> RunFuzz(const FuzzConfig& c) {
  if (c.gpus < 1 || c.gpus > 8) return Err(Errc::kInval, "gpus must be in [1, 8]");
  if (c.threads < 1 || c.threads > 16) return Err(Errc::kInval, "threads must be in [1, 16]");
  if (!(c.inject >= 0 && c.inject <= 1)) return Err(Errc::kInval, "inject must be in [0, 1]");
  if (c.slots < c.threads || c.slots > 64) return Err(Errc::kInval, "slots must be in [threads, 64]");
  if (c.slot_pages < 16 || c.slot_pages > kSlotMaxPages / 2) return Err(Errc::kInval, "slot_pages must be in [16, 512]");
  if (c.vram_bytes < (uint64_t{2} << 20) || c.vram_bytes % (uint64_t{2} << 20))
    return Err(Errc::kInval, "vram must be a multiple of 2 MiB");
  if (c.ops == 0 && c.time_s <= 0) return Err(Errc::kInval, "give an op count or a time limit");
  if (c.time_s < 0) return Err(Errc::kInval, "time must not be negative");
  if (c.racer && c.inject > 0) return Err(Errc::kInval, "the racer cannot be combined with injected failures");
  for (const std::string& site : c.inject_sites) {
    auto all = InjectionSites();
    if (std::find(all.begin(), all.end(), site) == all.end()) return Err(Errc::kInval, "unknown injection site");
  }
  Outcome o = RunOne(c, nullptr, nullptr);
  FuzzResult r = std::move(o.res);
  if (r.mismatches && c.shrink && !r.failing_ops.empty()) {
    r.shrunk = ShrinkOps(c, r.failing_ops);
    if (!r.shrunk.empty()) {
      r.shrunk_failure = ReplayOps(c, r.shrunk);
      r.repro_yaml = ToScenarioYaml(c, r.shrunk, &r.repro_note);
    } else {
      r.repro_note = "the failure did not reproduce single-threaded on a fresh machine";
    }
  }
  return r;
}

}  // namespace usvm::fuzz
