// Expected<T, E>: a value or an error, for the sim layer's errors that are
// not errno-like (a parse error with file/line/field; a one-line reason).
// A small class rather than std::expected because clang 14 -- the
// thread-safety analysis build -- cannot compile libstdc++'s <expected>
// (see usvm/base/result.h). Interface: has_value(), operator bool,
// operator*, operator->, value(), error(), value_or(); construction from a
// value, or from MakeUnexpected(error).
#ifndef USVM_SIM_EXPECTED_H_
#define USVM_SIM_EXPECTED_H_

#include <cstdlib>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

namespace usvm::sim {

template <typename E>
struct Unexpected {
  E error;
};

template <typename E>
Unexpected<std::decay_t<E>> MakeUnexpected(E&& e) {
  return {std::forward<E>(e)};
}

template <typename T, typename E>
class [[nodiscard]] Expected {
 public:
  template <typename U = T>
    requires std::is_constructible_v<T, U&&> && (!std::is_same_v<std::remove_cvref_t<U>, Expected>)
  Expected(U&& v) : v_(std::in_place_index<0>, std::forward<U>(v)) {}
  template <typename G>
  Expected(Unexpected<G> u) : v_(std::in_place_index<1>, std::move(u.error)) {}

  bool has_value() const { return v_.index() == 0; }
  explicit operator bool() const { return has_value(); }
  T& operator*() & { return std::get<0>(v_); }
  const T& operator*() const& { return std::get<0>(v_); }
  T&& operator*() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  T& value() & { return Check(), std::get<0>(v_); }
  const T& value() const& { return Check(), std::get<0>(v_); }
  T value_or(T other) const& { return has_value() ? std::get<0>(v_) : std::move(other); }
  E& error() { return std::get<1>(v_); }
  const E& error() const { return std::get<1>(v_); }

 private:
  void Check() const {
    if (!has_value()) std::abort();
  }
  std::variant<T, E> v_;
};

template <typename E>
class [[nodiscard]] Expected<void, E> {
 public:
  Expected() = default;
  template <typename G>
  Expected(Unexpected<G> u) : e_(std::move(u.error)) {}

  bool has_value() const { return !e_.has_value(); }
  explicit operator bool() const { return has_value(); }
  E& error() { return *e_; }
  const E& error() const { return *e_; }

 private:
  std::optional<E> e_;
};

}  // namespace usvm::sim

#endif  // USVM_SIM_EXPECTED_H_
