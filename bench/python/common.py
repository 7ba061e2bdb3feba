"""Shared helpers of Panther's Python benchmarks: timing, peak memory, hardware floors, tables.

Timing
  CUDA: CUDA events around each repetition (on the current stream), after warm-up; the median
        of the repetitions is reported. No L2 flush (the weights of the large configs do not fit
        in L2 anyway).
  CPU:  ``time.perf_counter`` around each repetition after warm-up; the median is reported.
  ``time_fns`` measures several callables round-robin (one call of each per round), so the
  ratios between them hold on a machine shared with other work.
  Repetitions stop at ``reps`` or when ``budget_s`` seconds of measuring are spent (at least
  ``min_reps``), so slow baselines do not eat the run.

Peak memory
  CUDA: ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before it
        (the extra memory the call needs: outputs, saved tensors, workspaces, gradients).
  CPU:  not measured ("n/a"): the caching CPU allocator gives no reliable number.

Hardware floors
  H100 (SXM, HBM3): 3.0 TB/s memory bandwidth (a device-to-device copy, bytes read + bytes
  written, measured on the device machine), 790 TFLOP/s bf16/fp16 dense tensor-core, 51 TFLOP/s
  fp32 without tensor cores (TF32 off). Other GPUs and CPUs: measured in the same run (a large
  copy for bandwidth, a large matrix product for arithmetic). Every table states the numbers used.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------- environment


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit() -> str:
    """The commit being measured: $PANTHER_COMMIT; else ``git rev-parse`` when the tree is clean;
    else a COMMIT file (the device machine gets a working tree newer than its copy of .git, and
    the file that travels with it names the tree); else ``git rev-parse`` marked -dirty, or
    'unknown'."""
    env = os.environ.get("PANTHER_COMMIT")
    if env:
        return env
    root = repo_root()
    head = None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            head = out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if head is not None and not head.endswith("-dirty"):
        return head
    path = os.path.join(root, "COMMIT")
    if os.path.exists(path):
        with open(path) as f:
            text = f.read().strip()
        if text:
            return text
    return head or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def header(title: str, device: torch.device, extra: Sequence[str] = ()) -> str:
    """Markdown header: what, where, which torch/Panther, commit and date."""
    try:
        import panther

        pinfo = panther.build_info()
        pver = f"panther {pinfo.get('version')} (built for torch {pinfo.get('torch_version')}, CUDA kernels: {pinfo.get('with_cuda')})"
    except Exception as e:  # noqa: BLE001 - the header must never fail
        pver = f"panther not importable: {e}"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    lines = [
        f"# {title}",
        "",
        f"- Device: {device_name(device)}",
        f"- torch {torch.__version__}{cuda}; {pver}",
        f"- Commit: {commit()}",
        f"- Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        lines.append(f"- Load average at start: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    lines += [f"- {e}" for e in extra]
    return "\n".join(lines) + "\n"


def pick_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available to this torch "
                     f"({torch.__version__}); run with --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def disable_tf32() -> None:
    """fp32 means fp32: no TF32 in matrix products or convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def dtype_name(dt: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dt:
            return k
    return str(dt)


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int

    def __str__(self) -> str:
        return fmt_ms(self.median_ms)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            min_reps: int = 3, budget_s: float = 1.0) -> Timing:
    """Median time of ``fn()`` in milliseconds (see the module docstring for the method)."""
    for _ in range(max(warmup, 1)):
        fn()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        start_all = time.perf_counter()
        # Record in groups so a slow call stops the loop early; the events of one group are
        # read after a single synchronisation.
        while len(times) < reps:
            group = []
            for _ in range(min(5, reps - len(times))):
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                group.append((s, e))
            torch.cuda.synchronize(device)
            times += [s.elapsed_time(e) for s, e in group]
            if len(times) >= min_reps and time.perf_counter() - start_all > budget_s:
                break
    else:
        start_all = time.perf_counter()
        while len(times) < reps:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= min_reps and time.perf_counter() - start_all > budget_s:
                break
    return Timing(statistics.median(times), min(times), len(times))


