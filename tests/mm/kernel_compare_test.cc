// Differential test against the kernel of this machine: the same random
// sequences of mmap (private/shared anonymous; fixed, fixed-noreplace,
// hinted, anywhere), munmap, mprotect, madvise(DONTNEED), mremap (every
// flag combination, DONTUNMAP, FIXED multi-VMA moves, old_len 0) and writes
// of known bytes run on an AddressSpace and on the real kernel, and after
// every operation the two must agree on:
//   - the result: the address returned, or the errno;
//   - the VMA layout inside the window (real: /proc/<pid>/maps; ours:
//     Vmas()), start, end, protection, shared/private, the shmem object
//     (matched one to one with the kernel's inodes) and its page offset;
//   - every byte of every page mapped on either side: whether it can be
//     read, and what it reads.
//
// How the two sides are made comparable: the test process reserves a
// window with a real PROT_NONE mapping. A forked child (so that a wrong
// operation cannot damage the test process) releases the window and fills
// every other gap of its address space with PROT_NONE placeholders: the
// window is then its only free space, and the kernel places non-fixed
// mappings there exactly as an AddressSpace whose user space is the window
// (min_addr = window start, task_size = mmap_base = window end) does: top
// of the highest gap that fits. Every operation the generator makes stays
// inside the window (a fixed mapping or an mremap outside it would hit the
// placeholders). The child runs the syscalls and nothing else: it must not
// allocate (malloc could mmap into the window). The parent reads and
// writes the child's memory with process_vm_readv/writev, which fail with
// EFAULT where a CPU access would fault (SIGSEGV, SIGBUS past the end of a
// shmem object), and reads its /proc/<pid>/maps.
//
// Deliberate differences, excluded here on purpose (docs/mm.md lists them):
//   - VMA merging: Linux keeps adjacent private anonymous VMAs apart when
//     their anon_vmas (or vm_pgoffs) do not fit; ours merge. Both layouts
//     are compared with adjacent private VMAs of the same protection
//     coalesced (shared ones must match exactly), and an mremap
//     (other than a FIXED move of equal lengths) is not run when the VMA
//     at old_addr ends at different addresses on the two sides, since its
//     outcome depends on that end.
//   - PROT_WRITE without PROT_READ is never generated: process_vm_readv
//     (GUP) refuses to read such a VMA, a CPU (and ours) can.
//   - A non-fixed mapping that does not fit in the window: Linux may place
//     it in a gap below mmap_min_addr that an unprivileged child cannot
//     fill, and fail there with EPERM; ours fails with ENOMEM. Accepted
//     only when such a gap is left.
//   - A FIXED mremap with old_len 0 whose target starts at old_addr: both
//     fail with EFAULT, Linux after unmapping the target, we before.
//   - Kernels before 6.17 refuse FIXED moves over several VMAs (EFAULT);
//     on such a kernel those operations are not run. Before 5.16 the test
//     is skipped (mremap of a hole differs).
//
// Short by default (8 seeds x 300 operations). Longer:
//   USVM_KERNEL_COMPARE_SEEDS=200 USVM_KERNEL_COMPARE_OPS=3000
//   ./build/release/tests/mm/mm_kernel_compare_test
// (USVM_KERNEL_COMPARE_FIRST_SEED picks where the seeds start,
// USVM_KERNEL_COMPARE_WINDOW_PAGES the window's size, default 512.)
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kDefaultWindowPages = 512;
constexpr uint64_t kUserTop = 0x7ffffffff000ull;  // x86-64 TASK_SIZE (4-level)

uint64_t EnvOr(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : def;
}

// ---- operations --------------------------------------------------------

enum class OpKind : uint32_t { kMmap, kMunmap, kMprotect, kMadvise, kMremap, kWrite };

struct Op {
  OpKind kind = OpKind::kMmap;
  uint64_t addr = 0;
  uint64_t len = 0;       // mremap: old_len
  uint64_t new_len = 0;   // mremap
  uint64_t new_addr = 0;  // mremap
  uint32_t prot = 0;
  uint32_t flags = 0;
  int32_t advice = 0;
};

struct Reply {
  int64_t ret = 0;  // address, or 0
  int32_t err = 0;  // errno, or 0
};

std::string Where(uint64_t a, uint64_t win) {
  char b[64];
  const int64_t d = int64_t(a - win);
  if (d % int64_t(kPageSize) == 0)
    std::snprintf(b, sizeof b, "win%+" PRId64 "p", d / int64_t(kPageSize));
  else
    std::snprintf(b, sizeof b, "win%+" PRId64 "b", d);
  return b;
}

