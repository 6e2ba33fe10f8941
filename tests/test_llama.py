"""The Llama class on tiny random-weight models: every kv_type, state, prefix reuse, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from logquant_gguf import KV_TYPES, Llama

ALL_KV = list(KV_TYPES)


def load(path, kv_type="f16", **kw):
    kw.setdefault("n_ctx", 512)
    kw.setdefault("verbose", False)
    kw.setdefault("seed", 1)
    kw.setdefault("n_threads", 2)
    return Llama(str(path), kv_type=kv_type, **kw)


def last_logits(llm: Llama) -> np.ndarray:
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kv_type", ALL_KV)
def test_every_kv_type_generates_on_every_head_size(tiny_models, head_dim, kv_type):
    llm = load(tiny_models[head_dim], kv_type)
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=0)
    assert out["usage"]["completion_tokens"] > 0
    stats = llm.kv_stats()
    assert stats["kv_type"] == kv_type
    assert stats["tokens"] == llm.n_tokens


def test_kv_bytes_follow_the_type(tiny_model):
    sizes = {kv: load(tiny_model, kv).kv_stats()["bytes_total"] for kv in ALL_KV}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_0"] > sizes["q2_0"] > 0
    # 2 layers x 2 kv heads x 64 dims x (K + V) x 512 cells at 16 bits
    assert sizes["f16"] == 2 * 2 * 64 * 2 * 512 * 2


def test_quantized_v_switches_flash_attention_on(tiny_model):
    assert load(tiny_model, "q4_0").context_params.flash_attn_type == 1
    with pytest.raises(ValueError, match="flash attention"):
        load(tiny_model, "q4_0", flash_attn=False)


def test_greedy_output_is_reproducible_and_f16_is_default(tiny_model):
    a = load(tiny_model).create_completion(PROMPT, max_tokens=8, temperature=0)
    b = load(tiny_model, "f16").create_completion(PROMPT, max_tokens=8, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.parametrize("kv_type", ALL_KV)
def test_state_round_trip_gives_identical_logits(tiny_model, kv_type):
    llm = load(tiny_model, kv_type, logits_all=True)
    toks = llm.tokenize(PROMPT.encode())
    llm.eval(toks)
    state = llm.save_state()
    llm.eval(llm.tokenize(b" continue", add_bos=False))
    after_save = last_logits(llm)

    other = load(tiny_model, kv_type, logits_all=True)
    other.load_state(state)
    other.eval(other.tokenize(b" continue", add_bos=False))
    # LogQuant too: its cells go back where they were, holes left by demotions included
    np.testing.assert_array_equal(last_logits(other), after_save)


def test_state_from_another_kv_type_is_refused(tiny_model):
    src = load(tiny_model, "q8_0")
    src.eval(src.tokenize(PROMPT.encode()))
    state = src.save_state()
    dst = load(tiny_model, "f16")
    with pytest.raises(ValueError, match="kv_type='q8_0'"):
        dst.load_state(state)
    # nothing lost: the destination still works, the state still loads where it belongs
    dst.eval(dst.tokenize(PROMPT.encode()))
    load(tiny_model, "q8_0").load_state(state)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_prefix_reuse_matches_a_fresh_evaluation(tiny_model, kv_type):
    common = PROMPT
    reused = load(tiny_model, kv_type, logits_all=True)
    reused.create_completion(common + " first ending", max_tokens=1, temperature=0)
    second = common + " another ending"
    reused.create_completion(second, max_tokens=1, temperature=0)

    fresh = load(tiny_model, kv_type, logits_all=True)
    fresh.create_completion(second, max_tokens=1, temperature=0)
    n = len(fresh.tokenize(second.encode()))
    np.testing.assert_allclose(reused.scores[n - 1], fresh.scores[n - 1], rtol=1e-3, atol=1e-3)


def test_pickle_keeps_kv_type(tiny_model):
    llm = load(tiny_model, "q4_0")
    clone = pickle.loads(pickle.dumps(llm))
    assert clone.kv_type == "q4_0"
    assert clone.context_params.type_k == KV_TYPES["q4_0"].type_k


def test_chat_streaming_and_tokenize(tiny_model):
    llm = load(tiny_model, "q8_0")
    chunks = list(llm.create_chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True))
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    toks = llm.tokenize(b"abc", add_bos=False)
    assert llm.detokenize(toks).endswith(b"abc")  # SPM may prepend its word-start mark
