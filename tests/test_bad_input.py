"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from logquant_gguf import KV_TYPES, Llama, ModelFileError


def test_unknown_kv_type_lists_the_valid_ones(tiny_model):
    with pytest.raises(ValueError) as e:
        Llama(str(tiny_model), kv_type="q3_nope", verbose=False)
    for name in KV_TYPES:
        assert name in str(e.value)


def test_type_k_conflicting_with_kv_type(tiny_model):
    with pytest.raises(ValueError, match="conflicts with kv_type"):
        Llama(str(tiny_model), kv_type="f16", type_k=8, verbose=False)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        Llama(str(tmp_path / "nope.gguf"), verbose=False)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is a text file, not a model\n")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        Llama(str(p), verbose=False)


def test_truncated_file(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt") as e:
        Llama(str(p), verbose=False)
    assert "(llama.cpp: " in str(e.value)  # its own reason, though verbose=False keeps its log quiet


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        Llama(str(p), verbose=False)


def test_llama_cpp_imported_first_with_another_library(tmp_path):
    """Importing llama_cpp bound to another libllama first must fail loudly, not run silently."""
    import logquant_gguf._runtime as rt

    other = tmp_path / "otherlib"
    shutil.copytree(rt.LIB_DIR, other)
    code = "import llama_cpp, logquant_gguf"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(other))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert "imported before logquant_gguf" in r.stderr
