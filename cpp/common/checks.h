// Argument checks of the ops and C++ modules: one vocabulary, one message format.
//
//   <op>: <argument> must <expectation>, got <actual>
//
// `op` is the op's qualified name ("panther::sketched_linear") or a C++ module's name
// ("SKLinear"). Every check raises c10::Error (RuntimeError in Python), except `defined`, which
// raises c10::TypeError (TypeError), as Python does for a missing argument. A check that is not
// one of the helpers below still uses the format, through PANTHER_CHECK_ARG:
//
//   PANTHER_CHECK_ARG(k >= 1, op, "low_rank", "be >= 1, got ", k);
//
// Shapes print as Python tuples (format.h), symbolic sizes by name, so the Meta kernels (dynamic
// shapes) and the real kernels raise the same text.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/format.h"

// TORCH_CHECK(cond, "<op>: <name> must ", ...): the free-form check of the format above. The
// message is built (by format.h's message(), without iostreams) only when the check fails.
#define PANTHER_CHECK_ARG(cond, op, name, ...) \
  TORCH_CHECK(cond, ::panther::detail::message(op, ": ", name, " must ", __VA_ARGS__))

namespace panther::checks {

using detail::shape_str;

// A named tensor argument, for the checks that take several at once.
struct Arg {
  const char* name;
  const at::Tensor& tensor;
};

// "<op>: <name> must be a tensor, got None" (TypeError): None passed for a Tensor argument
// arrives as an undefined tensor.
inline void defined(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    TORCH_CHECK_TYPE(a.tensor.defined(),
                     ::panther::detail::message(op, ": ", a.name, " must be a tensor, got None"));
}

// "<op>: <name> must be float64, float32, float16 or bfloat16, got <dtype>" (or `what` in place
// of the list).
inline void floating(const char* op, const char* name, const at::Tensor& t,
                     const char* what = "float64, float32, float16 or bfloat16") {
  PANTHER_CHECK_ARG(at::isFloatingType(t.scalar_type()), op, name, "be ", what, ", got ",
                    t.scalar_type());
}

// "<op>: <name> must be <what>, got <dtype>": one dtype exactly.
inline void dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want,
                  const char* what) {
  PANTHER_CHECK_ARG(t.scalar_type() == want, op, name, "be ", what, ", got ", t.scalar_type());
}

// "<op>: <name> must be <n>-d <layout>, got shape <shape>", layout as "(batch, heads, L, D)".
inline void dim(const char* op, const char* name, const at::Tensor& t, int64_t n,
                const char* layout) {
  PANTHER_CHECK_ARG(t.dim() == n, op, name, "be ", n, "-d ", layout, ", got shape ",
                    shape_str(t.sym_sizes()));
}

// "<op>: <name> must have at least <n> dimension(s) <layout>, got a <d>-d tensor".
inline void min_dim(const char* op, const char* name, const at::Tensor& t, int64_t n,
                    const char* layout) {
  PANTHER_CHECK_ARG(t.dim() >= n, op, name, "have at least ", n,
                    n == 1 ? " dimension " : " dimensions ", layout, ", got a ", t.dim(),
                    "-d tensor");
}

// "<op>: <name> must have shape <names> = <sizes>, got <shape>", names as "(num_terms, d_out)".
inline void shape(const char* op, const char* name, const at::Tensor& t,
                  std::initializer_list<int64_t> want, const char* names) {
  const std::vector<int64_t> w(want);
  PANTHER_CHECK_ARG(t.sizes().vec() == w, op, name, "have shape ", names, " = ", shape_str(w),
                    ", got ", shape_str(t.sizes()));
}

// "<op>: <name> must have the <ref_name>'s dtype <dtype>, got <dtype><hint>"; hint, when given,
// says how to fix it (" (cast the input ...)").
inline void same_dtype(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref, const char* hint = "") {
  PANTHER_CHECK_ARG(t.scalar_type() == ref.scalar_type(), op, name, "have the ", ref_name,
                    "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type(), hint);
}

// "<op>: <name> must be on the <ref_name>'s device <device>, got <device>".
inline void same_device(const char* op, const char* name, const at::Tensor& t,
                        const char* ref_name, const at::Tensor& ref) {
  PANTHER_CHECK_ARG(t.device() == ref.device(), op, name, "be on the ", ref_name, "'s device ",
                    ref.device(), ", got ", t.device());
}

// "<op>: <name> must be a positive integer, got <value>".
inline void positive(const char* op, const char* name, int64_t value) {
  PANTHER_CHECK_ARG(value > 0, op, name, "be a positive integer, got ", value);
}

// "<op>: <name> must be "a" or "b", got "c"" (quote: '"' for op arguments, '\'' for module
// options, as Python prints them). Returns the index of the choice that matched.
inline size_t one_of(const char* op, const char* name, c10::string_view value,
                     std::initializer_list<const char*> choices, char quote = '"') {
  size_t i = 0;
  for (const char* c : choices) {
    if (value == c10::string_view(c)) return i;
    ++i;
  }
  std::string list;
  i = 0;
  for (const char* c : choices) {
    if (i) list += (i + 1 == choices.size()) ? " or " : ", ";
    list += quote;
    list += c;
    list += quote;
    ++i;
  }
  PANTHER_CHECK_ARG(false, op, name, "be ", list, ", got ", quote,
                    std::string(value.data(), value.size()), quote);
  return choices.size();  // (not reached)
}

}  // namespace panther::checks