std::string Describe(const Op& op, uint64_t win) {
  char b[256];
  switch (op.kind) {
    case OpKind::kMmap:
      std::snprintf(b, sizeof b, "mmap(%s, %#" PRIx64 ", prot %#x, flags %#x)", Where(op.addr, win).c_str(), op.len,
                    op.prot, op.flags);
      break;
    case OpKind::kMunmap:
      std::snprintf(b, sizeof b, "munmap(%s, %#" PRIx64 ")", Where(op.addr, win).c_str(), op.len);
      break;
    case OpKind::kMprotect:
      std::snprintf(b, sizeof b, "mprotect(%s, %#" PRIx64 ", %#x)", Where(op.addr, win).c_str(), op.len, op.prot);
      break;
    case OpKind::kMadvise:
      std::snprintf(b, sizeof b, "madvise(%s, %#" PRIx64 ", %d)", Where(op.addr, win).c_str(), op.len, op.advice);
      break;
    case OpKind::kMremap:
      std::snprintf(b, sizeof b, "mremap(%s, %#" PRIx64 ", %#" PRIx64 ", flags %#x, %s)",
                    Where(op.addr, win).c_str(), op.len, op.new_len, op.flags, Where(op.new_addr, win).c_str());
      break;
    case OpKind::kWrite:
      std::snprintf(b, sizeof b, "write(%s, %" PRIu64 " pages, pattern %#x)", Where(op.addr, win).c_str(),
                    op.len / kPageSize, op.prot);
      break;
  }
  return b;
}

// ---- the child (real kernel side) --------------------------------------
// Everything here runs after fork() in a process whose only free address
// range will be the window: no allocation, no stdio.

bool FullRead(int fd, void* p, size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= size_t(r);
  }
  return true;
}

bool FullWrite(int fd, const void* p, size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t r = write(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= size_t(r);
  }
  return true;
}

uint64_t ParseHex(const char*& p) {
  uint64_t v = 0;
  for (;; ++p) {
    const char ch = *p;
    if (ch >= '0' && ch <= '9') v = v * 16 + uint64_t(ch - '0');
    else if (ch >= 'a' && ch <= 'f') v = v * 16 + uint64_t(ch - 'a' + 10);
    else return v;
  }
}

