"""The tutorials as runnable scripts (examples/) and the demo.

- Every examples/tutorial_*.py runs in a fresh interpreter with PANTHER_EXAMPLE_FAST=1 (smaller
  data and fewer epochs where the tutorial trains for long) and must exit 0 printing what it should.
- Every ``.. code-block:: python`` of the tutorials in ../shared/seeds compiles (after undoing the
  page's backslash escapes) and appears, line by line and in order, in some example script.
- examples/demo.py (``make demo``) runs in its fast mode and writes its PNG.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import panther

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
TUTORIALS = {"000": "000_64c79363b5271b5c.txt", "003": "003_bf3f5784e51f22f7.txt"}
TIMEOUT_S = 600  # generous: the machine is shared; a healthy run of one script takes seconds

HAS_RAND_MHA = hasattr(panther.nn, "RandMultiHeadAttention")
needs_rand_mha = pytest.mark.skipif(
    not HAS_RAND_MHA, reason="panther.nn.RandMultiHeadAttention is not implemented yet"
)

# script -> strings its output must contain (parameter counts follow from SKLinear's layout:
# S1s (L, in, k), S2s (L, k, out), bias (out,)).
CASES = {
    "tutorial_000_mlp.py": [
        "Standard model parameters: 567,434",
        "Sketched model parameters: 170,538",
        "Parameter reduction: 69.9%",
    ],
    "tutorial_000_training_comparison.py": [
        "Sketched model parameters: 170,538",
        "Epoch 2, Loss:",
        "Standard model accuracy:",
        "Sketched model accuracy:",
        "Accuracy difference:",
    ],
    "tutorial_000_attention.py": [
        "Output shape: torch.Size([32, 100, 512])",
        "TransformerBlock output shape: torch.Size([2, 10, 64])",
    ],
    "tutorial_000_document_classifier.py": [
        "Output shape: torch.Size([32, 100, 512])",
        "Model Parameters:",
        "Sketched layer parameters:",
        "Logits shape: torch.Size([4, 20])",
        "One training step done",
    ],
    "tutorial_003_mlp.py": [
        "Standard model parameters: 567,434",
        "Sketched model parameters: 934,410",
        "Parameter reduction: -64.7%",
        "Why the reduction is negative: SKLinear(d_in, d_out, num_terms=L, low_rank=k) trains",
        "4 of 4 layers grow.",
        "Smaller schedules save: num_terms_schedule=[3, 3, 2, 1], low_rank_schedule=[32, 16, 8, 4] "
        "give 168,882 parameters, a reduction of 70.2%",
    ],
    "tutorial_003_training_comparison.py": [
        "Epoch 2, Loss:",
        "Standard model accuracy:",
        "Sketched model accuracy:",
        "Accuracy difference:",
    ],
    "tutorial_003_cnn.py": ["SketchedCNN output shape: torch.Size([2, 10])"],
    "tutorial_003_resnet.py": ["SketchedResNet output shape: torch.Size([4, 10])"],
    "tutorial_003_attention.py": ["SketchedTransformerBlock output shape: torch.Size([2, 10, 64])"],
    "tutorial_003_adaptive.py": [
        "Adapted to terms=6, rank=48",
        "AdaptiveSketchedLayer output shape: torch.Size([16, 128])",
    ],
    "tutorial_003_lr_scheduling.py": [
        "param group: 2 tensors, lr=0.001",
        "param group: 1 tensors, lr=0.001",
        "Optimizer step done",
    ],
    "tutorial_003_progressive.py": [
        "Phase 1 output shape: torch.Size([4, 10])",
        "Advanced to phase 2/3",
        "Advanced to phase 3/3",
        "Final phase output shape: torch.Size([4, 10])",
    ],
    "tutorial_003_memory.py": ["Train loss:", "Memory log: [{'batch': 0"],
    "tutorial_003_checkpointing.py": ["Checkpointed output shape: torch.Size([8, 128])"],
    "tutorial_003_mixed_precision.py": ["Epoch 1, Loss:", "Mixed precision training done"],
    "tutorial_003_document_classifier.py": [
        "Model Parameters:",
        "Sketched layer parameters: 1,972,736",
        "Logits shape: torch.Size([1, 20])",
        "One training step done",
        "Unmasked batch logits shape: torch.Size([4, 20])",
    ],
}
USES_RAND_MHA = {"tutorial_000_attention.py", "tutorial_000_document_classifier.py"}


def run_script(args, timeout=TIMEOUT_S):
    env = dict(os.environ, PANTHER_EXAMPLE_FAST="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args[0]} exited with {proc.returncode}:\n{output[-6000:]}"
    return proc.stdout


def test_every_tutorial_script_has_a_case():
    scripts = sorted(p.name for p in EXAMPLES.glob("tutorial_*.py"))
    assert scripts == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=needs_rand_mha) if s in USES_RAND_MHA else s for s in CASES],
)
def test_tutorial_script_runs(script):
    out = run_script([EXAMPLES / script])
    for expected in CASES[script]:
        assert expected in out, f"{script}: {expected!r} not in output:\n{out[-4000:]}"
    # A script that shows a model growing says why.
    if "Parameter reduction: -" in out:
        assert "Why the reduction is negative" in out, f"{script}: negative reduction unexplained"


# ---- the tutorials' code blocks ------------------------------------------------------------------
def fix_page_artifacts(src: str) -> str:
    """Undo the page's escapes: backslash-escaped docstring quotes (with one stray quote after the
    closing ones) become a plain docstring; a line ending in two backslashes ends in one."""
    src = re.sub(r'\\"\\"\\"(.*?)\\"\\"\\""', r'"""\1"""', src)
    return re.sub(r" \\\\$", r" \\", src, flags=re.M)


def code_blocks(path: Path):
    """The ``.. code-block:: python`` bodies of a reStructuredText page, dedented."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        else:
            i += 1
    return blocks


