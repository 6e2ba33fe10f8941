"""native/cuda/*.cu compile with nvcc for sm_80 and sm_90, warning-free (no GPU needed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "native" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cuda_compiles(cu: Path, arch: str, tmp_path: Path):
    if NVCC is None:
        print("nvcc not found on PATH or in /usr/local/cuda/bin: CUDA compile check skipped")
        pytest.skip("nvcc is absent")
    obj = tmp_path / f"{cu.stem}-{arch}.o"
    r = subprocess.run([NVCC, f"-arch={arch}", "-O2", "-Werror", "all-warnings",
                        "-c", str(cu), "-o", str(obj)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    data = obj.read_bytes()
    if cu.name == "lq2-quants.cu":  # launchers have C linkage: what llama.cpp's CUDA code calls
        for sym in (b"lq2_cuda_quantize_v", b"lq2_cuda_dequantize_k_group"):
            assert sym in data


def test_cuda_sources_exist():
    assert CU_FILES, "native/cuda has no .cu file"
