"""The distribution's metadata: name, license, one version source, the true torch requirement,
extras that mirror requirements-dev.txt, and the installed build agreeing with all of it."""

import importlib.metadata as md
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import panther

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TORCH_MINOR = ".".join(re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def load_provider():
    spec = importlib.util.spec_from_file_location(
        "panther_metadata", REPO / "build_support" / "panther_metadata.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def release():
    text = (REPO / "python" / "panther" / "_version.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def requirements_dev():
    pins = {}
    for line in (REPO / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = line
    return pins


def test_project_table():
    p = PYPROJECT["project"]
    assert p["name"] == "torch-panther"
    assert p["license"] == "MIT" and p["license-files"] == ["LICENSE"]
    assert "version" not in p and "dependencies" not in p
    assert set(p["dynamic"]) == {"version", "dependencies"}
    assert p["urls"] and p["classifiers"]
    assert "Typing :: Typed" in p["classifiers"]
    assert not any(c.startswith("License ::") for c in p["classifiers"])  # the SPDX field says it


def test_files_a_user_needs():
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert (REPO / "python" / "panther" / "py.typed").is_file()
    assert f"## {release()}" in (REPO / "CHANGELOG.md").read_text()


def test_extras_mirror_requirements_dev():
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = requirements_dev()
    assert any(r.startswith("matplotlib==") for r in extras["demo"])
    for extra in ("demo", "test", "docs", "safetensors", "hf", "examples"):
        for req in extras[extra]:
            name = req.split("==")[0].lower()
            assert pins.get(name) == req, f"extra {extra!r}: {req} vs requirements-dev.txt {pins.get(name)}"
    assert set(extras["dev"]) == {"torch-panther[test,docs,safetensors,hf,examples]"}
    assert "torch" not in {r.split("==")[0] for e in extras.values() for r in e}


def test_metadata_provider(monkeypatch):
    mod = load_provider()
    assert mod.release() == release()
    assert mod.torch_minor() == TORCH_MINOR
    prov = mod.Provider()
    monkeypatch.delenv("PANTHER_LOCAL_VERSION", raising=False)
    prov.build_state("wheel")
    assert prov.dynamic_metadata({"field": "version"}, {}) == {"version": release()}
    assert prov.dynamic_metadata({"field": "dependencies"}, {}) == {
        "dependencies": [f"torch=={TORCH_MINOR}.*"]}
    monkeypatch.setenv("PANTHER_LOCAL_VERSION", "1")
    assert prov.dynamic_metadata({"field": "version"}, {}) == {"version": f"{release()}+torch{TORCH_MINOR}"}
    prov.build_state("sdist")  # an sdist never carries the local label
    assert prov.dynamic_metadata({"field": "version"}, {}) == {"version": release()}
    with pytest.raises(RuntimeError, match="field must be 'version' or 'dependencies'"):
        prov.dynamic_metadata({"field": "readme"}, {})


def test_metadata_provider_without_torch(monkeypatch):
    mod = load_provider()

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    with pytest.raises(RuntimeError, match="--no-build-isolation"):
        mod.torch_minor()


def test_version_has_one_source():
    assert panther.__version__.split("+")[0] == release()
    assert panther.build_info()["version"] == panther.__version__
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "project(panther VERSION ${_panther_release}" in cmake
    assert not re.search(r"^version\s*=", (REPO / "pyproject.toml").read_text(), re.M)


def test_installed_distribution_agrees():
    try:
        dist = md.distribution("torch-panther")
    except md.PackageNotFoundError:
        pytest.skip("torch-panther is not installed (running from a source tree only)")
    if Path(dist.locate_file("panther")).resolve() != Path(panther.__file__).resolve().parent and \
            dist.version != panther.__version__:
        pytest.skip("the installed torch-panther is another build than the imported panther")
    assert dist.version == panther.__version__
    assert f"torch=={TORCH_MINOR}.*" in (dist.requires or [])
    assert dist.metadata["License-Expression"] == "MIT"
    assert {"demo", "test", "docs", "dev"} <= set(dist.metadata.get_all("Provides-Extra") or [])


def test_cpp_messages_never_format_numbers_with_iostreams():
    """Error and repr text in cpp/ is built by format.h's message() (std::to_string, snprintf):
    a library built against another libstdc++ than the process's can carry its own copy of the
    iostream number formatting, whose locale facets then do not match the process's, and crash
    exactly when a check fails. So every TORCH_CHECK / TORCH_INTERNAL_ASSERT passes at most one
    message argument (several would be streamed by c10::str), and nothing uses a stringstream."""
    root = Path(__file__).resolve().parents[1] / "cpp"
    bad = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
            continue
        text = path.read_text()
        flat = re.sub(r"\s+", " ", re.sub(r"//[^\n]*", "", text))
        for m in re.finditer(r"\b(?:TORCH_CHECK(?:_TYPE|_INDEX|_VALUE)?|TORCH_INTERNAL_ASSERT)\((.*?)\);", flat):
            depth, pieces, in_str = 0, 1, False
            for ch in re.sub(r"\\.", "", m.group(1)):  # escapes dropped; commas in literals skipped
                in_str ^= ch == '"'
                if not in_str:
                    depth += ch in "([{"
                    depth -= ch in ")]}"
                    pieces += ch == "," and depth == 0
            if pieces > 2:
                bad.append(f"{path.relative_to(root)}: {m.group(0)[:100]}")
        if "stringstream" in text:
            bad.append(f"{path.relative_to(root)}: uses a stringstream")
    assert not bad, "build messages with panther::detail::message() (cpp/common/format.h):\n" + "\n".join(bad)


def test_compile_caches_are_keyed_by_this_build(monkeypatch):
    """torch.compile's on-disk caches must not serve graphs compiled against another build of the
    operator library (a renamed private op would fail, a changed one would be wrong): import
    mixes the library's content hash into torch.compiler.config.cache_key_tag, keeping any tag
    the user set, once."""
    import hashlib
    import torch.compiler.config as cc
    with open(panther.library_path(), "rb") as f:
        digest = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
    assert f"panther-{digest}" in cc.cache_key_tag.split("+")
    monkeypatch.setattr(cc, "cache_key_tag", "mine")
    panther._salt_compile_caches()
    panther._salt_compile_caches()
    assert cc.cache_key_tag == f"mine+panther-{digest}"
