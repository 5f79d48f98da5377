// The fuzzer's reference model (model.h) against the machine's kernel:
// random CPU-side layout programs (mmap, munmap, mprotect, madvise
// DONTNEED / FREE / HUGEPAGE, mremap in place / FIXED / DONTUNMAP, page
// writes) run on real memory of this process with the real syscalls, and
// every result (errno) and every page (mapped or not, readable, its first
// word) is compared with what the model says. Shared anonymous mappings
// are included. Not covered here: fork (the fuzzer's own tests check it
// against our mm) and reclaim of MADV_FREE pages (not controllable).
//
// The programs keep to what the model and Linux agree on by construction:
// our mm merges adjacent private anonymous VMAs that Linux may keep apart
// (docs/mm.md), so the program never maps next to an existing mapping.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "usvm/base/env.h"
#include "usvm/fuzz/model.h"

namespace usvm::fuzz {
namespace {

constexpr uint64_t kSlot = uint64_t{8} << 20;
constexpr uint64_t kPages = 64;  // a slot's first mapping: 256 KiB

// Reads one word at va of this process without faulting: EFAULT if not
// readable.
int ReadWord(uint64_t va, uint64_t* out) {
  iovec local{out, 8}, remote{reinterpret_cast<void*>(va), 8};
  return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == 8 ? 0 : errno;
}

TEST(FuzzModelLinux, RandomLayoutProgramsAgree) {
  // Four slots in a region reserved and given back (nothing else of this
  // single-threaded test maps there meanwhile).
  void* r = mmap(nullptr, 5 * kSlot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(r, MAP_FAILED);
  const uint64_t base = (reinterpret_cast<uint64_t>(r) + kSlot - 1) & ~(kSlot - 1);
  munmap(r, 5 * kSlot);
  auto slot = [&](uint64_t s) { return base + s * kSlot; };
  uint64_t compared = 0, ops = 0;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    Rng rng(seed);
    SpaceModel model;
    uint32_t next_obj = 1;
    for (uint64_t s = 0; s < 4; ++s) munmap(reinterpret_cast<void*>(slot(s)), kSlot);
    for (int step = 0; step < 60; ++step) {
      const uint64_t s = rng.Uniform(4);
      const uint64_t off = rng.Uniform(kPages), len = 1 + rng.Uniform(kPages - off);
      const uint64_t va = slot(s) + off * kPage;
      int want = 0, got = 0;
      std::string what;
      switch (rng.Uniform(8)) {
        case 0: {  // a fresh whole-slot mapping (the slot emptied first)
          const bool shared = rng.OneIn(3);
          munmap(reinterpret_cast<void*>(slot(s)), kSlot);
          model.Munmap(slot(s), kSlot / kPage);
          want = model.Mmap(slot(s), kPages, shared, &next_obj);
          void* p = mmap(reinterpret_cast<void*>(slot(s)), kPages * kPage, PROT_READ | PROT_WRITE,
                         (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
          got = p == MAP_FAILED ? errno : 0;
          what = "mmap";
          break;
        }
        case 1:
          want = model.Munmap(va, len);
          got = munmap(reinterpret_cast<void*>(va), len * kPage) ? errno : 0;
          what = "munmap";
          break;
        case 2: {
          const uint32_t prot = rng.OneIn(3) ? 0 : rng.OneIn(2) ? 1 : 3;
          want = model.Mprotect(va, len, prot);
          got = mprotect(reinterpret_cast<void*>(va), len * kPage, prot) ? errno : 0;
          what = "mprotect";
          break;
        }
        case 3: {
          const int adv = static_cast<int>(rng.Uniform(3));
          want = model.Madvise(va, len, adv);
          got = madvise(reinterpret_cast<void*>(va), len * kPage,
                        adv == 0 ? MADV_DONTNEED : adv == 1 ? MADV_FREE : MADV_HUGEPAGE)
                    ? errno
                    : 0;
          what = "madvise";
          break;
        }
        case 4: {
          const int mode = static_cast<int>(rng.Uniform(3));
          const uint64_t s2 = (s + 1 + rng.Uniform(3)) % 4;
          const uint64_t o = rng.OneIn(2) ? 0 : off;
          const uint64_t n = rng.OneIn(2) ? kPages - o : 1 + rng.Uniform(kPages - o);
          uint64_t n2 = mode == 2 ? n : rng.OneIn(3) ? n : rng.OneIn(2) ? std::max<uint64_t>(1, n / 2) : n * 2;
          // Growth in place next to another mapping is where the two may
          // disagree about merging: keep the slot's tail free (slots are
          // 8 MiB apart, mappings stay under 1 MiB).
          want = model.Mremap(slot(s) + o * kPage, n, n2, mode, slot(s2));
          if (want == kSkip) continue;
          const int flags = mode == 0 ? 0 : mode == 1 ? MREMAP_MAYMOVE | MREMAP_FIXED
                                                      : MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP;
          void* p = mremap(reinterpret_cast<void*>(slot(s) + o * kPage), n * kPage, n2 * kPage, flags,
                           reinterpret_cast<void*>(slot(s2)));
          got = p == MAP_FAILED ? errno : 0;
          what = "mremap mode " + std::to_string(mode);
          break;
        }
        default: {  // write a page's first word (if the model says writable)
          if (!model.Writable(va)) continue;
          const uint64_t v = rng.Next();
          std::memcpy(reinterpret_cast<void*>(va), &v, 8);
          ModelPage* p = model.Find(va);
          std::memcpy(SpaceModel::MutableBytes(*p), &v, 8);
          p->lazy = false;
          what = "write";
          break;
        }
      }
      ++ops;
      ASSERT_EQ(got, want) << "seed " << seed << " step " << step << ": " << what << " slot " << s << " off "
                           << off << " len " << len;
      // Every page of every slot: readable or not, and its first word.
      for (uint64_t ss = 0; ss < 4; ++ss)
        for (uint64_t i = 0; i < 2 * kPages; ++i) {
          const uint64_t p = slot(ss) + i * kPage;
          uint64_t w = 0;
          const int e = ReadWord(p, &w);
          ++compared;
          ASSERT_EQ(e == 0, model.Readable(p)) << "seed " << seed << " step " << step << " after " << what
                                                 << ": page " << ss << ":" << i;
          if (e) continue;
          const ModelPage* mp = model.Find(p);
          uint64_t m = 0;
          if (const uint8_t* b = SpaceModel::Bytes(*mp)) std::memcpy(&m, b, 8);
          ASSERT_EQ(w, m) << "seed " << seed << " step " << step << " after " << what << ": page " << ss << ":" << i;
        }
    }
  }
  for (uint64_t s = 0; s < 4; ++s) munmap(reinterpret_cast<void*>(slot(s)), kSlot);
  EXPECT_GT(ops, 1000u);
  EXPECT_GT(compared, 100000u);
}

}  // namespace
}  // namespace usvm::fuzz