def time_fns(fns: Dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3, reps: int = 20,
             min_reps: int = 3, budget_s: float = 1.0) -> Dict[str, Timing]:
    """Like :func:`time_fn` for several callables, measured round-robin (one call of each per
    round), so that load from other processes or clock changes affect all of them alike and
    their ratios stay meaningful on a shared machine."""
    for _ in range(max(warmup, 1)):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < reps:
        if device.type == "cuda":
            evs = {}
            for k, fn in fns.items():
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                evs[k] = (s, e)
            torch.cuda.synchronize(device)
            for k, (s, e) in evs.items():
                times[k].append(s.elapsed_time(e))
        else:
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= min_reps and time.perf_counter() - start_all > budget_s:
            break
    return {k: Timing(statistics.median(v), min(v), len(v)) for k, v in times.items()}


def host_and_total_us(fn: Callable[[], object], device: torch.device, n: int,
                      warmup: int = 3) -> Tuple[float, float]:
    """(host submit, total) microseconds per call of n back-to-back calls after warm-up: the time
    to return from the n calls, and to their end on the device. Close together: the calls are
    bound by the host (launch and dispatch), not by the device's work."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    synchronize(device)
    return 1e6 * (t1 - t0) / n, 1e6 * (time.perf_counter() - t0) / n


def back_to_back_us(fn: Callable[[], object], n: int, runs: int = 1, warmup: int = 1) -> List[float]:
    """CUDA: microseconds per call of n back-to-back calls between two events (after `warmup`
    calls), for each of `runs` runs, sorted (the median is [runs // 2]). The calls queue up
    without waiting for each other: for CUDA graph replays and host-bound loops."""
    out = []
    for _ in range(runs):
        for _ in range(warmup):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize()
        out.append(1e3 * s.elapsed_time(e) / n)
    return sorted(out)


def kernel_rows(fn: Callable[[], object], reps: int = 5) -> List[Tuple[str, float, float]]:
    """CUDA: (kernel name, GPU microseconds per call of fn, launches per call) from the torch
    profiler over `reps` calls after one unprofiled call, largest time first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / reps, e.count / reps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra device memory one call of ``fn`` needs at its peak (CUDA), or None (CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- hardware floors


@dataclass
class Hardware:
    name: str
    bandwidth: float  # bytes / s
    flops: Dict[torch.dtype, float]  # dtype -> FLOP / s
    source: str  # where the numbers come from

    def describe(self) -> str:
        def rate(v: float) -> str:
            return f"{v / 1e12:.1f} TFLOP/s" if v >= 1e12 else f"{v / 1e9:.1f} GFLOP/s"

        bw = f"{self.bandwidth / 1e12:.2f} TB/s" if self.bandwidth >= 1e12 else f"{self.bandwidth / 1e9:.1f} GB/s"
        f = ", ".join(f"{dtype_name(k)} {rate(v)}" for k, v in self.flops.items())
        return f"floors use: memory {bw}, {f} ({self.source})"

    def floor_ms(self, bytes_moved: float, flop: float, dtype: torch.dtype) -> float:
        """max(bytes / bandwidth, FLOPs / peak rate) in ms."""
        t = bytes_moved / self.bandwidth
        rate = self.flops.get(dtype)
        if rate:
            t = max(t, flop / rate)
        return t * 1e3


H100 = {
    "bandwidth": 3.0e12,
    "flops": {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 51e12, torch.float64: 51e12},
}


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Copy bandwidth (bytes read + bytes written per second) of one large tensor copy."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10, min_reps=3, budget_s=1.0)
    del src, dst
    free_cuda(device)
    return 2 * n * 4 / (t.median_ms * 1e-3)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, reps=10, min_reps=3, budget_s=1.0)
    return 2 * n ** 3 / (t.median_ms * 1e-3)


def hardware(device: torch.device, dtypes: Sequence[torch.dtype]) -> Hardware:
    """The floors for this device: H100 numbers on an H100, measured numbers elsewhere."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name:
            measured = measure_bandwidth(device)
            return Hardware(name, H100["bandwidth"], dict(H100["flops"]),
                            f"H100 numbers; this run's device-to-device copy measured {measured / 1e12:.2f} TB/s")
        bw = measure_bandwidth(device)
        fl = {dt: measure_matmul_flops(device, dt, 8192) for dt in dtypes}
        return Hardware(name, bw, fl, "measured in this run: 1 GiB copy, 8192^3 matmul")
    bw = measure_bandwidth(device, 512 << 20)
    fl = {dt: measure_matmul_flops(device, dt, 1024) for dt in dtypes if dt in (torch.float32, torch.float64)}
    return Hardware(device_name(device), bw, fl, "measured in this run: 512 MiB copy, 1024^3 matmul")


# ----------------------------------------------------------------------------- formatting


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None or math.isnan(r):
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def fmt_pct(p: Optional[float]) -> str:
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%"


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= s:
            return f"{b / s:.1f} {unit}"
    return f"{b} B"


def fmt_err(e: Optional[float]) -> str:
    if e is None or math.isnan(e):
        return "-"
    return f"{e:.1e}"


@dataclass
class Table:
    columns: List[str]
    rows: List[List[str]] = field(default_factory=list)
    raw: List[Dict[str, object]] = field(default_factory=list)  # unformatted values for CSV

    def add(self, cells: Sequence[object], raw: Optional[Dict[str, object]] = None) -> None:
        assert len(cells) == len(self.columns), (len(cells), len(self.columns))
        self.rows.append([str(c) for c in cells])
        self.raw.append(raw if raw is not None else dict(zip(self.columns, cells)))

    def markdown(self) -> str:
        out = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"

    def write_csv(self, path: str) -> None:
        keys: List[str] = []
        for r in self.raw:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in self.raw:
                w.writerow(r)


def targets_table(results: Sequence[tuple]) -> str:
    """Rows of (target, measured, passed: bool | None). Never asserts; None = not measured."""
    t = Table(["target", "measured", "verdict"])
    if not results:
        t.add(["(no configuration of a target was measured in this run)", "-", "-"])
    for target, measured, ok in results:
        t.add([target, measured, "-" if ok is None else ("PASS" if ok else "MISS")])
    return t.markdown()


def write_png(path: str, title: str, labels: Sequence[str], series: Dict[str, Sequence[Optional[float]]],
              ylabel: str = "ms (median)", log: bool = True) -> None:
    """Grouped bar chart (matplotlib, Agg); silently skipped with a message if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(PNG skipped: matplotlib is not installed; wanted {path})")
        return
    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(n, 1) * 0.5 + 2), 4.5))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ys = [v if v is not None and not math.isnan(v) else 0.0 for v in vals]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(path: Optional[str], text: str) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def emit(text: str, markdown_path: Optional[str]) -> None:
    """Print the report and optionally write it to a markdown file."""
    print(text)
    write_markdown(markdown_path, text)


