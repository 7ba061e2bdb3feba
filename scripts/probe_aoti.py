"""Developer probe: which model parts compile and load under AOTInductor on this torch
(each case in a child process, so a crash is reported and the next case still runs)."""
import os
import subprocess
import sys
import tempfile

CASE = r'''
import sys, torch, panther as pr
sys.path.insert(0, "examples")
from export_torchscript import TinyTransformer, example_input
from export_aoti import export_and_compile
use_attn, dev, stage = sys.argv[1] == "attn", sys.argv[2], sys.argv[3]
torch.manual_seed(0)
m = TinyTransformer(use_attention=use_attn).eval().to(dev)
x = example_input().to(dev)
with torch.no_grad():
    y = m(x)
    pkg = export_and_compile(m, x, sys.argv[4])
    print("compiled", flush=True)
    if stage == "load":
        c = torch._inductor.aoti_load_package(pkg)
        print("loaded", flush=True)
        print("max diff", (c(x) - y).abs().max().item(), flush=True)
'''
for attn in ("noattn", "attn"):
    for dev in ("cpu", "cuda"):
        d = tempfile.mkdtemp()
        r = subprocess.run([sys.executable, "-c", CASE, attn, dev, "load", os.path.join(d, "m.pt2")],
                           capture_output=True, text=True, timeout=240)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        print(f"{attn:7s} {dev:5s} exit={r.returncode} :: " + " | ".join(tail), flush=True)
