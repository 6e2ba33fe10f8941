"""The 2-bit tier's slot book (native/llama/logquant-book.{h,cpp}) without a model: scripted
rules (groups in order for a lone sequence, the lowest free group, staging rows, shared slots,
settling) and 90000 random operations over 30 seeds with every invariant checked after each
(logquant_book_check.cpp)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_slot_book_rules_and_invariants(tmp_path):
    exe = tmp_path / "book_check"
    subprocess.run([shutil.which("c++") or "c++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'native' / 'llama'}", str(ROOT / "tests" / "native" / "logquant_book_check.cpp"),
                    str(ROOT / "native" / "llama" / "logquant-book.cpp"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "90000"]
