"""Every Python example in the documentation runs, so none rots.

- README.md and docs/*.md: the ```python blocks of a file run in order in one fresh interpreter
  (one namespace, like a notebook: a block may use names an earlier block of the same file
  defined), on the CPU, in a temporary working directory. A block that cannot run in CI (it needs
  a GPU, several processes or minutes) is preceded by an HTML comment naming why, which renders
  as nothing:

      <!-- skip-test: needs torchrun (several processes) -->
      ```python
      ...

  Shell, C++ and CMake blocks are not run.
- Docstrings: doctest over every module of the panther package (``>>>`` examples).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import panther

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*$")
_SKIP = re.compile(r"<!--\s*skip-test:\s*(?P<reason>.*?)\s*-->")


def python_blocks(text: str) -> list[dict]:
    """The fenced code blocks of a Markdown text whose language is python.

    Returns dicts with ``line`` (1-based line of the opening fence), ``code`` (dedented by the
    fence's indentation) and ``skip`` (the reason of a ``<!-- skip-test: reason -->`` comment on
    the nearest non-blank line above the fence, or None).
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group("indent"), m.group("lang").lower(), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        skip = None
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            s = _SKIP.search(lines[j])
            if s:
                skip = s.group("reason") or "no reason given"
        blocks.append({"line": start + 1, "code": "\n".join(body) + "\n", "skip": skip})
    return blocks


# Runs the blocks (JSON on stdin) in order in one namespace; a failure names its block's line.
_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
for b in blocks:
    try:
        exec(compile(b["code"], f"{b['file']}:{b['line']}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the python block at {b['file']}:{b['line']}", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} block(s)")
"""


def test_block_extraction():
    text = (
        "a\n```python\nx = 1\n```\n<!-- skip-test: needs a GPU -->\n\n```python\ny = 2\n```\n"
        "```bash\nmake\n```\n  ```python\n  z = 3\n  ```\n"
    )
    blocks = python_blocks(text)
    assert [b["code"] for b in blocks] == ["x = 1\n", "y = 2\n", "z = 3\n"]
    assert [b["skip"] for b in blocks] == [None, "needs a GPU", None]
    assert [b["line"] for b in blocks] == [2, 7, 13]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_python_blocks_run(path, tmp_path):
    rel = str(path.relative_to(REPO))
    blocks = [dict(b, file=rel) for b in python_blocks(path.read_text(encoding="utf-8"))]
    runnable = [b for b in blocks if b["skip"] is None]
    if not runnable:
        pytest.skip(f"{rel}: no runnable python block")
    env = dict(os.environ)
    # The interpreter that runs the tests, with the same panther (its directory first on the path).
    pkg_parent = str(Path(panther.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, as in CI
    r = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(runnable),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=TIMEOUT_S,
    )
    assert r.returncode == 0, f"{rel}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert f"ran {len(runnable)} block(s)" in r.stdout


def test_every_skip_names_a_reason():
    for path in DOC_FILES:
        for b in python_blocks(path.read_text(encoding="utf-8")):
            if b["skip"] is not None:
                assert b["skip"] != "no reason given", f"{path}:{b['line']}: skip-test without a reason"


def _panther_modules() -> list[str]:
    names = ["panther"]
    for info in pkgutil.walk_packages(panther.__path__, prefix="panther."):
        if info.name in ("panther._C", "panther.libpanther_ops"):  # native, no docstrings
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _panther_modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    if not tests:
        pytest.skip(f"{name}: no docstring examples")
    out = []
    for t in tests:
        runner.run(t, out=out.append)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} docstring examples failed\n" + "".join(out)


def test_public_names_have_docstring_examples():
    """The package's own public functions show how to call them."""
    for fn in (panther.build_info, panther.library_path, panther.portable_kernels,
               panther.set_portable_kernels):
        assert fn.__doc__ and ">>>" in fn.__doc__, f"panther.{fn.__name__} has no example"
