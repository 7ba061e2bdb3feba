// Registers every schema of the panther operator library: TORCH_LIBRARY(panther, m).
// Kernels live in cpu/, cuda/, meta/, autograd/ and autocast/, one file per op and backend.
#include <torch/library.h>

TORCH_LIBRARY(panther, m) {
  // ---- sketched linear -------------------------------------------------------------------
  // y = 1/(2L) * sum_i (x S1s[i] U1s[i] + x U2s[i] S2s[i]) + bias
  // input (..., d_in), S1s (L, d_in, k), S2s (L, k, d_out), U1s (L, k, d_out), U2s (L, d_in, k),
  // bias (d_out) or None. Differentiable in every tensor argument.
  m.def("sketched_linear(Tensor input, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias) -> Tensor");
  // Forward for training: also returns the (tokens x 2Lk) intermediate that backward reuses, in a
  // compact form ("saved"): for fp32/fp64 it is T = x [S1 | U2] / (2L) of shape (N, 2Lk); for
  // fp16/bf16 it is T split as [hi | lo] (N, 4Lk) in the input dtype, hi + lo = T to ~fp32.
  m.def("_sketched_linear_fwd(Tensor input, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias) -> (Tensor, Tensor)");
  // Gradients of sketched_linear for (input, S1s, S2s, U1s, U2s, bias); None where the mask is false.
  m.def("_sketched_linear_backward(Tensor grad_output, Tensor input, Tensor saved, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, bool[6] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // ---- FAVOR+ random-feature attention ----------------------------------------------------
  // query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv), projection (M, D) shared by the
  // heads; kernel "softmax" or "relu"; causal needs Lq == Lk; key_padding_mask (B, Lk) bool,
  // True = padded key (removed from numerator and denominator). Returns (B, H, Lq, Dv) in the
  // query's dtype, laid out as (B, Lq, H, Dv) in memory. Non-causal O(L M D); causal chunked,
  // time and memory linear in length.
  // The argument is named kernel_fn, never `kernel`: inductor lowers custom ops with
  // FallbackKernel.create(kernel, *args, **kwargs), so an op argument called `kernel` breaks
  // torch.compile and AOTInductor ("got multiple values for argument 'kernel'").
  m.def("favor_attention(Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn=\"softmax\", bool causal=False, Tensor? key_padding_mask=None) -> Tensor");
  // favor_attention's output plus what the backward can reuse instead of recomputing (used by
  // its autograd kernel for CUDA bf16 calls): one byte tensor laid out as favor_saved_layout
  // (kernels/favor_attention.h) says, empty for shapes the fused kernels do not take. Filled by
  // the fused CUDA kernels (the autograd kernel calls this op only for calls they take; called
  // elsewhere, the tensor is allocated but not filled). CUDA and Meta kernels only.
  m.def("_favor_attention_forward(Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn, bool causal, Tensor? key_padding_mask) -> (Tensor, Tensor)");
  // Gradients of favor_attention for (query, key, value, projection); None where the mask is
  // false. Recomputes features and per-chunk states from the inputs; the fused CUDA kernels take
  // the scanned states and stabilisers from `saved` (_favor_attention_forward's second output
  // for the same inputs) when it is given, and every other backend ignores it.
  m.def("_favor_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn, bool causal, Tensor? key_padding_mask, bool[4] output_mask, Tensor? saved=None) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
  // RandMultiHeadAttention's forward for self-attention (x as query, key and value), used by
  // the module's eager inference path: q/k/v projections (one GEMM over the per-call
  // concatenation of Wq, Wk, Wv when no gradient is recorded), favor_attention, output projection. A composition of
  // at::linear and favor_attention (CompositeImplicitAutograd). x (B, L, E) -> (B, L, E).
  m.def("_rand_mha_self_attention(Tensor x, Tensor Wq, Tensor Wk, Tensor Wv, Tensor? bq, Tensor? bk, Tensor? bv, Tensor W0, Tensor? b0, Tensor projection, int num_heads, str kernel_fn, bool causal, Tensor? key_padding_mask) -> Tensor");
}
