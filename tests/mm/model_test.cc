// Model test: random sequences of mmap, munmap, mprotect, madvise, mremap,
// fork, exit, CPU writes and atomics, checked after every step against a
// simple reference model of every byte, every permission and every VMA, in
// parent and child address spaces (LevelDB's "real structure beside a
// std::map" style).
//
// The model keeps, per mapped page: its protection, its VMA flags, the
// object behind it (a file or a shmem object) with the page offset, and for
// private pages the bytes once written (otherwise a private page reads
// from its backing: zeros for anonymous memory, the file for a private file
// mapping). VMAs are derived from pages: maximal runs of adjacent pages
// with the same attributes (and continuing file offsets) are one VMA,
// which is the merge rule AddressSpace implements.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "test_util.h"

namespace usvm::mm {
namespace {

using Page = std::vector<uint8_t>;

// A file or shmem object: its pages, shared by every mapping of it.
struct MObj {
  std::vector<Page> pages;
  std::shared_ptr<SimFile> file;  // null for shmem (the sim makes its own)
};

struct MPage {
  uint32_t prot = 0;
  uint32_t flags = 0;               // kVma* flags
  std::shared_ptr<MObj> obj;        // null: private anonymous
  uint64_t pgoff = 0;               // page index in obj
  std::shared_ptr<Page> priv;       // private bytes, once written
  bool shared() const { return flags & kVmaShared; }
};

struct MSpace {
  std::shared_ptr<AddressSpace> as;
  std::map<uint64_t, MPage> pages;  // keyed by page address
};

bool SameAttrs(const MPage& a, const MPage& b) {
  return a.prot == b.prot && a.flags == b.flags && a.obj == b.obj;
}

struct MVma {
  uint64_t start, end;
  uint32_t prot, flags;
  MObj* obj;
  uint64_t pgoff;
};

std::vector<MVma> DeriveVmas(const std::map<uint64_t, MPage>& pages) {
  std::vector<MVma> out;
  for (const auto& [a, p] : pages) {
    if (!out.empty()) {
      MVma& v = out.back();
      const MPage& last = pages.at(v.end - kPageSize);
      if (v.end == a && SameAttrs(last, p) &&
          (!p.obj || p.pgoff == last.pgoff + 1)) {
        v.end += kPageSize;
        continue;
      }
    }
    out.push_back({a, a + kPageSize, p.prot, p.flags, p.obj.get(), p.pgoff});
  }
  return out;
}

class ModelTest : public ::testing::TestWithParam<uint64_t> {
 protected:
  static constexpr uint64_t kWindow = uint64_t{0x200} << 30;  // 512 GiB, 2 MiB aligned
  static constexpr uint64_t kWindowPages = 1024;             // 4 MiB
  static constexpr uint64_t kFilePages = 24;

  void SetUp() override {
    pool_ = testing::MakePool(512);
    rng_ = std::make_unique<Rng>(GetParam());
    for (int i = 0; i < 2; ++i) {
      auto obj = std::make_shared<MObj>();
      obj->file = *SimFile::TryCreate(*pool_, kFilePages * kPageSize, "file" + std::to_string(i));
      for (uint64_t p = 0; p < kFilePages; ++p) {
        Page page(kPageSize);
        for (auto& b : page) b = uint8_t(rng_->Next());
        ASSERT_TRUE(obj->file->Pwrite(p * kPageSize, page.data(), kPageSize).has_value());
        obj->pages.push_back(std::move(page));
      }
      files_.push_back(obj);
    }
    MSpace s;
    s.as = testing::MakeSpace(*pool_);
    spaces_.push_back(std::move(s));
  }

  uint64_t Pick(uint64_t n) { return rng_->Uniform(n); }
  uint64_t RandPageAddr() { return kWindow + Pick(kWindowPages) * kPageSize; }
  uint64_t RandLen() {
    const uint64_t r = Pick(100);
    if (r < 3) return (512 + Pick(600)) * kPageSize;  // big: covers huge regions
    return (1 + Pick(16)) * kPageSize;
  }
  uint32_t RandProt() {
    static const uint32_t kProts[] = {kProtRead | kProtWrite, kProtRead | kProtWrite, kProtRead,
                                      kProtNone, kProtRead | kProtWrite | kProtExec};
    return kProts[Pick(5)];
  }

