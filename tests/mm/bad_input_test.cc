// Every public call of the mm layer, given invalid arguments, returns the
// error Linux (or, where Linux has no such call, the header) specifies and
// changes nothing. Table-driven: one test per case.
//
// Each case runs against a seeded address space (private anonymous memory
// with data, shared anonymous, a shared and a private file mapping, a
// PROT_NONE region, a THP region, a read-only region, an untouched spare
// region), after every readable page was read once, so that reading it
// again changes nothing. Around the call the test compares a snapshot of
// everything observable: the VMAs (start, end, prot, flags, file, pgoff),
// every page table entry of every VMA (kind, frame, writable, huge), a
// checksum of every readable page's bytes (or of the error reading it
// gives), rss_pages, the pool's free frames, the file's size and cached
// pages, and the notifier hub's tree, deferred list and sequence; and it
// checks that no invalidation (classic or interval) was sent.
//
// Every case runs in a forked child, so that a crash is reported as that
// case's failure instead of killing the whole binary.
//
// Cases that once reproduced a bug (since fixed) carry `bug`, the
// description of that bug, printed if the case ever fails again.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <csignal>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace usvm::mm {
namespace {

using testing::RecordingNotifier;

// Layout of the seeded space (all inside user space, with holes between).
constexpr uint64_t kPriv = uint64_t{1} << 32;          // 16 pages RW private anon, data
constexpr uint64_t kShm = kPriv + 0x100000;            // 8 pages RW shared anon, data
constexpr uint64_t kFile = kPriv + 0x200000;           // 8 pages RW MAP_SHARED file
constexpr uint64_t kNone = kPriv + 0x300000;           // 4 pages PROT_NONE
constexpr uint64_t kThp = kPriv + 0x400000;            // 2 MiB RW, MADV_HUGEPAGE, data
constexpr uint64_t kRo = kPriv + 0x800000;             // 4 pages PROT_READ private anon
constexpr uint64_t kFilePriv = kPriv + 0x900000;       // 4 pages RW MAP_PRIVATE file
constexpr uint64_t kSpare = kPriv + 0xa00000;          // 4 pages RW private anon, untouched
constexpr uint64_t kHole = kPriv + 0xc00000;           // nothing mapped around here
constexpr uint64_t kPrivLen = 16 * kPageSize;
constexpr uint64_t kFileSize = 5 * kPageSize + 100;    // file pages 6 and 7 are past EOF
constexpr uint64_t kMax = ~uint64_t{0};
constexpr uint64_t kTaskSize = uint64_t{1} << 47;      // AddressSpaceConfig's default
constexpr uint64_t kMinAddr = 0x10000;

// An interval subscription's ops that count invalidations.
class CountingOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    ++calls;
    return true;
  }
  int calls = 0;
};

class NullAllocator : public MmuNotifierAllocator {
 public:
  Result<MmuNotifier*> AllocNotifier(AddressSpace*) override { return Err(Errc::kNoMem); }
  void FreeNotifier(MmuNotifier*) override {}
};

enum class Stage {
  kSeeded,    // the seeded space
  kExited,    // the seeded space after Exit()
  kPoolFull,  // the seeded space, every free frame of the pool taken
};

// The machine a case runs against.
struct World {
  std::unique_ptr<FramePool> pool;
  std::shared_ptr<SimFile> file;
  std::shared_ptr<AddressSpace> as;
  RecordingNotifier rec;        // registered classic notifier
  CountingOps ops;
  MmuIntervalNotifier sub;      // inserted over kPriv
  MmuIntervalNotifier loose;    // never inserted
  RecordingNotifier stranger;   // never registered
  NullAllocator alloc;
  std::vector<Pfn> held;        // frames taken by kPoolFull

  ~World() {
    for (Pfn p : held) pool->Put(p);
    if (sub.hub()) (void)sub.Remove();
    if (as) (void)as->notifiers().Unregister(&rec);
    as.reset();
    file.reset();
  }
};

std::vector<uint8_t> Pattern(uint64_t len, uint8_t seed) {
  std::vector<uint8_t> v(len);
  for (uint64_t i = 0; i < len; ++i) v[i] = uint8_t(seed + i * 131 + (i >> 12));
  return v;
}

