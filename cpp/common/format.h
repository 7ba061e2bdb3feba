// Small helpers for operator error messages (shared by every op's argument checks).
//
// Messages are assembled with std::string and std::to_string / snprintf, never through an
// iostream: a library built against another libstdc++ than the one loaded into the process
// (e.g. a toolchain that links parts of it statically) can carry its own copy of the iostream
// number formatting whose locale facets do not match the process's, and then crashes in the
// one place that formats a number, the error path. Strings are safe either way.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace panther::detail {

inline std::string to_text(const c10::SymInt& s) {
  if (auto v = s.maybe_as_int()) return std::to_string(*v);
  return s.toSymNodeImplUnowned()->str();  // a symbolic size, by name
}

// Appends one message piece: text, numbers, dtypes, devices, symbolic sizes.
inline void append(std::string& out, const char* v) { out += v; }
inline void append(std::string& out, const std::string& v) { out += v; }
inline void append(std::string& out, c10::string_view v) { out.append(v.data(), v.size()); }
inline void append(std::string& out, char v) { out += v; }
inline void append(std::string& out, bool v) { out += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                        !std::is_same_v<T, char>,
                                    int> = 0>
inline void append(std::string& out, T v) {
  out += std::to_string(v);
}
inline void append(std::string& out, double v) {  // as an iostream prints it (%g)
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  out += buf;
}
inline void append(std::string& out, at::ScalarType v) { out += c10::toString(v); }
inline void append(std::string& out, const c10::Device& v) { out += v.str(); }
inline void append(std::string& out, const c10::SymInt& v) { out += to_text(v); }

// The pieces concatenated: message("got ", 3, "-d") == "got 3-d".
template <class... Ts>
std::string message(const Ts&... pieces) {
  std::string out;
  (append(out, pieces), ...);
  return out;
}

// "(2, 3)", "(5,)", "()": a shape as Python prints a tuple, for error messages. Symbolic sizes
// (Meta kernels under dynamic shapes) print by name.
template <class T>
std::string shape_str_of(c10::ArrayRef<T> s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    append(out, s[i]);
  }
  out += s.size() == 1 ? ",)" : ")";
  return out;
}
inline std::string shape_str(c10::IntArrayRef s) { return shape_str_of(s); }
inline std::string shape_str(c10::SymIntArrayRef s) { return shape_str_of(s); }

}  // namespace panther::detail
