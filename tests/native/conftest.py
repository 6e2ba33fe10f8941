"""Builds the native core (native/cpu, native/common) as small shared libraries for the tests.

Two builds, compiled one file at a time: "scalar" (-DLQ2_FORCE_SCALAR, always) and "avx2"
(-mavx2 -mfma -mf16c, when this CPU has them). Tests that take the `lib` fixture run on both.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from lq2_ctypes import declare

ROOT = Path(__file__).resolve().parents[2]
C_SOURCES = ["native/cpu/lq2-quants.c", "native/cpu/lq2-rope.c", "native/cpu/lq2-attn.c",
             "tests/native/lq2_attn_block_host.c"]  # the GPU kernels' per-thread work, run on the host
CXX_SOURCES = ["native/common/logquant-policy.cpp"]
WARN = ["-Wall", "-Wextra", "-Werror"]


def cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def build(out: Path, name: str, flags: list[str]) -> Path:
    objs = []
    for src in C_SOURCES + CXX_SOURCES:
        obj = out / f"{name}-{Path(src).stem}.o"
        cxx = src.endswith(".cpp")
        cmd = [shutil.which("c++" if cxx else "cc") or ("c++" if cxx else "cc"),
               "-std=c++17" if cxx else "-std=c11", "-O2", "-fPIC", *WARN, *flags,
               "-c", str(ROOT / src), "-o", str(obj)]
        subprocess.run(cmd, check=True)
        objs.append(str(obj))
    so = out / f"liblq2-{name}.so"
    subprocess.run(["c++", "-shared", "-o", str(so), *objs, "-lm"], check=True)
    return so


@pytest.fixture(scope="session")
def native_libs(tmp_path_factory) -> dict[str, ctypes.CDLL]:
    out = tmp_path_factory.mktemp("lq2-native")
    libs = {"scalar": declare(ctypes.CDLL(str(build(out, "scalar", ["-DLQ2_FORCE_SCALAR"]))))}
    if cpu_has_avx2():
        libs["avx2"] = declare(ctypes.CDLL(str(build(out, "avx2", ["-mavx2", "-mfma", "-mf16c"]))))
    return libs


@pytest.fixture(params=["scalar", "avx2"])
def lib(request, native_libs) -> ctypes.CDLL:
    if request.param not in native_libs:
        pytest.skip("this CPU lacks AVX2/FMA/F16C: only the scalar build runs")
    lib = native_libs[request.param]
    assert lib.lq2_cpu_has_avx2() == (request.param == "avx2")
    return lib


@pytest.fixture(scope="session")
def patched_ggml(tmp_path_factory) -> Path:
    """ggml from the pinned llama.cpp with our patch series applied (the sdist the build fetched)."""
    import glob
    import os
    import sys

    env = dict(os.environ)
    found = sorted(glob.glob(str(ROOT / "build" / "*" / "_download" / "llama_cpp_python-*.tar.gz")))
    if found and "LOGQUANT_LLAMA_CPP_SOURCE" not in env:
        env["LOGQUANT_LLAMA_CPP_SOURCE"] = found[0]
    dest = tmp_path_factory.mktemp("patched") / "llama.cpp"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_source.py"), "materialize", str(dest),
                        "--cache", str(dest.parent / "cache")], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    return dest / "ggml"
