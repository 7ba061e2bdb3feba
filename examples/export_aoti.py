"""Compile the example Panther model ahead of time with torch.export + AOTInductor.

Usage::

    python examples/export_aoti.py OUT_DIR [--device cpu|cuda]

Exports ``TinyTransformer`` (examples/export_torchscript.py: SKLinear feed-forward, plus
RandMultiHeadAttention when this Panther build has it) with ``torch.export.export``, compiles it
with ``torch._inductor.aoti_compile_and_package`` and writes

* ``OUT_DIR/model.pt2``: the AOTInductor package,
* ``OUT_DIR/io.pt``: scripted holder with attributes ``input`` and ``output`` (eager output, CPU),

then loads the package back with ``torch._inductor.aoti_load_package`` and checks it matches eager.

Panther's ops inside the package are not compiled into it: the package calls
``torch.ops.panther.*`` through the dispatcher, so the process that runs it must have Panther's
operator library loaded first:

* Python: ``import panther`` (or ``torch.ops.load_library(panther.library_path())``) before
  ``torch._inductor.aoti_load_package(path)``;
* C++: link ``libpanther_ops.so`` with ``-Wl,--no-as-needed`` (``panther::panther_ops`` from
  ``find_package(panther)``), or ``dlopen`` it, before creating
  ``torch::inductor::AOTIModelPackageLoader(path)`` (examples/cpp/run_aoti.cpp).

Compiling takes about a minute on a CPU. A package compiled for CUDA runs on CUDA only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torchscript import build_model, example_input, save_tensors  # noqa: E402


def export_and_compile(model: torch.nn.Module, x: torch.Tensor, package_path: str) -> str:
    """torch.export the model on example input ``x`` and AOT-compile it into ``package_path``."""
    ep = torch.export.export(model, (x,))
    return torch._inductor.aoti_compile_and_package(ep, package_path=package_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("export_aoti: --device cuda needs a CUDA GPU")
    os.makedirs(args.out_dir, exist_ok=True)

    model = build_model(args.seed).to(args.device)
    x = example_input().to(args.device)
    with torch.no_grad():
        y = model(x)
    package = os.path.join(args.out_dir, "model.pt2")
    t0 = time.time()
    with torch.no_grad():
        export_and_compile(model, x, package)
    compile_s = time.time() - t0

    compiled = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        y_aoti = compiled(x)
    diff = (y - y_aoti).abs().max().item()
    save_tensors(os.path.join(args.out_dir, "io.pt"), input=x.cpu(), output=y.cpu())
    print(
        f"export_aoti: wrote {package} ({args.device}, compiled in {compile_s:.0f} s, attention: "
        f"{model.attn is not None}); Python reload vs eager max abs diff {diff:.3g}"
    )
    if not diff <= 1e-4:
        print("export_aoti: MISMATCH between the AOTInductor package and eager", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
