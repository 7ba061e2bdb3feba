// Small helpers for operator error messages (shared by every op's argument checks).
#pragma once
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/ArrayRef.h>
#include <sstream>
#include <string>

namespace panther::detail {

// "(2, 3)", "(5,)", "()": a shape as Python prints a tuple, for error messages.
inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// The same for symbolic shapes (Meta kernels under dynamic shapes): symbols print by name.
inline std::string shape_str(c10::SymIntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

}  // namespace panther::detail