def code_lines(text: str):
    return [line.strip() for line in text.splitlines() if line.strip()]


def is_subsequence(needle, haystack) -> bool:
    it = iter(haystack)
    return all(any(line == h for h in it) for line in needle)


def seed_blocks():
    if not SEEDS.is_dir():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=f"{SEEDS} not present"))]
    params = []
    for tut, name in TUTORIALS.items():
        for j, block in enumerate(code_blocks(SEEDS / name)):
            params.append(pytest.param(tut, j, block, id=f"{tut}-block{j + 1}"))
    return params


def test_seed_files_have_the_expected_blocks():
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS} not present")
    counts = {tut: len(code_blocks(SEEDS / name)) for tut, name in TUTORIALS.items()}
    assert counts == {"000": 4, "003": 12}


@pytest.mark.parametrize("tut,index,block", seed_blocks())
def test_tutorial_block_compiles_and_is_in_an_example(tut, index, block):
    fixed = fix_page_artifacts(block)
    compile(fixed, f"{TUTORIALS[tut]} block {index + 1}", "exec")
    wanted = code_lines(fixed)
    scripts = sorted(EXAMPLES.glob(f"tutorial_{tut}_*.py"))
    homes = [p.name for p in scripts if is_subsequence(wanted, code_lines(p.read_text()))]
    assert homes, f"block {index + 1} of {TUTORIALS[tut]} (starting {wanted[0]!r}) is in no example script"


def test_fix_page_artifacts():
    page = 'def f():\n    \\"\\"\\"Doc.\\"\\"\\""\n    x = 1 + \\\\\n        2\n    print("\\\\n")\n'
    fixed = fix_page_artifacts(page)
    assert fixed == 'def f():\n    """Doc."""\n    x = 1 + \\\n        2\n    print("\\\\n")\n'
    compile(fixed, "page", "exec")
    with pytest.raises(SyntaxError):
        compile(page, "page", "exec")


# ---- make demo -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_writes_png(tmp_path):
    png = tmp_path / "demo.png"
    out = run_script([EXAMPLES / "demo.py", "--out", png])
    for expected in ("nn.Linear MLP", "SKLinear MLP", "Parameter reduction: 69.9%", "test acc",
                     "forward+backward", f"Plot written to {png}"):
        assert expected in out, f"demo.py: {expected!r} not in output:\n{out[-4000:]}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
