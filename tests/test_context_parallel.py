"""Multi-process gloo jobs on CPU: context-parallel FAVOR+ attention, and FSDP2 + DCP resharding.

One spawned 4-process job (process start-up dominates the cost, so it runs every case inside;
the 2-rank cases run on the subgroup of ranks 0 and 1): every rank computes
``panther.distributed.context_parallel_favor_attention`` (and the ``ContextParallel`` wrapper of ``RandMultiHeadAttention``) on its contiguous chunk of a sequence
(unequal chunk lengths, on 4 ranks one with a single position and one with none; several local
chunks of the causal scan; padding that leaves the first ranks without any unpadded key), in float64, with forward outputs
and gradients saved per rank. The assertions run in the pytest process against the single-process
op ``torch.ops.panther.favor_attention`` on the concatenated sequence: outputs and the gradients
of query, key and value (concatenated over ranks) and of the projection (summed over ranks) must
agree to float64 rounding, which includes the stabilisers: a key stabiliser off by 1 changes the
result through eps (by ~3e-5 absolute in case 0, non-causal), far above the tolerance.

The same job checks that an FSDP2 (``fully_shard``) model with its Adam state, saved with DCP on 2
ranks mid-training, resumes on 4 ranks with the same data order and continues the uninterrupted
2-rank loss curve within 1e-3 relative.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import panther as pr
import panther.distributed as pd

pytestmark = pytest.mark.filterwarnings("ignore:.*sketch numbers:UserWarning")

B, H, L, D, DV, M = 2, 2, 13, 4, 3, 6
SPLITS = {2: [5, 8], 4: [1, 6, 0, 6]}  # one rank holds a single position, one none
CHUNK = 2  # the local causal scan runs over several chunks per rank
CASES = [(kern, causal, masked) for kern in ("softmax", "relu") for causal in (False, True) for masked in (False, True)]
E_MOD = 8  # RandMultiHeadAttention width for the wrapper


def case_inputs(i: int):
    """Full-sequence inputs of case i (same on every rank and in the pytest process)."""
    g = torch.Generator().manual_seed(100 + i)
    dt = torch.float64
    # Keys grow along the sequence: later ranks raise the running key maximum (rescaled states).
    grow = torch.linspace(0.5, 2.5, L, dtype=dt)[None, None, :, None]
    q = torch.randn(B, H, L, D, generator=g, dtype=dt) * 1.5
    k = torch.randn(B, H, L, D, generator=g, dtype=dt) * grow
    v = torch.randn(B, H, L, DV, generator=g, dtype=dt)
    W = torch.randn(M, D, generator=g, dtype=dt)
    gout = torch.randn(B, H, L, DV, generator=g, dtype=dt)
    mask = torch.rand(B, L, generator=g) < 0.3
    mask[1, :9] = True  # batch 1: the first ranks' chunks wholly padded (no key seen yet)
    mask[0, 0] = True
    return q, k, v, W, gout, mask


def chunk_bounds(world: int, rank: int) -> tuple[int, int]:
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def module_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, L, E_MOD, generator=g, dtype=torch.float64)
    gout = torch.randn(B, L, E_MOD, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < 0.25
    return x, gout, mask


def make_mha(causal: bool, group=None) -> nn.Module:
    return pr.nn.RandMultiHeadAttention(E_MOD, num_heads=2, num_random_features=6, iscausal=causal,
                                        dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                                        context_parallel_group=group)


# ---- FSDP2 + DCP resharding -------------------------------------------------------------------

FS_DIM, FS_SEQ, FS_GLOBAL_BATCH, FS_STEPS, FS_SAVE_AT = 16, 4, 8, 6, 3


class FsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = pr.nn.SKLinear(FS_DIM, FS_DIM, num_terms=2, low_rank=3)
        self.attn = pr.nn.RandMultiHeadAttention(FS_DIM, num_heads=2, num_random_features=8)
        self.out = pr.nn.SKLinear(FS_DIM, 4, num_terms=1, low_rank=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + self.attn(h, h, h)[0]
        return self.out(h.mean(dim=1))


def fs_batch(step: int):
    """The global batch of a step: the data order does not depend on the number of ranks."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(FS_GLOBAL_BATCH, FS_SEQ, FS_DIM, generator=g)
    teacher = torch.linspace(-1, 1, FS_DIM * 4).reshape(FS_DIM, 4)  # a learnable target
    return x, x.mean(1) @ teacher


