#include "usvm/base/error.h"

namespace usvm {

std::string_view ErrcName(Errc code) {
  switch (code) {
    case Errc::kOk: return "OK";
    case Errc::kPerm: return "EPERM";
    case Errc::kNoEnt: return "ENOENT";
    case Errc::kSrch: return "ESRCH";
    case Errc::kIntr: return "EINTR";
    case Errc::kAgain: return "EAGAIN";
    case Errc::kNoMem: return "ENOMEM";
    case Errc::kFault: return "EFAULT";
    case Errc::kBusy: return "EBUSY";
    case Errc::kExist: return "EEXIST";
    case Errc::kInval: return "EINVAL";
    case Errc::kNoSpc: return "ENOSPC";
    case Errc::kRange: return "ERANGE";
    case Errc::kDeadlk: return "EDEADLK";
    case Errc::kNoSys: return "ENOSYS";
    case Errc::kTime: return "ETIME";
    case Errc::kTimedOut: return "ETIMEDOUT";
    case Errc::kCanceled: return "ECANCELED";
    case Errc::kFBig: return "EFBIG";
    case Errc::kIo: return "EIO";
    case Errc::kOverflow: return "EOVERFLOW";
    case Errc::kOpNotSupp: return "EOPNOTSUPP";
    case Errc::kNoDev: return "ENODEV";
    case Errc::kAcces: return "EACCES";
    case Errc::kNoLink: return "ENOLINK";
  }
  return "E?";
}

std::string Error::ToString() const {
  std::string s(ErrcName(code_));
  if (what_ && *what_) {
    s += ": ";
    s += what_;
  }
  return s;
}

}  // namespace usvm
