// The reference model (model.h): Linux's layout semantics over a flat page
// map.
#include "usvm/fuzz/model.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <vector>

namespace usvm::fuzz {

ModelPage* SpaceModel::Find(uint64_t va) {
  auto it = pages_.find(va);
  return it == pages_.end() ? nullptr : &it->second;
}

const ModelPage* SpaceModel::Find(uint64_t va) const {
  auto it = pages_.find(va);
  return it == pages_.end() ? nullptr : &it->second;
}

bool SpaceModel::Readable(uint64_t va) const {
  const ModelPage* p = Find(va);
  return p && p->kind != PageKind::kSigbus && (p->prot & 1);
}

bool SpaceModel::Writable(uint64_t va) const {
  const ModelPage* p = Find(va);
  return p && p->kind != PageKind::kSigbus && (p->prot & 2);
}

uint8_t* SpaceModel::MutableBytes(ModelPage& p) {
  if (!p.data) {
    p.data = std::make_shared<PageBytes>();
  } else if (p.kind == PageKind::kPrivate && p.data.use_count() > 1) {
    p.data = std::make_shared<PageBytes>(*p.data);  // copy-on-write
  }
  return p.data->b.data();
}

const uint8_t* SpaceModel::Bytes(const ModelPage& p) { return p.data ? p.data->b.data() : nullptr; }

int SpaceModel::Mmap(uint64_t va, uint64_t n, bool shared, uint32_t* next_obj) {
  if (n == 0) return EINVAL;
  const uint32_t obj = shared ? (*next_obj)++ : 0;
  std::shared_ptr<ShmObject> o;
  if (shared) {
    // Objects no page maps any more are gone (shmem without a mapping is
    // freed): drop them here, or a long run keeps every object it made.
    std::set<uint32_t> live;
    for (const auto& [a, pg] : pages_)
      if (pg.kind != PageKind::kPrivate) live.insert(pg.obj);
    std::erase_if(objs_, [&](const auto& kv) { return !live.count(kv.first); });
    o = std::make_shared<ShmObject>();
    objs_[obj] = o;
  }
  for (uint64_t i = 0; i < n; ++i) {
    ModelPage p;
    p.prot = 3;
    if (shared) {
      p.kind = PageKind::kShared;
      p.data = std::make_shared<PageBytes>();
      o->pages.push_back(p.data);
      p.obj = obj;
      p.pgoff = i;
    }
    pages_[va + i * kPage] = std::move(p);
  }
  return 0;
}

int SpaceModel::Munmap(uint64_t va, uint64_t n) {
  if (n == 0) return EINVAL;
  pages_.erase(pages_.lower_bound(va), pages_.lower_bound(va + n * kPage));
  return 0;
}

int SpaceModel::Mprotect(uint64_t va, uint64_t n, uint32_t prot) {
  // Linux changes the VMAs in order and stops at the first hole (ENOMEM),
  // the part before it changed.
  for (uint64_t i = 0; i < n; ++i) {
    ModelPage* p = Find(va + i * kPage);
    if (!p) return ENOMEM;
    p->prot = static_cast<uint8_t>(prot);
  }
  return 0;
}

int SpaceModel::Madvise(uint64_t va, uint64_t n, int advice) {
  bool hole = false, inval = false;
  for (uint64_t i = 0; i < n; ++i) {
    ModelPage* p = Find(va + i * kPage);
    if (!p) {
      hole = true;
      continue;
    }
    switch (advice) {
      case 0:  // DONTNEED: private anonymous pages are dropped (zero on next
               // touch); shared memory keeps its bytes in the object.
        if (p->kind == PageKind::kPrivate) {
          p->data.reset();
          p->SetKnown(true);
          p->lazy = false;
        }
        break;
      case 1:  // FREE: EINVAL on a shared VMA (the walk stops there; the
               // model marks every private page lazy, a superset: a lazy
               // page reads as itself or zero after reclaim).
        if (p->kind != PageKind::kPrivate) inval = true;
        else p->lazy = true;
        break;
      default:  // HUGEPAGE: a VMA flag only
        p->huge = true;
        break;
    }
  }
  if (inval) return EINVAL;
  return hole ? ENOMEM : 0;
}

bool SpaceModel::Uniform(uint64_t va, uint64_t n) const {
  const ModelPage* f = Find(va);
  if (!f) return false;
  for (uint64_t i = 1; i < n; ++i) {
    const ModelPage* p = Find(va + i * kPage);
    // Shared pages and the SIGBUS tail beyond the object are one VMA.
    if (!p) return false;
    const bool fs = f->kind != PageKind::kPrivate, ps = p->kind != PageKind::kPrivate;
    if ( p->prot != f->prot || fs != ps || p->huge != f->huge) return false;
    if (f->kind != PageKind::kPrivate && (p->obj != f->obj || p->pgoff != f->pgoff + i)) return false;
  }
  return true;
}

int SpaceModel::Mremap(uint64_t old_va, uint64_t n, uint64_t n2, int mode, uint64_t nw) {
  if (n == 0) return kSkip;  // old_len 0: the shared-duplicate case, not generated
  if (n2 == 0) return EINVAL;
  if (mode == 2 && n != n2) return EINVAL;  // DONTUNMAP does not resize
  if (mode != 0) {
    const uint64_t oe = old_va + n * kPage, ne = nw + n2 * kPage;
    if (old_va < ne && nw < oe) return EINVAL;  // overlapping ranges
  }
  if (!Find(old_va)) return EFAULT;  // no VMA at old_addr
  auto new_page = [this](const ModelPage& last, uint64_t i_from_last) {
    ModelPage p;
    p.prot = last.prot;
    p.huge = last.huge;
    if (last.kind != PageKind::kPrivate) {
      // Grown shared memory maps the object further on: its pages where
      // the object has them, SIGBUS beyond its end.
      p.obj = last.obj;
      p.pgoff = last.pgoff + i_from_last;
      auto it = objs_.find(p.obj);
      if (it != objs_.end() && p.pgoff < it->second->pages.size()) {
        p.kind = PageKind::kShared;
        p.data = it->second->pages[p.pgoff];
      } else {
        p.kind = PageKind::kSigbus;
      }
    }
    return p;
  };
  // remap_move (6.17+; DONTUNMAP too): equal lengths may span several
  // VMAs; each moves to the same offset from nw, gaps stay gaps (the
  // target keeps what it has there). DONTUNMAP leaves the source mapped:
  // private memory there is empty (zeros), shared memory still maps the
  // object.
  auto move_each = [&](uint64_t count, bool dontunmap) {
    for (uint64_t i = 0; i < count; ++i) {
      auto it = pages_.find(old_va + i * kPage);
      if (it == pages_.end()) continue;
      ModelPage p = it->second;
      if (!dontunmap) {
        pages_.erase(it);
      } else if (it->second.kind == PageKind::kPrivate) {
        it->second.data.reset();
        it->second.SetKnown(true);
        it->second.lazy = false;
      }
      pages_[nw + i * kPage] = std::move(p);
    }
  };
  // Otherwise the part that moves or grows must lie inside the VMA at
  // old_va (EFAULT, nothing changed: Linux checks before it shrinks).
  if (mode == 0) {
    if (n2 == n) return 0;
    if (n2 < n) return Munmap(old_va + n2 * kPage, n - n2);
    if (!Uniform(old_va, n)) return EFAULT;
    const uint64_t oe = old_va + n * kPage;
    for (uint64_t i = 0; i < n2 - n; ++i)
      if (Find(oe + i * kPage)) return ENOMEM;  // cannot grow in place
    const ModelPage last = *Find(oe - kPage);
    for (uint64_t i = 0; i < n2 - n; ++i) pages_[oe + i * kPage] = new_page(last, i + 1);
    return 0;
  }
  if (mode == 2) {
    move_each(n, true);
    return 0;
  }
  if (n2 == n) {
    move_each(n, false);
    return 0;
  }
  if (!Uniform(old_va, std::min(n, n2))) return EFAULT;
  if (n2 < n) {  // shrink, then move the rest
    Munmap(old_va + n2 * kPage, n - n2);
    Munmap(nw, n2);
    move_each(n2, false);
    return 0;
  }
  const ModelPage last = *Find(old_va + (n - 1) * kPage);
  Munmap(nw, n2);
  move_each(n, false);
  for (uint64_t i = n; i < n2; ++i) pages_[nw + i * kPage] = new_page(last, i - n + 1);
  return 0;
}

SpaceModel SpaceModel::Fork() const {
  SpaceModel c;
  c.pages_ = pages_;
  c.objs_ = objs_;  // private bytes shared copy-on-write, shared ones for good
  return c;
}

}  // namespace usvm::fuzz
