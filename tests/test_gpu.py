"""LogQuant on a GPU: the cache in the GPU's memory (offload_kqv=True) through the LogQuant ops'
kernels, against the same model run on the CPU. `pytest -m cuda` (scripts/gpu_check.sh) for
NVIDIA, `pytest -m metal` (scripts/metal_check.sh, with LOGQUANT_METAL=1) for Apple. Skipped
unless this build has that backend's kernels (-DLOGQUANT_CUDA=ON / -DLOGQUANT_METAL=ON) and its
device: on a machine without a GPU they do not run at all, and until those scripts' results are
committed the kernels have never run."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_tiny_llama

from logquant_gguf import Llama
from logquant_gguf._capi import build_info

# (kernel tag in the build info, backend name prefix in llama.cpp's registry and logs)
BACKENDS = [pytest.param(("cuda", "CUDA"), marks=pytest.mark.cuda, id="cuda"),
            pytest.param(("metal", "MTL"), marks=pytest.mark.metal, id="metal")]

N_LAYER = 4
PROMPT = 200  # one batch; with W = 8 most of it ends in the 2-bit tier (the prefill path)
STEPS = 40  # then one token at a time (the fused decode kernel), demoting every W steps


def skip_reason(kernels: str, backend: str) -> str | None:
    import os

    info = build_info()
    if kernels not in info.get("logquant_gpu_kernels", []):
        return (f"this build has no LogQuant {kernels} kernels (build with "
                f"CMAKE_ARGS=\"-DGGML_{kernels.upper()}=ON -DLOGQUANT_{kernels.upper()}=ON\")")
    if not any(backend in b or kernels in b.lower() for b in info["backends"]):
        return f"no {backend} backend in this build"
    if kernels == "metal" and os.environ.get("LOGQUANT_METAL") != "1":
        return "the Metal LogQuant ops are off unless LOGQUANT_METAL=1"
    return None


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    kernels, prefix = request.param
    reason = skip_reason(kernels, prefix)
    if reason:
        pytest.skip(reason)
    return prefix


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gpu-model") / "tiny.gguf", n_layer=N_LAYER,
                            qk_scale=0.1, seed=11)


def tokens() -> list[int]:
    rng = np.random.default_rng(5)
    return [1] + rng.integers(3, 259, PROMPT + STEPS - 1).tolist()


def load(model: Path, **kw) -> Llama:
    return Llama(str(model), **{"n_ctx": 512, "n_batch": 256, "logits_all": True, "verbose": False,
                                "kv_type": "logquant", "logquant_window": 8, **kw})


def logits(llm: Llama, toks: list[int]) -> np.ndarray:
    llm.eval(toks[:PROMPT])
    for t in toks[PROMPT:]:
        llm.eval([t])
    return np.array(llm.scores[:len(toks)])


def gpu_vs_cpu(model: Path, backend: str, capfd, **kw) -> tuple[float, float]:
    """Max abs logit difference GPU vs CPU for `kw`, and the same for an f16 cache (the model's own
    GPU-vs-CPU difference, which bounds what the cache may add)."""
    toks = tokens()
    diffs = []
    for cache in (kw, {"kv_type": "f16"}):
        with contextlib.closing(load(model, n_gpu_layers=0, **cache)) as cpu:
            want = logits(cpu, toks)
        capfd.readouterr()
        with contextlib.closing(load(model, n_gpu_layers=-1, offload_kqv=True, verbose=True, **cache)) as gpu:
            log = capfd.readouterr().err
            assert re.search(rf"{backend}\d+ KV buffer size", log), log  # the cache is in GPU memory
            got = logits(gpu, toks)
        assert np.isfinite(got).all()
        diffs.append(float(np.abs(got - want).max()))
    print(f"{kw}: GPU vs CPU max abs logit diff {diffs[0]:.3g} (f16 cache: {diffs[1]:.3g})")
    return diffs[0], diffs[1]


@pytest.mark.parametrize("kw", [{}, {"logquant_key_bits": 4}, {"flash_attn": True}, {"logquant_scale_bits": 8}],
                         ids=["logquant", "k4", "flash-attn", "s8"])
def test_logquant_on_the_gpu_matches_the_cpu(backend, model, capfd, kw):
    lq, f16 = gpu_vs_cpu(model, backend, capfd, **kw)
    assert lq <= max(1e-2, 4 * f16)


def test_state_round_trip_on_the_gpu(backend, model):
    """Saved after the prompt, restored into a fresh GPU context, the decode continues as the
    uninterrupted run does."""
    toks = tokens()
    with contextlib.closing(load(model, n_gpu_layers=-1, offload_kqv=True)) as a:
        a.eval(toks[:PROMPT])
        state = a.save_state()
        for t in toks[PROMPT:]:
            a.eval([t])
        want = np.array(a.scores[PROMPT:PROMPT + STEPS])
    with contextlib.closing(load(model, n_gpu_layers=-1, offload_kqv=True)) as b:
        b.load_state(state)
        for t in toks[PROMPT:]:
            b.eval([t])
        got = np.array(b.scores[PROMPT:PROMPT + STEPS])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_kv_stats_count_the_2bit_tier_on_the_gpu(backend, model):
    with contextlib.closing(load(model, n_gpu_layers=-1, offload_kqv=True)) as llm:
        logits(llm, tokens())
        stats = llm.kv_stats()
    assert stats["tiers"]["q2"]["tokens"] >= PROMPT + STEPS - 3 * 8
