#!/usr/bin/env python3
"""Multi-rank scaling: DDP / FSDP2 training of a BERT-base-shaped encoder, and context-parallel attention.

Launch with torchrun (one process per GPU; NCCL on CUDA, gloo on CPU); run without torchrun it
is a 1-rank job (same code, a 1-process group):

    torchrun --nproc_per_node=8 bench/python/bench_distributed.py --markdown bench/results/h100x8-distributed.md
    torchrun --nproc_per_node=2 bench/python/bench_distributed.py --smoke --device cpu   # tiny, gloo
    python bench/python/bench_distributed.py --smoke --device cpu                        # 1 rank

Part ``train`` (``--parts train``): the encoder (12 layers, d = 768, 12 heads, FFN 3072,
hand-written pre-LN blocks with ``F.scaled_dot_product_attention``; or ``bench_models.py``'s
``build_encoder`` when that shared module exists), dense (``nn.Linear``) vs sketched (every
Linear as ``pr.nn.SKLinear(num_terms=1, low_rank=64)``). One training step = zero_grad, forward
(bf16 autocast on CUDA), MSE loss, backward, AdamW step; per-GPU batch fixed (weak scaling).
Rows, each in eager mode and under ``torch.compile`` (``--compile``):

* ``1 GPU``: the plain model on rank 0 alone (the other ranks wait): the weak-scaling baseline;
* ``DDP``: ``DistributedDataParallel`` with ``broadcast_buffers=True`` (the default) and
  ``False``; the sketches ``U1s``/``U2s`` are buffers, identical on every rank when the ranks
  are seeded identically, so broadcasting them before every forward only costs bandwidth;
* ``FSDP2``: ``fully_shard`` per block and on the root (``reshard_after_forward=True``).

Step time: median over steps of the slowest rank's step (wall clock after a device
synchronisation). Weak-scaling efficiency = 1-GPU step time / N-GPU step time of the same mode
(eager vs eager, compiled vs compiled). Bytes communicated per step and rank (payload, the size
of the tensors handed to the collectives):

* DDP: gradient bytes measured by a communication hook on the reducer's buckets (every
  parameter's gradient, fp32) + with ``broadcast_buffers=True`` every buffer's bytes (broadcast
  from rank 0 before each forward; counted from the module's buffers);
* FSDP2: parameters all-gathered twice (forward, and backward after resharding) + gradients
  reduce-scattered, counted from the parameters' sizes; buffers are never communicated.

On the wire a ring all-reduce moves 2 (N - 1) / N of its payload per rank, an all-gather or a
reduce-scatter (N - 1) / N.

Part ``cp`` (``--parts cp``): causal FAVOR+ attention fwd+bwd (B = 1, 12 heads of 64, M = 256
features, bf16 on CUDA) of a sequence of T tokens split over the N ranks
(``panther.distributed.context_parallel_favor_attention``, T / N tokens per rank), against one
GPU running the native op ``torch.ops.panther.favor_attention`` on T / N tokens (the
weak-scaling baseline) and on T tokens (where it fits). Peak memory: the extra memory of one
fwd+bwd (``torch.cuda.max_memory_allocated`` minus what was allocated before), the largest over
ranks.

Results are printed by rank 0 and written with ``--markdown`` / ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import panther as pr  # noqa: E402
import panther.distributed as pd  # noqa: E402

# ----------------------------------------------------------------------------- sizes

FULL = dict(layers=12, d=768, heads=12, ffn=3072, seq=512, batch=8, steps=20, warmup=5,
            cp_heads=12, cp_dim=64, cp_features=256, cp_tokens=[65536, 131072, 262144, 524288, 1048576],
            cp_reps=5)
SMOKE = dict(layers=2, d=64, heads=4, ffn=128, seq=16, batch=2, steps=3, warmup=1,
             cp_heads=2, cp_dim=16, cp_features=16, cp_tokens=[256, 512], cp_reps=2)


# ----------------------------------------------------------------------------- the encoder


class Block(nn.Module):
    """Pre-LN transformer encoder block: x + attn(LN(x)), then x + FFN(LN(x)) (GELU)."""

    def __init__(self, d: int, heads: int, ffn: int, linear: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = linear(d, 3 * d)
        self.proj = linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = linear(d, ffn)
        self.fc2 = linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, ffn: int, linear) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ffn, linear) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.ln(x)


def build_encoder(sketched: bool, layers: int, d: int, heads: int, ffn: int, low_rank: int = 64) -> nn.Module:
    """BERT-base-shaped encoder (token embeddings in, hidden states out); every Linear dense or
    ``pr.nn.SKLinear(num_terms=1, low_rank=low_rank)``. Uses ``bench_models.build_encoder`` when
    that shared module exists (same signature)."""
    try:
        import bench_models  # type: ignore  # noqa: F401

        if hasattr(bench_models, "build_encoder"):
            return bench_models.build_encoder(sketched=sketched, layers=layers, d=d, heads=heads, ffn=ffn,
                                              low_rank=low_rank)
    except ImportError:
        pass
    if sketched:
        def linear(i: int, o: int) -> nn.Module:
            return pr.nn.SKLinear(i, o, num_terms=1, low_rank=low_rank)
    else:
        linear = nn.Linear
    return Encoder(layers, d, heads, ffn, linear)


# ----------------------------------------------------------------------------- process group


def init(device_name: str) -> torch.device:
    if "RANK" not in os.environ:  # plain python: a 1-rank job
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        rv = os.path.join(tempfile.mkdtemp(), "rv")
        backend = "nccl" if device_name == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{rv}", rank=0, world_size=1)
    else:
        backend = "nccl" if device_name == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=600))
    if device_name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank0() -> bool:
    return dist.get_rank() == 0


def log(*a) -> None:
    if rank0():
        print(*a, flush=True)


def max_over_ranks(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ----------------------------------------------------------------------------- training


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def buffer_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int, world: bool = True) -> float:
    """Median over steps of the slowest rank's step time (ms); world=False: this rank alone."""
    for _ in range(warmup):
        step()
    C.synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        C.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        times.append(max_over_ranks(ms, device) if world else ms)
    return statistics.median(times)