// Fills every gap of [kPageSize, kUserTop) outside [win, win_end) with a
// PROT_NONE placeholder (failures are left to the parent's check).
void FillGaps(uint64_t win, uint64_t win_end) {
  static char buf[1 << 18];
  static uint64_t starts[4096], ends[4096];
  const int fd = open("/proc/self/maps", O_RDONLY);
  if (fd < 0) return;
  size_t n = 0;
  for (ssize_t r; n < sizeof buf - 1 && (r = read(fd, buf + n, sizeof buf - 1 - n)) > 0;) n += size_t(r);
  close(fd);
  buf[n] = 0;
  size_t count = 0;
  for (const char* p = buf; *p && count < 4096;) {
    starts[count] = ParseHex(p);
    ++p;  // '-'
    ends[count] = ParseHex(p);
    ++count;
    while (*p && *p != '\n') ++p;
    if (*p) ++p;
  }
  auto fill = [](uint64_t a, uint64_t b) {
    if (a >= b) return;
    (void)mmap(reinterpret_cast<void*>(a), b - a, PROT_NONE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
  };
  uint64_t prev = kPageSize;
  for (size_t i = 0; i <= count; ++i) {
    const uint64_t next = i < count ? std::min(starts[i], kUserTop) : kUserTop;
    if (next > prev) {
      fill(prev, std::min(next, win));
      fill(std::max(prev, win_end), next);
    }
    if (i < count) prev = std::max(prev, ends[i]);
  }
}

[[noreturn]] void ChildMain(int cmd_fd, int reply_fd, uint64_t win, uint64_t win_end) {
  munmap(reinterpret_cast<void*>(win), win_end - win);
  FillGaps(win, win_end);
  Reply ready{};
  if (!FullWrite(reply_fd, &ready, sizeof ready)) _exit(1);
  for (Op op; FullRead(cmd_fd, &op, sizeof op);) {
    Reply r{};
    long ret = 0;
    errno = 0;
    switch (op.kind) {
      case OpKind::kMmap: {
        void* p = mmap(reinterpret_cast<void*>(op.addr), op.len, int(op.prot), int(op.flags), -1, 0);
        ret = p == MAP_FAILED ? -1 : long(reinterpret_cast<uintptr_t>(p));
        break;
      }
      case OpKind::kMunmap: ret = munmap(reinterpret_cast<void*>(op.addr), op.len); break;
      case OpKind::kMprotect: ret = mprotect(reinterpret_cast<void*>(op.addr), op.len, int(op.prot)); break;
      case OpKind::kMadvise: ret = madvise(reinterpret_cast<void*>(op.addr), op.len, op.advice); break;
      case OpKind::kMremap: {
        const long p = syscall(SYS_mremap, op.addr, op.len, op.new_len, op.flags, op.new_addr);
        ret = p;
        break;
      }
      case OpKind::kWrite: ret = 0; break;  // the parent writes with process_vm_writev
    }
    if (ret == -1) r.err = errno;
    else r.ret = ret;
    if (!FullWrite(reply_fd, &r, sizeof r)) _exit(1);
  }
  _exit(0);
}

// ---- layouts -------------------------------------------------------------

struct Entry {
  uint64_t start = 0, end = 0;
  uint32_t prot = 0;
  bool shared = false;
  uint64_t obj = 0;  // real: inode; sim: SimFile address; 0 for private anonymous
  uint64_t off = 0;  // byte offset of start in obj (shared only)
};

// Coalesces adjacent private entries that Linux could have kept apart for
// reasons we do not model (anon_vma compatibility, vm_pgoff). Shared
// (shmem) VMAs have no anon_vma: their boundaries must match exactly.
std::vector<Entry> Coalesce(std::vector<Entry> v) {
  std::vector<Entry> out;
  for (const Entry& e : v) {
    if (!out.empty()) {
      Entry& l = out.back();
      if (l.end == e.start && l.prot == e.prot && !l.shared && !e.shared) {
        l.end = e.end;
        continue;
      }
    }
    out.push_back(e);
  }
  return out;
}

// The VMAs inside the window, as they are (RealVmas) or coalesced (RealLayout).
std::vector<Entry> RealVmas(pid_t pid, uint64_t win, uint64_t win_end) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  std::vector<Entry> v;
  std::string line;
  while (std::getline(in, line)) {
    unsigned long long s = 0, e = 0, off = 0, ino = 0;
    char perms[8] = {};
    unsigned dmaj = 0, dmin = 0;
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &s, &e, perms, &off, &dmaj, &dmin, &ino) != 7)
      continue;
    if (e <= win || s >= win_end) continue;
    Entry x;
    x.start = std::max<uint64_t>(s, win);
    x.end = std::min<uint64_t>(e, win_end);
    x.prot = (perms[0] == 'r' ? uint32_t{kProtRead} : 0u) | (perms[1] == 'w' ? uint32_t{kProtWrite} : 0u) |
             (perms[2] == 'x' ? uint32_t{kProtExec} : 0u);
    x.shared = perms[3] == 's';
    x.obj = x.shared ? ino : 0;
    x.off = x.shared ? off + (x.start - s) : 0;
    v.push_back(x);
  }
  return v;
}

std::vector<Entry> RealLayout(pid_t pid, uint64_t win, uint64_t win_end) {
  return Coalesce(RealVmas(pid, win, win_end));
}

std::vector<Entry> SimVmas(AddressSpace& as) {
  std::vector<Entry> v;
  for (const VmaInfo& i : as.Vmas()) {
    Entry x;
    x.start = i.start;
    x.end = i.end;
    x.prot = i.prot;
    x.shared = i.flags & kVmaShared;
    x.obj = x.shared ? reinterpret_cast<uint64_t>(i.file) : 0;
    x.off = x.shared ? i.pgoff * kPageSize : 0;
    v.push_back(x);
  }
  return v;
}

std::vector<Entry> SimLayout(AddressSpace& as) { return Coalesce(SimVmas(as)); }

// The end of the VMA containing a, or 0.
uint64_t EndOfVmaAt(const std::vector<Entry>& v, uint64_t a) {
  for (const Entry& e : v)
    if (e.start <= a && a < e.end) return e.end;
  return 0;
}

std::string Show(const std::vector<Entry>& v, uint64_t win) {
  std::string s;
  char b[160];
  for (const Entry& e : v) {
    std::snprintf(b, sizeof b, "  [%+" PRId64 ", %+" PRId64 ") pages, prot %u, %s obj %#" PRIx64 " off %#" PRIx64 "\n",
                  int64_t(e.start - win) / int64_t(kPageSize), int64_t(e.end - win) / int64_t(kPageSize), e.prot,
                  e.shared ? "shared" : "private", e.obj, e.off);
    s += b;
  }
  return s;
}

// ---- one seed --------------------------------------------------------------

struct KernelVersion {
  int major = 0, minor = 0;
  bool AtLeast(int ma, int mi) const { return major > ma || (major == ma && minor >= mi); }
};