// Builds the seeded world; fatal test failures on any setup error.
void Build(World& w, Stage setup) {
  // 8 MiB: two blocks for THP plus room; small enough to fill quickly.
  auto p = FramePool::TryCreate(8 << 20);
  ASSERT_TRUE(p.has_value());
  w.pool = std::move(*p);
  auto as = AddressSpace::TryCreate(*w.pool);
  ASSERT_TRUE(as.has_value());
  w.as = std::move(*as);
  auto f = SimFile::TryCreate(*w.pool, kFileSize, "bad_input");
  ASSERT_TRUE(f.has_value());
  w.file = std::move(*f);
  auto data = Pattern(kFileSize, 7);
  ASSERT_TRUE(w.file->Pwrite(0, data.data(), data.size()));

  AddressSpace& a = *w.as;
  const uint32_t rw = kProtRead | kProtWrite;
  const uint32_t anon = kMapPrivate | kMapAnonymous | kMapFixedNoReplace;
  ASSERT_EQ(a.Mmap(kPriv, kPrivLen, rw, anon).value_or(0), kPriv);
  ASSERT_EQ(a.Mmap(kShm, 8 * kPageSize, rw, kMapShared | kMapAnonymous | kMapFixed).value_or(0), kShm);
  ASSERT_EQ(a.Mmap(kFile, 8 * kPageSize, rw, kMapShared | kMapFixed, w.file).value_or(0), kFile);
  ASSERT_EQ(a.Mmap(kNone, 4 * kPageSize, kProtNone, anon).value_or(0), kNone);
  ASSERT_EQ(a.Mmap(kThp, kHugePageSize, rw, anon).value_or(0), kThp);
  ASSERT_TRUE(a.Madvise(kThp, kHugePageSize, kMadvHugePage));
  ASSERT_EQ(a.Mmap(kRo, 4 * kPageSize, kProtRead, anon).value_or(0), kRo);
  ASSERT_EQ(a.Mmap(kFilePriv, 4 * kPageSize, rw, kMapPrivate | kMapFixed, w.file).value_or(0),
            kFilePriv);
  ASSERT_EQ(a.Mmap(kSpare, 4 * kPageSize, rw, anon).value_or(0), kSpare);

  auto priv = Pattern(kPrivLen, 1);
  ASSERT_TRUE(a.Write(kPriv, priv.data(), priv.size()));
  auto shm = Pattern(8 * kPageSize, 2);
  ASSERT_TRUE(a.Write(kShm, shm.data(), shm.size()));
  auto fw = Pattern(2 * kPageSize, 3);
  ASSERT_TRUE(a.Write(kFile + kPageSize, fw.data(), fw.size()));
  auto thp = Pattern(kHugePageSize, 4);
  ASSERT_TRUE(a.Write(kThp, thp.data(), thp.size()));
  ASSERT_TRUE(a.QueryPte(kThp).huge) << "the THP region did not get a huge page";
  // Read every readable page once (zero pages, page cache pages), so that
  // the snapshot's reads are idempotent. Pages past EOF fail (SIGBUS).
  for (const VmaInfo& v : a.Vmas()) {
    if (!(v.prot & kProtRead)) continue;
    for (uint64_t x = v.start; x < v.end; x += kPageSize) {
      uint8_t b;
      (void)a.Read(x, &b, 1);
    }
  }

  ASSERT_TRUE(a.notifiers().Register(&w.rec));
  ASSERT_TRUE(a.notifiers().Insert(&w.sub, kPriv, kPrivLen, &w.ops));

  if (setup == Stage::kExited) {
    a.Exit();
    ASSERT_TRUE(a.exited());
  } else if (setup == Stage::kPoolFull) {
    for (;;) {
      auto pfn = w.pool->AllocPage();
      if (!pfn) break;
      w.held.push_back(*pfn);
    }
    ASSERT_EQ(w.pool->GetStats().free_frames, 0u);
  }
  (void)w.rec.Take();
  w.ops.calls = 0;
}

// Everything observable that a failed call must not change.
struct Snapshot {
  using VmaKey = std::tuple<uint64_t, uint64_t, uint32_t, uint32_t, const SimFile*, uint64_t>;
  using PteKey = std::tuple<uint64_t, int, Pfn, bool, bool>;
  std::vector<VmaKey> vmas;
  std::vector<PteKey> ptes;
  uint64_t checksum = 0;
  uint64_t rss = 0;
  uint64_t free_frames = 0;
  uint64_t file_size = 0;
  uint64_t file_pages = 0;
  size_t tree = 0;
  size_t deferred = 0;
  uint64_t seq = 0;
  bool sub_inserted = false;

  // What differs, or "" if nothing does.
  std::string Diff(const Snapshot& o) const {
    std::string d;
    auto note = [&](bool differs, const std::string& what) {
      if (differs) d += (d.empty() ? "" : ", ") + what;
    };
    note(vmas != o.vmas, "VMAs (" + std::to_string(vmas.size()) + " -> " +
                             std::to_string(o.vmas.size()) + ")");
    if (ptes != o.ptes) {
      size_t i = 0;
      while (i < ptes.size() && i < o.ptes.size() && ptes[i] == o.ptes[i]) ++i;
      char buf[64];
      std::snprintf(buf, sizeof buf, "0x%llx",
                    (unsigned long long)(i < ptes.size() ? std::get<0>(ptes[i]) : 0));
      note(true, std::string("page table entries (first at ") + buf + ")");
    }
    note(checksum != o.checksum, "bytes");
    note(rss != o.rss, "rss_pages " + std::to_string(rss) + " -> " + std::to_string(o.rss));
    note(free_frames != o.free_frames, "free frames " + std::to_string(free_frames) + " -> " +
                                           std::to_string(o.free_frames));
    note(file_size != o.file_size, "file size " + std::to_string(file_size) + " -> " +
                                       std::to_string(o.file_size));
    note(file_pages != o.file_pages, "file cached pages " + std::to_string(file_pages) + " -> " +
                                         std::to_string(o.file_pages));
    note(tree != o.tree || deferred != o.deferred || sub_inserted != o.sub_inserted,
         "interval subscriptions");
    note(seq != o.seq, "invalidate_seq");
    return d;
  }
};