def make_step(model: nn.Module, device: torch.device, batch: int, seq: int, d: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    x = torch.randn(batch, seq, d, device=device, generator=g)
    y = torch.randn(batch, seq, d, device=device, generator=g)
    amp = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        F.mse_loss(out.float(), y).backward()
        opt.step()

    return step


SETUPS = ("single", "ddp", "ddp_nobb", "fsdp")


def bench_train(sz: dict, device: torch.device, compile_modes: List[bool], setups: Dict[bool, List[str]]) -> List[dict]:
    """Rows of the training part; ``setups[compiled]`` lists which of SETUPS run in that mode."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = dist.get_world_size()
    rows: List[dict] = []
    for sketched in (False, True):
        name = "sketched (SKLinear L=1 k=64)" if sketched else "dense (nn.Linear)"

        def fresh() -> nn.Module:
            torch.manual_seed(0)  # identical sketches and weights on every rank
            return build_encoder(sketched, sz["layers"], sz["d"], sz["heads"], sz["ffn"]).to(device)

        probe = fresh()
        pbytes, bbytes = param_bytes(probe), buffer_bytes(probe)
        del probe
        for compiled in compile_modes:
            mode = "compiled" if compiled else "eager"
            wrap = torch.compile if compiled else (lambda m: m)
            single = None
            for setup in setups[compiled]:
                row = dict(model=name, mode=mode, ranks=1 if setup == "single" else world, params=pbytes,
                           buffers=bbytes, payload=0, step_ms=None, eff=None, err="")
                try:
                    if setup == "single":  # rank 0 alone, the plain model: the weak-scaling baseline
                        row["setup"] = "1 rank, no wrapper"
                        res = [None, ""]
                        if rank0():
                            try:
                                m = fresh()
                                res[0] = time_steps(make_step(wrap(m), device, sz["batch"], sz["seq"], sz["d"]),
                                                    device, sz["steps"], sz["warmup"], world=False)
                                del m
                            except Exception as e:  # noqa: BLE001 - reported in the table
                                res[1] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        dist.broadcast_object_list(res, 0)
                        single, row["err"] = res
                        row["step_ms"], row["eff"] = single, 1.0 if single else None
                    elif setup in ("ddp", "ddp_nobb"):
                        bb = setup == "ddp"
                        row["setup"] = f"DDP broadcast_buffers={bb}"
                        m = fresh()
                        ddp = DDP(m, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=bb)
                        counted = {"bytes": 0}

                        def hook(state, bucket, counted=counted):
                            buf = bucket.buffer()
                            counted["bytes"] += buf.numel() * buf.element_size()
                            return default_hooks.allreduce_hook(state, bucket)

                        ddp.register_comm_hook(None, hook)
                        step = make_step(wrap(ddp), device, sz["batch"], sz["seq"], sz["d"])
                        step()  # buckets are rebuilt after the first iteration: count the second
                        counted["bytes"] = 0
                        step()
                        row["grad_bytes"] = counted["bytes"]
                        row["payload"] = counted["bytes"] + (bbytes if bb else 0)
                        row["step_ms"] = time_steps(step, device, sz["steps"], sz["warmup"])
                        del ddp, m, step
                    elif setup == "fsdp":
                        row["setup"] = "FSDP2"
                        m = fresh()
                        for blk in getattr(m, "blocks", []):
                            fully_shard(blk)
                        fully_shard(m)
                        # all-gather of the parameters in forward and again in backward, reduce-scatter
                        # of the (fp32) gradients; buffers are never communicated.
                        row["payload"] = 3 * pbytes
                        row["step_ms"] = time_steps(make_step(wrap(m), device, sz["batch"], sz["seq"], sz["d"]),
                                                    device, sz["steps"], sz["warmup"])
                        del m
                except Exception as e:  # noqa: BLE001 - one failing setup must not hide the others
                    if world > 1:
                        raise  # the other ranks may wait in a collective: stop the job
                    row["err"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if row["step_ms"] and single and setup != "single":
                    row["eff"] = single / row["step_ms"]
                rows.append(row)
                log(f"[train] {name} {mode} {row['setup']} x{row['ranks']}: {row['step_ms']} ms, "
                    f"{row['payload']} B/step {row['err']}")
                if device.type == "cuda":
                    C.free_cuda(device)
    return rows


# ----------------------------------------------------------------------------- context parallel


def peak_extra(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_cp(sz: dict, device: torch.device, tokens: List[int], chunk: int) -> List[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    H, D, M = sz["cp_heads"], sz["cp_dim"], sz["cp_features"]
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    W = torch.randn(M, D, device=device, dtype=dt)
    rows = []

    def inputs(L: int):
        g = torch.Generator(device=device).manual_seed(7 + rank)
        q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dt, generator=g).requires_grad_(True)
                   for _ in range(3))
        return q, k, v, torch.randn(1, H, L, D, device=device, dtype=dt, generator=g)

    def native(L: int):
        q, k, v, go = inputs(L)

        def fn() -> None:
            out = torch.ops.panther.favor_attention(q, k, v, W, "softmax", True, None)
            torch.autograd.grad(out, (q, k, v), go)
        return fn

    def single_row(L: int) -> dict:
        """Native op on one GPU (rank 0 alone)."""
        res = {"ms": None, "peak": None, "err": ""}
        if rank0():
            try:
                fn = native(L)
                res["peak"] = peak_extra(fn, device)
                res["ms"] = C.time_fn(fn, device, warmup=1, reps=sz["cp_reps"]).median_ms
            except RuntimeError as e:
                if not C.is_oom(e):
                    raise
                res["err"] = "OOM"
            if device.type == "cuda":
                C.free_cuda(device)
        obj = [res]
        dist.broadcast_object_list(obj, 0)
        return obj[0]

    for T in tokens:
        if T % world:
            log(f"[cp] skip T={T}: not divisible by {world} ranks")
            continue
        Lr = T // world
        base = single_row(Lr)
        full = single_row(T) if world > 1 else base
        err = ""
        ms = peak = None
        try:
            q, k, v, go = inputs(Lr)

            def fn() -> None:
                out = pd.context_parallel_favor_attention(q, k, v, W, "softmax", True, None, chunk_size=chunk)
                torch.autograd.grad(out, (q, k, v), go)

            p = peak_extra(fn, device)
            t = C.time_fn(fn, device, warmup=1, reps=sz["cp_reps"]).median_ms
            ms = max_over_ranks(t, device)
            peak = int(max_over_ranks(float(p or 0), device)) if p is not None else None
        except RuntimeError as e:
            if not C.is_oom(e):
                raise
            err = "OOM"  # (a rank that runs out of memory stops the job: collectives cannot finish)
        if device.type == "cuda":
            C.free_cuda(device)
        row = dict(tokens=T, ranks=world, per_rank=Lr, cp_ms=ms, cp_peak=peak, base_ms=base["ms"],
                   base_peak=base["peak"], full_ms=full["ms"], full_peak=full["peak"],
                   eff=(base["ms"] / ms) if (ms and base["ms"]) else None, err=err or base["err"])
        rows.append(row)
        log(f"[cp] T={T} x{world}: {row}")
    return rows


# ----------------------------------------------------------------------------- report


def report(train_rows: List[dict], cp_rows: List[dict], device: torch.device, sz: dict, smoke: bool) -> str:
    world = dist.get_world_size()
    extra = [f"Ranks: {world} ({dist.get_backend()})",
             "Sizes: " + ("smoke (tiny)" if smoke else "full") + f": {json.dumps({k: v for k, v in sz.items()})}"]
    out = [C.header("Distributed scaling: DDP / FSDP2 training and context-parallel attention", device, extra)]
    if train_rows:
        t = C.Table(["model", "mode", "setup", "ranks", "step (ms)", "weak-scaling eff.", "payload B/step/rank",
                     "param bytes", "buffer bytes", "note"])
        for r in train_rows:
            t.add([r["model"], r["mode"], r["setup"], r["ranks"], C.fmt_ms(r["step_ms"]),
                   C.fmt_pct(100 * r["eff"]) if r["eff"] else "n/a", C.fmt_bytes(r["payload"]),
                   C.fmt_bytes(r["params"]), C.fmt_bytes(r["buffers"]), r["err"]], r)
        out += ["## Training (BERT-base-shaped encoder)", "", t.markdown(), ""]
    if cp_rows:
        t = C.Table(["tokens", "ranks", "tokens/rank", "context-parallel fwd+bwd (ms)", "peak/rank",
                     "1 rank native @ tokens/rank (ms)", "peak", "weak-scaling eff.", "1 rank native @ tokens (ms)",
                     "peak",
                     "note"])
        for r in cp_rows:
            t.add([r["tokens"], r["ranks"], r["per_rank"], C.fmt_ms(r["cp_ms"]), C.fmt_bytes(r["cp_peak"]),
                   C.fmt_ms(r["base_ms"]), C.fmt_bytes(r["base_peak"]),
                   C.fmt_pct(100 * r["eff"]) if r["eff"] else "n/a", C.fmt_ms(r["full_ms"]),
                   C.fmt_bytes(r["full_peak"]), r["err"]], r)
        out += ["## Context-parallel causal FAVOR+ attention (fwd+bwd)", "", t.markdown(), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few steps (CPU/gloo check that it runs)")
    p.add_argument("--parts", default="train,cp", help="comma list of: train, cp")
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="torch.compile rows (default: both on CUDA, off on CPU)")
    p.add_argument("--setups", default=",".join(SETUPS),
                   help="comma list of training setups (single, ddp, ddp_nobb, fsdp) in eager mode")
    p.add_argument("--compiled-setups", default=None,
                   help="the same for the compiled rows (default: as --setups)")
    p.add_argument("--tokens", default=None, help="comma list of total sequence lengths for the cp part")
    p.add_argument("--cp-chunk", type=int, default=256, help="chunk_size of the context-parallel path")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available; run with --device cpu")
    device = init(args.device)
    try:
        if device.type == "cuda":
            C.disable_tf32()
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        sz = dict(SMOKE if args.smoke else FULL)
        parts = {s.strip() for s in args.parts.split(",") if s.strip()}
        bad = parts - {"train", "cp"}
        if bad:
            sys.exit(f"--parts: unknown part(s) {sorted(bad)}; expected train and/or cp")
        comp = args.compile or ("both" if device.type == "cuda" else "off")
        modes = {"off": [False], "on": [True], "both": [False, True]}[comp]
        tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else sz["cp_tokens"]
        setups = {False: [x for x in args.setups.split(",") if x]}
        setups[True] = [x for x in (args.compiled_setups or args.setups).split(",") if x]
        for lst in setups.values():
            unknown = set(lst) - set(SETUPS)
            if unknown:
                sys.exit(f"--setups: unknown setup(s) {sorted(unknown)}; expected some of {', '.join(SETUPS)}")
            if "single" in lst:  # the baseline first: efficiencies need it
                lst.remove("single")
                lst.insert(0, "single")
        train_rows = bench_train(sz, device, modes, setups) if "train" in parts else []
        cp_rows = bench_cp(sz, device, tokens, args.cp_chunk) if "cp" in parts else []
        if rank0():
            text = report(train_rows, cp_rows, device, sz, args.smoke)
            print(text)
            if args.markdown:
                with open(args.markdown, "w") as f:
                    f.write(text)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"train": train_rows, "cp": cp_rows, "ranks": dist.get_world_size()}, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
