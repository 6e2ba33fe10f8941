"""The shell scripts parse, and the shaped model (scripts/shaped_model.py) has the real model's
shapes, so that the speed a lent GPU measures on it is the model's."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")))
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    assert bash
    r = subprocess.run([bash, "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shaped_model_has_the_real_models_shapes():
    from gguf import GGUFReader

    from logquant_gguf import models

    try:
        path = models.model_path("qwen2.5-coder-0.5b")
    except Exception as e:  # the model extra is not installed
        pytest.skip(f"the default model is not installed: {e}")
    spec = importlib.util.spec_from_file_location("shaped_model", REPO / "scripts" / "shaped_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fields = GGUFReader(path).fields

    def value(key):
        return int(fields[f"qwen2.{key}"].parts[-1][0])

    shape = mod.SHAPES["qwen2.5-coder-0.5b"]
    assert shape["n_embd"] == value("embedding_length")
    assert shape["n_head"] == value("attention.head_count")
    assert shape["n_head_kv"] == value("attention.head_count_kv")
    assert shape["n_layer"] == value("block_count")
    assert shape["n_ff"] == value("feed_forward_length")
    assert shape["head_dim"] == shape["n_embd"] // shape["n_head"]