uint64_t Fnv(uint64_t h, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

Snapshot Take(World& w) {
  Snapshot s;
  AddressSpace& a = *w.as;
  const auto vmas = a.Vmas();
  for (const VmaInfo& v : vmas) s.vmas.emplace_back(v.start, v.end, v.prot, v.flags, v.file, v.pgoff);
  for (const VmaInfo& v : vmas)
    for (uint64_t x = v.start; x < v.end; x += kPageSize) {
      const PteInfo p = a.QueryPte(x);
      s.ptes.emplace_back(x, int(p.kind), p.pfn, p.writable, p.huge);
    }
  s.rss = a.GetStats().rss_pages;
  s.free_frames = w.pool->GetStats().free_frames;
  s.file_size = w.file->size();
  s.file_pages = w.file->cached_pages();
  s.tree = a.notifiers().DebugTreeSize();
  s.deferred = a.notifiers().DebugDeferredSize();
  s.seq = a.notifiers().DebugInvalidateSeq();
  s.sub_inserted = w.sub.hub() != nullptr;
  uint64_t h = 0xcbf29ce484222325ull;
  std::vector<uint8_t> page(kPageSize);
  for (const VmaInfo& v : vmas) {
    if (!(v.prot & kProtRead)) continue;
    for (uint64_t x = v.start; x < v.end; x += kPageSize) {
      auto r = a.Read(x, page.data(), kPageSize);
      if (r) {
        h = Fnv(h, page.data(), kPageSize);
      } else {
        const int e = r.error().errnum();
        h = Fnv(h, &e, sizeof e);
      }
    }
  }
  s.checksum = h;
  return s;
}

struct Case {
  std::string name;
  Errc expect;
  std::function<Error(World&)> call;
  Stage setup = Stage::kSeeded;
  // A known deviation (from Linux or from the header): the case is skipped
  // while it reproduces.
  const char* bug = nullptr;
};

template <typename T>
Error ErrOf(const Result<T>& r) {
  return r.has_value() ? Error(Errc::kOk) : r.error();
}

std::shared_ptr<SimFile> NoFile() { return nullptr; }

constexpr const char* kLookupBug =
    "PageTable::Lookup (src/mm/page_table.h) indexes pgd_[addr >> 39] (256 entries) without a "
    "bound check, and Access()/QueryPte() call it for any address: an address >= 2^47 reads "
    "past pgd_ (pgd_[256] is tables_, a small count, then dereferenced as a PudTable*)";

std::vector<Case> Cases() {
  const uint32_t rw = kProtRead | kProtWrite;
  const uint32_t pa = kMapPrivate | kMapAnonymous;
  const uint32_t sa = kMapShared | kMapAnonymous;
  const uint64_t P = kPageSize;
  std::vector<Case> c = {
      // ---- Mmap -------------------------------------------------------------
      {"mmap zero length", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, 0, rw, pa)); }},
      {"mmap zero length fixed", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(kHole, 0, rw, pa | kMapFixed)); }},
      {"mmap unknown prot bits", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, 0x100, pa)); }},
      {"mmap unknown flag", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, pa | 0x40000000)); }},
      {"mmap neither shared nor private", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, kMapAnonymous)); }},
      {"mmap both shared and private", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, pa | kMapShared)); }},
      {"mmap anonymous with a file", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, pa, w.file)); }},
      {"mmap file mapping without a file", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, kMapShared, NoFile())); }},
      {"mmap unaligned file offset", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, kMapShared, w.file, 100)); }},
      {"mmap unaligned offset, anonymous", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, pa, nullptr, 100)); }},
      {"mmap file offset overflow", Errc::kOverflow, [=](World& w) { return ErrOf(w.as->Mmap(0, 4 * P, rw, kMapShared, w.file, kMax & kPageMask)); }, Stage::kSeeded,
       "Mmap returned EINVAL for a file offset whose last page overflows; Linux: EOVERFLOW (file_mmap_ok)"},
      {"mmap file offset past MAX_LFS_FILESIZE", Errc::kOverflow, [=](World& w) { return ErrOf(w.as->Mmap(0, 4 * P, rw, kMapPrivate, w.file, uint64_t{1} << 63)); }},
      {"mmap fixed file mapping, offset overflow, beyond user space", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kTaskSize, P, rw, kMapShared | kMapFixed, w.file, kMax & kPageMask)); }},
      {"mmap no type, no room (ENOMEM first)", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kTaskSize - kMinAddr, rw, kMapAnonymous)); }, Stage::kSeeded,
       "Mmap checked for a missing MAP_SHARED/MAP_PRIVATE before the placement; Linux's do_mmap checks the type after get_unmapped_area"},
      {"mmap no type, fixed beyond user space", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kTaskSize, P, rw, kMapAnonymous | kMapFixed)); }},
      {"mmap no type, fixed_noreplace over a mapping", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kPriv, P, rw, kMapAnonymous | kMapFixedNoReplace)); }},
      {"mmap length rounds up to zero", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kMax, rw, pa)); }},
      {"mmap length rounds past 2^64", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kMax - P + 2, rw, pa)); }},
      {"mmap length above user space", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kTaskSize, rw, pa)); }},
      {"mmap no room (all of user space)", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kTaskSize - kMinAddr, rw, pa)); }},
      {"mmap shared anon no room", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(0, kTaskSize - kMinAddr, rw, sa)); }},
      {"mmap fixed unaligned address", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(kHole + 1, P, rw, pa | kMapFixed)); }},
      {"mmap fixed_noreplace unaligned address", Errc::kInval, [=](World& w) { return ErrOf(w.as->Mmap(kHole + 8, P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed unaligned beyond user space (ENOMEM first)", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kTaskSize + 8, P, rw, pa | kMapFixed)); }, Stage::kSeeded,
       "Mmap checked the fixed address's alignment before its range; Linux's get_unmapped_area returns ENOMEM for a range beyond TASK_SIZE first"},
      {"mmap fixed beyond user space", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kTaskSize, P, rw, pa | kMapFixed)); }},
      {"mmap fixed straddling the top of user space", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kTaskSize - P, 2 * P, rw, pa | kMapFixed)); }},
      {"mmap fixed address wraps", Errc::kNoMem, [=](World& w) { return ErrOf(w.as->Mmap(kMax & kPageMask, 2 * P, rw, pa | kMapFixed)); }},
      {"mmap fixed at 0 (below mmap_min_addr)", Errc::kPerm, [=](World& w) { return ErrOf(w.as->Mmap(0, P, rw, pa | kMapFixed)); }},
      {"mmap fixed below mmap_min_addr", Errc::kPerm, [=](World& w) { return ErrOf(w.as->Mmap(kMinAddr - P, P, rw, pa | kMapFixed)); }},
      {"mmap fixed_noreplace below mmap_min_addr", Errc::kPerm, [=](World& w) { return ErrOf(w.as->Mmap(P, P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace over a mapping", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kPriv, P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace overlapping a mapping's end", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kPriv + kPrivLen - P, 2 * P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace overlapping a mapping's start", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kShm - P, 2 * P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace over PROT_NONE", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kNone, P, rw, sa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace over THP", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kThp + 5 * P, P, rw, pa | kMapFixedNoReplace)); }},
      {"mmap fixed_noreplace file over a mapping", Errc::kExist, [=](World& w) { return ErrOf(w.as->Mmap(kFile, P, rw, kMapShared | kMapFixedNoReplace, w.file)); }},
      // ---- Munmap -----------------------------------------------------------
      {"munmap unaligned address", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kPriv + 1, kPageSize)); }},
      {"munmap zero length", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kPriv, 0)); }},
      {"munmap length rounds up to zero", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kPriv, kMax)); }},
      {"munmap start beyond user space", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kTaskSize + kPageSize, kPageSize)); }},
      {"munmap end beyond user space", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kPriv, kTaskSize)); }},
      {"munmap range wraps", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kMax & kPageMask, 2 * kPageSize)); }},
      // ---- Mprotect ---------------------------------------------------------
      {"mprotect unaligned address", Errc::kInval, [](World& w) { return ErrOf(w.as->Mprotect(kPriv + 8, kPageSize, kProtRead)); }},
      {"mprotect unknown prot bits", Errc::kInval, [](World& w) { return ErrOf(w.as->Mprotect(kPriv, kPageSize, 0x100)); }},
      {"mprotect unknown prot bits, zero length (Linux: 0)", Errc::kOk,
       [](World& w) { return ErrOf(w.as->Mprotect(kPriv, 0, 0x100)); }, Stage::kSeeded,
       "mprotect checks prot before len == 0; Linux do_mprotect_pkey returns 0 for len 0 before arch_validate_prot"},
      {"mprotect length rounds up to zero", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kPriv, kMax, kProtRead)); }},
      {"mprotect range wraps", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kMax & kPageMask, 2 * kPageSize, kProtRead)); }},
      {"mprotect GROWSDOWN and GROWSUP", Errc::kInval, [](World& w) { return ErrOf(w.as->Mprotect(kPriv + 1, kPageSize, kProtRead | kProtGrowsDown | kProtGrowsUp)); }},
      {"mprotect GROWSDOWN on a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kHole, kPageSize, kProtRead | kProtGrowsDown)); }, Stage::kSeeded,
       "Mprotect rejected PROT_GROWSDOWN as an unknown bit (EINVAL); Linux finds no VMA first (ENOMEM)"},
      {"mprotect GROWSUP on a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kHole, kPageSize, kProtRead | kProtGrowsUp)); }},
      {"mprotect GROWSDOWN on a VMA that cannot grow", Errc::kInval, [](World& w) { return ErrOf(w.as->Mprotect(kPriv + kPageSize, kPageSize, kProtRead | kProtGrowsDown)); }},
      {"mprotect GROWSUP on a VMA that cannot grow", Errc::kInval, [](World& w) { return ErrOf(w.as->Mprotect(kPriv, kPageSize, kProtRead | kProtGrowsUp)); }},
      {"mprotect hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kHole, kPageSize, kProtRead)); }},
      {"mprotect starting in a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kShm - kPageSize, 2 * kPageSize, kProtRead)); }},
      {"mprotect hole after an unchanged mapping", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kPriv, kPrivLen + kPageSize, kProtRead | kProtWrite)); }},
      {"mprotect beyond user space", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mprotect(kTaskSize, kPageSize, kProtRead)); }},
      // ---- Madvise ----------------------------------------------------------
      {"madvise unaligned address", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kPriv + 1, kPageSize, kMadvDontNeed)); }},
      {"madvise unknown advice", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kPageSize, 12345)); }},
      {"madvise negative advice", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kPageSize, -1)); }},
      {"madvise unknown advice, zero length", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kPriv, 0, 12345)); }},
      {"madvise length rounds up to zero", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kMax, kMadvDontNeed)); }},
      {"madvise range wraps", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kMax & kPageMask, 2 * kPageSize, kMadvDontNeed)); }},
      {"madvise DONTNEED on a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kHole, kPageSize, kMadvDontNeed)); }},
      {"madvise FREE on a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kHole, 4 * kPageSize, kMadvFree)); }},
      {"madvise HUGEPAGE on a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kHole, kHugePageSize, kMadvHugePage)); }},
      {"madvise NORMAL over a mapping and a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kPrivLen + kPageSize, kMadvNormal)); }},
      {"madvise HUGEPAGE again over THP and a hole", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kThp - kPageSize, kHugePageSize + kPageSize, kMadvHugePage)); }},
      {"madvise beyond user space", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Madvise(kTaskSize, kPageSize, kMadvDontNeed)); }},
      {"madvise FREE on shared anonymous", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kShm, kPageSize, kMadvFree)); }},
      {"madvise FREE on a shared file mapping", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kFile, kPageSize, kMadvFree)); }},
      {"madvise FREE on a private file mapping", Errc::kInval, [](World& w) { return ErrOf(w.as->Madvise(kFilePriv, kPageSize, kMadvFree)); }},
      // ---- Mremap -----------------------------------------------------------
      {"mremap unknown flag", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, 8)); }},
      {"mremap FIXED without MAYMOVE", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapFixed, kHole)); }},
      {"mremap DONTUNMAP without MAYMOVE", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapDontUnmap)); }},
      {"mremap DONTUNMAP resizing", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, 2 * kPageSize, kMremapDontUnmap | kMremapMayMove)); }},
      {"mremap unaligned old address", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv + 1, kPageSize, 2 * kPageSize, kMremapMayMove)); }},
      {"mremap zero new length", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, 0, kMremapMayMove)); }},
      {"mremap new length rounds up to zero", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kMax, kMremapMayMove)); }},
      {"mremap old length rounds up to zero, private", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kMax, 2 * kPageSize, kMremapMayMove)); }},
      {"mremap zero old length, private", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, 0, kPageSize, kMremapMayMove)); }},
      {"mremap zero old length, shared, no MAYMOVE", Errc::kNoMem,
       [](World& w) { return ErrOf(w.as->Mremap(kShm, 0, kPageSize, 0)); }, Stage::kSeeded,
       "Mremap returns EINVAL for old_len == 0 on a shared mapping without MREMAP_MAYMOVE "
       "(address_space.cc, 'zero old length needs a shared mapping and MAYMOVE'); Linux only "
       "rejects old_len == 0 on private mappings (remap_is_valid) and then fails the in-place "
       "expansion with ENOMEM (expand_vma: !MREMAP_MAYMOVE)"},
      {"mremap FIXED unaligned new address", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapMayMove | kMremapFixed, kHole + 4)); }},
      {"mremap FIXED new range beyond user space", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapMayMove | kMremapFixed, kTaskSize)); }},
      {"mremap FIXED new length above user space", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kTaskSize + kPageSize, kMremapMayMove | kMremapFixed, kHole)); }},
      {"mremap FIXED overlapping ranges", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, 4 * kPageSize, 4 * kPageSize, kMremapMayMove | kMremapFixed, kPriv + 2 * kPageSize)); }},
      {"mremap FIXED same range", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, 4 * kPageSize, 4 * kPageSize, kMremapMayMove | kMremapFixed, kPriv)); }},
      {"mremap FIXED below mmap_min_addr", Errc::kPerm, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapMayMove | kMremapFixed, kPageSize)); }},
      {"mremap FIXED of a hole below mmap_min_addr (EFAULT first)", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kHole, kPageSize, kPageSize, kMremapMayMove | kMremapFixed, kPageSize)); }, Stage::kSeeded,
       "Mremap checked a FIXED new address against mmap_min_addr (EPERM) before looking the old VMA up; Linux: EFAULT first"},
      {"mremap FIXED duplicate onto old_addr", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kShm + kPageSize, 0, 2 * kPageSize, kMremapMayMove | kMremapFixed, kShm + kPageSize)); }, Stage::kSeeded,
       "Mremap with old_len 0 and a FIXED target covering old_addr unmapped the VMA at old_addr with the target and then dereferenced it (segfault); Linux: EFAULT"},
      {"mremap nothing mapped at old address", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kHole, kPageSize, 2 * kPageSize, kMremapMayMove)); }},
      {"mremap FIXED nothing mapped at old address", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kHole, kPageSize, kPageSize, kMremapMayMove | kMremapFixed, kHole + kHugePageSize)); }},
      {"mremap old range runs into a hole", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPrivLen + kPageSize, kPrivLen + 2 * kPageSize, kMremapMayMove)); }},
      {"mremap old address in the hole before a mapping", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kNone - kPageSize, 2 * kPageSize, 4 * kPageSize, kMremapMayMove)); }},
      {"mremap grow in place blocked, no MAYMOVE", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPrivLen, 0x100000 + kPageSize, 0)); }},
      {"mremap grow a middle part, no MAYMOVE", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, 2 * kPageSize, 0)); }},
      {"mremap grow, no room to move", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPrivLen, kTaskSize - kMinAddr, kMremapMayMove)); }},
      {"mremap new length beyond the task size", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPrivLen, kTaskSize + kPageSize, kMremapMayMove)); }, Stage::kSeeded,
       "Mremap without MREMAP_FIXED returned ENOMEM for new_len > TASK_SIZE; Linux 6.18 check_mremap_params: EINVAL"},
      {"mremap of a hole, shrinking", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kShm - 2 * kPageSize, 4 * kPageSize, kPageSize, 0)); }, Stage::kSeeded,
       "Mremap shrinking an old range with no VMA at old_addr returned success and unmapped the tail (the mapping after the hole); Linux: EFAULT (vma_lookup first)"},
      {"mremap of a hole, same length", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kHole, kPageSize, kPageSize, 0)); }},
      {"mremap of a wrapping range", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kMax & kPageMask, 2 * kPageSize, kPageSize, kMremapMayMove)); }, Stage::kSeeded,
       "Mremap returned EINVAL for an old range that wraps; Linux looks the VMA up (EFAULT)"},
      {"mremap FIXED move of a wrapping range", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kMax & kPageMask, 2 * kPageSize, 2 * kPageSize, kMremapMayMove | kMremapFixed, kHole)); }},
      {"mremap shrink whose tail wraps", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kMax & kPageMask, kPageSize, 0)); }},
      {"mremap FIXED shrink whose tail wraps", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kMax & kPageMask, kPageSize, kMremapMayMove | kMremapFixed, kHole)); }},
      {"mremap FIXED move starting in a hole", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kShm - kPageSize, 2 * kPageSize, 2 * kPageSize, kMremapMayMove | kMremapFixed, kHole)); }},
      {"mremap DONTUNMAP unaligned hint", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapMayMove | kMremapDontUnmap, kHole + 8)); }, Stage::kSeeded,
       "Mremap ignored new_addr with MREMAP_DONTUNMAP alone; Linux validates it (check_mremap_params)"},
      {"mremap DONTUNMAP hint overlapping the old range", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, 2 * kPageSize, 2 * kPageSize, kMremapMayMove | kMremapDontUnmap, kPriv + kPageSize)); }},
      {"mremap DONTUNMAP hint beyond user space", Errc::kInval, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, kPageSize, kMremapMayMove | kMremapDontUnmap, kTaskSize)); }},
      {"mremap grow above user space (Linux ENOMEM)", Errc::kNoMem,
       [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPrivLen, kTaskSize, kMremapMayMove)); }, Stage::kSeeded,
       "Mremap without MREMAP_FIXED returns EINVAL for new_len > task_size - min_addr "
       "(address_space.cc, 'new length too large'); Linux checks new_len against TASK_SIZE "
       "only in mremap_to (FIXED/DONTUNMAP, EINVAL); a plain grow fails in get_unmapped_area "
       "with ENOMEM"},
      // ---- CPU accesses -----------------------------------------------------
      {"read a hole", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(kHole, b, 8)); }},
      {"read below mmap_min_addr", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(0, b, 8)); }},
      {"read PROT_NONE", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(kNone, b, 8)); }},
      {"read running off a mapping's end", Errc::kFault, [](World& w) { std::vector<uint8_t> b(2 * kPageSize); return ErrOf(w.as->Read(kPriv + kPrivLen - kPageSize, b.data(), b.size())); }},
      {"read shared file past EOF (SIGBUS)", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(kFile + 6 * kPageSize, b, 8)); }},
      {"read range wraps", Errc::kFault, [](World& w) { uint8_t b[64]; return ErrOf(w.as->Read(kMax - 10, b, 64)); }},
      {"read beyond user space (2^47)", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(kTaskSize, b, 8)); }, Stage::kSeeded, kLookupBug},
      {"read far beyond user space (2^60)", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(uint64_t{1} << 60, b, 8)); }, Stage::kSeeded,
       kLookupBug},
      {"read a kernel address", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(0xffff800000001000ull, b, 8)); }, Stage::kSeeded,
       kLookupBug},
      {"write a hole", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kHole, &v, 8)); }},
      {"write PROT_NONE", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kNone + kPageSize, &v, 8)); }},
      {"write read-only", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kRo, &v, 8)); }},
      {"write shared file past EOF (SIGBUS)", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kFile + 7 * kPageSize, &v, 8)); }},
      {"write range wraps", Errc::kFault, [](World& w) { uint8_t b[64] = {}; return ErrOf(w.as->Write(kMax - 10, b, 64)); }},
      {"write a kernel address", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(0xffff800000001000ull, &v, 8)); }, Stage::kSeeded,
       kLookupBug},
      // ---- atomics ----------------------------------------------------------
      {"atomic load unaligned", Errc::kInval, [](World& w) { return ErrOf(w.as->AtomicLoad(kPriv + 4)); }},
      {"atomic store unaligned", Errc::kInval, [](World& w) { return ErrOf(w.as->AtomicStore(kPriv + 1, 5)); }},
      {"atomic fetch-add unaligned", Errc::kInval, [](World& w) { return ErrOf(w.as->AtomicFetchAdd(kPriv + 12, 5)); }},
      {"atomic exchange unaligned", Errc::kInval, [](World& w) { return ErrOf(w.as->AtomicExchange(kPriv + 2, 5)); }},
      {"atomic cmpxchg unaligned", Errc::kInval, [](World& w) { return ErrOf(w.as->AtomicCompareExchange(kPriv + 7, 0, 5)); }},
      {"atomic load hole", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicLoad(kHole)); }},
      {"atomic load PROT_NONE", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicLoad(kNone)); }},
      {"atomic load past EOF", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicLoad(kFile + 6 * kPageSize)); }},
      {"atomic load at the top of the address range", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicLoad(kMax - 7)); }},
      {"atomic store read-only", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicStore(kRo, 5)); }},
      {"atomic store hole", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicStore(kHole + 8, 5)); }},
      {"atomic fetch-add read-only", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicFetchAdd(kRo + 8, 5)); }},
      {"atomic fetch-add PROT_NONE", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicFetchAdd(kNone, 5)); }},
      {"atomic exchange read-only", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicExchange(kRo, 5)); }},
      {"atomic cmpxchg read-only (fails compare)", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicCompareExchange(kRo, 12345, 5)); }},
      {"atomic cmpxchg hole", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicCompareExchange(kHole, 0, 5)); }},
      // ---- Populate ---------------------------------------------------------
      {"populate unaligned address", Errc::kInval, [](World& w) { return ErrOf(w.as->Populate(kPriv + 1, kPageSize, false)); }},
      {"populate length rounds up to zero", Errc::kInval, [](World& w) { return ErrOf(w.as->Populate(kPriv, kMax, false)); }},
      {"populate range wraps", Errc::kInval,
       [](World& w) { return ErrOf(w.as->Populate(kMax & kPageMask, 2 * kPageSize, false)); }, Stage::kSeeded,
       "Populate only checks that the length does not overflow when page aligned; when addr + len "
       "wraps past 2^64 its loop `a < addr + alen` never runs and it returns success without "
       "touching anything (fault.cc, Impl::Populate); expected EINVAL like its other overflow check "
       "(or EFAULT as Access gives for a wrapping range)"},
      {"populate hole", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kHole, kPageSize, false)); }},
      {"populate PROT_NONE", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kNone, 4 * kPageSize, false)); }},
      {"populate write read-only", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kRo, kPageSize, true)); }},
      {"populate past EOF", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kFile + 6 * kPageSize, kPageSize, false)); }},
      {"populate beyond user space", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kTaskSize, kPageSize, false)); }, Stage::kSeeded, kLookupBug},
      {"query pte beyond user space (reads as none)", Errc::kOk, [](World& w) {
         return w.as->QueryPte(kTaskSize).kind == PteInfo::Kind::kNone ? Error(Errc::kOk) : Error(Errc::kIo);
       }, Stage::kSeeded, kLookupBug},
      // ---- out of frames ----------------------------------------------------
      {"write COW of the zero page, pool full", Errc::kNoMem, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kSpare, &v, 8)); }, Stage::kPoolFull},
      {"atomic store COW of the zero page, pool full", Errc::kNoMem, [](World& w) { return ErrOf(w.as->AtomicStore(kSpare + kPageSize, 1)); }, Stage::kPoolFull},
      {"write private file page (COW), pool full", Errc::kNoMem, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kFilePriv, &v, 8)); }, Stage::kPoolFull},
      {"populate write, pool full", Errc::kNoMem, [](World& w) { return ErrOf(w.as->Populate(kSpare, 4 * kPageSize, true)); }, Stage::kPoolFull},
      {"pool AllocPage, pool full", Errc::kNoMem, [](World& w) { return ErrOf(w.pool->AllocPage()); }, Stage::kPoolFull},
      {"pool AllocHuge, pool full", Errc::kNoMem, [](World& w) { return ErrOf(w.pool->AllocHuge()); }, Stage::kPoolFull},
      {"file GetPage of a new page, pool full", Errc::kNoMem, [](World& w) {
         auto f = SimFile::TryCreate(*w.pool, 4 * kPageSize);
         if (!f) return f.error();
         return ErrOf((*f)->GetPage(1));
       }, Stage::kPoolFull},
      {"file Pwrite of a new page, pool full", Errc::kNoMem, [](World& w) { uint8_t b[16] = {}; return ErrOf(w.file->Pwrite(6 * kPageSize, b, sizeof b)); }, Stage::kPoolFull},
      {"file Pwrite failing on its second page", Errc::kNoMem,
       [](World& w) {
         // One free frame: the first new page is made, the second is not.
         w.pool->Put(w.held.back());
         w.held.pop_back();
         std::vector<uint8_t> b(2 * kPageSize, 0xab);
         auto r = w.file->Pwrite(8 * kPageSize, b.data(), b.size());
         // Take the frame back (if the call left it free) so only the call's effect shows.
         if (auto p = w.pool->AllocPage()) w.held.push_back(*p);
         return ErrOf(r);
       },
       Stage::kPoolFull,
       "SimFile::Pwrite fails with ENOMEM after writing the pages before the one it could not "
       "allocate: those pages stay in the page cache (a frame gone, cached_pages + 1) with the "
       "new bytes, but size_ is not extended, so the bytes sit beyond EOF (sim_file.cc, "
       "Pwrite). Linux returns a short write and extends the file; Result<void> cannot say "
       "'short', so the failed call should undo the pages it created (or succeed short)"},
      // ---- Fork and everything after Exit ----------------------------------
      {"fork after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Fork()); }, Stage::kExited},
      {"mmap after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Mmap(0, kPageSize, kProtRead, kMapPrivate | kMapAnonymous)); }, Stage::kExited},
      {"mmap fixed after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Mmap(kPriv, kPageSize, kProtRead, kMapPrivate | kMapAnonymous | kMapFixed)); }, Stage::kExited},
      {"mmap shared anon after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Mmap(0, kPageSize, kProtRead, kMapShared | kMapAnonymous)); }, Stage::kExited},
      {"munmap after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Munmap(kPriv, kPageSize)); }, Stage::kExited},
      {"mprotect after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Mprotect(kPriv, kPageSize, kProtRead)); }, Stage::kExited},
      {"madvise DONTNEED after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kPageSize, kMadvDontNeed)); }, Stage::kExited},
      {"madvise HUGEPAGE after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Madvise(kPriv, kPageSize, kMadvHugePage)); }, Stage::kExited},
      {"mremap after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Mremap(kPriv, kPageSize, 2 * kPageSize, kMremapMayMove)); }, Stage::kExited},
      {"read after exit", Errc::kFault, [](World& w) { uint8_t b[8]; return ErrOf(w.as->Read(kPriv, b, 8)); }, Stage::kExited},
      {"write after exit", Errc::kFault, [](World& w) { uint64_t v = 1; return ErrOf(w.as->Write(kPriv, &v, 8)); }, Stage::kExited},
      {"atomic load after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicLoad(kPriv)); }, Stage::kExited},
      {"atomic store after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicStore(kPriv, 1)); }, Stage::kExited},
      {"atomic fetch-add after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicFetchAdd(kPriv, 1)); }, Stage::kExited},
      {"atomic exchange after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicExchange(kPriv, 1)); }, Stage::kExited},
      {"atomic cmpxchg after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->AtomicCompareExchange(kPriv, 0, 1)); }, Stage::kExited},
      {"populate after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->Populate(kPriv, kPageSize, true)); }, Stage::kExited},
      {"reclaim after exit", Errc::kFault, [](World& w) { return ErrOf(w.as->ReclaimLazyFree()); }, Stage::kExited},
      {"munmap bad arguments after exit", Errc::kInval, [](World& w) { return ErrOf(w.as->Munmap(kPriv + 1, kPageSize)); }, Stage::kExited},
      {"notifier register after exit", Errc::kSrch, [](World& w) { return ErrOf(w.as->notifiers().Register(&w.stranger)); }, Stage::kExited},
      {"notifier get after exit", Errc::kSrch, [](World& w) { return ErrOf(w.as->notifiers().Get(&w.alloc)); }, Stage::kExited},
      {"interval insert after exit", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(&w.loose, kPriv, kPageSize, &w.ops)); }, Stage::kExited},
      // ---- notifiers --------------------------------------------------------
      {"notifier register null", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Register(nullptr)); }},
      {"notifier register twice", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Register(&w.rec)); }},
      {"notifier register-locked without the mmap lock", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().RegisterLocked(&w.stranger)); }},
      {"notifier unregister null", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Unregister(nullptr)); }},
      {"notifier unregister not registered", Errc::kNoEnt, [](World& w) { return ErrOf(w.as->notifiers().Unregister(&w.stranger)); }},
      {"notifier get null allocator", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Get(nullptr)); }},
      {"notifier get, allocator fails", Errc::kNoMem, [](World& w) { return ErrOf(w.as->notifiers().Get(&w.alloc)); }},
      {"notifier put null", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Put(nullptr)); }},
      {"notifier put not from Get", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Put(&w.rec)); }},
      {"interval insert null subscription", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(nullptr, kPriv, kPageSize, &w.ops)); }},
      {"interval insert null ops", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(&w.loose, kPriv, kPageSize, nullptr)); }},
      {"interval insert zero length", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(&w.loose, kPriv, 0, &w.ops)); }},
      {"interval insert overflowing", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(&w.loose, kMax & kPageMask, 2 * kPageSize, &w.ops)); }},
      {"interval insert twice", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Insert(&w.sub, kShm, kPageSize, &w.ops)); }},
      {"interval insert-locked without the mmap lock", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().InsertLocked(&w.loose, kPriv, kPageSize, &w.ops)); }},
      {"interval remove not inserted", Errc::kInval, [](World& w) { return ErrOf(w.as->notifiers().Remove(&w.loose)); }},
      {"interval remove via the subscription, not inserted", Errc::kInval, [](World& w) { return ErrOf(w.loose.Remove()); }},
      // ---- factories (nothing to snapshot but the seeded world) ------------
      {"pool size 0", Errc::kInval, [](World&) { return ErrOf(FramePool::TryCreate(0)); }},
      {"pool size 2 MiB (below 4 MiB)", Errc::kInval, [](World&) { return ErrOf(FramePool::TryCreate(2 << 20)); }},
      {"pool size not a multiple of 2 MiB", Errc::kInval, [](World&) { return ErrOf(FramePool::TryCreate((4 << 20) + 4096)); }},
      {"pool size above 64 TiB", Errc::kInval, [](World&) { return ErrOf(FramePool::TryCreate((uint64_t{1} << 46) + (2 << 20))); }},
      {"pool size 2^64 - 2 MiB", Errc::kInval, [](World&) { return ErrOf(FramePool::TryCreate(kMax & kHugeMask)); }},
      {"file size above 2^50", Errc::kFBig, [](World& w) { return ErrOf(SimFile::TryCreate(*w.pool, (uint64_t{1} << 50) + 1)); }},
      {"file Pwrite offset overflow", Errc::kFBig, [](World& w) { uint8_t b[16] = {}; return ErrOf(w.file->Pwrite(kMax - 4, b, sizeof b)); }},
      {"file GetPage past EOF", Errc::kFault, [](World& w) { return ErrOf(w.file->GetPage(6)); }},
      {"file GetPage far past EOF", Errc::kFault, [](World& w) { return ErrOf(w.file->GetPage(kMax)); }},
      {"address space min_addr 0", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.min_addr = 0; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space min_addr unaligned", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.min_addr = 0x10001; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space task_size unaligned", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.task_size -= 1; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space task_size above 2^47", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.task_size = uint64_t{1} << 48; c.mmap_base = uint64_t{1} << 47; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space min_addr >= task_size", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.min_addr = c.task_size; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space mmap_base unaligned", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.mmap_base += 8; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space mmap_base at min_addr", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.mmap_base = c.min_addr; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
      {"address space mmap_base above task_size", Errc::kInval, [](World& w) { AddressSpaceConfig c; c.task_size = uint64_t{1} << 40; return ErrOf(AddressSpace::TryCreate(*w.pool, c)); }},
  };
  return c;
}

