"""The LogQuant ggml ops (GGML_OP_LQ2_DEMOTE / _ATTN / _DEQUANT) through ggml's own graph API, as
the package's CPU backend runs them (lq2_ops_check.cpp, built against the patched ggml headers and
linked to the package's libraries).

The kernels under them are held to numpy / float64 references in test_lq2_attn.py and
test_lq2_quants.py; these check what the ops add: their AVX2 forwards against the scalar reference
path (use_ref), thread counts (parts split and merged), byte-equal demotion on both paths, and
the prefill path (dequantize both tiers to f16, then ggml_flash_attn_ext) against the fused
decode op within f16 rounding."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ggml_include(tmp_path_factory) -> Path:
    """The patched ggml headers: the build's copy, or the series applied to the pinned source."""
    for h in sorted(glob.glob(str(ROOT / "build" / "*" / "llama.cpp" / "ggml" / "include" / "ggml.h"))):
        if "GGML_OP_LQ2_DEQUANT" in Path(h).read_text():
            return Path(h).parent
    dest = tmp_path_factory.mktemp("src") / "llama.cpp"
    env = dict(os.environ)
    found = sorted(glob.glob(str(ROOT / "build" / "*" / "_download" / "llama_cpp_python-*.tar.gz")))
    if found and "LOGQUANT_LLAMA_CPP_SOURCE" not in env:
        env["LOGQUANT_LLAMA_CPP_SOURCE"] = found[0]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_source.py"), "materialize", str(dest),
                        "--cache", str(dest.parent / "cache")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dest / "ggml" / "include"


@pytest.fixture(scope="module")
def report(ggml_include, tmp_path_factory) -> list[str]:
    import logquant_gguf
    from logquant_gguf import _runtime

    libdir = _runtime.library_path().parent
    assert (libdir / "libggml-cpu.so").exists() or list(libdir.glob("libggml-cpu*")), libdir
    out_dir = tmp_path_factory.mktemp("ops")
    exe = out_dir / "lq2_ops_check"
    host = out_dir / "lq2_attn_block_host.o"  # the GPU attention's program, run on the host
    subprocess.run([shutil.which("cc") or "cc", "-std=c11", "-O1", "-Wall", "-Werror", "-c",
                    str(ROOT / "tests" / "native" / "lq2_attn_block_host.c"), "-o", str(host)], check=True)
    cmd = [shutil.which("c++") or "c++", "-std=c++17", "-O1", "-Wall", "-Werror",
           "-Wno-deprecated-declarations",
           str(ROOT / "tests" / "native" / "lq2_ops_check.cpp"), str(host), f"-I{ggml_include}",
           f"-I{ROOT / 'native' / 'common'}", f"-I{ROOT / 'native' / 'cpu'}", f"-I{ROOT / 'native' / 'ggml'}",
           f"-L{libdir}", "-lggml", "-lggml-base", "-lggml-cpu", "-lm", f"-Wl,-rpath,{libdir}",
           "-o", str(exe)]
    subprocess.run(cmd, check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=True).stdout
    print(f"(package: {Path(logquant_gguf.__file__).parent})\n{out}")
    return out.splitlines()


def fields(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"([a-z_]+) ([-0-9.e+]+)(?= |$)", line)}


def test_attention_op_paths_agree(report):
    lines = [ln for ln in report if ln.startswith("attn ")]
    assert len(lines) == 19
    # the default format (mixed key widths, values per channel) and each alone are among them,
    # 3-bit keys (widths of 2 and 4 bits), and 8-bit block headers (3 cases)
    assert sum(" vpc=1 kw=1 " in ln for ln in lines) == 6 and sum(" bits=3 " in ln for ln in lines) == 2
    assert sum(" vpc=1 kw=0 " in ln for ln in lines) == 3 and sum(" vpc=0 kw=1 " in ln for ln in lines) == 1
    assert sum(" s8=1 " in ln for ln in lines) == 3
    for ln in lines:
        f = fields(ln)
        scale = max(1.0, f["max_out"])
        assert f["simd_vs_ref"] <= 1e-4 * scale, ln       # AVX2 vs scalar: float summation order
        assert f["threads"] <= 1e-5 * scale, ln           # parts merged exactly (up to rounding)
        assert f["dequant_simd_vs_ref"] == 0.0, ln        # dequantization is exact arithmetic
        # the GPU kernels' code on the op's tensors: the attention within float summation order,
        # the dequantized f16 within one f16 rounding of the rotation (fma vs separate products)
        assert f["gpu_vs_ref"] <= 1e-4 * scale, ln
        assert f["gpu_dequant_vs_ref"] <= 2e-3 * scale, ln
        if " bc=1 " in ln:
            # the op applies the score correction (the flash-attention path does not have it):
            # a change well above the two paths' rounding differences
            assert f["bc_effect"] > max(1e-6, 10 * f["simd_vs_ref"]), ln
            continue
        assert f["bc_effect"] == 0.0, ln
        # flash attention reads Q and both tiers in f16: within f16 rounding, far below any
        # wrong slot, mask or head (those differ by the output's own size)
        assert 0.0 < f["fa_vs_fused"] <= 1e-2 * scale, ln


def test_demote_op_stores_the_same_bytes_on_both_paths(report):
    lines = [ln for ln in report if ln.startswith("demote ")]
    assert len(lines) == 15
    assert sum(" fit=1 " in ln for ln in lines) == 9 and sum(" bits=3 " in ln for ln in lines) == 1
    assert sum(" vpc=1 kw=1 " in ln for ln in lines) == 4 and sum(" vpc=0 kw=1 " in ln for ln in lines) == 1
    assert sum(" vpc=1 kw=0 " in ln for ln in lines) == 3 and sum(" s8=1 " in ln for ln in lines) == 3
    for ln in lines:
        f = fields(ln)
        assert f["demote_bytes"] == 0, ln
        assert f["gpu_demote_bytes"] == 0, ln  # the GPU demotion's code stores the CPU's bytes
        assert f["gpu_seq_demote_bytes"] == 0, ln  # in its one-threadgroup form (Metal's) too
        assert f["gpu_staging_differs"] == 0, ln  # and leaves the open group's staging as the CPU does
        assert f["nonzero"] > 1000, ln  # and it did write the stores
