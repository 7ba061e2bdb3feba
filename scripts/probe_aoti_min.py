"""Minimal AOTInductor custom-op probe: is a crash in ``aoti_load_package`` torch's or ours?

Usage::

    python scripts/probe_aoti_min.py --device cpu      # or --device cuda
    python scripts/probe_aoti_min.py --device cuda --cases plain,py_scale -v

Each case builds a tiny module, ``torch.export.export``s it, compiles it with
``torch._inductor.aoti_compile_and_package`` into a temp dir and then loads the package with
``torch._inductor.aoti_load_package`` in a FRESH process, runs it and compares with the eager
output. Compiling and loading each happen in child processes (this script re-run with
``--child ...``), so a segfault shows up as a negative exit code (-11 = SIGSEGV) in the summary
instead of killing the probe.

Cases (the first three use no Panther code at all):

  plain          nn.Linear only: AOTInductor itself works.
  py_scale       nn.Linear + Python custom op ``probe::scale(Tensor x) -> Tensor`` (torch.library.custom_op):
                 the generic AOTI proxy-executor path for custom ops, no C++ library involved.
  py_mimic       Python custom op with a schema like ours:
                 ``probe::mimic(Tensor x, Tensor? bias, str mode, bool flag, int[] dims) -> Tensor``.
  py_mimic_none  the same op with bias=None and the defaulted args left out (None/default path).
  sketched       torch.ops.panther.sketched_linear called directly (child: ``import panther`` first).
  favor          torch.ops.panther.favor_attention called directly.
  sketched_late  the ``sketched`` package loaded by a child that imports panther only AFTER
                 aoti_load_package (first load without the op library; if that raises, import
                 panther and load again).
  sketched_lib   the ``sketched`` package loaded by a child that never imports panther and only
                 does ``torch.ops.load_library(<libpanther_ops.so>)`` (path computed by the parent).

Reading the result:
  * plain fails                    -> AOTInductor itself is broken on this install (not us).
  * py_* fail like sketched        -> torch's custom-op (proxy executor) path is broken in this torch.
  * py_* pass, sketched/favor fail -> something specific to libpanther_ops.so / our registrations
                                      (e.g. ABI mismatch with this torch, a bad kernel, schema).
  * sketched fails, sketched_lib passes (or the reverse) -> the Python side of ``import panther``.

For every failing load the probe re-runs it with ``python -X faulthandler`` (Python stack at the
crash) plus a few torch debug env vars, then (if gdb is installed) under ``gdb -batch`` for the
native backtrace, and prints the package's extern-kernel JSON (how the custom-op call was
serialised). ``--keep`` leaves the temp dir in place for further poking.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

# NOTE: no top-level `import torch` / `import panther`: the child processes must control exactly
# when (and whether) panther gets imported. Each function imports what it needs.

THIS = os.path.abspath(__file__)
COMPILE_TIMEOUT_S = 300
LOAD_TIMEOUT_S = 150

# case name -> (model builder name, load mode of the child that runs the package)
#   load modes: "plain" (nothing extra), "py_ops" (define the probe:: Python ops first),
#   "import_panther" (import panther first), "panther_after" (import panther after loading),
#   "load_library" (torch.ops.load_library(path) only; never imports panther)
CASES = {
    "plain": ("plain", "plain"),
    "py_scale": ("py_scale", "py_ops"),
    "py_mimic": ("py_mimic", "py_ops"),
    "py_mimic_none": ("py_mimic_none", "py_ops"),
    "sketched": ("sketched", "import_panther"),
    "favor": ("favor", "import_panther"),
    "sketched_late": ("sketched", "panther_after"),  # reuses the `sketched` package
    "sketched_lib": ("sketched", "load_library"),   # reuses the `sketched` package
    # Not run by default: checks the harness itself (the load child segfaults on purpose after
    # loading the `plain` package), e.g. `--cases selftest_crash --no-gdb`.
    "selftest_crash": ("plain", "crash"),
}
DEFAULT_CASES = [c for c in CASES if not c.startswith("selftest")]


# ------------------------------------------------------------------ Python custom ops (cases 2, 3)

def define_python_ops() -> None:
    """Registers probe::scale and probe::mimic (Python kernels + fake/meta kernels).

    Must run in every process that exports, compiles or loads a package using them: the package
    refers to them by name only, like it refers to panther::* ops."""
    from typing import List, Optional

    import torch
    from torch import Tensor

    @torch.library.custom_op("probe::scale", mutates_args=())
    def scale(x: Tensor) -> Tensor:
        return x * 2

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    # Same argument kinds as panther::favor_attention / sketched_linear: Tensor?, str, bool (with
    # defaults), plus int[] (our backward ops have bool[N]).
    # The schema is spelled out (as in our cpp/library.cpp) rather than inferred, so that it is
    # the same on every torch version.
    @torch.library.custom_op(
        "probe::mimic", mutates_args=(),
        schema='(Tensor x, Tensor? bias, str mode="double", bool flag=True, int[] dims=[-1]) -> Tensor')
    def mimic(x: Tensor, bias: Optional[Tensor], mode: str = "double", flag: bool = True,
              dims: List[int] = (-1,)) -> Tensor:
        y = x * 2 if mode == "double" else x * 3
        if flag:
            y = y + 1
        if bias is not None:
            y = y + bias
        return y.flip(list(dims))

    @mimic.register_fake
    def _(x, bias, mode="double", flag=True, dims=(-1,)):
        return torch.empty_like(x)


# ------------------------------------------------------------------ tiny models (all eval, tiny shapes)

def build_case(name: str, device: str):
    """Returns (module, example args tuple) for model ``name`` on ``device``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)

    if name == "plain":
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(8, 4)

            def forward(self, x):
                return torch.relu(self.lin(x))
        args = (x,)

    elif name == "py_scale":
        define_python_ops()

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(8, 4)

            def forward(self, x):
                return torch.ops.probe.scale(self.lin(x))
        args = (x,)

    elif name in ("py_mimic", "py_mimic_none"):
        define_python_ops()
        with_bias = name == "py_mimic"

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(8, 4)
                self.register_buffer("b", torch.randn(4))

            def forward(self, x):
                h = self.lin(x)
                if with_bias:   # every argument explicit, Tensor? = a tensor
                    return torch.ops.probe.mimic(h, self.b, "triple", False, [0, 2])
                return torch.ops.probe.mimic(h, None)   # Tensor? = None, defaults omitted
        args = (x,)

    elif name == "sketched":
        import panther  # noqa: F401  (registers torch.ops.panther.*)
        L, d_in, k, d_out = 2, 8, 3, 4
        # Shapes from python/panther/ops.py: S1s (L, d_in, k), S2s (L, k, d_out),
        # U1s (L, k, d_out), U2s (L, d_in, k), bias (d_out,).

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.S1s = nn.Parameter(torch.randn(L, d_in, k))
                self.S2s = nn.Parameter(torch.randn(L, k, d_out))
                self.U1s = nn.Parameter(torch.randn(L, k, d_out))
                self.U2s = nn.Parameter(torch.randn(L, d_in, k))
                self.bias = nn.Parameter(torch.randn(d_out))

            def forward(self, x):
                return torch.ops.panther.sketched_linear(x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)
        args = (x,)

    elif name == "favor":
        import panther  # noqa: F401
        B, H, Lq, D, M_feat = 1, 2, 5, 4, 6
        q, k, v = (torch.randn(B, H, Lq, D) for _ in range(3))

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("proj", torch.randn(M_feat, D))   # (M, D)

            def forward(self, q, k, v):
                # kernel_fn and causal explicit, key_padding_mask None (Tensor? = None).
                return torch.ops.panther.favor_attention(q, k, v, self.proj, "softmax", False, None)
        args = (q, k, v)

    else:
        raise ValueError(name)

    return M().eval().to(device), tuple(a.to(device) for a in args)


