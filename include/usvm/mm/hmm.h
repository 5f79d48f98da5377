// HMM range fault: how a mirror (GPU) learns the page frames behind a
// range of the CPU address space (mm/hmm.c, hmm_range_fault).
//
// Each page of the range has one 64-bit word in `hmm_pfns`:
//   bit 63 kPfnValid, bit 62 kPfnWrite, bit 61 kPfnError,
//   bits 56..60 the order of the CPU mapping (0 for 4 KiB, 9 for 2 MiB),
//   bit 55 kPfnDevice: the frame is a DevicePfn (a device-private page of
//   dev_private_owner, reported without faulting, or a page of
//   device-coherent memory),
//   bits 0..54 the frame number.
// On input the words say what the caller needs: kPfnReqFault (fault the
// page in if absent) and kPfnReqWrite (with kPfnReqFault: it must be
// writable), computed per page as `default_flags | (word & pfn_flags_mask)`.
// Without kPfnReqFault the call is a snapshot, whatever kPfnReqWrite says
// (hmm_pte_need_fault): absent pages read as 0, pages that can never be
// mapped (holes, PROT_NONE) as kPfnError.
//
// Errors: EINVAL if the notifier is not inserted in this address space;
// EFAULT if a fault was requested on a hole, a PROT_NONE mapping or
// a page beyond the end of a file; EPERM if a write was requested on a
// read-only mapping; EBUSY if the notifier sequence moved (an invalidation
// ran): the caller starts again from ReadBegin. ENOMEM when faulting could
// not allocate. Output words filled before an error are kept.
//
// The usual caller loop is RangeFaultAndCommit below.
#ifndef USVM_MM_HMM_H_
#define USVM_MM_HMM_H_

#include <cstdint>
#include <functional>

#include "usvm/base/result.h"
#include "usvm/mm/types.h"

namespace usvm::mm {

class AddressSpace;
class MmuIntervalNotifier;

inline constexpr uint64_t kPfnValid = uint64_t{1} << 63;
inline constexpr uint64_t kPfnWrite = uint64_t{1} << 62;
inline constexpr uint64_t kPfnError = uint64_t{1} << 61;
inline constexpr unsigned kPfnOrderShift = 56;
inline constexpr uint64_t kPfnOrderMask = uint64_t{0x1f} << kPfnOrderShift;
inline constexpr uint64_t kPfnDevice = uint64_t{1} << 55;
inline constexpr uint64_t kPfnFlags = kPfnValid | kPfnWrite | kPfnError | kPfnOrderMask | kPfnDevice;
// Input requests share the bits of the outputs they ask for.
inline constexpr uint64_t kPfnReqFault = kPfnValid;
inline constexpr uint64_t kPfnReqWrite = kPfnWrite;

inline constexpr Pfn HmmPfn(uint64_t word) { return word & ~kPfnFlags; }
inline constexpr unsigned HmmOrder(uint64_t word) {
  return static_cast<unsigned>((word & kPfnOrderMask) >> kPfnOrderShift);
}

// struct hmm_range.
struct HmmRange {
  MmuIntervalNotifier* notifier = nullptr;  // must cover [start, end)
  uint64_t notifier_seq = 0;                // from notifier->ReadBegin()
  uint64_t start = 0;                       // page aligned
  uint64_t end = 0;                         // page aligned, exclusive
  uint64_t* hmm_pfns = nullptr;             // (end - start) / 4096 words
  uint64_t default_flags = 0;
  uint64_t pfn_flags_mask = 0;
  // Device-private pages of this owner are reported (kPfnDevice) rather
  // than faulted, as they are: a read-only one (e.g. shared after fork)
  // comes without kPfnWrite even under kPfnReqWrite, and the driver
  // decides. Any other device-private page is faulted (migrated to RAM by
  // its owner) when a fault is requested, and reads as 0 otherwise.
  const void* dev_private_owner = nullptr;
};

// The standard caller loop: ReadBegin -> RangeFault under the mmap read
// lock -> commit. `commit` takes the driver lock itself, checks
// notifier->ReadRetry(range.notifier_seq) under it, and returns true once
// it has programmed the device, false to start again. Gives up with ETIME
// after `timeout_ns` of env time (the kernel's HMM_RANGE_DEFAULT_TIMEOUT
// is 1 s). Other errors of RangeFault and of commit are returned as is.
Result<void> RangeFaultAndCommit(AddressSpace& as, HmmRange& range,
                                 const std::function<Result<bool>(HmmRange&)>& commit,
                                 uint64_t timeout_ns = 1'000'000'000);

}  // namespace usvm::mm

#endif  // USVM_MM_HMM_H_
