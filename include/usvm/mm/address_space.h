// AddressSpace: a simulated process address space (the kernel's mm_struct).
//
// It owns the VMAs (an address-ordered map with split and merge), a 4-level
// CPU page table over a 47-bit user space, and the notifier hub. Frames come
// from a FramePool shared by every address space of the simulated machine
// (fork children share it with their parent). Bytes are real: every CPU
// read and write copies to or from the frame arena.
//
// Key operations, with Linux semantics and errors:
//   Mmap / Munmap / Mprotect / Madvise / Mremap / Fork / Exit
//   Read / Write / Atomic*  -- the CPU: walks the page table, takes a fault
//                              (zero page, allocation, COW break, THP) when
//                              the entry is missing or read-only; EFAULT is
//                              this world's SIGSEGV/SIGBUS.
//
// Invalidation: every change that removes or downgrades a page table entry
// is bracketed by notifiers().InvalidateRangeStart/End with the kernel's
// event: UNMAP (munmap, mremap's old range), CLEAR (madvise DONTNEED/FREE,
// COW break, THP split), PROTECTION_VMA (mprotect), PROTECTION_PAGE (fork's
// write-protect of the parent), RELEASE (teardown).
//
// Locking (in acquisition order):
//   1. mmap_lock_ (RwSemaphore): write for layout changes (mmap, munmap,
//      mprotect, mremap, fork, madvise HUGEPAGE/NOHUGEPAGE, exit); read for
//      faults, CPU accesses and madvise DONTNEED/FREE. Guards the VMA map
//      and the existence of page table pages (freed only under write).
//   2. the page table lock of a 2 MiB region (PageTable's per-PMD-slot
//      RwSemaphore): exclusive to change entries of that region, shared for
//      a CPU access through them, so a frame cannot be freed or replaced
//      while bytes are copied to or from it.
//   Notifier callbacks run with (1) held and (2) not held.
//
// Thread-safety: every public method is safe to call concurrently.
// Lifetime: AddressSpace is shared (std::shared_ptr) so that mirrors can
// hold the structure (mmgrab) past Exit(); Exit() (mmput of the last user)
// tears the space down; later calls fail with EFAULT. The FramePool must
// outlive every AddressSpace.
#ifndef USVM_MM_ADDRESS_SPACE_H_
#define USVM_MM_ADDRESS_SPACE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/mutex.h"
#include "usvm/base/result.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/mm.h"
#include "usvm/mm/mmu_notifier.h"
#include "usvm/mm/sim_file.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

class PageTable;
class DeviceMigration;
struct Vma;
struct HmmRange;
struct MigrateVma;

// What the CPU page table holds for one 4 KiB page.
struct PteInfo {
  enum class Kind : uint8_t {
    kNone,            // not present
    kPresent,         // a system frame (or the zero page)
    kMigration,       // under migration: accessors wait (HMM issue)
    kDevicePrivate,   // in device memory (HMM issue)
    kDeviceExclusive, // exclusively owned by a device (HMM issue)
  };
  Kind kind = Kind::kNone;
  Pfn pfn = kInvalidPfn;
  bool readable = false;
  bool writable = false;
  bool dirty = false;
  bool accessed = false;
  bool zero_page = false;  // the shared zero page
  bool file = false;       // a page-cache page (not anonymous)
  bool huge = false;       // mapped by a 2 MiB entry
  bool hugetlb = false;    // a 2 MiB page of a MAP_HUGETLB mapping
  bool lazy_free = false;  // MADV_FREE'd and not written since
  bool device_memory = false;  // pfn is a DevicePfn (device-private or coherent)
};

struct AddressSpaceConfig {
  // User space is [min_addr, task_size).
  uint64_t min_addr = 0x10000;
  uint64_t task_size = uint64_t{1} << 47;
  // Top-down allocation starts below this address.
  uint64_t mmap_base = (uint64_t{1} << 47) - (uint64_t{1} << 40);
  // Transparent huge pages in MADV_HUGEPAGE regions ("madvise" mode).
  bool thp = true;
};

class AddressSpace final : public Mm, public std::enable_shared_from_this<AddressSpace> {
 public:
  static Result<std::shared_ptr<AddressSpace>> TryCreate(FramePool& pool,
                                                        AddressSpaceConfig config = {},
                                                        Env& env = Env::Default());
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  // ---- layout -----------------------------------------------------------