// Runs one case in this process; returns "" on success, else what went wrong.
std::string RunCase(World& w, const Case& c) {
  const Snapshot before = Take(w);
  (void)w.rec.Take();
  w.ops.calls = 0;
  const Error got = c.call(w);
  const size_t classic = w.rec.Take().size();
  const int interval = w.ops.calls;
  const Snapshot after = Take(w);
  std::string out;
  if (got.code() != c.expect)
    out += "returned " + (got.code() == Errc::kOk ? std::string("success") : got.ToString()) +
           ", expected " + std::string(ErrcName(c.expect)) + "; ";
  if (const std::string d = before.Diff(after); !d.empty()) out += "state changed: " + d + "; ";
  if (classic != 0 || interval != 0)
    out += "sent " + std::to_string(classic) + " classic and " + std::to_string(interval) +
           " interval notifications; ";
  return out;
}

// Runs the case in a forked child so that a crash fails only this case.
std::string RunIsolated(World& w, const Case& c) {
  int fds[2];
  if (pipe(fds) != 0) return "pipe failed";
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    close(fds[0]);
    const std::string out = RunCase(w, c);
    size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = write(fds[1], out.data() + done, out.size() - done);
      if (n <= 0) break;
      done += size_t(n);
    }
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, size_t(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status))
    return "crashed with signal " + std::to_string(WTERMSIG(status)) + " (" +
           strsignal(WTERMSIG(status)) + ")";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "child exited abnormally";
  return out;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class BadInputTest : public ::testing::TestWithParam<Case> {};

