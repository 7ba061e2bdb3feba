// Schemas of the sketched linear ops (sketched_linear and its private training pair). The
// namespace itself is declared once, in cpp/library.cpp; every family adds its ops with a fragment.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(panther, m) {
  // y = 1/(2L) * sum_i (x S1s[i] U1s[i] + x U2s[i] S2s[i]) + bias
  // input (..., d_in), S1s (L, d_in, k), S2s (L, k, d_out), U1s (L, k, d_out), U2s (L, d_in, k),
  // bias (d_out) or None. Differentiable in every tensor argument.
  m.def("sketched_linear(Tensor input, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias) -> Tensor");
  // Forward for training: also returns the (tokens x 2Lk) intermediate that backward reuses
  // ("saved"): T = x [S1 | U2] / (2L) in the input dtype, followed by 8 columns [1, 0, .., 0]
  // (N, 2Lk + 8), whose column of ones yields the bias gradient in the same GEMM as dB.
  m.def("_sketched_linear_forward(Tensor input, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias) -> (Tensor, Tensor)");
  // Gradients of sketched_linear for (input, S1s, S2s, U1s, U2s, bias); None where the mask is false.
  m.def("_sketched_linear_backward(Tensor grad_output, Tensor input, Tensor saved, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, bool[6] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}