  // The bytes a page reads as, or nullopt if an access faults (SIGSEGV for
  // PROT_NONE, SIGBUS beyond the end of the object).
  std::optional<Page> Expected(const MPage& p) const {
    if (p.prot == kProtNone) return std::nullopt;
    if (p.priv && !p.shared()) return *p.priv;
    if (!p.obj) return Page(kPageSize, 0);
    if (p.pgoff >= p.obj->pages.size()) return std::nullopt;
    return p.obj->pages[p.pgoff];
  }

  // ---- operations, each applied to the sim and the model ----

  void OpMmap(MSpace& s) {
    const uint64_t a = RandPageAddr();
    const uint64_t len = std::min(RandLen(), kWindow + kWindowPages * kPageSize - a);
    const uint32_t prot = RandProt();
    const int kind = int(Pick(4));  // private anon, shared anon, private file, shared file
    MPage tmpl;
    tmpl.prot = prot;
    uint64_t off = 0;
    std::shared_ptr<SimFile> file;
    uint32_t flags = kMapFixed;
    switch (kind) {
      case 0:
        tmpl.flags = kVmaAnonymous;
        flags |= kMapPrivate | kMapAnonymous;
        break;
      case 1:
        tmpl.flags = kVmaAnonymous | kVmaShared;
        flags |= kMapShared | kMapAnonymous;
        tmpl.obj = std::make_shared<MObj>();
        tmpl.obj->pages.assign(len / kPageSize, Page(kPageSize, 0));
        break;
      default: {
        auto& f = files_[Pick(files_.size())];
        tmpl.obj = f;
        file = f->file;
        off = Pick(kFilePages);  // may run past the end: SIGBUS pages
        tmpl.flags = kind == 3 ? uint32_t{kVmaShared} : 0u;
        flags |= kind == 3 ? kMapShared : kMapPrivate;
        break;
      }
    }
    auto r = s.as->Mmap(a, len, prot, flags, file, off * kPageSize);
    ASSERT_TRUE(r.has_value()) << r.error().ToString();
    ASSERT_EQ(*r, a);
    for (uint64_t i = 0; i < len / kPageSize; ++i) {
      MPage p = tmpl;
      p.pgoff = kind == 0 ? 0 : (kind == 1 ? i : off + i);
      s.pages[a + i * kPageSize] = p;
    }
    trace_ += "mmap ";
  }

  void OpMunmap(MSpace& s) {
    const uint64_t a = RandPageAddr(), len = RandLen();
    ASSERT_TRUE(s.as->Munmap(a, len).has_value());
    s.pages.erase(s.pages.lower_bound(a), s.pages.lower_bound(a + len));
    trace_ += "munmap ";
  }

  void OpMprotect(MSpace& s) {
    const uint64_t a = RandPageAddr(), len = RandLen();
    const uint32_t prot = RandProt();
    auto r = s.as->Mprotect(a, len, prot);
    // Pages are changed in order until the first unmapped page.
    bool hole = false;
    for (uint64_t x = a; x < a + len; x += kPageSize) {
      auto it = s.pages.find(x);
      if (it == s.pages.end()) {
        hole = true;
        break;
      }
      it->second.prot = prot;
    }
    if (hole)
      ASSERT_EQ(r.error(), Errc::kNoMem);
    else
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
    trace_ += "mprotect ";
  }

  void OpMadvise(MSpace& s) {
    const uint64_t a = RandPageAddr(), len = RandLen();
    static const int kAdv[] = {kMadvDontNeed, kMadvFree, kMadvHugePage, kMadvNoHugePage};
    const int adv = kAdv[Pick(4)];
    auto r = s.as->Madvise(a, len, adv);
    bool hole = false;
    std::optional<Errc> err;
    for (uint64_t x = a; x < a + len; x += kPageSize) {
      auto it = s.pages.find(x);
      if (it == s.pages.end()) {
        hole = true;
        continue;
      }
      MPage& p = it->second;
      if (adv == kMadvDontNeed) {
        if (!p.shared()) p.priv.reset();
      } else if (adv == kMadvFree) {
        // Only private anonymous memory; contents stay until reclaim.
        if (p.obj) {
          err = Errc::kInval;
          break;
        }
      } else if (adv == kMadvHugePage) {
        p.flags = (p.flags & ~kVmaNoHugePage) | kVmaHugePage;
      } else {
        p.flags = (p.flags & ~kVmaHugePage) | kVmaNoHugePage;
      }
    }
    if (err)
      ASSERT_EQ(r.error(), *err);
    else if (hole)
      ASSERT_EQ(r.error(), Errc::kNoMem);
    else
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
    trace_ += "madvise" + std::to_string(adv) + " ";
  }

