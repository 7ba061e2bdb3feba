// Device-independent pieces of the sketched linear op (argument checks, packing the sketches
// into the two GEMM operands, the exact-precision forward/backward written with ATen GEMMs).
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <tuple>

namespace panther::detail {

struct SketchDims {
  int64_t L, k, d_in, d_out, N;
};

// Validates shapes, dtypes and devices; errors name the op, the argument, expected and got.
SketchDims check_sketched_linear(const char* op, const at::Tensor& input, const at::Tensor& S1s,
                                 const at::Tensor& S2s, const at::Tensor& U1s,
                                 const at::Tensor& U2s, const std::optional<at::Tensor>& bias);

// The backward's own arguments, for a call whose tensors passed check_sketched_linear (sizes
// compared as SymInts, so the Meta kernel runs it under dynamic shapes too): grad_output (..., d_out) with the input's leading dims, saved
// (N, 2Lk + kSavedPad), both of the input's dtype and device. Autograd always passes them right;
// a direct call of the private op gets an error instead of gradients of the wrong rows.
void check_sketched_linear_backward(const char* op, const at::Tensor& grad_output,
                                    const at::Tensor& saved, const at::Tensor& input,
                                    const SketchDims& d);

// Output shape (..., d_out) for an input (..., d_in).
std::vector<int64_t> sketched_output_shape(const at::Tensor& input, int64_t d_out);

// The saved intermediate carries kSavedPad extra columns [1, 0, ..., 0]: the GEMM that forms the
// gradient of B against it then also yields the bias gradient (the row of ones sums the output
// gradient) in the same pass over grad_output, instead of a separate reduction.
constexpr int64_t kSavedPad = 8;

// The saved intermediate is (N, 2Lk + kSavedPad) in the input dtype on every device (the Meta
// kernel cannot know the device): fp16/bf16 keep T rounded to the input dtype, which the
// backward's GEMMs read as the dense layer's backward reads its input.
inline int64_t saved_cols(int64_t Lk) { return 2 * Lk + kSavedPad; }

inline bool is_low_precision(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// A = [S1_1 .. S1_L | U2_1 .. U2_L]  (d_in, 2Lk)
at::Tensor pack_A(const at::Tensor& S1s, const at::Tensor& U2s);
// B = [U1_1; ..; U1_L; S2_1; ..; S2_L]  (2Lk, d_out)
at::Tensor pack_B(const at::Tensor& U1s, const at::Tensor& S2s);

// The two-GEMM forward into a given saved buffer (N, 2Lk + kSavedPad) of A's dtype: writes its
// first 2Lk columns (x A / (2L)), leaves the pad columns alone and returns y.
at::Tensor forward_exact_into(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                              const std::optional<at::Tensor>& bias, double scale,
                              const at::Tensor& saved);

// The same forward in the operands' dtype (any device), allocating the buffer: returns
// (y2d, saved) with saved = [x A / (2L) | 1 | 0...] of shape (N, 2Lk + kSavedPad); without
// want_saved the pad columns are left unwritten (inference never reads them).
std::tuple<at::Tensor, at::Tensor> forward_exact(const at::Tensor& x2, const at::Tensor& A,
                                                 const at::Tensor& B,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, bool want_saved = true);

using Grads6 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The gradients mask asks for, in the order (input, S1s, S2s, U1s, U2s, bias); nullopt elsewhere.
inline Grads6 select_grads(const std::array<bool, 6>& mask, const std::array<at::Tensor, 6>& g) {
  Grads6 out;
  if (mask[0]) std::get<0>(out) = g[0];
  if (mask[1]) std::get<1>(out) = g[1];
  if (mask[2]) std::get<2>(out) = g[2];
  if (mask[3]) std::get<3>(out) = g[3];
  if (mask[4]) std::get<4>(out) = g[4];
  if (mask[5]) std::get<5>(out) = g[5];
  return out;
}

// The gradients mask asks for, each GEMM reading only the columns / rows it needs, in the per-term
// layouts and the dtype `dtype` (x: the input's shape). saved: (N, 2Lk + kSavedPad) as returned
// by forward_exact; A, B as packed by pack_A / pack_B (any dtype the GEMMs run in). A caller that
// formed dT = s G B^T (N, 2Lk) itself passes it as gT (and dx = dT A^T, if mask[0], as dx); A and
// B are then not read and may be undefined.
Grads6 backward_exact(const at::Tensor& G2, const at::Tensor& x2, const at::Tensor& saved,
                      const at::Tensor& A, const at::Tensor& B, double scale, const SketchDims& d,
                      at::IntArrayRef input_sizes, at::ScalarType dtype,
                      const std::array<bool, 6>& mask, const at::Tensor& gT = at::Tensor(),
                      const at::Tensor& dx = at::Tensor());

}  // namespace panther::detail
