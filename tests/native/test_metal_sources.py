"""native/metal/*.metal checked on Linux: parsed by clang (libclang, as C++17) against a small
metal_stdlib stand-in (tests/native/metal_shim) that models Metal's address spaces, so a pointer
into the wrong one is an error, as it is for Metal; Metal's [[...]] attributes are stripped first.
The shim also has no double. This proves syntax, types and address spaces, not that Apple's
compiler takes the code or that it runs: no Metal compiler or Mac here. Without libclang (pip
install libclang) the tests skip with a message."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "metal_shim"
METAL_FILES = sorted((ROOT / "native" / "metal").glob("*.metal"))
ARGS = ["-x", "c++", "-std=c++17", "-D__METAL_VERSION__=310", "-I", str(SHIM),
        "-I", str(ROOT / "native" / "common"), "-I", str(ROOT / "native" / "cpu"), "-Wall", "-Wextra"]


def diagnostics(path: Path, text: str | None = None) -> list[str]:
    try:
        import clang.cindex as ci
    except ImportError:
        print("libclang not installed (pip install libclang): Metal source check skipped")
        pytest.skip("libclang is absent")
    src = re.sub(r"\[\[[^\]]*\]\]", "", path.read_text() if text is None else text)  # Metal attributes
    tu = ci.Index.create().parse(str(path), args=ARGS, unsaved_files=[(str(path), src)])
    return [f"{d.location.file}:{d.location.line}: {d.spelling}"
            + "".join(f" / {c.spelling}" for c in d.children)
            for d in tu.diagnostics if d.severity >= ci.Diagnostic.Warning]


@pytest.mark.parametrize("metal", METAL_FILES, ids=lambda p: p.name)
def test_metal_source_has_no_diagnostics(metal: Path):
    assert diagnostics(metal) == []


def test_metal_sources_exist():
    assert {"lq2-attn.metal", "lq2-demote.metal"} <= {p.name for p in METAL_FILES}


KERNEL = """#include <metal_stdlib>
#include "lq2-attn-block.h"
using namespace metal;
kernel void k(threadgroup uint8_t * tg [[threadgroup(0)]], device const uint8_t * dev [[buffer(0)]],
              device float * out [[buffer(1)]]) {
    out[0] = lq2_block_value(%s, 64, 2, 0, lq2_ref_at(0, 0)) + (float) tg[1] + (float) dev[1];
}
"""


def test_the_check_catches_a_wrong_address_space(tmp_path):
    """A threadgroup pointer where the shared code wants device memory is an error (and the same
    kernel with the device pointer is clean, so the error is the address space)."""
    path = tmp_path / "probe.metal"
    assert diagnostics(path, KERNEL % "dev") == []
    errors = diagnostics(path, KERNEL % "tg")
    wrong = "cannot pass pointer to address space '3' as a pointer to address space '1'"
    assert errors and all(wrong in e for e in errors), errors


def test_the_check_catches_a_double(tmp_path):
    """Metal has no double: the RoPE angles' double arithmetic must stay out of Metal code."""
    path = tmp_path / "probe.metal"
    text = KERNEL.replace("lq2_block_value(%s, 64, 2, 0, lq2_ref_at(0, 0))", "(float) lq2_rope_freq(1, 64, 1e4f, 1.0f)")
    assert any("undeclared identifier 'lq2_rope_freq'" in e for e in diagnostics(path, text))  # not for Metal
    text = KERNEL.replace("lq2_block_value(%s, 64, 2, 0, lq2_ref_at(0, 0))", "(float) (double) 1")
    assert any("metal_has_no_double" in e for e in diagnostics(path, text))


def test_combined_source_stands_alone(tmp_path):
    """ggml-metal compiles each embedded library from memory, with no include path: the source
    combine.cmake writes (our headers inlined, as -DLOGQUANT_METAL=ON builds it) parses alone."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is absent")
    out = tmp_path / "lq2.metal"
    subprocess.run([cmake, f"-DOUT={out}", "-P", str(ROOT / "native" / "metal" / "combine.cmake")],
                   check=True)
    text = out.read_text()
    assert '#include "' not in text
    try:
        import clang.cindex as ci
    except ImportError:
        pytest.skip("libclang is absent")
    src = re.sub(r"\[\[[^\]]*\]\]", "", text)
    args = ["-x", "c++", "-std=c++17", "-D__METAL_VERSION__=310", "-I", str(SHIM), "-Wall", "-Wextra",
            "-Wno-unused-function"]  # one file: the headers' helpers a kernel does not call are in it
    tu = ci.Index.create().parse(str(out), args=args, unsaved_files=[(str(out), src)])
    assert [d.spelling for d in tu.diagnostics if d.severity >= ci.Diagnostic.Warning] == []
    for kernel in ("kernel_lq2_attn_block", "kernel_lq2_attn_combine", "kernel_lq2_dequant_keys",
                   "kernel_lq2_dequant_rest", "kernel_lq2_demote_values", "kernel_lq2_demote_keys"):
        assert f"void {kernel}(" in text  # the names lq2-ops-metal.cpp asks the library for
        assert f'"{kernel}"' in (ROOT / "native" / "metal" / "lq2-ops-metal.cpp").read_text()


@pytest.mark.parametrize("src", ["native/metal/lq2-ops-metal.cpp", "ggml/src/ggml-metal/ggml-metal-ops.cpp",
                                 "ggml/src/ggml-metal/ggml-metal.cpp"])
def test_metal_glue_and_patched_files_parse(src, patched_ggml):
    """The encoders (C++ over ggml-metal's C API) and the two C++ files patch 0014 changes parse with
    LOGQUANT_METAL on Linux (g++ -fsyntax-only; <memory> forced, which Apple's libc++ brings
    transitively). ggml-metal-device.m (Objective-C: the library list and supports_op) cannot be
    checked here."""
    import shutil
    import subprocess

    gxx = shutil.which("g++") or shutil.which("c++")
    path = ROOT / src if src.startswith("native") else patched_ggml.parent / src
    ggml = patched_ggml
    r = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-DLOGQUANT_METAL", "-include", "memory",
                        "-I", str(ggml / "include"), "-I", str(ggml / "src"),
                        "-I", str(ggml / "src" / "ggml-metal"),
                        "-I", str(ROOT / "native" / "metal"), "-I", str(ROOT / "native" / "common"),
                        "-I", str(ROOT / "native" / "cpu"), "-I", str(ROOT / "native" / "ggml"), str(path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