  // The model VMA containing a, or nullopt.
  std::optional<MVma> ModelVmaAt(const MSpace& s, uint64_t a) {
    for (const MVma& v : DeriveVmas(s.pages))
      if (v.start <= a && a < v.end) return v;
    return std::nullopt;
  }

  void OpMremap(MSpace& s) {
    const uint64_t old_addr = RandPageAddr();
    const uint64_t old_len = (1 + Pick(16)) * kPageSize;
    uint64_t new_len = (1 + Pick(16)) * kPageSize;
    const int variant = int(Pick(4));  // in place, may move, fixed, dontunmap+fixed
    uint32_t flags = 0;
    uint64_t new_addr = 0;
    if (variant == 1) flags = kMremapMayMove;
    if (variant >= 2) {
      flags = kMremapMayMove | kMremapFixed;
      new_addr = RandPageAddr();
    }
    if (variant == 3) {
      flags |= kMremapDontUnmap;
      new_len = old_len;
    }
    auto r = s.as->Mremap(old_addr, old_len, new_len, flags, new_addr);

    // Expected, in the order Linux 6.18 checks (do_mremap).
    if (variant >= 2 && new_addr < old_addr + old_len && old_addr < new_addr + new_len) {
      ASSERT_EQ(r.error(), Errc::kInval);
      return;
    }
    auto v = ModelVmaAt(s, old_addr);
    if (!v) {
      // The VMA is looked up first, whatever the lengths.
      ASSERT_EQ(r.error(), Errc::kFault);
      return;
    }
    if (variant >= 2 && old_len == new_len) {
      // remap_move (6.17+): every mapped page of the old range moves to the
      // same offset from new_addr; the images of holes keep what they had.
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
      ASSERT_EQ(*r, new_addr);
      std::vector<std::pair<uint64_t, MPage>> moved;
      for (auto it = s.pages.lower_bound(old_addr); it != s.pages.end() && it->first < old_addr + old_len; ++it)
        moved.emplace_back(it->first - old_addr, it->second);
      for (const auto& [off, p] : moved) {
        s.pages.erase(new_addr + off);
        if (variant == 3) {
          MPage& src = s.pages.at(old_addr + off);
          if (!src.shared()) src.priv.reset();
        } else {
          s.pages.erase(old_addr + off);
        }
      }
      for (const auto& [off, p] : moved) s.pages[new_addr + off] = p;
      trace_ += "mremap-multi" + std::to_string(variant) + " ";
      return;
    }
    if (variant <= 1 && old_len >= new_len) {
      // Shrinking unmaps the tail, whatever is mapped there.
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
      ASSERT_EQ(*r, old_addr);
      s.pages.erase(s.pages.lower_bound(old_addr + new_len), s.pages.lower_bound(old_addr + old_len));
      trace_ += "mremap-shrink ";
      return;
    }
    // Only the part that moves must lie in the VMA.
    if (std::min(old_len, new_len) > v->end - old_addr) {
      ASSERT_EQ(r.error(), Errc::kFault);
      return;
    }
    const MPage src_tmpl = s.pages.at(old_addr);
    auto fresh = [&](uint64_t i_from_old) {
      MPage p = src_tmpl;
      p.priv.reset();
      if (p.obj) p.pgoff = src_tmpl.pgoff + i_from_old;
      return p;
    };
    if (variant <= 1) {
      bool room = v->end == old_addr + old_len;
      for (uint64_t x = old_addr + old_len; room && x < old_addr + new_len; x += kPageSize)
        room = !s.pages.count(x);
      if (room) {
        ASSERT_TRUE(r.has_value()) << r.error().ToString();
        ASSERT_EQ(*r, old_addr);
        for (uint64_t i = old_len / kPageSize; i < new_len / kPageSize; ++i)
          s.pages[old_addr + i * kPageSize] = fresh(i);
        trace_ += "mremap-grow ";
        return;
      }
      if (variant == 0) {
        ASSERT_EQ(r.error(), Errc::kNoMem);
        return;
      }
    }
    ASSERT_TRUE(r.has_value()) << r.error().ToString() << " variant " << variant;
    const uint64_t target = *r;
    if (variant >= 2) {
      ASSERT_EQ(target, new_addr);
    }
    uint64_t move_len = std::min(old_len, new_len);
    // Collect the moved pages first (the target may be re-used below).
    std::vector<MPage> moved;
    for (uint64_t i = 0; i < move_len / kPageSize; ++i) moved.push_back(s.pages.at(old_addr + i * kPageSize));
    if (variant >= 2) {
      s.pages.erase(s.pages.lower_bound(target), s.pages.lower_bound(target + new_len));
      if (old_len > new_len)
        s.pages.erase(s.pages.lower_bound(old_addr + new_len), s.pages.lower_bound(old_addr + old_len));
    }
    if (variant == 3) {
      for (uint64_t i = 0; i < move_len / kPageSize; ++i) {
        MPage& p = s.pages.at(old_addr + i * kPageSize);
        if (!p.shared()) p.priv.reset();
      }
    } else {
      s.pages.erase(s.pages.lower_bound(old_addr), s.pages.lower_bound(old_addr + move_len));
    }
    for (uint64_t i = 0; i < new_len / kPageSize; ++i)
      s.pages[target + i * kPageSize] = i < moved.size() ? moved[i] : fresh(i);
    trace_ += "mremap-move" + std::to_string(variant) + " ";
  }