# ------------------------------------------------------------------ child: compile

def child_compile(model_name: str, device: str, out_dir: str) -> int:
    import torch

    print(f"[compile] torch {torch.__version__}, model {model_name} on {device}", flush=True)
    model, args = build_case(model_name, device)
    with torch.no_grad():
        expected = model(*args)
    ep = torch.export.export(model, args)
    targets = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"})
    print("[compile] exported graph ops:", ", ".join(targets), flush=True)
    t0 = time.time()
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(out_dir, "model.pt2"))
    print(f"[compile] packaged {pkg} in {time.time() - t0:.1f} s", flush=True)
    torch.save({"args": [a.cpu() for a in args], "expected": expected.cpu()}, os.path.join(out_dir, "io.pt"))
    print("[compile] OK", flush=True)
    return 0


# ------------------------------------------------------------------ child: load + run

def child_load(device: str, out_dir: str, mode: str, lib_path: str) -> int:
    """Fresh process: prepare per `mode`, aoti_load_package, run, compare. Prints each stage
    (flushed) so the last line printed before a crash says where it crashed."""
    import torch

    def stage(msg):
        print(f"[load:{mode}] {msg}", flush=True)

    if mode == "py_ops":
        define_python_ops()
        stage("defined probe:: Python ops")
    elif mode == "import_panther":
        import panther  # noqa: F401
        stage("imported panther")
    elif mode == "load_library":
        torch.ops.load_library(lib_path)
        stage(f"torch.ops.load_library({lib_path})")

    io = torch.load(os.path.join(out_dir, "io.pt"))
    args = [a.to(device) for a in io["args"]]
    pkg = os.path.join(out_dir, "model.pt2")

    stage("calling aoti_load_package")
    try:
        compiled = torch._inductor.aoti_load_package(pkg)
    except Exception as e:  # only expected in panther_after mode (op library not loaded yet)
        if mode != "panther_after":
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        stage(f"aoti_load_package without panther raised {type(e).__name__}: {first}")
        note = f"(1st load w/o panther raised {type(e).__name__}) "
        compiled = None
    else:
        stage("aoti_load_package returned")
        note = "(1st load w/o panther succeeded) " if mode == "panther_after" else ""

    if mode == "panther_after":
        import panther  # noqa: F401
        stage("imported panther (after loading)")
        if compiled is None:
            stage("calling aoti_load_package again")
            compiled = torch._inductor.aoti_load_package(pkg)
            stage("aoti_load_package returned")

    if mode == "crash":   # harness self-test only
        import ctypes
        stage("segfaulting on purpose")
        ctypes.string_at(0)

    stage("running the package")
    with torch.no_grad():
        out = compiled(*args)
    if isinstance(out, (list, tuple)):
        out = out[0]
    if device == "cuda":
        torch.cuda.synchronize()
    stage("run returned")
    diff = (out.cpu() - io["expected"]).abs().max().item()
    if mode == "load_library":
        assert "panther" not in sys.modules, "panther got imported in load_library mode"
    ok = diff <= 1e-4
    stage(f"{note}max abs diff vs eager {diff:.3g} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 3


# ------------------------------------------------------------------ parent helpers

def rc_text(rc: int) -> str:
    if rc is None:
        return "timeout"
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return f"{rc} (signal)"
    return str(rc)


def run_child(argv, timeout, env=None, python_flags=()):
    """Runs this script as a child; returns (rc or None on timeout, stdout, stderr, seconds)."""
    cmd = [sys.executable, *python_flags, THIS, "--child", *argv]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout, r.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, out, err, time.time() - t0


def tail(text: str, n: int) -> list:
    return [ln for ln in text.strip().splitlines() if ln.strip()][-n:]


def last_stage(stdout: str) -> str:
    lines = tail(stdout, 1)
    return lines[0] if lines else "(no output)"


def print_env_info(device: str) -> str:
    """Prints versions (python, torch, CUDA, GPU, triton, panther build, C++ compiler); returns
    panther.library_path() ("" when panther cannot be imported)."""
    import platform

    import torch

    print(f"python   {sys.version.split()[0]} ({sys.executable}) on {platform.platform()}")
    print(f"torch    {torch.__version__}  (file {torch.__file__})")
    print(f"CUDA     torch.version.cuda={torch.version.cuda}  available={torch.cuda.is_available()}", end="")
    if torch.cuda.is_available():
        print(f"  device={torch.cuda.get_device_name(0)}  cap={torch.cuda.get_device_capability(0)}", end="")
        try:
            import triton
            print(f"  triton={triton.__version__}", end="")
        except Exception:
            pass
    print()
    # panther's build info, read in a child so this process stays panther-free (not required,
    # but keeps the parent neutral: it only spawns children).
    code = ("import panther, json; print(json.dumps(panther.build_info())); print(panther.library_path())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    path = ""
    if r.returncode == 0:
        info, path = r.stdout.strip().splitlines()[-2:]
        print(f"panther  {info}\n         lib {path}")
    else:
        print(f"panther  import FAILED (rc {rc_text(r.returncode)}): {' | '.join(tail(r.stderr, 3))}")
    try:
        from torch._inductor import cpp_builder
        print(f"cxx      {cpp_builder.get_cpp_compiler()}")
    except Exception:
        pass
    print(f"device   {device}", flush=True)
    return path


def dump_package(pkg: str, limit: int = 2500) -> None:
    """Shows what the AOTI runtime reads for custom ops: the extern-node JSON (``*.wrapper.json``,
    the serialised custom-op calls that the proxy executor parses at load time), the package
    metadata (device key, CPU ISA, compute capability) and the generated wrapper's
    ``aoti_torch_proxy_executor_call_function`` lines (how the op is called at run time)."""
    try:
        with zipfile.ZipFile(pkg) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            print("    package files: " + ", ".join(f"{os.path.basename(n)} ({z.getinfo(n).file_size} B)"
                                                     for n in names))
            for n in names:
                base = os.path.basename(n)
                if base.endswith(".json"):
                    txt = z.read(n).decode(errors="replace")
                    print(f"    {base}: {txt[:limit]}")
                elif base.endswith("wrapper.cpp"):
                    calls = [ln.strip() for ln in z.read(n).decode(errors="replace").splitlines()
                             if "proxy_executor_call_function" in ln or "call_dispatcher" in ln]
                    for ln in calls[:10]:
                        print(f"    wrapper.cpp: {ln[:400]}")
    except Exception as e:
        print(f"    (could not read {pkg}: {e})")


def diagnose(name: str, load_argv, pkg: str, use_gdb: bool) -> None:
    """Re-runs a failed load with faulthandler + debug env, then under gdb if available."""
    print(f"\n===== diagnosis: {name} =====")
    env = dict(os.environ)
    env.update({
        "PYTHONFAULTHANDLER": "1",
        "TORCH_SHOW_CPP_STACKTRACES": "1",
        "AOTI_RUNTIME_CHECK_INPUTS": "1",   # AOTI runtime validates input shapes/dtypes/devices
        "TORCH_LOGS": "+inductor",          # mostly compile-side, cheap to set
        "TORCH_CPP_LOG_LEVEL": "INFO",
    })
    if "cuda" in load_argv:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    rc, out, err, _ = run_child(load_argv, LOAD_TIMEOUT_S, env=env, python_flags=("-X", "faulthandler"))
    print(f"  [faulthandler rerun] rc {rc_text(rc)}")
    for ln in tail(out, 8):
        print("   out| " + ln)
    for ln in tail(err, 40):
        print("   err| " + ln)
    dump_package(pkg)
    if use_gdb and shutil.which("gdb"):
        gdb = ["gdb", "-q", "-batch", "-return-child-result", "-ex", "set pagination off",
               "-ex", "handle SIGPIPE nostop noprint", "-ex", "run", "-ex", "bt 40",
               "--args", sys.executable, THIS, "--child", *load_argv]
        try:
            g = subprocess.run(gdb, capture_output=True, text=True, timeout=240)
            bt = [ln for ln in g.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
            print(f"  [gdb backtrace] (gdb rc {g.returncode})")
            for ln in bt[-45:]:
                print("   gdb| " + ln[:300])
        except subprocess.TimeoutExpired:
            print("  [gdb] timed out")
    print(f"===== end diagnosis: {name} =====\n", flush=True)


# ------------------------------------------------------------------ parent

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (packages, io.pt)")
    ap.add_argument("--no-diagnose", action="store_true", help="skip faulthandler/gdb reruns of failures")
    ap.add_argument("--no-gdb", action="store_true", help="skip the gdb reruns")
    ap.add_argument("--gdb-max", type=int, default=2,
                    help="run gdb on at most this many failing cases (it is slow; default 2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print full child output")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:   # ---- we are a child process
        kind, rest = a.child[0], a.child[1:]
        if kind == "compile":
            return child_compile(*rest)               # model device dir
        if kind == "load":
            return child_load(*rest)                  # device dir mode libpath
        raise SystemExit(f"unknown child kind {kind}")

    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("probe_aoti_min: --device cuda needs a CUDA GPU")
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in wanted if c not in CASES]
    if bad:
        raise SystemExit(f"unknown cases {bad}; known: {list(CASES)}")

    lib_path = print_env_info(a.device)   # computed here, passed to the load_library child
    root = tempfile.mkdtemp(prefix="probe_aoti_min_")
    print(f"workdir  {root}\n", flush=True)
    t_start = time.time()

    compiled = {}    # model name -> (compile rc, stderr tail if it failed)
    results = []     # (case, compile status, load rc text, detail)
    failed = []      # (case, load argv, pkg)
    for case in wanted:
        model_name, mode = CASES[case]
        d = os.path.join(root, model_name)
        # ---- compile (once per model; the *_late / *_lib cases reuse the `sketched` package)
        if model_name not in compiled:
            os.makedirs(d, exist_ok=True)
            rc, out, err, secs = run_child(["compile", model_name, a.device, d], COMPILE_TIMEOUT_S)
            if a.verbose:
                print(f"--- compile {model_name} (rc {rc_text(rc)}, {secs:.0f} s)\n{out}{err}")
            ops = next((ln for ln in out.splitlines() if "exported graph ops" in ln), "")
            print(f"compiled {model_name:14s} rc {rc_text(rc):12s} {secs:5.1f} s  {ops.split(':', 1)[-1].strip()}",
                  flush=True)
            compiled[model_name] = (rc, " | ".join(tail(err, 3)) if rc != 0 else "")
        crc, cerr = compiled[model_name]
        if crc != 0:
            results.append((case, f"compile rc {rc_text(crc)}", "-", cerr))
            continue
        # ---- load + run in a fresh process
        load_argv = ["load", a.device, d, mode, lib_path]
        rc, out, err, secs = run_child(load_argv, LOAD_TIMEOUT_S)
        if a.verbose:
            print(f"--- load {case} (rc {rc_text(rc)}, {secs:.0f} s)\n{out}{err}")
        detail = last_stage(out)
        err_tail = tail(err, 3)
        if rc != 0 and err_tail:
            detail += "  || stderr: " + " | ".join(ln[:200] for ln in err_tail)
        results.append((case, "compiled", rc_text(rc), detail))
        if rc != 0:
            failed.append((case, load_argv, os.path.join(d, "model.pt2")))

    # ---- summary: one line per case
    print(f"\n===== summary (torch {torch.__version__}, cuda {torch.version.cuda}, device {a.device}, "
          f"{time.time() - t_start:.0f} s) =====")
    for case, cstat, lrc, detail in results:
        print(f"{case:14s} {cstat:10s} load rc {lrc:12s} {detail}")
    print(flush=True)

    if failed and not a.no_diagnose:
        for i, (case, load_argv, pkg) in enumerate(failed):
            diagnose(case, load_argv, pkg, use_gdb=not a.no_gdb and i < a.gdb_max)

    if a.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    ok = all(lrc == "0" for _, _, lrc, _ in results)
    print("probe_aoti_min:", "all cases passed" if ok else "SOME CASES FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
