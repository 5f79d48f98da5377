// The fuzzer's reference: a flat model of one address space -- every
// mapped 4 KiB page with its bytes, protection and kind (private
// anonymous, shared anonymous, or the SIGBUS tail of a grown shared
// mapping) -- and the expected result of each layout change, written from
// Linux's rules (mm/mmap.c, mm/mremap.c, mm/madvise.c, mm/mprotect.c,
// fork's copy-on-write), not from our mm's code. docs/fuzz.md lists the
// rules; tests/fuzz/fuzz_model_linux_test.cc holds them against the
// machine's kernel.
//
// Every layout call returns the errno the operation must give (0 for
// success) and applies its effect, or kSkip when the model does not
// define the outcome in that state (then nothing is applied and the
// fuzzer does not run the operation; see docs/fuzz.md for when).
//
// Copy-on-write: private pages share their bytes (shared_ptr) between a
// parent and its fork children until one side writes (MutableBytes
// copies); shared pages share them for good.
//
// Thread-safety: a value type; no shared state.
#ifndef USVM_FUZZ_MODEL_H_
#define USVM_FUZZ_MODEL_H_

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

namespace usvm::fuzz {

inline constexpr uint64_t kPage = 4096;
inline constexpr int kSkip = -1;

struct PageBytes {
  std::array<uint8_t, kPage> b{};
  bool known = true;  // shared pages: whether the bytes are known (every mapper sees them)
};

enum class PageKind : uint8_t { kPrivate, kShared, kSigbus };

struct ModelPage {
  std::shared_ptr<PageBytes> data;  // null: zeros (private pages only)
  uint8_t prot = 3;                 // 1 read, 2 write (write implies read)
  PageKind kind = PageKind::kPrivate;
  bool known = true;   // bytes known; else the first CPU read defines them
  bool lazy = false;   // MADV_FREE'd, not CPU-written since: reclaim may zero it
  bool huge = false;   // MADV_HUGEPAGE: a VMA flag (VMAs with different flags do not merge)
  uint32_t obj = 0;    // shared: the shmem object and the page's index in it
  uint64_t pgoff = 0;

  // Whether the bytes are known: per page for private memory, per object
  // page for shared memory (a GPU write that failed part-way makes them
  // unknown in every address space that maps them).
  bool Known() const { return kind == PageKind::kShared && data ? data->known : known; }
  void SetKnown(bool v) {
    if (kind == PageKind::kShared && data) data->known = v;
    else known = v;
  }
};

// A shared anonymous (shmem) object: its pages outlive any mapping of
// them; its size is fixed at mmap (a mapping grown beyond it is SIGBUS).
struct ShmObject {
  std::vector<std::shared_ptr<PageBytes>> pages;
};

class SpaceModel {
 public:
  std::map<uint64_t, ModelPage>& pages() { return pages_; }
  const std::map<uint64_t, ModelPage>& pages() const { return pages_; }
  ModelPage* Find(uint64_t va);
  const ModelPage* Find(uint64_t va) const;

  // CPU access rights of the page at va.
  bool Readable(uint64_t va) const;
  bool Writable(uint64_t va) const;
  // The page's bytes for writing (allocated / copied on write).
  static uint8_t* MutableBytes(ModelPage& p);
  static const uint8_t* Bytes(const ModelPage& p);  // null: zeros

  // mmap(va, n pages, PROT_READ|PROT_WRITE, MAP_FIXED | private or shared
  // anonymous). `next_obj` numbers shared objects.
  int Mmap(uint64_t va, uint64_t n, bool shared, uint32_t* next_obj);
  int Munmap(uint64_t va, uint64_t n);
  // prot: 0, 1 (read), 3 (read|write).
  int Mprotect(uint64_t va, uint64_t n, uint32_t prot);
  // advice: 0 DONTNEED, 1 FREE, 2 HUGEPAGE.
  int Madvise(uint64_t va, uint64_t n, int advice);
  // mode 0: mremap(old, n, n2, 0); 1: MAYMOVE|FIXED to nw; 2: MAYMOVE|
  // FIXED|DONTUNMAP to nw.
  int Mremap(uint64_t old_va, uint64_t n, uint64_t n2, int mode, uint64_t nw);
  // fork: the child's model.
  SpaceModel Fork() const;

  // Whether [va, va + n pages) is one VMA as our mm would merge it: every
  // page mapped with the same protection and kind (shared: one object at
  // consecutive offsets).
  bool Uniform(uint64_t va, uint64_t n) const;

 private:
  std::map<uint64_t, ModelPage> pages_;
  // Shared objects by id (fork children share them).
  std::map<uint32_t, std::shared_ptr<ShmObject>> objs_;
};

}  // namespace usvm::fuzz

#endif  // USVM_FUZZ_MODEL_H_
