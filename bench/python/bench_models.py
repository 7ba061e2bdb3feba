#!/usr/bin/env python3
"""Panther's layers inside whole transformer models: SKLinear everywhere, and long-context attention.

One pre-norm transformer block class (``Block``) with flags builds every model here:
  x = x + out(attention(LayerNorm(x)));  x = x + fc2(GELU(fc1(LayerNorm(x))))
with separate (q, k, v) or one fused qkv ``nn.Linear``, exact attention through
``F.scaled_dot_product_attention`` (``is_causal`` for decoders; PyTorch picks flash /
memory-efficient kernels) or ``pr.nn.RandMultiHeadAttention`` (FAVOR+, softmax kernel, its own
q/k/v/out projections), a final LayerNorm, no embedding or vocabulary head (except the copy task).

Part "linear" (SKLinear inside models)
  Models: BERT-base-shaped encoder (12 layers, d=768, 12 heads, FFN 3072, separate q/k/v, not
  causal, batch 32 x 512 tokens) and GPT-2-small-shaped decoder (12 layers, d=768, 12 heads,
  FFN 3072, fused qkv, causal, batch 16 x 1024 tokens).
  Variants, all from the same dense initialisation (seed 0):
    dense                  nn.Linear everywhere;
    SK L=a k=b             every nn.Linear replaced by ``pr.nn.SKLinear.from_linear(lin, a, b)``,
                           for (L, k) in (1, 32), (1, 64), (2, 64);
    zero-cost Linear       the bound: every nn.Linear replaced by a stand-in that costs ~nothing.
                           Its forward returns a view of a preallocated tensor of the right shape
                           (batch, seq, d_out) (shared by the stand-ins of one width; no kernel);
                           its backward returns a zero scalar expanded to the input's shape (one
                           tiny fill). It has no parameters, so the optimizer steps only the
                           LayerNorms. Everything else (LayerNorms, attention, GELU, residuals,
                           optimizer) runs as in the dense model, so dense time / bound time is
                           the most any Linear replacement can win. (Under torch.compile the
                           compiler may also drop the LayerNorm whose output only feeds a
                           stand-in, so the compiled bound is slightly looser.)
  Modes: eager and torch.compile (each block compiled on its own, ``fullgraph=True``, the
  default inductor mode; a failing fullgraph compile, e.g. a graph break, is reported in the
  note and that variant recompiled without fullgraph; --compile-scope model compiles the whole
  stack instead; compiled rows are dense, SK L=1 k=64 and the bound unless --compile-all);
  bf16 parameters; plus one row pair with fp32 parameters and bf16 autocast (dense vs SK L=1
  k=64, eager), where autocast casts the weights or sketches on every call; and (CUDA) "CUDA
  graph": dense, SK L=1 k=64 and the bound, eager modules with the inference forward and the
  whole training step (forward, backward, AdamW with capturable=True) each captured once in a
  CUDA graph and replayed, which takes the host's launch time out of both sides (what
  ``torch.compile(mode="reduce-overhead")`` or a hand-captured step gives); no peak memory there
  (a replay allocates nothing: its memory lives in the graph's pool).
  Order (so a time budget cuts the least important rows): eager, compiled, CUDA graph, autocast;
  encoder first.
  Measured: inference = forward under torch.no_grad(); training step = zero_grad(set_to_none),
  forward, backward with a fixed random output gradient, AdamW step (torch defaults, lr 1e-5);
  peak training memory = the model's own parameters, gradients, buffers and optimizer state
  plus the peak extra memory of one training step (torch.cuda.max_memory_allocated minus what
  was allocated before the step; the shared input batch is not counted); n/a on CPU.

Part "attention" (long-context training)
  GPT-2-small-shaped decoder (12 layers, d=768, 12 heads x 64, FFN 3072) at 4096, 16384 and
  65536 tokens, batch 1, bf16: exact attention (fused qkv nn.Linear + flash SDPA is_causal + out
  nn.Linear) vs ``RandMultiHeadAttention(d, heads, 256, iscausal=True)``; training step time
  and peak training memory as above. Rows at head_dim 128 (LLaMA-like width): d=2048, 16 heads
  x 128, FFN 8192, 12 layers, same lengths.
  Copy/recall task at 4096 tokens (reported, not judged): vocabulary 64, each sequence is 2048
  random tokens followed by the same 2048 tokens; next-token cross-entropy on the second half
  (the recall part; chance = ln 64 = 4.16). Model: token + learned position embedding, the
  12 x 64 decoder (exact or RandMultiHeadAttention), a linear readout; fp32 parameters, bf16
  autocast (CUDA), AdamW lr 3e-4, batch 1, a fixed number of steps; data from a seeded
  generator, the same sequences for both models; reported: the mean training loss of the last
  10 steps and the loss on 4 held-out sequences.

Part "decode" (autoregressive decoding)
  One decode step of 12 layers' attention (the 12 x 64 width, batch 1) with 65536 tokens of
  context: exact attention with a KV cache of that length (per layer: fused qkv nn.Linear, the new
  key and value written into a preallocated cache, ``F.scaled_dot_product_attention`` of the one
  query over the whole cache, out nn.Linear) vs ``RandMultiHeadAttention.step_`` on the state left
  by ``prefill`` of the context (constant size). Eager, and (CUDA) each step captured once in a
  CUDA graph and replayed; with compiling on (not --quick), also the step of all layers
  ``torch.compile``'d (fullgraph, default inductor mode) and then captured in a CUDA graph. Memory per layer: the KV cache's bytes vs the decoding state's bytes
  (also checked to be the same after a 16-token prefill: independent of the context length).

Timing: common.time_fns (CUDA events, or perf_counter on CPU), the variants of one group measured
round-robin, median of >= 3 rounds after warm-up. Each variant first runs once on its own (that
call also compiles), so a variant that runs out of memory prints "OOM" and the others go on.

Usage:
  python bench/python/bench_models.py --device cuda                      # everything (budget 540 s)
  python bench/python/bench_models.py --device cuda --which linear       # SKLinear part only
  python bench/python/bench_models.py --device cuda --which attention    # long-context part only
  python bench/python/bench_models.py --device cuda --which decode       # decode-step part only
  python bench/python/bench_models.py --device cuda --quick              # < 90 s subset, eager
  python bench/python/bench_models.py --device cpu --smoke               # tiny sizes, seconds
Options: --compile/--no-compile  --compile-scope block|model  --budget-s S  --json PATH
         --markdown PATH  --models encoder,decoder  --lengths 4096,16384  --task-steps N
         --decode-context N
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import panther as pr  # noqa: E402

# ----------------------------------------------------------------------------- configurations

ENCODER = dict(key="encoder", name="BERT-base-shaped encoder", layers=12, d=768, heads=12, ffn=3072, batch=32, seq=512,
               causal=False, fused_qkv=False)
DECODER = dict(key="decoder", name="GPT-2-small-shaped decoder", layers=12, d=768, heads=12, ffn=3072, batch=16,
               seq=1024, causal=True, fused_qkv=True)
SKETCHES = [(1, 32), (1, 64), (2, 64)]
TARGET_SKETCH = (1, 64)
ATTN_WIDTHS = [dict(key="hd64", name="12 x 64 (GPT-2 small)", layers=12, d=768, heads=12, ffn=3072),
               dict(key="hd128", name="16 x 128 (LLaMA-like, d=2048)", layers=12, d=2048, heads=16, ffn=8192)]
ATTN_LENGTHS = [4096, 16384, 65536]
NUM_FEATURES = 256
TASK = dict(length=4096, vocab=64, steps=200, lr=3e-4, heldout=4)
NOT_SLOWER = 0.95

SMOKE_MODEL = dict(layers=1, d=32, heads=2, ffn=64, batch=2, seq=16)
SMOKE_SKETCHES = [(1, 4), (2, 4)]
SMOKE_WIDTHS = [dict(key="hd64", name="2 x 16 (smoke)", layers=1, d=32, heads=2, ffn=64),
                dict(key="hd128", name="1 x 32 (smoke)", layers=1, d=32, heads=1, ffn=64)]
SMOKE_LENGTHS = [32, 64]
SMOKE_TASK = dict(length=32, vocab=8, steps=2, lr=3e-4, heldout=1)
DECODE_CONTEXT = 65536
SMOKE_DECODE_CONTEXT = 64
DECODE_GOAL = 10.0


# ----------------------------------------------------------------------------- the model


class ExactAttention(nn.Module):
    """Exact multi-head self-attention as a user's model writes it: q/k/v ``nn.Linear`` (one fused
    ``d -> 3d`` when ``fused_qkv``, else three), ``F.scaled_dot_product_attention(is_causal=causal)``
    (PyTorch picks flash / memory-efficient kernels), out ``nn.Linear``. ``(batch, seq, d)`` in
    and out."""

    def __init__(self, d: int, heads: int, *, causal: bool, fused_qkv: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.heads, self.causal, self.fused_qkv = heads, causal, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, **fk)
        else:
            self.q = nn.Linear(d, d, **fk)
            self.k = nn.Linear(d, d, **fk)
            self.v = nn.Linear(d, d, **fk)
        self.out = nn.Linear(d, d, **fk)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, d = h.shape
        H = self.heads
        if self.fused_qkv:
            q, k, v = self.qkv(h).view(B, L, 3, H, d // H).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(h).view(B, L, H, d // H).transpose(1, 2)
            k = self.k(h).view(B, L, H, d // H).transpose(1, 2)
            v = self.v(h).view(B, L, H, d // H).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(ctx.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x)))).

    attention="sdpa": :class:`ExactAttention` (separate or fused q/k/v, SDPA, out Linear).
    attention="rand": ``pr.nn.RandMultiHeadAttention(d, heads, num_features, iscausal=causal)``.
    Input and output ``(batch, seq, d)``.
    """

    def __init__(self, d: int, heads: int, ffn: int, *, causal: bool, fused_qkv: bool, attention: str = "sdpa",
                 num_features: int = NUM_FEATURES, device=None, dtype=None) -> None:
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.d, self.heads, self.causal, self.fused_qkv, self.attention = d, heads, causal, fused_qkv, attention
        self.ln1 = nn.LayerNorm(d, **fk)
        self.ln2 = nn.LayerNorm(d, **fk)
        if attention == "sdpa":
            self.attn = ExactAttention(d, heads, causal=causal, fused_qkv=fused_qkv, **fk)
        elif attention == "rand":
            self.attn = pr.nn.RandMultiHeadAttention(d, heads, num_features, iscausal=causal, **fk)
        else:
            raise ValueError(f"Block: attention must be 'sdpa' or 'rand', got {attention!r}")
        self.fc1 = nn.Linear(d, ffn, **fk)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, d, **fk)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, h, h)[0] if self.attention == "rand" else self.attn(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    """``layers`` Blocks and a final LayerNorm."""

    def __init__(self, layers: int, d: int, **block_kw) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, **block_kw) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, device=block_kw.get("device"), dtype=block_kw.get("dtype"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


class _ZeroCost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.in_shape = x.shape
        return out.view(out.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.new_zeros(()).expand(ctx.in_shape), None


class ZeroCostLinear(nn.Module):
    """Stand-in for an ``nn.Linear`` that costs ~nothing: returns a view of a preallocated output."""

    def __init__(self, in_features: int, out_features: int, cache: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1] != self.cache.shape[:-1]:
            raise ValueError(f"ZeroCostLinear: built for inputs {tuple(self.cache.shape[:-1])} x {self.in_features}, "
                             f"got {tuple(x.shape)}")
        return _ZeroCost.apply(x, self.cache)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model


def sketched(model: nn.Module, L: int, k: int) -> nn.Module:
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny smoke layers may hold more numbers than dense
        return replace_linears(m, lambda lin: pr.nn.SKLinear.from_linear(lin, L, k))


def zero_cost(model: nn.Module, lead_shape: Tuple[int, ...]) -> nn.Module:
    m = copy.deepcopy(model)
    caches: Dict[int, torch.Tensor] = {}

    def make(lin: nn.Linear) -> nn.Module:
        w = lin.weight
        if lin.out_features not in caches:
            g = torch.Generator(device="cpu").manual_seed(lin.out_features)
            caches[lin.out_features] = (0.5 * torch.randn(*lead_shape, lin.out_features, generator=g)).to(
                device=w.device, dtype=w.dtype)
        return ZeroCostLinear(lin.in_features, lin.out_features, caches[lin.out_features])

    return replace_linears(m, make)


# ----------------------------------------------------------------------------- helpers


def own_bytes(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> int:
    """Bytes of the storages of the model's parameters, gradients, buffers and optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    if opt is not None:
        for st in opt.state.values():
            for v in st.values():
                add(v)
    return total


def peak_training_bytes(step: Callable[[], object], model: nn.Module, opt, device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    extra = C.peak_memory_bytes(step, device)
    return extra + own_bytes(model, opt)


class Variant:
    """One model variant: its module, optimizer and the callables the benchmark times."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, gy: torch.Tensor, *,
                 autocast: Optional[torch.dtype] = None, compiled: bool = False, fullgraph: bool = True,
                 scope: str = "block", lr: float = 1e-5, graphed: bool = False) -> None:
        self.name, self.model, self.x, self.gy = name, model, x, gy
        self.autocast = autocast
        params = [p for p in model.parameters() if p.requires_grad]
        # (a captured optimizer step keeps its step count on the device: capturable=True)
        self.opt = torch.optim.AdamW(params, lr=lr, capturable=graphed) if params else None
        self.note = ""
        self.fwd: Callable[[torch.Tensor], torch.Tensor] = model
        self.graphed = graphed
        self._replays: Dict[str, Callable[[], object]] = {}
        if compiled:
            self.compile(fullgraph, scope)

    def compile(self, fullgraph: bool, scope: str) -> None:
        m = self.model
        if scope == "model":
            self.fwd = torch.compile(m, fullgraph=fullgraph)
        else:
            blocks = [torch.compile(b, fullgraph=fullgraph) for b in m.blocks]

            def fwd(x):
                for b in blocks:
                    x = b(x)
                return m.ln_f(x)
            self.fwd = fwd

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.x.device.type, dtype=self.autocast)

    def infer(self):
        with torch.no_grad(), self._ctx():
            return self.fwd(self.x)

    def train_step(self):
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        with self._ctx():
            y = self.fwd(self.x)
        y.backward(self.gy.to(y.dtype))
        if self.opt is not None:
            self.opt.step()

    def call(self, which: str) -> Callable[[], object]:
        """What the benchmark times for ``which`` ("infer" or "train"): the method itself, or
        (graphed) the replay of its CUDA graph, captured on the first call."""
        eager = self.infer if which == "infer" else self.train_step
        if not self.graphed:
            return eager
        if which not in self._replays:
            if which == "infer":
                self._replays[which] = _graphed(eager, self.x.device)
            else:
                self._replays[which] = self._graph_train_step()
        return self._replays[which]

    def _graph_train_step(self) -> Callable[[], object]:
        # The whole step in one graph (PyTorch's whole-network capture): warm-up steps on a side
        # stream, the gradients set to None once, then forward, backward and the optimizer step
        # captured; each replay rewrites the same gradient tensors and steps the optimizer.
        dev = self.x.device

        def body():
            with self._ctx():
                y = self.fwd(self.x)
            y.backward(self.gy.to(y.dtype))
            if self.opt is not None:
                self.opt.step()
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(3):
                self.model.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream(dev).wait_stream(s)
        self.model.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return g.replay


def _try(fn: Callable[[], object], device: torch.device) -> Optional[str]:
    """Run ``fn`` once; None if it worked, else "OOM" or the error. The memory of a failed call is
    released after the except clause (its traceback holds the call's tensors until then)."""
    why = None
    try:
        fn()
        C.synchronize(device)
    except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
        if C.is_oom(e):
            why = "OOM"
        else:
            msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
            why = f"{type(e).__name__}: {msg}"
    if why is not None:
        gc.collect()
        C.free_cuda(device)
    return why


def first_calls(variants: List[Variant], which: str, device: torch.device, compiled: bool, scope: str) -> Dict[str, str]:
    """Run each variant once on its own (compiles; finds OOM); returns {name: problem} for the failures.

    When a compiled variant fails (fullgraph=True: a graph break raises), the failure is noted
    and the variant is recompiled without fullgraph and tried again."""
    problems: Dict[str, str] = {}
    for v in variants:
        def fn(v=v):
            return v.call(which)()
        why = _try(fn, device)
        if why is not None and why != "OOM" and compiled and not v.note:
            v.note = f"fullgraph=True failed ({why}); timed without fullgraph"
            print(f"{v.name}: {v.note}", file=sys.stderr, flush=True)
            v.compile(False, scope)
            why = _try(fn, device)
        if why is not None:
            problems[v.name] = why
    return problems


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


# ----------------------------------------------------------------------------- part (a): SKLinear


def bench_linear_model(spec: Dict, device: torch.device, dtype: torch.dtype, sketches: List[Tuple[int, int]],
                       modes: List[str], tk: Dict, deadline: float, scope: str, rows: List[Dict],
                       table: C.Table, log: Callable[[], None], target: Tuple[int, int],
                       compile_all: bool = False) -> None:
    B, S, d = spec["batch"], spec["seq"], spec["d"]
    torch.manual_seed(0)
    kw = dict(heads=spec["heads"], ffn=spec["ffn"], causal=spec["causal"], fused_qkv=spec["fused_qkv"], device=device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x_cpu = torch.randn(B, S, d, generator=gen)
    gy_cpu = torch.randn(B, S, d, generator=gen)

    for mode in modes:
        if time.perf_counter() > deadline:
            table.add([spec["name"], mode, "(time budget: not run)"] + ["-"] * (len(table.columns) - 3))
            continue
        autocast = torch.bfloat16 if mode == "autocast" else None
        pdtype = torch.float32 if mode == "autocast" else dtype
        x, gy = x_cpu.to(device, pdtype), gy_cpu.to(device, pdtype)
        torch.manual_seed(0)
        base = Stack(spec["layers"], d, dtype=pdtype, **kw)
        builds: List[Tuple[str, Callable[[], nn.Module]]] = [("dense", lambda: copy.deepcopy(base))]
        # autocast and CUDA graph, and compiled unless compile_all: dense, the target sketch (and
        # the bound) only
        few = mode in ("autocast", "CUDA graph") or (mode == "compiled" and not compile_all)
        sk_list = [target] if few else sketches
        for (L, k) in sk_list:
            builds.append((f"SK L={L} k={k}", lambda L=L, k=k: sketched(base, L, k)))
        if mode != "autocast":
            builds.append(("zero-cost Linear (bound)", lambda: zero_cost(base, (B, S))))
        variants: List[Variant] = []
        for name, build in builds:
            try:
                variants.append(Variant(name, build(), x, gy, autocast=autocast, compiled=mode == "compiled",
                                        scope=scope, graphed=mode == "CUDA graph"))
            except Exception as e:  # noqa: BLE001
                why = "OOM" if C.is_oom(e) else f"{type(e).__name__}: {str(e)[:100]}"
                rows.append({"part": "linear", "model": spec["key"], "mode": mode, "variant": name, "error": why})
                table.add([spec["name"], mode, name, why] + ["-"] * (len(table.columns) - 4))
        del base
        res: Dict[str, Dict] = {v.name: {} for v in variants}
        for which in ("infer", "train"):
            alive = [v for v in variants if "error" not in res[v.name]]
            probs = first_calls(alive, which, device, mode == "compiled", scope)
            for n, why in probs.items():
                res[n]["error"] = why
            alive = [v for v in alive if v.name not in probs]
            if not alive:
                continue
            fns = {v.name: v.call(which) for v in alive}
            timed: Dict[str, C.Timing] = {}
            why = _try(lambda: timed.update(C.time_fns(fns, device, **tk)), device)
            for v in alive:
                if why:
                    res[v.name]["error"] = why
                else:
                    res[v.name][which] = timed[v.name].median_ms
        for v in variants:
            r = res[v.name]
            if "error" not in r and "bound" not in v.name and not v.graphed:
                why = _try(lambda v=v, r=r: r.__setitem__(
                    "mem", peak_training_bytes(v.train_step, v.model, v.opt, device)), device)
                if why:
                    r["mem_note"] = why
        dense = res.get("dense", {})
        for v in variants:
            r = res[v.name]
            raw = {"part": "linear", "model": spec["key"], "mode": mode, "variant": v.name,
                   "params": "fp32 + bf16 autocast" if autocast else C.dtype_name(dtype), "batch": B, "seq": S,
                   "infer_ms": r.get("infer"), "train_ms": r.get("train"), "peak_train_bytes": r.get("mem"),
                   "infer_speedup": ratio(dense.get("infer"), r.get("infer")),
                   "train_speedup": ratio(dense.get("train"), r.get("train")),
                   "mem_ratio": ratio(r.get("mem"), dense.get("mem")), "note": v.note, "error": r.get("error")}
            rows.append(raw)
            table.add([spec["name"], {"autocast": "eager, fp32 params + bf16 autocast"}.get(mode, mode), v.name,
                       r.get("error") or C.fmt_ms(r.get("infer")), C.fmt_ratio(raw["infer_speedup"]),
                       C.fmt_ms(r.get("train")), C.fmt_ratio(raw["train_speedup"]),
                       C.fmt_bytes(r.get("mem")) if "bound" not in v.name else "-",
                       C.fmt_ratio(raw["mem_ratio"]), v.note or "-"], raw=raw)
        del variants, x, gy
        gc.collect()
        C.free_cuda(device)
        log()


LINEAR_COLUMNS = ["model", "mode", "variant", "inference ms", "speedup", "train step ms", "speedup",
                  "peak train mem", "mem / dense", "note"]


# ----------------------------------------------------------------------------- part (b): attention


def bench_attention(widths: List[Dict], lengths: List[int], device: torch.device, dtype: torch.dtype, tk: Dict,
                    deadline: float, rows: List[Dict], table: C.Table, log: Callable[[], None]) -> None:
    for w in widths:
        for L in lengths:
            if time.perf_counter() > deadline:
                table.add([w["name"], str(L), "(time budget: not run)"] + ["-"] * (len(table.columns) - 3))
                continue
            gen = torch.Generator(device="cpu").manual_seed(L)
            x = torch.randn(1, L, w["d"], generator=gen).to(device, dtype)
            gy = torch.randn(1, L, w["d"], generator=gen).to(device, dtype)
            variants: List[Variant] = []
            build_errors: Dict[str, str] = {}
            for key, attn in (("exact", "sdpa"), ("rand", "rand")):
                torch.manual_seed(0)

                def build(key=key, attn=attn):
                    m = Stack(w["layers"], w["d"], heads=w["heads"], ffn=w["ffn"], causal=True, fused_qkv=True,
                              attention=attn, device=device, dtype=dtype)
                    variants.append(Variant(key, m, x, gy))
                why = _try(build, device)
                if why:
                    build_errors[key] = why
            probs = first_calls(variants, "train", device, False, "block")
            probs.update(build_errors)
            alive = [v for v in variants if v.name not in probs]
            res: Dict[str, Dict] = {k: {"error": probs.get(k)} for k in ("exact", "rand")}
            small_tk = dict(tk, warmup=1, min_reps=3) if L >= 16384 else tk
            if alive:
                timed: Dict[str, C.Timing] = {}
                why = _try(lambda: timed.update(C.time_fns({v.name: v.train_step for v in alive}, device,
                                                            **small_tk)), device)
                for v in alive:
                    if why:
                        res[v.name]["error"] = why
                    else:
                        res[v.name]["train"] = timed[v.name].median_ms
            for v in alive:
                if res[v.name].get("error"):
                    continue
                why = _try(lambda v=v: res[v.name].__setitem__(
                    "mem", peak_training_bytes(v.train_step, v.model, v.opt, device)), device)
                if why:
                    res[v.name]["mem_note"] = why
            ex, ra = res.get("exact", {}), res.get("rand", {})
            raw = {"part": "attention", "width": w["key"], "width_name": w["name"], "d": w["d"], "heads": w["heads"],
                   "head_dim": w["d"] // w["heads"], "layers": w["layers"], "tokens": L,
                   "num_features": NUM_FEATURES, "exact_train_ms": ex.get("train"), "rand_train_ms": ra.get("train"),
                   "speedup": ratio(ex.get("train"), ra.get("train")), "exact_peak_bytes": ex.get("mem"),
                   "rand_peak_bytes": ra.get("mem"), "mem_ratio": ratio(ra.get("mem"), ex.get("mem")),
                   "exact_error": ex.get("error"), "rand_error": ra.get("error")}
            rows.append(raw)
            table.add([w["name"], str(L), ex.get("error") or C.fmt_ms(ex.get("train")),
                       ra.get("error") or C.fmt_ms(ra.get("train")), C.fmt_ratio(raw["speedup"]),
                       C.fmt_bytes(ex.get("mem")), C.fmt_bytes(ra.get("mem")), C.fmt_ratio(raw["mem_ratio"])], raw=raw)
            del variants, alive, x, gy
            gc.collect()
            C.free_cuda(device)
            log()


ATTN_COLUMNS = ["heads x head_dim", "tokens", "exact train step ms", "RandMHA train step ms", "speedup",
                "exact peak train mem", "RandMHA peak train mem", "mem RandMHA / exact"]


# ----------------------------------------------------------------------------- part (c): decode


class KVCacheAttention(nn.Module):
    """Exact causal self-attention decoding with a preallocated KV cache of ``cache_len`` slots:
    ``step(x_t)`` projects one token (fused qkv), writes its key and value into the last slot and
    attends over the whole cache with ``F.scaled_dot_product_attention`` (static shapes, so a
    CUDA graph can capture it)."""

    def __init__(self, d: int, heads: int, cache_len: int, device, dtype) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, device=device, dtype=dtype)
        self.out = nn.Linear(d, d, device=device, dtype=dtype)
        shape = (1, heads, cache_len, self.hd)
        self.k_cache = torch.randn(shape, device=device, dtype=dtype)
        self.v_cache = torch.randn(shape, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(B, 1, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, -1:].copy_(k)
        self.v_cache[:, :, -1:].copy_(v)
        ctx = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        return self.out(ctx.transpose(1, 2).reshape(B, 1, -1))

    def cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes


def _graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns the replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_decode(w: Dict, context: int, device: torch.device, dtype: torch.dtype, tk: Dict, deadline: float,
                 rows: List[Dict], table: C.Table, log: Callable[[], None], compiled: bool = False) -> None:
    if time.perf_counter() > deadline:
        table.add([w["name"], str(context), "(time budget: not run)"] + ["-"] * (len(table.columns) - 3))
        return
    d, heads, nl = w["d"], w["heads"], w["layers"]
    gen = torch.Generator(device="cpu").manual_seed(context)
    x_t = torch.randn(1, 1, d, generator=gen).to(device, dtype)
    res: Dict[str, Dict] = {}
    with torch.no_grad():
        torch.manual_seed(0)
        exact: List[KVCacheAttention] = []
        rand: List[pr.nn.RandMultiHeadAttention] = []
        states: list = []
        errors: Dict[str, Optional[str]] = {}

        def build_exact():
            exact.extend(KVCacheAttention(d, heads, context + 1, device, dtype) for _ in range(nl))

        def build_rand():
            prompt = torch.randn(1, context, d, generator=gen).to(device, dtype)
            for _ in range(nl):
                layer = pr.nn.RandMultiHeadAttention(d, heads, NUM_FEATURES, iscausal=True, device=device,
                                                     dtype=dtype).eval()
                rand.append(layer)
                states.append(layer.prefill(prompt)[1])

        errors["exact"] = _try(build_exact, device)
        errors["rand"] = _try(build_rand, device)
        short_bytes = None
        if not errors["rand"]:
            short = rand[0].prefill(torch.randn(1, 16, d, generator=gen).to(device, dtype))[1]
            short_bytes = sum(t.nbytes for t in short)

        # Both return their layers' outputs: a compiled step that returned nothing would keep only
        # the in-place cache/state writes and drop the attention readout as dead code.
        def exact_step():
            return [layer.step(x_t) for layer in exact]

        def rand_step():
            return [layer.step_(x_t, st) for layer, st in zip(rand, states)]

        fns = {k: f for k, f in (("exact", exact_step), ("rand", rand_step)) if not errors[k]}
        modes = ["eager"] + (["CUDA graph"] if device.type == "cuda" else [])
        modes += ["compiled + CUDA graph"] if device.type == "cuda" and compiled else []
        for mode in modes:
            timed: Dict[str, C.Timing] = {}
            errs = dict(errors)
            run = {}
            for k, f in fns.items():
                why = None
                if mode == "compiled + CUDA graph":  # inductor's fused kernels, then one graph
                    why = _try(lambda k=k, f=f: run.__setitem__(
                        k, _graphed(torch.compile(f, fullgraph=True), device)), device)
                elif mode == "CUDA graph":
                    why = _try(lambda k=k, f=f: run.__setitem__(k, _graphed(f, device)), device)
                else:
                    run[k] = f
                if why:
                    errs[k] = why
            if run:
                why = _try(lambda: timed.update(C.time_fns(run, device, **tk)), device)
                if why:
                    errs.update({k: why for k in run})
            ex_ms = timed["exact"].median_ms if "exact" in timed else None
            ra_ms = timed["rand"].median_ms if "rand" in timed else None
            raw = {"part": "decode", "width": w["key"], "width_name": w["name"], "layers": nl, "d": d,
                   "heads": heads, "context": context, "mode": mode, "num_features": NUM_FEATURES,
                   "exact_step_ms": ex_ms, "rand_step_ms": ra_ms, "speedup": ratio(ex_ms, ra_ms),
                   "exact_layer_bytes": exact[0].cache_bytes() if exact else None,
                   "rand_layer_bytes": sum(t.nbytes for t in states[0]) if states else None,
                   "rand_layer_bytes_16_tokens": short_bytes,
                   "exact_error": errs.get("exact"), "rand_error": errs.get("rand")}
            rows.append(raw)
            table.add([w["name"], str(context), mode, errs.get("exact") or C.fmt_ms(ex_ms),
                       errs.get("rand") or C.fmt_ms(ra_ms), C.fmt_ratio(raw["speedup"]),
                       C.fmt_bytes(raw["exact_layer_bytes"]), C.fmt_bytes(raw["rand_layer_bytes"])], raw=raw)
            log()
    del exact, rand, states
    gc.collect()
    C.free_cuda(device)


DECODE_COLUMNS = ["heads x head_dim", "context tokens", "mode", "exact (KV cache) step ms", "RandMHA step ms",
                  "speedup", "exact mem / layer", "RandMHA mem / layer"]


class CopyModel(nn.Module):
    """Token + position embedding, a decoder Stack, a linear readout (for the copy task only)."""

    def __init__(self, vocab: int, length: int, w: Dict, attention: str, device) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, w["d"], device=device)
        self.pos = nn.Embedding(length, w["d"], device=device)
        self.body = Stack(w["layers"], w["d"], heads=w["heads"], ffn=w["ffn"], causal=True, fused_qkv=True,
                          attention=attention, device=device)
        self.head = nn.Linear(w["d"], vocab, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.body(self.tok(ids) + self.pos(pos)))


def copy_batch(gen: torch.Generator, vocab: int, length: int, device) -> torch.Tensor:
    half = length // 2
    first = torch.randint(0, vocab, (1, half), generator=gen)
    return torch.cat([first, first], dim=1).to(device)


def copy_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    half = ids.shape[1] // 2
    logits = model(ids[:, :-1])
    # Predictions of positions half .. end (the repeated half): logits at half-1 .. end-1.
    return F.cross_entropy(logits[:, half - 1:].float().reshape(-1, logits.shape[-1]), ids[:, half:].reshape(-1))


def amp(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def copy_task(w: Dict, task: Dict, device: torch.device, rows: List[Dict], deadline: float) -> List[List[str]]:
    out = []
    for key, attn in (("exact", "sdpa"), ("rand", "rand")):
        if time.perf_counter() > deadline:
            out.append([key, "(time budget: not run)", "-", "-", "-"])
            continue
        torch.manual_seed(0)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        try:
            model = CopyModel(task["vocab"], task["length"], w, attn, device)
            opt = torch.optim.AdamW(model.parameters(), lr=task["lr"], weight_decay=0.0)
            losses = []
            t0 = time.perf_counter()
            for _ in range(task["steps"]):
                ids = copy_batch(gen, task["vocab"], task["length"], device)
                opt.zero_grad(set_to_none=True)
                with amp(device):
                    loss = copy_loss(model, ids)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            held_gen = torch.Generator(device="cpu").manual_seed(99)
            with torch.no_grad(), amp(device):
                held = [float(copy_loss(model, copy_batch(held_gen, task["vocab"], task["length"], device)))
                        for _ in range(task["heldout"])]
            secs = time.perf_counter() - t0
            last = losses[-10:]
            r = {"part": "copy_task", "attention": key, "steps": task["steps"], "tokens": task["length"],
                 "vocab": task["vocab"], "first_loss": losses[0], "final_train_loss": sum(last) / len(last),
                 "heldout_loss": sum(held) / len(held), "chance": math.log(task["vocab"]), "seconds": secs}
            rows.append(r)
            out.append([{"exact": "exact (SDPA)", "rand": f"RandMultiHeadAttention M={NUM_FEATURES}"}[key],
                        f"{r['first_loss']:.3f}", f"{r['final_train_loss']:.3f}", f"{r['heldout_loss']:.3f}",
                        f"{secs:.1f}"])
            del model, opt
        except Exception as e:  # noqa: BLE001
            why = "OOM" if C.is_oom(e) else f"{type(e).__name__}: {str(e)[:100]}"
            rows.append({"part": "copy_task", "attention": key, "error": why})
            out.append([key, why, "-", "-", "-"])
        gc.collect()
        C.free_cuda(device)
    return out


# ----------------------------------------------------------------------------- targets


def evaluate(rows: List[Dict], gpu: str, sketch: Tuple[int, int]) -> List[tuple]:
    out: List[tuple] = []
    sk_name = f"SK L={sketch[0]} k={sketch[1]}"
    lin = [r for r in rows if r.get("part") == "linear" and r.get("model") == "encoder"]

    def get(mode, variant):
        for r in lin:
            if r["mode"] == mode and r["variant"] == variant and not r.get("error"):
                return r
        return None

    for mode in ("eager", "compiled") if lin else ():
        d, s, b = get(mode, "dense"), get(mode, sk_name), get(mode, "zero-cost Linear (bound)")
        tag = f"encoder, every Linear at L={sketch[0]} k={sketch[1]}, {mode} vs {mode} [{gpu}]"
        if not (d and s):
            out.append((f"{tag}: training step >= 1.6x dense", "not measured", None))
            continue
        sp = s["train_speedup"]
        bound = b["train_speedup"] if b else None
        if bound is not None and bound < 1.6:
            out.append((f"{tag}: training step within 1.25x of the zero-cost-Linear bound (bound {C.fmt_ratio(bound)} "
                        "< 1.6x dense)", f"{s['train_ms'] / b['train_ms']:.2f}x the bound ({C.fmt_ratio(sp)} dense)",
                        s["train_ms"] <= 1.25 * b["train_ms"]))
        else:
            out.append((f"{tag}: training step >= 1.6x dense"
                        + (f" (bound {C.fmt_ratio(bound)})" if bound else ""), C.fmt_ratio(sp), sp >= 1.6))
        out.append((f"{tag}: inference >= 1.3x dense", C.fmt_ratio(s["infer_speedup"]), s["infer_speedup"] >= 1.3))
        if s.get("peak_train_bytes") is not None and d.get("peak_train_bytes") is not None:
            out.append((f"{tag}: peak training memory <= dense",
                        f"{C.fmt_bytes(s['peak_train_bytes'])} vs {C.fmt_bytes(d['peak_train_bytes'])}",
                        s["peak_train_bytes"] <= d["peak_train_bytes"]))
    s_e, s_c = get("eager", sk_name), get("compiled", sk_name)
    if s_c:
        out.append((f"encoder {sk_name}: torch.compile(fullgraph=True) with no graph break [{gpu}]",
                    s_c["note"] or "compiled with fullgraph=True", not s_c["note"]))
        if s_e:
            out.append((f"encoder {sk_name}: compiled training step no slower than eager [{gpu}]",
                        f"{C.fmt_ms(s_c['train_ms'])} vs {C.fmt_ms(s_e['train_ms'])} ms eager",
                        s_e["train_ms"] / s_c["train_ms"] >= NOT_SLOWER))
    for r in (r for r in rows if r.get("part") == "decode"):
        label = f"decode step, {r['layers']} layers' attention at {r['context']} tokens, {r['mode']}"
        sp = r["speedup"]
        out.append((f"{label}: >= {DECODE_GOAL:g}x faster than exact attention with a KV cache [{gpu}]",
                    C.fmt_ratio(sp) if sp else (r["rand_error"] or r["exact_error"] or "-"),
                    None if sp is None else sp >= DECODE_GOAL))
        if r["mode"] == "eager" and r["rand_layer_bytes"] is not None:
            same = r["rand_layer_bytes"] == r["rand_layer_bytes_16_tokens"]
            out.append((f"{label}: decoding memory per layer independent of the context length [{gpu}]",
                        f"{C.fmt_bytes(r['rand_layer_bytes'])} at {r['context']} and "
                        f"{C.fmt_bytes(r['rand_layer_bytes_16_tokens'])} at 16 tokens (KV cache "
                        f"{C.fmt_bytes(r['exact_layer_bytes'])})", same))
    att = [r for r in rows if r.get("part") == "attention"]
    lengths = sorted({r["tokens"] for r in att})
    for wkey in ("hd64", "hd128"):
        ws = [r for r in att if r["width"] == wkey]
        if not ws:
            continue
        what = ws[0]["width_name"] + ("" if wkey == "hd64" else ", targets restated")
        # Speed goals at 4096 / 16384 / 65536 tokens; memory goals at 16384 and 65536. Other lengths
        # (smoke runs) take the goals by position.
        goals = [NOT_SLOWER, 1.7, 5.0]
        if set(lengths) <= set(ATTN_LENGTHS):
            want = dict(zip(ATTN_LENGTHS, goals))
            mem_at = set(ATTN_LENGTHS[1:])
        else:
            want = dict(zip(lengths, goals))
            mem_at = set(lengths[1:])
        for r in sorted(ws, key=lambda r: r["tokens"]):
            L = r["tokens"]
            label = f"decoder {what} at {L} tokens"
            if L in want:
                goal = want[L]
                txt = "not slower than exact" if goal == NOT_SLOWER else f">= {goal}x exact"
                out.append((f"{label}: training step {txt} [{gpu}]",
                            C.fmt_ratio(r["speedup"]) if r["speedup"] else (r["rand_error"] or r["exact_error"] or "-"),
                            None if r["speedup"] is None else r["speedup"] >= goal))
            if L in mem_at:
                ok = None if r["mem_ratio"] is None else r["mem_ratio"] <= 1.0
                if r["mem_ratio"] is not None:
                    meas = f"{C.fmt_bytes(r['rand_peak_bytes'])} vs {C.fmt_bytes(r['exact_peak_bytes'])}"
                elif r["exact_error"] == "OOM" and r["rand_peak_bytes"] is not None:
                    meas, ok = f"{C.fmt_bytes(r['rand_peak_bytes'])}; exact attention ran out of memory", True
                else:
                    meas = r["rand_error"] or r["exact_error"] or "-"
                out.append((f"{label}: peak training memory <= exact [{gpu}]", meas, ok))
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--which", choices=["linear", "attention", "decode", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="< 90 s on an H100: encoder eager (dense, L=1 k=64, bound), "
                   "attention 12 x 64 at 4k and 16k, a short copy task, the decode step")
    p.add_argument("--decode-context", type=int, default=None,
                   help=f"context tokens of the decode-step rows (default {DECODE_CONTEXT})")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU): checks that the script runs")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also torch.compile'd rows (default: on, except --quick and --smoke)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-scope", choices=["block", "model"], default="block")
    p.add_argument("--compile-all", action="store_true",
                   help="compile every sketch (default: dense, L=1 k=64 and the bound only, to bound compile time)")
    p.add_argument("--models", default=None, help="comma list of encoder,decoder (default both; --quick encoder)")
    p.add_argument("--lengths", default=None, help="attention token counts, e.g. 4096,16384")
    p.add_argument("--widths", default=None, help="attention widths: hd64,hd128 (default both; --quick hd64)")
    p.add_argument("--task-steps", type=int, default=None, help="copy task steps (default 200; --quick 30)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting groups after this many seconds "
                   "(default 540; --quick 80)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="write the rows as JSON lines")
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)

    device = C.pick_device(args.device)
    if args.threads or (args.smoke and device.type == "cpu"):
        # Smoke runs use one thread: on a CPU shared with other work, more threads only wait.
        torch.set_num_threads(args.threads or 1)
    C.disable_tf32()
    t_start = time.perf_counter()
    dtype = torch.bfloat16
    do_compile = args.compile if args.compile is not None else not (args.quick or args.smoke)
    try:  # every block of a model compiles to the same graph; leave room for the grad/no-grad pair
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 512)
    except Exception:  # noqa: BLE001
        pass

    models = [ENCODER, DECODER]
    sketches, widths, lengths, task = SKETCHES, ATTN_WIDTHS, ATTN_LENGTHS, dict(TASK)
    if args.smoke:
        models = [dict(m, **SMOKE_MODEL) for m in models]
        sketches, widths, lengths, task = SMOKE_SKETCHES, SMOKE_WIDTHS, SMOKE_LENGTHS, dict(SMOKE_TASK)
        task_w = dict(SMOKE_WIDTHS[0])
        tk = dict(warmup=1, reps=3, min_reps=3, budget_s=0.0)
        budget = args.budget_s if args.budget_s is not None else 120
    else:
        task_w = dict(ATTN_WIDTHS[0])
        if args.quick:
            models = [ENCODER]
            sketches = [TARGET_SKETCH]
            widths, lengths = ATTN_WIDTHS[:1], ATTN_LENGTHS[:2]
            task["steps"] = 30
            tk = dict(warmup=2, reps=5, min_reps=3, budget_s=0.5)
            budget = args.budget_s if args.budget_s is not None else 80
        else:
            tk = (dict(warmup=3, reps=15, min_reps=5, budget_s=3.0) if device.type == "cuda"
                  else dict(warmup=1, reps=5, min_reps=3, budget_s=5.0))
            budget = args.budget_s if args.budget_s is not None else 540
    if args.models:
        keys = args.models.split(",")
        models = [m for m in models if m["key"] in keys]
    if args.widths:
        widths = [w for w in widths if w["key"] in args.widths.split(",")]
    if args.lengths:
        lengths = [int(t) for t in args.lengths.split(",")]
    if args.task_steps is not None:
        task["steps"] = args.task_steps
    decode_context = args.decode_context or (SMOKE_DECODE_CONTEXT if args.smoke else DECODE_CONTEXT)
    deadline = t_start + budget
    sketch_target = TARGET_SKETCH if TARGET_SKETCH in sketches else sketches[0]

    gpu = C.device_name(device)
    notes = [
        "One pre-norm block class (LayerNorm, attention, out Linear, GELU MLP), no embedding or vocabulary head. "
        "bf16 parameters unless a row says otherwise; AdamW (torch defaults). fp32 runs with TF32 off.",
        "inference = forward under torch.no_grad(); train step = zero_grad + forward + backward (fixed random output "
        "gradient) + AdamW step. Median of " + ("CUDA-event" if device.type == "cuda" else "perf_counter")
        + " timings, the variants of one group measured round-robin.",
        "peak train mem = the model's parameters, gradients, buffers and optimizer state + the peak extra memory of "
        "one training step (n/a on CPU). speedup and mem / dense are against the dense (or exact-attention) model of "
        "the same group.",
        "zero-cost Linear (bound): every Linear replaced by a stand-in returning a view of a preallocated output "
        "(backward: an expanded zero); dense / bound is the most a Linear replacement can win.",
        f"compiled: torch.compile per {args.compile_scope} with fullgraph=True (a failing fullgraph compile is reported "
        "in the note); dense, the target sketch and the bound" + (", every sketch" if args.compile_all else "") + ".",
        f"budget: groups stop starting after {budget:.0f} s.",
    ]
    if args.which in ("linear", "all"):
        notes += [f"{m['name']}: {m['layers']} layers, d={m['d']}, {m['heads']} heads, FFN {m['ffn']}, "
                  f"{'fused' if m['fused_qkv'] else 'separate'} qkv, {'causal' if m['causal'] else 'not causal'}, "
                  f"batch {m['batch']} x {m['seq']} tokens" for m in models]
    if args.which in ("attention", "all"):
        notes += [f"attention rows: {w['name']}: {w['layers']} layers, d={w['d']}, {w['heads']} heads x "
                  f"{w['d'] // w['heads']}, FFN {w['ffn']}, batch 1" for w in widths]
    if args.which in ("decode", "all"):
        notes.append(f"decode rows: one step of {(widths or ATTN_WIDTHS)[0]['layers']} layers' attention (no MLP), "
                     "batch 1; mem / layer: the KV cache vs the decoding state")
    head = C.header("Panther inside transformer models", device, notes) + "\n"
    rows: List[Dict] = []
    lin_table, att_table, dec_table = C.Table(LINEAR_COLUMNS), C.Table(ATTN_COLUMNS), C.Table(DECODE_COLUMNS)
    task_rows: List[List[str]] = []
    meta = {"bench": "models", "device": gpu, "commit": C.commit(), "torch": torch.__version__}

    def report(final: bool) -> str:
        text = head
        if lin_table.rows:
            text += "\n## SKLinear in every Linear\n\n" + lin_table.markdown()
        if att_table.rows:
            text += (f"\n## Long-context decoder training (batch 1, causal, RandMultiHeadAttention M={NUM_FEATURES})\n\n"
                     + att_table.markdown())
        if dec_table.rows:
            text += (f"\n## Decode step (batch 1, RandMultiHeadAttention M={NUM_FEATURES} step_ vs exact attention "
                     "with a KV cache of the context)\n\n" + dec_table.markdown())
        if task_rows:
            t = C.Table(["attention", "first loss", f"train loss (last 10 of {task['steps']} steps)",
                         "held-out loss", "seconds"])
            for r in task_rows:
                t.add(r)
            text += (f"\n## Copy/recall task ({task['length']} tokens, vocabulary {task['vocab']}, chance "
                     f"{math.log(task['vocab']):.2f}; reported, not judged)\n\n" + t.markdown())
        if final:
            text += f"\n## Targets ({gpu})\n\n" + C.targets_table(evaluate(rows, gpu, sketch_target))
        else:
            text += C.PARTIAL
        return text

    def log() -> None:
        C.write_markdown(args.markdown, report(False))
        print(f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)

    if args.which in ("linear", "all"):
        for spec in models:
            modes = (["eager"] + (["compiled"] if do_compile else [])
                     + (["CUDA graph"] if device.type == "cuda" else []) + ([] if args.quick else ["autocast"]))
            bench_linear_model(spec, device, dtype, sketches, modes, tk, deadline, args.compile_scope, rows,
                               lin_table, log, sketch_target, args.compile_all)
    if args.which in ("attention", "all"):
        bench_attention(widths, lengths, device, dtype, tk, deadline, rows, att_table, log)
    if args.which in ("decode", "all"):  # before the copy task: seconds, where the task takes the rest
        bench_decode(widths[0] if widths else ATTN_WIDTHS[0], decode_context, device, dtype, tk, deadline, rows,
                     dec_table, log, compiled=do_compile)
    if args.which in ("attention", "all"):
        task_rows = copy_task(task_w, task, device, rows, deadline)

    C.emit(report(True), args.markdown)
    C.write_json_lines(args.json, rows, meta)
    print(f"(total {time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    failed = [r for r in rows if r.get("error") and r["error"] != "OOM"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
