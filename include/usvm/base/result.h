// Result<T>: std::expected<T, Error>, with USVM_TRY for propagation.
//
//   Result<Pfn> AllocPage();
//   Result<void> Map(...) {
//     Pfn pfn = USVM_TRY(AllocPage());   // returns the error to our caller
//     ...
//     return {};
//   }
//   return Err(Errc::kInval, "length is zero");
//
// g++ 12 provides std::expected in C++23. clang 14 (used only for the
// thread-safety analysis build) cannot compile libstdc++'s <expected>, so
// under that compiler Result is a small class with the same interface
// subset. Code must only use that subset: has_value(), operator bool,
// value(), error(), operator*, operator->, value_or().
#ifndef USVM_BASE_RESULT_H_
#define USVM_BASE_RESULT_H_

#include <type_traits>
#include <utility>
#include <version>

#include "usvm/base/error.h"

#if defined(__cpp_lib_expected) && __cpp_lib_expected >= 202202L
#include <expected>
#define USVM_HAVE_STD_EXPECTED 1
#else
#include <cstdlib>
#include <new>
#define USVM_HAVE_STD_EXPECTED 0
#endif

namespace usvm {

#if USVM_HAVE_STD_EXPECTED

template <typename T>
using Result = std::expected<T, Error>;
using Unexpected = std::unexpected<Error>;

#else

struct Unexpected {
  constexpr explicit Unexpected(Error e) : err(e) {}
  constexpr const Error& error() const { return err; }
  Error err;
};

// Minimal stand-in for std::expected<T, Error> (see the file comment).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result() requires std::is_default_constructible_v<T> : ok_(true) { new (&val_) T(); }
  template <typename U = T>
    requires std::is_constructible_v<T, U&&> &&
             (!std::is_same_v<std::remove_cvref_t<U>, Result>) &&
             (!std::is_same_v<std::remove_cvref_t<U>, Unexpected>)
  Result(U&& v) : ok_(true) { new (&val_) T(std::forward<U>(v)); }
  Result(Unexpected u) : ok_(false), err_(u.err) {}
  Result(const Result& o) : ok_(o.ok_) {
    if (ok_) new (&val_) T(o.val_); else err_ = o.err_;
  }
  Result(Result&& o) : ok_(o.ok_) {
    if (ok_) new (&val_) T(std::move(o.val_)); else err_ = o.err_;
  }
  Result& operator=(Result o) {
    this->~Result();
    new (this) Result(std::move(o));
    return *this;
  }
  ~Result() { if (ok_) val_.~T(); }

  bool has_value() const { return ok_; }
  explicit operator bool() const { return ok_; }
  T& value() & { Check(); return val_; }
  const T& value() const& { Check(); return val_; }
  T&& value() && { Check(); return std::move(val_); }
  T& operator*() & { return val_; }
  const T& operator*() const& { return val_; }
  T&& operator*() && { return std::move(val_); }
  T* operator->() { return &val_; }
  const T* operator->() const { return &val_; }
  const Error& error() const { return err_; }
  template <typename U>
  T value_or(U&& d) const& { return ok_ ? val_ : static_cast<T>(std::forward<U>(d)); }

 private:
  void Check() const { if (!ok_) std::abort(); }
  bool ok_;
  union { T val_; Error err_; };
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() : ok_(true), err_(Errc::kOk) {}
  Result(Unexpected u) : ok_(false), err_(u.err) {}
  bool has_value() const { return ok_; }
  explicit operator bool() const { return ok_; }
  void value() const { if (!ok_) std::abort(); }
  void operator*() const {}
  const Error& error() const { return err_; }

 private:
  bool ok_;
  Error err_;
};

#endif

// Builds the error side of a Result: `return Err(Errc::kInval, "why");`
inline Unexpected Err(Errc code, const char* what = nullptr) { return Unexpected(Error(code, what)); }
inline Unexpected Err(const Error& e) { return Unexpected(e); }

namespace detail {
template <typename T>
inline T&& TryValue(Result<T>&& r) { return std::move(*r); }
inline void TryValue(Result<void>&&) {}
}  // namespace detail

}  // namespace usvm

// Evaluates `expr` (a Result); on error returns that error from the calling
// function (which must return some Result<U>); else yields the value.
#define USVM_TRY(expr)                                        \
  ({                                                          \
    auto usvm_try_r_ = (expr);                                \
    if (!usvm_try_r_.has_value()) [[unlikely]]                \
      return ::usvm::Err(usvm_try_r_.error());                \
    ::usvm::detail::TryValue(std::move(usvm_try_r_));         \
  })

#endif  // USVM_BASE_RESULT_H_
