"""The patch series applies to the pinned source from scratch, and prepare/export round-trips."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "llama_source.py"


@pytest.fixture(scope="module")
def source_env() -> dict:
    """Reuse the sdist the build downloaded, when there is one (the test checks its sha256)."""
    env = dict(os.environ)
    found = sorted(glob.glob(str(REPO / "build" / "*" / "_download" / "llama_cpp_python-*.tar.gz")))
    if found and "LOGQUANT_LLAMA_CPP_SOURCE" not in env:
        env["LOGQUANT_LLAMA_CPP_SOURCE"] = found[0]
    return env


def run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("inside_repo", [False, True], ids=["alone", "inside-a-git-repo"])
def test_series_applies_to_the_pinned_source(tmp_path, source_env, inside_repo):
    """Also inside another git work tree, as in our build/ folder (git apply is path-sensitive)."""
    if inside_repo:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    dest = tmp_path / "build" / "llama.cpp"
    r = run(source_env, "materialize", dest, "--cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "GGML_TYPE_Q2_0," in (dest / "common" / "arg.cpp").read_text()


def test_prepare_then_export_changes_nothing(tmp_path, source_env):
    before = {p.name: p.read_bytes() for p in (REPO / "patches").glob("*.patch")}
    r = run(source_env, "prepare", tmp_path / "dev", "--cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    r = run(source_env, "export", tmp_path / "dev")
    assert r.returncode == 0, r.stderr
    after = {p.name: p.read_bytes() for p in (REPO / "patches").glob("*.patch")}
    assert after == before


def test_pack_is_a_tree_the_build_takes(tmp_path, source_env):
    """The offline kit's llama.cpp (scripts/gpu_kit.sh): without the skipped folders, and the
    series applies to it, from LOGQUANT_LLAMA_CPP_SOURCE pointing at the unpacked tree."""
    import tarfile

    archive = tmp_path / "llama.cpp.tar.xz"
    r = run(source_env, "pack", archive, "--cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "kit")
    assert "llama.cpp/ggml/include/ggml.h" in names
    assert not any(n.startswith(("llama.cpp/models/", "llama.cpp/docs/")) for n in names)
    env = dict(source_env, LOGQUANT_LLAMA_CPP_SOURCE=str(tmp_path / "kit" / "llama.cpp"))
    r = run(env, "materialize", tmp_path / "tree", "--cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "GGML_OP_LQ2_DEMOTE" in (tmp_path / "tree" / "ggml" / "include" / "ggml.h").read_text()


def test_a_corrupt_archive_is_refused(tmp_path):
    bad = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bad.write_bytes(b"not the sdist")
    env = dict(os.environ, LOGQUANT_LLAMA_CPP_SOURCE=str(bad))
    r = run(env, "materialize", tmp_path / "out", "--cache", tmp_path / "cache")
    assert r.returncode == 1
    assert "does not match the pinned" in r.stderr


def test_the_logquant_path_has_no_custom_op():
    """The cache's graph nodes are ggml ops whose state is in tensors (GGML_OP_LQ2_*), so any
    backend, and RPC, can run them: no ggml_custom node (and no userdata host pointer) anywhere
    in our native code or the patch series."""
    files = [p for d in ("native", "patches") for p in (REPO / d).rglob("*") if p.is_file()]
    assert len(files) > 20
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if "ggml_custom" in line]
    assert hits == []
    patch = (REPO / "patches").glob("*LogQuant-cache-s-ops*.patch")
    assert "GGML_OP_LQ2_ATTN" in next(patch).read_text()