  // Writes random bytes; the model writes page by page and stops at the
  // first page that faults, as the CPU does.
  void OpWrite(MSpace& s) {
    const uint64_t a = RandPageAddr() + Pick(kPageSize);
    const uint64_t len = 1 + Pick(3 * kPageSize);
    std::vector<uint8_t> data(len);
    for (auto& b : data) b = uint8_t(rng_->Next());
    auto r = s.as->Write(a, data.data(), len);
    bool faulted = false;
    for (uint64_t done = 0; done < len;) {
      const uint64_t x = a + done;
      const uint64_t page = PageAlignDown(x);
      const uint64_t n = std::min(len - done, page + kPageSize - x);
      auto it = s.pages.find(page);
      if (it == s.pages.end() || !(it->second.prot & kProtWrite) || !Expected(it->second)) {
        faulted = true;
        break;
      }
      WriteModel(it->second, x - page, data.data() + done, n);
      done += n;
    }
    if (faulted)
      ASSERT_EQ(r.error(), Errc::kFault);
    else
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
    trace_ += "write ";
  }

  void WriteModel(MPage& p, uint64_t off, const uint8_t* src, uint64_t n) {
    if (p.shared()) {
      std::memcpy(p.obj->pages[p.pgoff].data() + off, src, n);
      return;
    }
    if (!p.priv) p.priv = std::make_shared<Page>(*Expected(p));
    else if (p.priv.use_count() > 1) p.priv = std::make_shared<Page>(*p.priv);  // COW in the model
    std::memcpy(p.priv->data() + off, src, n);
  }

  void OpAtomic(MSpace& s) {
    const uint64_t a = RandPageAddr() + Pick(kPageSize / 8) * 8;
    const uint64_t add = rng_->Next();
    auto r = s.as->AtomicFetchAdd(a, add);
    auto it = s.pages.find(PageAlignDown(a));
    if (it == s.pages.end() || !(it->second.prot & kProtWrite) || !Expected(it->second)) {
      ASSERT_EQ(r.error(), Errc::kFault);
      return;
    }
    ASSERT_TRUE(r.has_value());
    Page cur = *Expected(it->second);
    uint64_t old;
    std::memcpy(&old, cur.data() + (a % kPageSize), 8);
    ASSERT_EQ(*r, old);
    const uint64_t now = old + add;
    WriteModel(it->second, a % kPageSize, reinterpret_cast<const uint8_t*>(&now), 8);
    trace_ += "atomic ";
  }

  void OpFork(size_t from) {
    if (spaces_.size() >= 3) return;
    MSpace& s = spaces_[from];
    auto child = s.as->Fork();
    ASSERT_TRUE(child.has_value());
    MSpace c;
    c.as = *child;
    c.pages = s.pages;  // private bytes shared copy-on-write in the model too
    spaces_.push_back(std::move(c));
    trace_ += "fork ";
  }