PARTIAL = "\n_(partial: the run was still going when this was written)_\n"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float64 (NaN if out holds NaN/inf)."""
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64)
    if not torch.isfinite(o).all():
        return float("nan")
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r))


# ----------------------------------------------------------------------------- machine-readable results

RESULT_FIELDS = ("bench", "op", "shape", "dtype", "mode", "baseline", "baseline_ms", "ours_ms", "ratio",
                 "device", "torch", "commit")


class ResultWriter:
    """Machine-readable benchmark results, one JSON object per line (JSON Lines), for
    ``bench/compare.py OLD NEW``.

    Each record has ``RESULT_FIELDS``: ``bench`` (the script), ``op`` (what is measured),
    ``shape`` (the configuration, a string), ``dtype``, ``mode`` ("fwd" / "fwd+bwd"),
    ``baseline`` (what it is compared with in the same run), ``baseline_ms`` and ``ours_ms``
    (medians, null when that implementation failed or was skipped), ``ratio`` = baseline_ms /
    ours_ms (the speedup over the baseline), ``device`` (GPU or CPU name), ``torch`` (version)
    and ``commit``; extra keys may follow (e.g. ``note``). The file is rewritten from scratch
    and each record is flushed as it is measured, so a run that is stopped keeps its rows.
    ``path=None`` writes nothing.
    """

    def __init__(self, path: Optional[str], bench: str, device: torch.device):
        self.path = path
        self.bench = bench
        self.env = {"device": device_name(device).split(" (")[0], "torch": torch.__version__, "commit": commit()}
        self.records: List[Dict[str, object]] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def add(self, op: str, shape: str, dtype: str, mode: str, baseline: str, baseline_ms: Optional[float],
            ours_ms: Optional[float], **extra: object) -> Dict[str, object]:
        ok = baseline_ms is not None and ours_ms is not None and ours_ms > 0
        rec: Dict[str, object] = {
            "bench": self.bench, "op": op, "shape": shape, "dtype": dtype, "mode": mode, "baseline": baseline,
            "baseline_ms": baseline_ms, "ours_ms": ours_ms,
            "ratio": (baseline_ms / ours_ms) if ok else None,  # type: ignore[operator]
            **self.env,
        }
        rec.update(extra)
        self.records.append(rec)
        if self.path:
            import json

            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=False) + "\n")
        return rec


def read_results(path: str) -> List[Dict[str, object]]:
    """The records of a ResultWriter file (JSON Lines; blank lines ignored)."""
    import json

    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
    return out


def compare_with_rev(rev: str, script: str, argv: Sequence[str], runs: int = 1) -> int:
    """``--compare REV`` of the benchmark scripts: runs ``bench/compare.py --rev REV -- script
    argv`` (REV built in a temporary worktree, both builds measured by this script, then the
    per-row table of new/old times). ``argv`` is the script's arguments without ``--compare``."""
    cmd = [sys.executable, os.path.join(repo_root(), "bench", "compare.py"), "--rev", rev, "--runs", str(runs),
           "--", os.path.relpath(os.path.abspath(script), repo_root()), *argv]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=repo_root()).returncode


