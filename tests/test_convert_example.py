"""examples/convert_and_distill.py --fast: trains, converts at <= 50% stored numbers, distils,
prints the table and writes the plot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent


def test_convert_and_distill_fast(tmp_path):
    png = tmp_path / "cd.png"
    # The installed package (as every example test uses it), not the source tree: python/panther
    # holds no built library.
    res = subprocess.run([sys.executable, str(REPO / "examples" / "convert_and_distill.py"), "--fast",
                          "--out", str(png)], capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-4000:]
    m = re.search(r"= (\d+\.\d)% \(budget 50%\)", out)
    assert m and float(m.group(1)) <= 50.0, out
    dense = float(re.search(r"test accuracy (\d+\.\d+)%", out).group(1))
    rows = {}
    for name in ("svd", "svd \\+ calibration", "sketch \\(unbiased random\\)"):
        r = re.search(rf"^{name}\s+(\d+\.\d+)%\s+(-?\d+\.\d+)p\s+(\d+\.\d+)%", out, re.M)
        assert r, out
        rows[name] = (float(r.group(1)), float(r.group(3)))
    assert dense > 90.0
    assert dense - rows["svd"][0] <= 2.0  # the target: <= 2 points before any fine-tuning
    assert dense - rows["svd"][1] <= 1.0  # and <= 1 point after the short distillation
    assert rows["sketch \\(unbiased random\\)"][0] < rows["svd"][0] - 10  # the random init loses far more
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