  void OpExit() {
    if (spaces_.size() <= 1) return;
    const size_t i = 1 + Pick(spaces_.size() - 1);
    spaces_[i].as->Exit();
    spaces_.erase(spaces_.begin() + i);
    trace_ += "exit ";
  }

  // ---- the check ----

  void Verify(MSpace& s, size_t idx) {
    SCOPED_TRACE("space " + std::to_string(idx));
    // VMAs.
    std::vector<VmaInfo> got = s.as->Vmas();
    std::vector<MVma> want = DeriveVmas(s.pages);
    ASSERT_EQ(got.size(), want.size()) << trace_;
    std::map<const SimFile*, MObj*> objmap;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i].start, want[i].start) << i << " " << trace_;
      ASSERT_EQ(got[i].end, want[i].end) << i << " " << trace_;
      ASSERT_EQ(got[i].prot, want[i].prot) << i;
      ASSERT_EQ(got[i].flags, want[i].flags) << i;
      ASSERT_EQ(got[i].file == nullptr, want[i].obj == nullptr) << i;
      if (want[i].obj) {
        ASSERT_EQ(got[i].pgoff, want[i].pgoff) << i;
        auto [it, fresh] = objmap.emplace(got[i].file, want[i].obj);
        ASSERT_EQ(it->second, want[i].obj) << "object identity differs at VMA " << i;
      }
    }
    // Bytes and permissions of every page.
    Page buf(kPageSize);
    for (const auto& [a, p] : s.pages) {
      auto exp = Expected(p);
      auto r = s.as->Read(a, buf.data(), kPageSize);
      if (!exp) {
        ASSERT_FALSE(r.has_value()) << std::hex << a << " " << trace_;
        ASSERT_EQ(r.error(), Errc::kFault);
        continue;
      }
      ASSERT_TRUE(r.has_value()) << std::hex << a << " " << r.error().ToString() << " " << trace_;
      ASSERT_TRUE(buf == *exp) << "bytes differ at " << std::hex << a << " " << trace_;
      PteInfo pte = s.as->QueryPte(a);
      ASSERT_EQ(pte.kind, PteInfo::Kind::kPresent);
      ASSERT_TRUE(pte.readable);
      if (pte.writable) {
        ASSERT_TRUE(p.prot & kProtWrite) << std::hex << a;
      }
    }
  }

  std::unique_ptr<FramePool> pool_;
  std::unique_ptr<Rng> rng_;
  std::vector<std::shared_ptr<MObj>> files_;
  std::vector<MSpace> spaces_;
  std::string trace_;
};

TEST_P(ModelTest, RandomOperationsMatchTheReferenceModel) {
  const int kSteps = 3000;
  for (int step = 0; step < kSteps; ++step) {
    const size_t si = Pick(spaces_.size());
    MSpace& s = spaces_[si];
    const uint64_t op = Pick(100);
    if (op < 18) OpMmap(s);
    else if (op < 26) OpMunmap(s);
    else if (op < 36) OpMprotect(s);
    else if (op < 46) OpMadvise(s);
    else if (op < 56) OpMremap(s);
    else if (op < 84) OpWrite(s);
    else if (op < 92) OpAtomic(s);
    else if (op < 96) OpFork(si);
    else OpExit();
    if (HasFatalFailure()) {
      ADD_FAILURE() << "at step " << step;
      return;
    }
    if (trace_.size() > 400) trace_.erase(0, trace_.size() - 400);
    for (size_t i = 0; i < spaces_.size(); ++i) {
      Verify(spaces_[i], i);
      if (HasFatalFailure()) {
        ADD_FAILURE() << "at step " << step;
        return;
      }
    }
  }
  // Everything goes back to the pool when the spaces go.
  for (auto& s : spaces_) s.as->Exit();
  spaces_.clear();
  files_.clear();
  auto st = pool_->GetStats();
  EXPECT_EQ(st.free_frames, st.total_frames - 1);  // all but the zero page
}

INSTANTIATE_TEST_SUITE_P(Seeds, ModelTest, ::testing::Values(1, 2, 3, 4, 5, 6));

}  // namespace
}  // namespace usvm::mm