TEST_P(BadInputTest, ReturnsItsErrorAndChangesNothing) {
  const Case& c = GetParam();
  World w;
  ASSERT_NO_FATAL_FAILURE(Build(w, c.setup));
  const std::string problem = RunIsolated(w, c);
  if (problem.empty()) return;
  ADD_FAILURE() << c.name << ": " << problem
                << (c.bug ? std::string("\nregression of a fixed bug: ") + c.bug : std::string());
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  std::string n;
  for (char ch : info.param.name) n += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return std::to_string(info.index) + "_" + n;
}

INSTANTIATE_TEST_SUITE_P(Table, BadInputTest, ::testing::ValuesIn(Cases()), CaseName);

// The snapshot itself must be idempotent, or every case above is meaningless.
TEST(BadInputSnapshotTest, TakingASnapshotChangesNothing) {
  for (Stage s : {Stage::kSeeded, Stage::kExited, Stage::kPoolFull}) {
    World w;
    ASSERT_NO_FATAL_FAILURE(Build(w, s));
    const Snapshot a = Take(w);
    const Snapshot b = Take(w);
    EXPECT_EQ(a.Diff(b), "");
    EXPECT_TRUE(w.rec.Take().empty());
  }
}

// And it must see the changes the cases look for.
TEST(BadInputSnapshotTest, SeesEachKindOfChange) {
  World w;
  ASSERT_NO_FATAL_FAILURE(Build(w, Stage::kSeeded));
  Snapshot s = Take(w);
  ASSERT_TRUE(w.as->Mprotect(kRo, kPageSize, kProtNone));  // VMAs
  Snapshot t = Take(w);
  EXPECT_NE(s.Diff(t), "");
  uint64_t v = 0x1234;
  ASSERT_TRUE(w.as->Write(kPriv + 8, &v, 8));  // bytes only
  s = t;
  t = Take(w);
  EXPECT_NE(s.Diff(t).find("bytes"), std::string::npos) << s.Diff(t);
  ASSERT_TRUE(w.as->Madvise(kPriv, kPageSize, kMadvDontNeed));  // entries, rss, frames
  s = t;
  t = Take(w);
  EXPECT_NE(s.Diff(t).find("rss_pages"), std::string::npos) << s.Diff(t);
  EXPECT_NE(s.Diff(t).find("free frames"), std::string::npos) << s.Diff(t);
  EXPECT_NE(s.Diff(t).find("page table entries"), std::string::npos) << s.Diff(t);
}

}  // namespace
}  // namespace usvm::mm
