"""native/cuda/*.cu compile with nvcc and ggml-cuda's flags (-O3 -use_fast_math) for every
architecture our CMake targets by default, warning-free, and the demotion's PTX has no approximate
division (its codes must be the CPU's bytes). No GPU needed; without nvcc the tests skip with a
message. The kernels have never run on a GPU: this proves they build, not that they work."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "native" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
# what native/CMakeLists.txt sets when the user gives no CMAKE_CUDA_ARCHITECTURES: Turing, Ampere
# (and Jetson Orin), Ada, Hopper, Blackwell (consumer)
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_120"]
GGML_CUDA_FLAGS = ["-O3", "-use_fast_math", "-std=c++17"]
# the extern "C" launchers the ggml-cuda glue (lq2-ops-cuda.cu) calls
LAUNCHERS = {"lq2-attn.cu": [b"lq2_cuda_attn", b"lq2_cuda_attn_n_part"],
             "lq2-demote.cu": [b"lq2_cuda_demote", b"lq2_cuda_dequant"]}
STANDALONE = [cu for cu in CU_FILES if cu.name in LAUNCHERS]  # lq2-ops-cuda.cu needs ggml-cuda


def need_nvcc():
    if NVCC is None:
        print("nvcc not found on PATH or in /usr/local/cuda/bin: CUDA compile check skipped")
        pytest.skip("nvcc is absent")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", STANDALONE, ids=lambda p: p.name)
def test_cuda_compiles(cu: Path, arch: str, tmp_path: Path):
    need_nvcc()
    obj = tmp_path / f"{cu.stem}-{arch}.o"
    r = subprocess.run([NVCC, f"-arch={arch}", *GGML_CUDA_FLAGS, "-Werror", "all-warnings",
                        "-c", str(cu), "-o", str(obj)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    data = obj.read_bytes()
    for sym in LAUNCHERS[cu.name]:  # C linkage: what the glue calls
        assert sym in data, sym


def test_demotion_divides_exactly_under_fast_math(tmp_path: Path):
    """-use_fast_math turns a plain / into div.approx; the quantizer's divisions are LQ2_DIV
    (__fdiv_rn), so the PTX has only correctly rounded ones. The attention may approximate."""
    need_nvcc()
    ptx = tmp_path / "demote.ptx"
    r = subprocess.run([NVCC, "-arch=sm_80", *GGML_CUDA_FLAGS, "-ptx",
                        str(ROOT / "native/cuda/lq2-demote.cu"), "-o", str(ptx)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = ptx.read_text()
    divs = re.findall(r"\bdiv\.[a-z0-9.]*f32", text)
    assert divs and all(d.startswith("div.rn") for d in divs), sorted(set(divs))
    assert not re.search(r"\b(sin|cos|ex2|lg2)\.approx", text)  # angles in double, as on the CPU


def test_cuda_sources_exist():
    assert set(LAUNCHERS) <= {cu.name for cu in CU_FILES}, "a CUDA source is missing"


def cublas_include() -> Path | None:
    """cublas_v2.h, which ggml-cuda's headers include: the toolkit's, the nvidia-cublas wheel's, or
    $LOGQUANT_CUBLAS_INCLUDE."""
    import os
    import sys

    dirs = [os.environ.get("LOGQUANT_CUBLAS_INCLUDE", ""), "/usr/local/cuda/include"]
    if NVCC:
        dirs.append(str(Path(NVCC).resolve().parent.parent / "include"))
    dirs += [str(Path(p) / "nvidia" / "cu13" / "include") for p in sys.path]
    return next((Path(d) for d in dirs if d and (Path(d) / "cublas_v2.h").exists()), None)


@pytest.mark.parametrize("src", ["native/cuda/lq2-ops-cuda.cu", "ggml/src/ggml-cuda/ggml-cuda.cu"])
def test_ggml_cuda_glue_compiles(src: str, tmp_path: Path, request):
    """The glue against ggml-cuda's headers, and ggml-cuda.cu with patch 0013's dispatch, as
    -DLOGQUANT_CUDA=ON builds them (one architecture: the whole of ggml-cuda would take an hour
    here). Needs cublas_v2.h (the nvidia-cublas wheel): skipped with a message without it."""
    need_nvcc()
    inc = cublas_include()
    if inc is None:
        print("cublas_v2.h not found (pip install nvidia-cublas, or set LOGQUANT_CUBLAS_INCLUDE): "
              "ggml-cuda glue compile check skipped")
        pytest.skip("cublas_v2.h is absent")
    ggml = request.getfixturevalue("patched_ggml")
    path = ROOT / src if src.startswith("native") else ggml.parent / src
    r = subprocess.run([NVCC, "-arch=sm_80", *GGML_CUDA_FLAGS, "-DLOGQUANT_CUDA", "-DGGML_USE_CUDA",
                        "-Werror",
                        "all-warnings" if src.startswith("native") else "cross-execution-space-call",
                        "-I", str(inc), "-I", str(ggml / "include"), "-I", str(ggml / "src"),
                        "-I", str(ggml / "src" / "ggml-cuda"), "-I", str(ROOT / "native" / "cuda"),
                        "-I", str(ROOT / "native" / "common"), "-I", str(ROOT / "native" / "cpu"),
                        "-c", str(path), "-o", str(tmp_path / "glue.o")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    if src.endswith("ggml-cuda.cu"):  # the dispatch calls the glue
        assert b"ggml_cuda_op_lq2_attn" in (tmp_path / "glue.o").read_bytes()