def _fs_build(world: int, seed: int, group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = FsNet()
    mesh = DeviceMesh.from_group(group, "cpu")
    for sub in (model.inp, model.attn, model.out):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _fs_step(model, opt, step: int, rank: int, world: int, group) -> float:
    x, y = fs_batch(step)
    n = FS_GLOBAL_BATCH // world
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
    loss.backward()
    opt.step()
    t = loss.detach().clone()
    dist.all_reduce(t, group=group)
    return t.item() / world


def _fs_part(rank: int, groups: dict, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out: dict = {}
    if rank < 2:  # the uninterrupted run on 2 ranks, saving mid-way
        g2 = groups[2]
        model, opt = _fs_build(2, seed=11, group=g2)
        losses = []
        for step in range(FS_STEPS):
            if step == FS_SAVE_AT:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt, process_group=g2)
            losses.append(_fs_step(model, opt, step, rank, 2, g2))
        out["losses"] = losses
    dist.barrier()
    # Resume on 4 ranks, from a differently seeded model.
    model, opt = _fs_build(4, seed=12, group=groups[4])
    with torch.no_grad():
        x, y = fs_batch(FS_SAVE_AT)
        out["fresh_loss"] = nn.functional.mse_loss(model(x), y).item()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out["resumed"] = [_fs_step(model, opt, step, rank, 4, groups[4]) for step in range(FS_SAVE_AT, FS_STEPS)]
    return out


# ---- the spawned job ---------------------------------------------------------------------------


def _cp_part(rank: int, world: int, group) -> dict:
    lo, hi = chunk_bounds(world, rank)
    out: dict = {"cases": [], "module": {}}
    for i, (kern, causal, masked) in enumerate(CASES):
        q, k, v, W, gout, mask = case_inputs(i)
        ql, kl, vl = (t[:, :, lo:hi].clone().requires_grad_(True) for t in (q, k, v))
        Wl = W.clone().requires_grad_(True)
        ml = mask[:, lo:hi] if masked else None
        y = pd.context_parallel_favor_attention(ql, kl, vl, Wl, kern, causal, ml, group, chunk_size=CHUNK)
        grads = torch.autograd.grad(y, (ql, kl, vl, Wl), gout[:, :, lo:hi])
        out["cases"].append({"y": y.detach(), "grads": [g.detach() for g in grads]})
    x, gout, mask = module_inputs()
    for causal in (False, True):
        layer = make_mha(causal)
        cp = pd.ContextParallel(layer, group, chunk_size=CHUNK)
        xl = x[:, lo:hi].clone().requires_grad_(True)
        y, none = cp(xl, xl, xl, key_padding_mask=mask[:, lo:hi])
        assert none is None
        (y * gout[:, lo:hi]).sum().backward()
        out["module"][causal] = {"y": y.detach(), "dx": xl.grad,
                                 "pgrads": {n: p.grad.clone() for n, p in layer.named_parameters()}}
    # The layer's own option: RandMultiHeadAttention(..., context_parallel_group=group).
    out["module_group"] = {}
    for causal in (False, True):
        layer = make_mha(causal, group)
        xl = x[:, lo:hi].clone().requires_grad_(True)
        y, _ = layer(xl, xl, xl, key_padding_mask=mask[:, lo:hi])
        (y * gout[:, lo:hi]).sum().backward()
        out["module_group"][causal] = {"y": y.detach(), "dx": xl.grad,
                                       "pgrads": {n: p.grad.clone() for n, p in layer.named_parameters()}}
    return out


def _worker(rank: int, tmp: str, ckpt: str) -> None:
    """One 4-process job (process start-up dominates the cost); the 2-rank parts run on the
    subgroup of ranks 0 and 1 while ranks 2 and 3 wait."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    warnings.filterwarnings("ignore", message=".*sketch numbers")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=4, timeout=timedelta(seconds=90))
    try:
        groups = {2: dist.new_group([0, 1]), 4: dist.group.WORLD}
        res: dict = {"cp": {}}
        for world in (2, 4):
            if rank < world:
                res["cp"][world] = _cp_part(rank, world, groups[world])
        res["fsdp"] = _fs_part(rank, groups, ckpt)
        torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(str(tmp), str(tmp / "fsdp_ckpt")), nprocs=4, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.fixture(scope="module")
def run2(job):
    return [r["cp"][2] for r in job[:2]]


@pytest.fixture(scope="module")
def run4(job):
    return [r["cp"][4] for r in job]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check_op(results: list[dict], world: int) -> None:
    for i, (kern, causal, masked) in enumerate(CASES):
        q, k, v, W, gout, mask = case_inputs(i)
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, W)]
        y = torch.ops.panther.favor_attention(*ins, kern, causal, mask if masked else None)
        ref_grads = torch.autograd.grad(y, ins, gout)
        tag = f"world={world} kernel={kern} causal={causal} masked={masked}"
        got = [r["cases"][i] for r in results]
        _close(torch.cat([c["y"] for c in got], 2), y.detach(), f"{tag} output")
        for j, name in enumerate(("query", "key", "value")):
            _close(torch.cat([c["grads"][j] for c in got], 2), ref_grads[j], f"{tag} grad {name}")
        _close(sum(c["grads"][3] for c in got), ref_grads[3], f"{tag} grad projection")


def _check_module(results: list[dict], world: int, part: str = "module") -> None:
    x, gout, mask = module_inputs()
    for causal in (False, True):
        layer = make_mha(causal)
        xr = x.clone().requires_grad_(True)
        y, _ = layer(xr, xr, xr, key_padding_mask=mask)
        (y * gout).sum().backward()
        got = [r[part][causal] for r in results]
        tag = f"{part} world={world} causal={causal}"
        _close(torch.cat([g["y"] for g in got], 1), y.detach(), f"{tag} output")
        _close(torch.cat([g["dx"] for g in got], 1), xr.grad, f"{tag} input grad")
        for n, p in layer.named_parameters():
            _close(sum(g["pgrads"][n] for g in got), p.grad, f"{tag} grad {n}")


def test_context_parallel_two_ranks_equals_single_process(run2):
    _check_op(run2, 2)


def test_context_parallel_four_ranks_equals_single_process(run4):
    _check_op(run4, 4)


def test_context_parallel_module_wrapper(run2, run4):
    _check_module(run2, 2)
    _check_module(run4, 4)


def test_module_context_parallel_group_option(run2, run4):
    """RandMultiHeadAttention(..., context_parallel_group=group) on each rank's chunk equals the
    single-process layer on the whole sequence: outputs, input and parameter gradients."""
    _check_module(run2, 2, "module_group")
    _check_module(run4, 4, "module_group")


def test_module_context_parallel_group_errors():
    x = torch.randn(1, 4, E_MOD, dtype=torch.float64)
    with pytest.raises(ValueError, match="context_parallel_group must be a torch.distributed ProcessGroup"):
        pr.nn.RandMultiHeadAttention(E_MOD, 2, 6, context_parallel_group="world")
    rv = os.path.join(__import__("tempfile").mkdtemp(), "rendezvous")
    dist.init_process_group("gloo", init_method="file://" + rv, rank=0, world_size=1)
    try:
        layer = make_mha(True, dist.group.WORLD)
        with pytest.raises(ValueError, match="attn_mask must be None"):
            layer(x, x, x, attn_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))
        with pytest.raises(ValueError, match="need_weights must be False"):
            layer(x, x, x, need_weights=True)
        with pytest.raises(ValueError, match="cannot be scripted"):
            torch.jit.script(layer)
        # copies (e.g. nn.TransformerEncoder's layer clones) share the group, copy the rest
        twin = __import__("copy").deepcopy(layer)
        assert twin.context_parallel_group is layer.context_parallel_group
        assert twin.Wq is not layer.Wq and torch.equal(twin.Wq, layer.Wq)
        # one rank: the whole sequence, equal to the plain layer
        torch.testing.assert_close(layer(x, x, x)[0], make_mha(True)(x, x, x)[0], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_fsdp2_dcp_save_on_two_ranks_resume_on_four(job):
    """Saved on 2 ranks after FS_SAVE_AT steps, resumed on 4 from a differently seeded model: the
    loss curve continues the uninterrupted 2-rank run within 1e-3 relative."""
    full = job[0]["fsdp"]["losses"]
    assert job[1]["fsdp"]["losses"] == full
    resumed = job[0]["fsdp"]["resumed"]
    assert all(r["fsdp"]["resumed"] == resumed for r in job)
    assert len(resumed) == FS_STEPS - FS_SAVE_AT
    assert len(set(full)) == FS_STEPS, full  # a new batch every step
    # The control: the fresh model before loading is far from the saved one.
    assert abs(job[0]["fsdp"]["fresh_loss"] - full[FS_SAVE_AT]) > 1e-2 * full[FS_SAVE_AT]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[FS_SAVE_AT:]), rtol=1e-3, atol=0)


# ---- single-process checks (no spawn) ------------------------------------------------------------


def test_eps_constants_match_the_reference():
    from panther import _reference as ref
    from panther import distributed as d

    assert d._SOFTMAX_EPS == ref.FAVOR_SOFTMAX_EPS and d._RELU_EPS == ref.FAVOR_RELU_EPS


def test_errors_without_process_group_and_bad_arguments():
    q = torch.randn(1, 2, 4, 3)
    W = torch.randn(5, 3)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="context_parallel_favor_attention: torch.distributed is not init"):
            pd.context_parallel_favor_attention(q, q, q, W)
    with pytest.raises(ValueError, match="kernel_fn must be 'softmax' or 'relu', got 'gelu'"):
        pd._check(q, q, q, W, "gelu", False, None, 4)
    with pytest.raises(ValueError, match=r"causal=True needs equal query and key chunk lengths.*Lq=4 and Lk=3"):
        pd._check(q, q[:, :, :3], q[:, :, :3], W, "softmax", True, None, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch=1, Lk=4\)"):
        pd._check(q, q, q, W, "softmax", False, torch.zeros(1, 5, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"projection must have shape \(num_random_features >= 1, head_dim=3\)"):
        pd._check(q, q, q, torch.randn(5, 4), "softmax", False, None, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        pd._check(q, q, q, W, "softmax", False, None, 0)
    with pytest.raises(TypeError, match="ContextParallel: module must be a RandMultiHeadAttention"):
        pd.ContextParallel(nn.Linear(3, 3))
    cp = pd.ContextParallel(make_mha(False))
    with pytest.raises(ValueError, match="ContextParallel: attn_mask must be None"):
        cp(torch.randn(1, 2, E_MOD), torch.randn(1, 2, E_MOD), torch.randn(1, 2, E_MOD),
           attn_mask=torch.ones(2, 2, dtype=torch.bool))


# ---- the distributed benchmark's smoke mode under torchrun ---------------------------------------


def test_bench_distributed_smoke_under_torchrun(tmp_path):
    """bench/python/bench_distributed.py --smoke on 2 gloo ranks (tiny sizes): every row is produced."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "python" / "bench_distributed.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(pr.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    out = tmp_path / "res.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(script), "--smoke", "--device", "cpu", "--json", str(out), "--markdown", str(tmp_path / "res.md"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ranks"] == 2
    setups = {(r["model"].split()[0], r["setup"]) for r in res["train"]}
    for model in ("dense", "sketched"):
        for setup in ("1 rank, no wrapper", "DDP broadcast_buffers=True", "DDP broadcast_buffers=False", "FSDP2"):
            assert (model, setup) in setups, (model, setup, setups)
    for r in res["train"]:
        assert r["step_ms"] > 0
        if r["setup"].startswith("DDP"):
            # The reducer all-reduces every parameter's gradient; buffers only when broadcast.
            assert r["grad_bytes"] == r["params"]
            assert r["payload"] == r["params"] + (r["buffers"] if r["setup"].endswith("True") else 0)
    sk = [r for r in res["train"] if r["model"].startswith("sketched")]
    assert all(r["buffers"] > 0 for r in sk)
    assert [r["tokens"] for r in res["cp"]] == [256, 512]
    assert all(r["cp_ms"] > 0 and r["per_rank"] * 2 == r["tokens"] for r in res["cp"])
    assert "Context-parallel causal FAVOR+ attention" in (tmp_path / "res.md").read_text()


def test_docstring_examples(monkeypatch):
    """The ``>>>`` examples of panther.distributed run (a 1-rank gloo group, destroyed at the end)."""
    import doctest

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    res = doctest.testmod(pd, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 8 and res.failed == 0, res
    assert not dist.is_initialized()


# ---- GPUs (NCCL): run by the GPU check ---------------------------------------------------------


def _cuda_cp_worker(rank: int, tmp: str, world: int) -> None:  # pragma: no cover - GPU machine only
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'rv')}", rank=rank, world_size=world)
    try:
        Lr = 96  # per rank; several chunks of the local scan (chunk_size=32)
        res = []
        for i, (kern, causal, masked) in enumerate(CASES):
            g = torch.Generator().manual_seed(500 + i)
            T = Lr * world
            q, k, v, gout = (torch.randn(2, 3, T, 16, generator=g) for _ in range(4))
            W = torch.randn(32, 16, generator=g)
            mask = torch.rand(2, T, generator=g) < 0.2 if masked else None
            lo, hi = rank * Lr, (rank + 1) * Lr
            ins = [t[:, :, lo:hi].cuda().requires_grad_(True) for t in (q, k, v)] + [W.cuda().requires_grad_(True)]
            y = pd.context_parallel_favor_attention(*ins, kern, causal, None if mask is None else mask[:, lo:hi].cuda(),
                                                    chunk_size=32)
            grads = torch.autograd.grad(y, ins, gout[:, :, lo:hi].cuda())
            res.append({"y": y.cpu(), "grads": [t.cpu() for t in grads]})
        torch.save(res, os.path.join(tmp, f"cuda_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_context_parallel_nccl_gpus(tmp_path):
    """On every GPU (1 to 4 ranks, NCCL), fp32: equal to the native CUDA op on the concatenated sequence."""
    world = min(torch.cuda.device_count(), 4)
    mp.spawn(_cuda_cp_worker, args=(str(tmp_path), world), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"cuda_rank{r}.pt") for r in range(world)]
    for i, (kern, causal, masked) in enumerate(CASES):
        g = torch.Generator().manual_seed(500 + i)
        T = 96 * world
        q, k, v, gout = (torch.randn(2, 3, T, 16, generator=g) for _ in range(4))
        W = torch.randn(32, 16, generator=g)
        mask = torch.rand(2, T, generator=g) < 0.2 if masked else None
        ins = [t.cuda().requires_grad_(True) for t in (q, k, v, W)]
        y = torch.ops.panther.favor_attention(*ins, kern, causal, None if mask is None else mask.cuda())
        ref = torch.autograd.grad(y, ins, gout.cuda())
        tag = f"world={world} kernel={kern} causal={causal} masked={masked}"
        tol = dict(rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(torch.cat([r[i]["y"] for r in got], 2), y.cpu(), **tol, msg=lambda m: f"{tag}: {m}")
        for j in range(3):
            torch.testing.assert_close(torch.cat([r[i]["grads"][j] for r in got], 2), ref[j].cpu(), **tol,
                                       msg=lambda m: f"{tag} grad {j}: {m}")
        torch.testing.assert_close(sum(r[i]["grads"][3] for r in got), ref[3].cpu(), rtol=1e-3, atol=1e-3,
                                   msg=lambda m: f"{tag} grad projection: {m}")


def _cuda_fsdp_worker(rank: int, tmp: str, world: int, ckpt: str, phase: str) -> None:  # pragma: no cover
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore", message=".*sketch numbers")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'rv_' + phase)}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(11 if phase == "save" else 12)
        model = FsNet().cuda()
        mesh = init_device_mesh("cuda", (world,))
        for sub in (model.inp, model.attn, model.out):
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step(s: int) -> float:
            x, y = (t.cuda() for t in fs_batch(s))
            n = FS_GLOBAL_BATCH // world
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
            loss.backward()
            opt.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            return t.item() / world

        losses = []
        if phase == "save":
            for s in range(FS_STEPS):
                if s == FS_SAVE_AT:
                    msd, osd = get_state_dict(model, opt)
                    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
                losses.append(step(s))
        else:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            losses = [step(s) for s in range(FS_SAVE_AT, FS_STEPS)]
        if rank == 0:
            torch.save(losses, os.path.join(tmp, f"losses_{phase}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_fsdp2_dcp_nccl_resume_on_other_rank_count(tmp_path):
    """FSDP2 over NCCL: saved on N GPUs (all of them, up to 4), resumed on N // 2 (at least 1)
    with the same data order: the loss curve continues within 1e-3 relative."""
    n = min(torch.cuda.device_count(), 4)
    if n < 2:
        pytest.skip(f"needs 2 GPUs for NCCL resharding, found {torch.cuda.device_count()}")
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(_cuda_fsdp_worker, args=(str(tmp_path), n, ckpt, "save"), nprocs=n, join=True)
    mp.spawn(_cuda_fsdp_worker, args=(str(tmp_path), n // 2, ckpt, "load"), nprocs=n // 2, join=True)
    full = torch.load(tmp_path / "losses_save.pt")
    resumed = torch.load(tmp_path / "losses_load.pt")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[FS_SAVE_AT:]), rtol=1e-3, atol=0)