KernelVersion RunningKernel() {
  utsname u{};
  KernelVersion k;
  if (uname(&u) == 0) std::sscanf(u.release, "%d.%d", &k.major, &k.minor);
  return k;
}

class Comparison {
 public:
  Comparison(uint64_t seed, uint64_t win, uint64_t pages, KernelVersion kernel)
      : rng_(seed), seed_(seed), win_(win), win_end_(win + pages * kPageSize), pages_(pages), kernel_(kernel) {}
  ~Comparison() { StopChild(); }

  // Returns "" if all operations agreed, else the first difference.
  std::string Run(uint64_t ops) {
    auto pool = FramePool::TryCreate(uint64_t{64} << 20);
    if (!pool) return "FramePool: " + pool.error().ToString();
    pool_ = std::move(*pool);
    AddressSpaceConfig c;
    c.min_addr = win_;
    c.task_size = win_end_;
    c.mmap_base = win_end_;
    auto as = AddressSpace::TryCreate(*pool_, c);
    if (!as) return "AddressSpace: " + as.error().ToString();
    as_ = std::move(*as);
    if (std::string e = StartChild(); !e.empty()) return e;
    for (uint64_t i = 0; i < ops; ++i) {
      Op op = Generate();
      if (Excluded(op)) continue;
      trace_.push_back(Describe(op, win_));
      if (std::string e = Step(op, i); !e.empty()) {
        std::string t;
        const size_t from = trace_.size() > 12 ? trace_.size() - 12 : 0;
        for (size_t k = from; k < trace_.size(); ++k) t += "  " + trace_[k] + "\n";
        return "seed " + std::to_string(seed_) + ", op " + std::to_string(i) + " " + trace_.back() + ": " + e +
               "\nlast operations:\n" + t;
      }
    }
    return "";
  }

  uint64_t compared_pages() const { return compared_pages_; }
  uint64_t successes() const { return successes_; }
  uint64_t failures() const { return failures_; }
  uint64_t excluded() const { return excluded_; }

