// Error: an errno-like code with an optional static message.
//
// Every fallible public call in usvm returns Result<T> (result.h) whose
// error side is an Error. Codes mirror the Linux errno values the kernel
// returns for the same situation, so a kernel engineer can read them as
// such: EINVAL for bad arguments, EFAULT for a bad address (the SIGSEGV of
// this world), ENOMEM when there is no room, EAGAIN/EBUSY for "retry", ...
//
// Error is trivially copyable and two words wide: the message is a pointer
// to a string with static storage duration (a literal), so returning an
// error on a hot retry path costs nothing.
#ifndef USVM_BASE_ERROR_H_
#define USVM_BASE_ERROR_H_

#include <cerrno>
#include <string>
#include <string_view>

namespace usvm {

enum class Errc : int {
  kOk = 0,
  kPerm = EPERM,
  kNoEnt = ENOENT,
  kSrch = ESRCH,
  kIntr = EINTR,
  kAgain = EAGAIN,
  kNoMem = ENOMEM,
  kFault = EFAULT,
  kBusy = EBUSY,
  kExist = EEXIST,
  kInval = EINVAL,
  kNoSpc = ENOSPC,
  kRange = ERANGE,
  kDeadlk = EDEADLK,
  kNoSys = ENOSYS,
  kTime = ETIME,
  kTimedOut = ETIMEDOUT,
  kCanceled = ECANCELED,
  kFBig = EFBIG,
  kIo = EIO,
  kOverflow = EOVERFLOW,
  kOpNotSupp = EOPNOTSUPP,
  kNoDev = ENODEV,
  kAcces = EACCES,
  kNoLink = ENOLINK,
};

class Error {
 public:
  constexpr Error(Errc code, const char* what = nullptr) : code_(code), what_(what) {}

  constexpr Errc code() const { return code_; }
  // The errno value, e.g. EINVAL.
  constexpr int errnum() const { return static_cast<int>(code_); }
  // The static message, or "" if none was given.
  constexpr const char* what() const { return what_ ? what_ : ""; }

  // "EINVAL: length is zero" (or just "EINVAL").
  std::string ToString() const;

  friend constexpr bool operator==(const Error& a, const Error& b) { return a.code_ == b.code_; }
  friend constexpr bool operator==(const Error& a, Errc c) { return a.code_ == c; }

 private:
  Errc code_;
  const char* what_;
};

// "EINVAL", "EFAULT", ...; "E?" for an unknown code.
std::string_view ErrcName(Errc code);

}  // namespace usvm

#endif  // USVM_BASE_ERROR_H_