def strip_option(argv: Sequence[str], *names: str) -> List[str]:
    """argv without ``--name VALUE`` / ``--name=VALUE`` for each name."""
    out: List[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------- sketched layers


def two_gemm_operands(sk) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """An SKLinear as the plain two-GEMM product ``addmm(b, x @ A, B)``: A ``(d_in, 2Lk)``,
    B ``(2Lk, d_out)`` pre-scaled by 1/(2L), bias; leaf tensors of the layer's dtype."""
    L, k = sk.num_terms, sk.low_rank
    with torch.no_grad():
        S1 = sk.S1s.permute(1, 0, 2).reshape(sk.in_features, L * k)
        U2 = sk.U2s.permute(1, 0, 2).reshape(sk.in_features, L * k)
        A = torch.cat([S1, U2], dim=1).contiguous()
        B = (torch.cat([sk.U1s.reshape(L * k, -1), sk.S2s.reshape(L * k, -1)], dim=0) / (2 * L)).contiguous()
        b = sk.bias.detach().clone()
    return A, B, b


def write_json_lines(path: Optional[str], rows: Sequence[Dict], meta: Dict) -> None:
    """One JSON object per row (the row's raw numbers plus the run's metadata), for scripts that
    keep their own row dicts (bench_linear_grid.py, bench_models.py); ResultWriter writes the
    fixed-column records bench/compare.py reads."""
    import json

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}, default=str) + "\n")
