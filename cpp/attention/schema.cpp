// Schemas of the FAVOR+ random-feature attention ops (favor_attention, its private
// forward/backward pair, RandMultiHeadAttention's fused self-attention forward and its in-place
// decoding steps). The
// namespace itself is declared once, in cpp/library.cpp; every family adds its ops with a fragment.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(panther, m) {
  // query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv), projection (M, D) shared by the
  // heads; kernel_fn "softmax" or "relu"; causal needs Lq == Lk; key_padding_mask (B, Lk) bool,
  // True = padded key (removed from numerator and denominator). Returns (B, H, Lq, Dv) in the
  // query's dtype, laid out as (B, Lq, H, Dv) in memory. Non-causal O(L M D); causal chunked,
  // time and memory linear in length.
  // The argument is named kernel_fn, never `kernel`: inductor lowers custom ops with
  // FallbackKernel.create(kernel, *args, **kwargs), so an op argument called `kernel` breaks
  // torch.compile and AOTInductor ("got multiple values for argument 'kernel'").
  m.def("favor_attention(Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn=\"softmax\", bool causal=False, Tensor? key_padding_mask=None) -> Tensor");
  // favor_attention's output plus what the backward can reuse instead of recomputing (used by
  // its autograd kernel for CUDA bf16 calls): one byte tensor laid out as favor_saved_layout
  // (cpp/attention/impl.h) says, empty for shapes the fused kernels do not take. Filled by
  // the fused CUDA kernels (the autograd kernel calls this op only for calls they take; called
  // elsewhere, the tensor is allocated but not filled). CUDA and Meta kernels only.
  m.def("_favor_attention_forward(Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn, bool causal, Tensor? key_padding_mask) -> (Tensor, Tensor)");
  // Gradients of favor_attention for (query, key, value, projection); None where the mask is
  // false. Recomputes features and per-chunk states from the inputs; the fused CUDA kernels take
  // the stabilisers and the total or boundary states from `saved` (_favor_attention_forward's
  // second output for the same inputs) when it is given, and every other backend ignores it.
  m.def("_favor_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn, bool causal, Tensor? key_padding_mask, bool[4] output_mask, Tensor? saved=None) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
  // RandMultiHeadAttention's forward for self-attention (x as query, key and value), used by
  // the module's eager inference path: q/k/v projections (one GEMM over the per-call
  // concatenation of Wq, Wk, Wv when no gradient is recorded), favor_attention, output
  // projection. A composition of
  // at::linear and favor_attention (CompositeImplicitAutograd). x (B, L, E) -> (B, L, E).
  // One causal decoding position against a running state, in place (RandMultiHeadAttention.step_
  // on CUDA: one fused kernel instead of a few dozen small ones; the math of
  // panther._favor_math.decode_step). query, key (..., D), value (..., Dv), projection (M, D);
  // state kv (..., M, Dv+1), v_sum (..., Dv+1), stabiliser (...); all float32 or float64, one
  // dtype and device. The new key joins the state (softmax: stabiliser rises to the key's max
  // pre-activation and kv is rescaled), then the query reads it. Returns out (..., Dv); kv, v_sum
  // and stabiliser are updated; length (a 0-d int64 tensor, the positions the state holds), when
  // given, is incremented by the same kernel (the decoding loop then needs no launch of its own
  // for it). Inference only: no autograd kernel, so tensors that require grad under grad mode are
  // an error.
  m.def("_favor_decode_step_(Tensor query, Tensor key, Tensor value, Tensor projection, str kernel_fn, Tensor(a!) kv, Tensor(b!) v_sum, Tensor(c!) stabiliser, Tensor(d!)? length=None) -> Tensor");
  // The decoding step of a causal self-attention layer (RandMultiHeadAttention.step_): x (B, E) in
  // the layer's dtype; q = x w_q^T + b_q (B, H D), k = x w_k^T + b_k (B, H D), v = x w_v^T + b_v
  // (B, H Dv) (head-major), with H and Dv from kv (B, H, M, Dv + 1) and D from the projection
  // (M, D); then _favor_decode_step_'s update of the state (same arguments, same rules) and its
  // readout ctx (B, H Dv); returns ctx w_out^T + b_out (B, E_out) in x's dtype. On CUDA (compute
  // capability 9.0+) the projections and the step are one kernel (a thread block cluster per
  // head), the output projection a second one. Inference only, as _favor_decode_step_.
  m.def("_favor_decode_layer_(Tensor x, Tensor w_q, Tensor w_k, Tensor w_v, Tensor? b_q, Tensor? b_k, Tensor? b_v, Tensor projection, str kernel_fn, Tensor w_out, Tensor? b_out, Tensor(a!) kv, Tensor(b!) v_sum, Tensor(c!) stabiliser, Tensor(d!)? length=None) -> Tensor");
  m.def("_rand_mha_self_attention(Tensor x, Tensor Wq, Tensor Wk, Tensor Wv, Tensor? bq, Tensor? bk, Tensor? bv, Tensor W0, Tensor? b0, Tensor projection, int num_heads, str kernel_fn, bool causal, Tensor? key_padding_mask) -> Tensor");
}
