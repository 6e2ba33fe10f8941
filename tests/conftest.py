from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_model import write_tiny_llama

HEAD_DIMS = (64, 128, 256)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[int, Path]:
    """head_dim -> a tiny GQA llama (4 query heads over 2 KV heads)."""
    d = tmp_path_factory.mktemp("models")
    return {hd: write_tiny_llama(d / f"tiny-hd{hd}.gguf", head_dim=hd, seed=hd) for hd in HEAD_DIMS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models[64]


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The default model (Qwen2.5-Coder-0.5B-Instruct), when its part packages are installed."""
    from logquant_gguf import models

    try:
        return models.default_model_path()
    except models.ModelNotInstalledError as e:
        if os.environ.get("CI"):
            raise  # CI installs the extra: a missing model there is a failure, not a skip
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma-3-270M (sliding-window layers: llama.cpp's iSWA cache), when its parts are installed."""
    from logquant_gguf import models

    try:
        return models.model_path("gemma-3-270m")
    except models.ModelNotInstalledError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