 private:
  uint64_t Pick(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  uint64_t RandPage() { return win_ + Pick(pages_) * kPageSize; }
  uint32_t RandProt() {
    static constexpr uint32_t kProts[] = {kProtNone, kProtRead, kProtRead | kProtWrite, kProtRead | kProtWrite,
                                          kProtRead | kProtExec, kProtAll};
    return kProts[Pick(std::size(kProts))];
  }
  // A page range [a, a + n pages) inside the window, n in [lo, hi].
  std::pair<uint64_t, uint64_t> RandRange(uint64_t lo, uint64_t hi) {
    uint64_t n = lo + Pick(hi - lo + 1);
    const uint64_t a = RandPage();
    n = std::min(n, (win_end_ - a) / kPageSize);
    return {a, n * kPageSize};
  }

  // Exactly one of our VMAs (a random range if there is none).
  std::pair<uint64_t, uint64_t> WholeVma() {
    auto vmas = as_->Vmas();
    if (vmas.empty()) return RandRange(1, 24);
    const VmaInfo& v = vmas[Pick(vmas.size())];
    return {v.start, v.end - v.start};
  }

  Op Generate() {
    Op op;
    const uint64_t k = Pick(100);
    if (k < 6) return GenerateBad();
    if (k < 30) {
      op.kind = OpKind::kMmap;
      op.prot = RandProt();
      op.flags = (Pick(3) == 0 ? kMapShared : kMapPrivate) | kMapAnonymous;
      const uint64_t place = Pick(10);
      auto [a, len] = RandRange(1, 16);
      op.len = len;
      if (place < 4) {
        op.addr = a;
        op.flags |= kMapFixed;
      } else if (place < 5) {
        op.addr = a;
        op.flags |= kMapFixedNoReplace;
      } else if (place < 8) {
        op.addr = a + (Pick(4) == 0 ? Pick(kPageSize) : 0);  // a hint, sometimes unaligned
      }
    } else if (k < 42) {
      op.kind = OpKind::kMunmap;
      std::tie(op.addr, op.len) = Pick(3) == 0 ? WholeVma() : RandRange(1, 24);
    } else if (k < 54) {
      op.kind = OpKind::kMprotect;
      std::tie(op.addr, op.len) = Pick(3) == 0 ? WholeVma() : RandRange(1, 24);
      op.prot = RandProt();
    } else if (k < 60) {
      op.kind = OpKind::kMadvise;
      std::tie(op.addr, op.len) = RandRange(1, 24);
      op.advice = kMadvDontNeed;
    } else if (k < 85) {
      op.kind = OpKind::kMremap;
      op.flags = uint32_t(Pick(8));  // every combination of MAYMOVE, FIXED, DONTUNMAP
      if (Pick(4) != 0) op.flags |= kMremapMayMove;
      // Start at a VMA most of the time (else mostly EFAULT).
      auto vmas = as_->Vmas();
      uint64_t a = RandPage();
      if (!vmas.empty() && Pick(5) != 0) {
        const VmaInfo& v = vmas[Pick(vmas.size())];
        a = v.start + Pick((v.end - v.start) / kPageSize) * kPageSize;
      }
      // The old range stays in the window (beyond it are the child's
      // placeholders); a new length may not: growing in place past the
      // window's end fails on both sides.
      const uint64_t room = (win_end_ - a) / kPageSize;
      op.addr = a;
      uint64_t olen = Pick(12) == 0 ? 0 : std::min<uint64_t>(1 + Pick(16), room);
      uint64_t nlen = 1 + Pick(16);
      if (op.flags & (kMremapFixed | kMremapDontUnmap)) {
        const uint64_t na = RandPage();
        nlen = std::min(nlen, (win_end_ - na) / kPageSize);
        if ((op.flags & kMremapDontUnmap) || Pick(2) == 0) olen = nlen = std::min(nlen, room);  // a move
        op.new_addr = na + (Pick(16) == 0 ? 8 : 0);
      } else if (Pick(8) == 0) {
        op.new_addr = RandPage();  // ignored without FIXED/DONTUNMAP
      }
      op.len = olen * kPageSize;
      op.new_len = nlen * kPageSize;
    } else {
      op.kind = OpKind::kWrite;
      std::tie(op.addr, op.len) = RandRange(1, 4);
      op.prot = uint32_t(Pick(256));  // the pattern
    }
    return op;
  }

  // Invalid arguments, checked for the errno and its order. None of them
  // may succeed outside the window on the real side.
  Op GenerateBad() {
    Op op;
    auto [a, len] = RandRange(1, 8);
    op.addr = a;
    op.len = len;
    constexpr uint64_t kTop = uint64_t{1} << 47;  // beyond both user spaces
    constexpr uint64_t kWrap = ~uint64_t{0} & kPageMask;
    switch (Pick(16)) {
      case 0: op.kind = OpKind::kMunmap; op.addr += 1 + Pick(kPageSize - 1); break;
      case 1: op.kind = OpKind::kMunmap; op.len = 0; break;
      case 2: op.kind = OpKind::kMprotect; op.addr += 8; op.prot = kProtRead; break;
      case 3:
        op.kind = OpKind::kMprotect;
        op.prot = RandProt() | (Pick(2) ? kProtGrowsDown : kProtGrowsUp);
        break;
      case 4: op.kind = OpKind::kMprotect; op.prot = kProtRead | kProtGrowsDown | kProtGrowsUp; break;
      case 5: op.kind = OpKind::kMprotect; op.prot = RandProt() | kProtSem; break;
      case 6: op.kind = OpKind::kMadvise; op.addr += 16; op.advice = kMadvDontNeed; break;
      case 7: op.kind = OpKind::kMadvise; op.advice = 12345; break;
      case 8: op.kind = OpKind::kMremap; op.addr = kWrap; op.len = op.new_len = 2 * kPageSize; op.flags = kMremapMayMove; break;
      case 9:
        op.kind = OpKind::kMremap;
        op.addr = kWrap;
        op.len = op.new_len = 2 * kPageSize;
        op.flags = kMremapMayMove | kMremapFixed;
        op.new_addr = win_ + Pick(pages_ - 1) * kPageSize;  // a valid target (in the window)
        break;
      case 10: op.kind = OpKind::kMremap; op.new_len = kTop; op.flags = kMremapMayMove; break;
      case 11: op.kind = OpKind::kMremap; op.new_len = op.len; op.flags = kMremapFixed; op.new_addr = RandPage(); break;
      case 12: op.kind = OpKind::kMmap; op.len = 0; op.prot = kProtRead; op.flags = kMapPrivate | kMapAnonymous; break;
      case 13: op.kind = OpKind::kMmap; op.prot = kProtRead; op.flags = kMapAnonymous | (Pick(2) ? kMapFixedNoReplace : 0u); break;
      case 14:
        // Unaligned, and not at the window's end: there our range check
        // (ENOMEM past task_size) would come before the alignment check.
        if (op.addr + op.len >= win_end_) op.addr = win_;
        op.kind = OpKind::kMmap;
        op.addr += 4; op.prot = kProtRead; op.flags = kMapPrivate | kMapAnonymous | kMapFixed; break;
      default: op.kind = OpKind::kMmap; op.addr = kTop; op.prot = kProtRead; op.flags = kMapShared | kMapAnonymous | kMapFixed; break;
    }
    return op;
  }

  // Operations whose outcome is known to differ on purpose on this kernel.
  bool Excluded(const Op& op) {
    if (op.kind != OpKind::kMremap) return false;
    if ((op.flags & kMremapFixed) && op.len == 0 && op.new_addr == op.addr) {
      // EFAULT on both sides, but Linux has unmapped the target first (we
      // validate before changing anything, docs/mm.md).
      ++excluded_;
      return true;
    }
    const bool move_only = (op.flags & kMremapFixed) && op.len == op.new_len && op.len != 0;
    if (move_only) {
      if (kernel_.AtLeast(6, 17)) return false;
      // Before 6.17 a FIXED move of equal lengths must lie in one VMA.
      auto v = as_->FindVma(op.addr);
      if (v && v->start <= op.addr && op.addr + op.len <= v->end) return false;
      ++excluded_;
      return true;
    }
    // Any other mremap depends on where the VMA at old_addr ends. Linux may
    // keep a boundary there that we merged away (anon_vma compatibility,
    // see Coalesce): such an operation is not comparable.
    if (EndOfVmaAt(RealVmas(pid_, win_, win_end_), op.addr) != EndOfVmaAt(SimVmas(*as_), op.addr)) {
      ++excluded_;
      return true;
    }
    return false;
  }

  Reply Sim(const Op& op) {
    sim_what_.clear();
    auto err = [&](const Error& e) {
      sim_what_ = e.ToString();
      return Reply{0, e.errnum()};
    };
    switch (op.kind) {
      case OpKind::kMmap: {
        auto r = as_->Mmap(op.addr, op.len, op.prot, op.flags);
        return r ? Reply{int64_t(*r), 0} : err(r.error());
      }
      case OpKind::kMunmap: {
        auto r = as_->Munmap(op.addr, op.len);
        return r ? Reply{} : err(r.error());
      }
      case OpKind::kMprotect: {
        auto r = as_->Mprotect(op.addr, op.len, op.prot);
        return r ? Reply{} : err(r.error());
      }
      case OpKind::kMadvise: {
        auto r = as_->Madvise(op.addr, op.len, op.advice);
        return r ? Reply{} : err(r.error());
      }
      case OpKind::kMremap: {
        auto r = as_->Mremap(op.addr, op.len, op.new_len, op.flags, op.new_addr);
        return r ? Reply{int64_t(*r), 0} : err(r.error());
      }
      case OpKind::kWrite: return Reply{};
    }
    return Reply{};
  }

  std::string Step(const Op& op, uint64_t index) {
    const Reply s = Sim(op);
    Reply r;
    if (!FullWrite(cmd_fd_, &op, sizeof op) || !FullRead(reply_fd_, &r, sizeof r))
      return "the child died (" + ChildStatus() + ")";
    if (r.err == 0) ++successes_;
    else ++failures_;
    if (s.err != r.err || s.ret != r.ret) {
      // A request that does not fit in the window: the kernel may try a gap
      // below mmap_min_addr the child could not fill (EPERM there).
      const bool low_gap_eperm = s.err == ENOMEM && r.err == EPERM && low_gap_;
      if (!low_gap_eperm) {
        char b[200];
        std::snprintf(b, sizeof b, "result differs: ours %s %+" PRId64 " (errno %d %s), kernel %s %+" PRId64
                      " (errno %d %s)",
                      s.err ? "error" : "ok", s.err ? 0 : s.ret - int64_t(win_), s.err, std::strerror(s.err),
                      r.err ? "error" : "ok", r.err ? 0 : r.ret - int64_t(win_), r.err, std::strerror(r.err));
        return b + (sim_what_.empty() ? "" : " [ours: " + sim_what_ + "]") + "\nkernel VMAs (after):\n" + Show(RealLayout(pid_, win_, win_end_), win_) +
               "ours (after):\n" + Show(SimLayout(*as_), win_);
      }
    }
    if (op.kind == OpKind::kWrite) {
      if (std::string e = WriteBoth(op, index); !e.empty()) return e;
    }
    return Compare();
  }

  std::string WriteBoth(const Op& op, uint64_t index) {
    std::vector<uint8_t> data(kPageSize);
    for (uint64_t a = op.addr; a < op.addr + op.len; a += kPageSize) {
      for (uint64_t i = 0; i < kPageSize; ++i) data[i] = uint8_t(op.prot + i * 7 + (a >> 12) + index);
      const bool sim_ok = as_->Write(a, data.data(), kPageSize).has_value();
      iovec local{data.data(), kPageSize};
      iovec remote{reinterpret_cast<void*>(a), kPageSize};
      const bool real_ok = process_vm_writev(pid_, &local, 1, &remote, 1, 0) == ssize_t(kPageSize);
      if (sim_ok != real_ok)
        return "write of page win+" + std::to_string((a - win_) / kPageSize) + ": ours " +
               (sim_ok ? "ok" : "faults") + ", kernel " + (real_ok ? "ok" : "faults");
    }
    return "";
  }

  std::string Compare() {
    const std::vector<Entry> real = RealLayout(pid_, win_, win_end_);
    const std::vector<Entry> sim = SimLayout(*as_);
    // Object identities (inode numbers, SimFile addresses) can be reused
    // once an object dies: match them one to one within this snapshot.
    real_to_sim_.clear();
    sim_to_real_.clear();
    bool same = real.size() == sim.size();
    for (size_t i = 0; same && i < real.size(); ++i) {
      const Entry &a = real[i], &b = sim[i];
      same = a.start == b.start && a.end == b.end && a.prot == b.prot && a.shared == b.shared && a.off == b.off &&
             SameObject(a.obj, b.obj);
    }
    if (!same) return "VMA layouts differ\nkernel:\n" + Show(real, win_) + "ours:\n" + Show(sim, win_);
    // Bytes of every mapped page.
    std::vector<uint8_t> rb(kPageSize), sb(kPageSize);
    for (const Entry& e : sim) {
      for (uint64_t a = e.start; a < e.end; a += kPageSize) {
        const bool sim_ok = as_->Read(a, sb.data(), kPageSize).has_value();
        iovec local{rb.data(), kPageSize};
        iovec remote{reinterpret_cast<void*>(a), kPageSize};
        const bool real_ok = process_vm_readv(pid_, &local, 1, &remote, 1, 0) == ssize_t(kPageSize);
        const std::string where = "page win+" + std::to_string((a - win_) / kPageSize);
        if (sim_ok != real_ok)
          return where + ": ours " + (sim_ok ? "reads" : "faults") + ", kernel " + (real_ok ? "reads" : "faults");
        if (sim_ok && std::memcmp(rb.data(), sb.data(), kPageSize) != 0) {
          size_t i = 0;
          while (rb[i] == sb[i]) ++i;
          return where + ": bytes differ at offset " + std::to_string(i) + ": ours " + std::to_string(sb[i]) +
                 ", kernel " + std::to_string(rb[i]);
        }
        ++compared_pages_;
      }
    }
    return "";
  }

  // Matches kernel inodes and our SimFiles one to one.
  bool SameObject(uint64_t real, uint64_t sim) {
    if (!real || !sim) return real == sim;
    auto [it, fresh] = real_to_sim_.emplace(real, sim);
    auto [jt, fresh2] = sim_to_real_.emplace(sim, real);
    return it->second == sim && jt->second == real;
  }

  std::string StartChild() {
    int cmd[2], reply[2];
    if (pipe(cmd) != 0 || pipe(reply) != 0) return "pipe failed";
    std::fflush(nullptr);
    pid_ = fork();
    if (pid_ < 0) return "fork failed";
    if (pid_ == 0) {
      close(cmd[1]);
      close(reply[0]);
      ChildMain(cmd[0], reply[1], win_, win_end_);
    }
    close(cmd[0]);
    close(reply[1]);
    cmd_fd_ = cmd[1];
    reply_fd_ = reply[0];
    Reply ready;
    if (!FullRead(reply_fd_, &ready, sizeof ready)) return "the child died while starting (" + ChildStatus() + ")";
    // The window must be the child's only free space, except perhaps below
    // mmap_min_addr (see Step).
    uint64_t min_addr = 0x10000;
    std::ifstream("/proc/sys/vm/mmap_min_addr") >> min_addr;
    std::vector<std::pair<uint64_t, uint64_t>> gaps;
    {
      std::ifstream in("/proc/" + std::to_string(pid_) + "/maps");
      std::string line;
      uint64_t prev = kPageSize;
      while (std::getline(in, line)) {
        unsigned long long s = 0, e = 0;
        if (std::sscanf(line.c_str(), "%llx-%llx", &s, &e) != 2) continue;
        if (std::min<uint64_t>(s, kUserTop) > prev) gaps.emplace_back(prev, std::min<uint64_t>(s, kUserTop));
        prev = std::max<uint64_t>(prev, e);
      }
      if (prev < kUserTop) gaps.emplace_back(prev, kUserTop);
    }
    for (auto [a, b] : gaps) {
      for (auto [x, y] : {std::pair{a, std::min(b, win_)}, std::pair{std::max(a, win_end_), b}}) {
        if (x >= y) continue;
        if (y <= min_addr) {
          low_gap_ = true;
          continue;
        }
        char m[160];
        std::snprintf(m, sizeof m, "the child's gap [%#" PRIx64 ", %#" PRIx64 ") could not be filled", x, y);
        return m;
      }
    }
    return "";
  }

  std::string ChildStatus() {
    int status = 0;
    if (pid_ <= 0 || waitpid(pid_, &status, WNOHANG) <= 0) return "still running";
    pid_ = -1;
    if (WIFSIGNALED(status)) return std::string("killed by ") + strsignal(WTERMSIG(status));
    return "exit " + std::to_string(WEXITSTATUS(status));
  }

  void StopChild() {
    if (cmd_fd_ >= 0) close(cmd_fd_);
    if (reply_fd_ >= 0) close(reply_fd_);
    cmd_fd_ = reply_fd_ = -1;
    if (pid_ > 0) {
      int status = 0;
      waitpid(pid_, &status, 0);
      pid_ = -1;
    }
  }

  std::mt19937_64 rng_;
  const uint64_t seed_;
  const uint64_t win_, win_end_, pages_;
  const KernelVersion kernel_;
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  pid_t pid_ = -1;
  int cmd_fd_ = -1, reply_fd_ = -1;
  bool low_gap_ = false;
  std::string sim_what_;  // our last error, spelled out
  std::map<uint64_t, uint64_t> real_to_sim_, sim_to_real_;
  std::vector<std::string> trace_;
  uint64_t compared_pages_ = 0, successes_ = 0, failures_ = 0, excluded_ = 0;
};

TEST(KernelCompareTest, RandomOperationsMatchTheRunningKernel) {
  const KernelVersion k = RunningKernel();
  if (!k.AtLeast(5, 16)) GTEST_SKIP() << "kernel " << k.major << "." << k.minor << " predates 5.16 mremap semantics";
  // The window: reserved here, released in each child. A small one
  // (USVM_KERNEL_COMPARE_WINDOW_PAGES=48) exercises "no room" more.
  const uint64_t window_pages = std::max<uint64_t>(32, EnvOr("USVM_KERNEL_COMPARE_WINDOW_PAGES", kDefaultWindowPages));
  const uint64_t window_bytes = window_pages * kPageSize;
  void* w = mmap(nullptr, window_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(w, MAP_FAILED);
  const uint64_t win = reinterpret_cast<uint64_t>(w);
  // process_vm_readv on a child needs ptrace rights (Yama scope <= 1).
  {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      pause();
      _exit(0);
    }
    uint64_t probe = 0, src = reinterpret_cast<uint64_t>(&probe);
    iovec local{&probe, sizeof probe}, remote{reinterpret_cast<void*>(src), sizeof probe};
    const bool ok = process_vm_readv(pid, &local, 1, &remote, 1, 0) == ssize_t(sizeof probe);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    if (!ok) {
      munmap(w, window_bytes);
      GTEST_SKIP() << "process_vm_readv on a child is not permitted here: " << std::strerror(errno);
    }
  }
  const uint64_t seeds = EnvOr("USVM_KERNEL_COMPARE_SEEDS", 8);
  const uint64_t ops = EnvOr("USVM_KERNEL_COMPARE_OPS", 300);
  const uint64_t first = EnvOr("USVM_KERNEL_COMPARE_FIRST_SEED", 1);
  uint64_t pages = 0, ok = 0, failed = 0, excluded = 0;
  for (uint64_t seed = first; seed < first + seeds; ++seed) {
    Comparison c(seed, win, window_pages, k);
    const std::string problem = c.Run(ops);
    EXPECT_EQ(problem, "");
    pages += c.compared_pages();
    ok += c.successes();
    failed += c.failures();
    excluded += c.excluded();
    if (!problem.empty()) break;
  }
  munmap(w, window_bytes);
  std::printf("kernel %d.%d: %" PRIu64 " seeds x %" PRIu64 " ops, %" PRIu64 " succeeded, %" PRIu64
              " failed (on both), %" PRIu64 " excluded (see Excluded), %" PRIu64
              " page comparisons\n",
              k.major, k.minor, seeds, ops, ok, failed, excluded, pages);
  // The generator must exercise both outcomes, or the comparison is hollow.
  EXPECT_GT(ok, seeds * ops / 4);
  EXPECT_GT(failed, seeds * ops / 50);
}

}  // namespace
}  // namespace usvm::mm