  // mmap(2). `flags`: exactly one of kMapShared/kMapPrivate, plus
  // kMapAnonymous (then `file` must be null), kMapFixed,
  // kMapFixedNoReplace, kMapPopulate. Returns the address. A hint (addr
  // without FIXED) is rounded down to a page and used if the range is free.
  // Errors in Linux's order: EINVAL: zero length, unknown flags or prot,
  // unaligned file offset, anonymous with a file or file-backed without
  // one; ENOMEM: length overflow, no room, a fixed range beyond user space;
  // EINVAL: an unaligned fixed address; EPERM: a fixed address below
  // min_addr; EEXIST: kMapFixedNoReplace over an existing mapping;
  // EOVERFLOW: the file offset of the last page beyond MAX_LFS_FILESIZE;
  // EINVAL: not exactly one of kMapShared/kMapPrivate.
  // kMapHugetlb (anonymous only; optional kMapHuge2MB, kMapNoReserve): 2 MiB
  // pages from the pool's hugetlb pool (FramePool::SetHugetlbPages). The
  // length rounds up to 2 MiB and the address is 2 MiB aligned; the pages
  // are reserved now (ENOMEM if the pool cannot, unless kMapNoReserve).
  // EINVAL: with a file, another huge page size, an unaligned fixed address
  // or offset. A fault that finds no page is EFAULT (SIGBUS).
  Result<uint64_t> Mmap(uint64_t addr, uint64_t len, uint32_t prot, uint32_t flags,
                        std::shared_ptr<SimFile> file = nullptr, uint64_t offset = 0);
  // munmap(2). EINVAL: unaligned address, zero length, a range outside
  // user space, or an end that cuts a hugetlb mapping off a 2 MiB
  // boundary. Unmapping nothing succeeds.
  Result<void> Munmap(uint64_t addr, uint64_t len);
  // mprotect(2). EINVAL: unaligned address, unknown prot bits (kProtSem is
  // accepted and ignored), both kProtGrowsDown and kProtGrowsUp, or one of
  // them on a VMA (none can grow), or an end that cuts a hugetlb mapping
  // off a 2 MiB boundary. ENOMEM: the range overflows, or part of it is not
  // mapped; as in Linux the mappings before the first hole have been
  // changed then.
  Result<void> Mprotect(uint64_t addr, uint64_t len, uint32_t prot);
  // madvise(2) with kMadvNormal, kMadvDontNeed, kMadvFree, kMadvHugePage,
  // kMadvNoHugePage, kMadvCollapse. EINVAL: unaligned address, unknown
  // advice, FREE on a shared or file mapping. ENOMEM: part of the range is
  // not mapped (the mapped parts are still advised, as in Linux).
  // kMadvCollapse (MADV_COLLAPSE, khugepaged's work done now): every
  // 2 MiB-aligned 2 MiB inside the range and inside one private anonymous
  // VMA becomes one THP, copying its pages (holes and the zero page read as
  // zeros), whatever MADV_HUGEPAGE says (not under MADV_NOHUGEPAGE, not
  // with THP off). Regions that cannot be collapsed are skipped and the
  // call fails with the errno of the last one, as Linux 6.18: EINVAL for
  // an ineligible VMA, a region with no page at all, device or migration
  // entries, or no whole 2 MiB in the range; EAGAIN for pinned pages;
  // ENOMEM when no 2 MiB block can be had (that stops the walk).
  // Hugetlb mappings: FREE is EINVAL, DONTNEED must start on a 2 MiB
  // boundary and rounds its end down to one, flag changes that would split
  // off a boundary are EINVAL; COLLAPSE is EINVAL.
  Result<void> Madvise(uint64_t addr, uint64_t len, int advice);
  // mremap(2) with kMremapMayMove, kMremapFixed, kMremapDontUnmap, as in
  // Linux 6.18 (docs/mm.md). Returns the new address. EINVAL: bad flags or
  // alignment, zero or too large new length, a bad or overlapping new
  // address (FIXED, or DONTUNMAP whose new_addr is a hint), DONTUNMAP
  // resizing, old_len 0 on a private mapping, a shrink tail outside user
  // space; EFAULT: no VMA at old_addr, or the part that moves leaves it (a
  // FIXED move of equal lengths may span several VMAs); EPERM: a FIXED
  // address below min_addr; ENOMEM: cannot grow in place and may not move,
  // or no room. Hugetlb mappings: lengths round up to 2 MiB; EINVAL for
  // unaligned addresses, growth, or kMremapDontUnmap.
  Result<uint64_t> Mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len,
                          uint32_t flags, uint64_t new_addr = 0);
  // fork(2) of the memory: a new address space with copies of every VMA;
  // private memory becomes copy-on-write in both, shared stays shared.
  Result<std::shared_ptr<AddressSpace>> Fork();
  // Tears the address space down (exit_mmap): one RELEASE to the notifier
  // hub, then every mapping is unmapped. Idempotent. Later calls: EFAULT.
  void Exit();
  bool exited() const;
  // mmget_not_zero: false from the moment Exit starts. Lock-free (no mmap
  // lock), so it may be asked with or without that lock held.
  bool Alive() const override;

  // ---- the CPU ----------------------------------------------------------

  // Copies between the simulated memory and a host buffer, faulting pages
  // in as a CPU would. EFAULT: no VMA, missing permission, or beyond the
  // end of a file (SIGBUS). A failed access may have copied the bytes
  // before the failing page, as a real memcpy would. ENOMEM: out of frames.
  Result<void> Read(uint64_t addr, void* dst, uint64_t len);
  Result<void> Write(uint64_t addr, const void* src, uint64_t len);
  // 8-byte atomics on naturally aligned addresses (EINVAL if unaligned).
  Result<uint64_t> AtomicLoad(uint64_t addr);
  Result<void> AtomicStore(uint64_t addr, uint64_t v);
  Result<uint64_t> AtomicFetchAdd(uint64_t addr, uint64_t v);
  Result<uint64_t> AtomicExchange(uint64_t addr, uint64_t v);
  // Returns the old value; the store happened iff it equals `expected`.
  Result<uint64_t> AtomicCompareExchange(uint64_t addr, uint64_t expected, uint64_t desired);
  // Faults [addr, addr+len) in as a read or write access would, without
  // copying (get_user_pages without pins; MAP_POPULATE).
  Result<void> Populate(uint64_t addr, uint64_t len, bool write);
  // Simulated memory pressure on this space: discards every clean
  // lazy-free page (MADV_FREE'd, not written since), as reclaim would, with
  // a CLEAR notification; those pages read as zero afterwards. Returns the
  // number of 4 KiB pages discarded.
  Result<uint64_t> ReclaimLazyFree();

  // ---- queries (take the mmap lock for read) ----------------------------

  // find_vma: the first VMA ending above addr, if any.
  std::optional<VmaInfo> FindVma(uint64_t addr) const;
  // The same lookups for callers that already hold the mmap lock (read or
  // write), e.g. a driver's fault handler between ReadBegin and
  // RangeFault: VmaLookupLocked is the kernel's vma_lookup (the VMA that
  // contains addr, or nothing), FindVmaLocked is find_vma (the first VMA
  // ending above addr). Both return copies; nothing stays referenced.
  // REQUIRES: the mmap lock (read or write).
  std::optional<VmaInfo> VmaLookupLocked(uint64_t addr) const override
      USVM_REQUIRES_SHARED(mmap_lock_);
  std::optional<VmaInfo> FindVmaLocked(uint64_t addr) const override
      USVM_REQUIRES_SHARED(mmap_lock_);
  std::vector<VmaInfo> Vmas() const;
  size_t VmaCount() const;
  PteInfo QueryPte(uint64_t addr) const;

  struct Stats {
    uint64_t faults = 0;        // page faults handled (any kind)
    uint64_t zero_maps = 0;     // read faults served by the zero page
    uint64_t anon_allocs = 0;   // anonymous 4 KiB frames allocated by faults
    uint64_t huge_faults = 0;   // 2 MiB frames mapped by faults
    uint64_t cow_breaks = 0;    // copies made by write faults
    uint64_t cow_reuses = 0;    // write faults that reused an exclusive page
    uint64_t cow_unshares = 0;  // copies made to unshare a page for a read-only pin
    uint64_t thp_splits = 0;    // huge entries split into 4 KiB entries
    uint64_t thp_collapses = 0; // 2 MiB regions collapsed by MADV_COLLAPSE
    uint64_t rss_pages = 0;     // present 4 KiB entries (huge counts 512)
    uint64_t page_table_pages = 0;
  };
  Stats GetStats() const;

  // ---- HMM (hmm.h) --------------------------------------------------------

  // hmm_range_fault. REQUIRES: the mmap lock held for read (or write).
  // EINVAL for a malformed range; see hmm.h for the rest.
  Result<void> RangeFault(HmmRange& range) override USVM_REQUIRES_SHARED(mmap_lock_);

  // migrate_vma_setup / _pages / _finalize (migrate.h). REQUIRES: the mmap
  // lock held for read across all three calls. Setup: EINVAL if the range
  // is empty, unaligned, not inside one VMA, or src/dst/flags are missing;
  // EFAULT after Exit. Every successful Setup must be finalized.
  Result<void> MigrateVmaSetup(MigrateVma& m) override USVM_REQUIRES_SHARED(mmap_lock_);
  void MigrateVmaPages(MigrateVma& m) override USVM_REQUIRES_SHARED(mmap_lock_);
  void MigrateVmaFinalize(MigrateVma& m) override USVM_REQUIRES_SHARED(mmap_lock_);

  // make_device_exclusive: faults the page at addr in for writing and
  // replaces its CPU entry with a device-exclusive entry, so the device
  // `owner` may use it for atomics (EXCLUSIVE notification with owner). A
  // CPU access, or fork, restores the normal entry first (EXCLUSIVE
  // notification, no owner). Returns the frame. REQUIRES: the mmap lock
  // (read). EINVAL: unaligned, or not private anonymous memory; EFAULT /
  // EPERM as for a write fault.
  Result<Pfn> MakeDeviceExclusive(uint64_t addr, const void* owner) USVM_REQUIRES_SHARED(mmap_lock_);

  // pin_user_pages(FOLL_LONGTERM): faults npages pages from addr in (for
  // writing if `write`), migrating device-private pages to system memory
  // first, and pins each frame into out[]. All or nothing. Pinned frames
  // are not migrated and are copied at fork. A read-only pin never pins a
  // page the process may share (gup_must_unshare): a page shared
  // copy-on-write after fork, the zero page or a private file page is
  // copied first (FAULT_FLAG_UNSHARE; the entry stays read-only and a
  // later write reuses the copy), so the pin sees the process's writes.
  // EFAULT as for an access; EINVAL for an unaligned address or zero pages.
  Result<void> PinUserPages(uint64_t addr, uint64_t npages, bool write, Pfn* out);
  void UnpinUserPage(Pfn pfn) { pool_.Unpin(pfn); }

  // get_user_pages (FOLL_GET, short term; takes the mmap read lock, as
  // get_user_pages_unlocked): faults npages pages from addr in as a CPU
  // access would (a write access if `write`, breaking copy-on-write) and
  // takes one page reference on each, into out[]. All or nothing.
  // What out[i] names:
  //   - a system frame (Pfn) with a reference;
  //   - FramePool::kZeroPfn for a read of never-written private anonymous
  //     memory (the shared zero page; no reference is needed);
  //   - a DevicePfn of device-coherent memory, returned where it is with a
  //     reference on the device page (DevicePagemap::Lookup tells them
  //     apart). Device-private pages are faulted home first (the owner's
  //     MigrateToRam), as any CPU access does.
  // Unlike PinUserPages (FOLL_PIN | FOLL_LONGTERM) a reference is not a
  // pin: huge entries stay huge, coherent pages are not moved, fork shares
  // the page copy-on-write (only pinned pages are copied at fork), and a
  // later write fault on a shared copy copies (the extra reference means
  // the page may still be in use). Migration skips writable pages with
  // extra references. Release each with PutUserPage.
  // EFAULT as for an access (no VMA, PROT_NONE, write to a read-only
  // mapping, beyond end of file); ENOMEM; EINVAL for an unaligned address,
  // zero pages, a null out or a range that wraps.
  Result<void> GetUserPages(uint64_t addr, uint64_t npages, bool write, Pfn* out);
  // put_page for a page GetUserPages returned. The zero page, kInvalidPfn,
  // unknown device frames and frames with no reference are ignored.
  void PutUserPage(Pfn pfn);

  // ---- for the layers above --------------------------------------------

  MmuNotifierSubscriptions& notifiers() { return *notifiers_; }

  // ---- the rest of the Mm port (mm.h) -------------------------------------

  Result<void> InsertIntervalNotifier(MmuIntervalNotifier* sub, uint64_t start, uint64_t length,
                                      MmuIntervalNotifierOps* ops) override;
  Result<void> MigrateDevicePfns(DevicePagemap& pgmap, const DevicePfn* pfns, uint64_t n,
                                 uint64_t* src, uint64_t* dst) override;
  void MigrateDevicePages(DevicePagemap& pgmap, uint64_t* src, const uint64_t* dst,
                          uint64_t n) override;
  void MigrateDeviceFinalize(DevicePagemap& pgmap, const uint64_t* src, const uint64_t* dst,
                             uint64_t n) override;
  Result<Pfn> AllocSystemPage() override;
  Result<Pfn> AllocSystemHugePage() override;
  void PutSystemPage(Pfn pfn) override;
  std::byte* SystemPageData(Pfn pfn) const override;

  FramePool& pool() const { return pool_; }
  Env& env() const { return env_; }
  const AddressSpaceConfig& config() const { return config_; }

 private:
  class Impl;
  friend class DeviceMigration;  // migrate_device.cc: device-frame migration
  AddressSpace(FramePool& pool, AddressSpaceConfig config, Env& env);

  FramePool& pool_;
  Env& env_;
  const AddressSpaceConfig config_;
  std::unique_ptr<MmuNotifierSubscriptions> notifiers_;
  // All mutable state; its fields are guarded by mmap_lock_ and the page
  // table locks as documented in src/mm/address_space_impl.h.
  std::unique_ptr<Impl> impl_;
};

}  // namespace usvm::mm

#endif  // USVM_MM_ADDRESS_SPACE_H_
