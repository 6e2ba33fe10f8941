"""The LogQuant cache end to end, on tiny random-weight models: tiers, policy, state, reuse."""

from __future__ import annotations

import ctypes
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from logquant_gguf import Llama, _capi

sys.path.insert(0, str(Path(__file__).resolve().parent / "native"))
from lq2_reference import DecodeRule  # noqa: E402

W = 8  # small, so that short prompts cross every tier boundary
# groups of 64 tokens and 2-bit keys on every layer: not the default format (groups of 128, 3-bit
# keys on the layers "auto" picks), the one the figures of some tests are for
G64 = {"logquant_key_group": 64}


def load(path, kv_type="logquant", **kw):
    kw.setdefault("n_ctx", 1024)
    kw.setdefault("verbose", False)
    kw.setdefault("n_threads", 2)
    kw.setdefault("logits_all", True)
    if kv_type in ("logquant", "q2_window"):
        kw.setdefault("logquant_window", W)
    return Llama(str(path), kv_type=kv_type, **kw)


def ctx_ptr(llm: Llama) -> int:
    return ctypes.cast(llm._ctx.ctx, ctypes.c_void_p).value


def f16_positions(llm: Llama) -> list[int]:
    return _capi.f16_positions(ctx_ptr(llm))


def policy_model(n: int, w: int) -> list[int]:
    rule = DecodeRule(w)
    for p in range(n):
        rule.feed(p)
    return sorted(rule.full())


def tokens(llm: Llama, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, llm.n_vocab()) for _ in range(n)]


def last_logits(llm: Llama) -> np.ndarray:
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def saved_state_continues(path, n: int = 150, n_more: int = 20, **kw):
    """A state saved after n tokens, loaded into a fresh Llama of the same settings: the next
    n_more tokens' last logits equal those of the context it was saved from, bit for bit
    (test_state_round_trip_continues_the_saved_context). Returns the state."""
    llm = load(path, **kw)
    llm.eval(tokens(llm, n))
    state = llm.save_state()
    more = tokens(llm, n_more, seed=9)
    llm.eval(more)
    expected = last_logits(llm)
    llm.close()
    other = load(path, **kw)
    other.load_state(state)
    other.eval(more)
    np.testing.assert_array_equal(last_logits(other), expected)
    other.close()
    return state


def test_logits_match_the_f16_cache_while_everything_is_f16(tmp_path):
    """2W tokens: all in the f16 tier, so only the attention kernels differ. A model with soft
    attention keeps llama.cpp's own rounding differences small (its flash attention rounds Q and
    accumulates V in f16: it is 0.019 off its f32 path here, ours 0.006)."""
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "soft.gguf", qk_scale=0.1, seed=64)
    toks = tokens(load(path), 2 * W)
    ref = load(path, "f16", flash_attn=False)  # the f32 softmax path
    lq = load(path)
    ref.eval(toks)
    lq.eval(toks)
    assert lq.kv_stats()["tiers"]["q2"]["tokens"] == 0
    a = np.array(ref.scores[: len(toks)], dtype=np.float64)
    b = np.array(lq.scores[: len(toks)], dtype=np.float64)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * np.abs(a).max())


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kv_type", ["logquant", "q2_window"])
def test_long_context_fills_both_tiers(tiny_models, head_dim, kv_type):
    llm = load(tiny_models[head_dim], kv_type)
    n = 300
    llm.eval(tokens(llm, n))
    st = llm.kv_stats()
    f16, q2 = st["tiers"]["f16"], st["tiers"]["q2"]
    assert f16["tokens"] + q2["tokens"] == n == st["tokens"]
    assert f16["tokens"] <= 3 * W
    assert f16["bytes"] > 0 and q2["bytes"] > 0
    logits = last_logits(llm)
    assert np.all(np.isfinite(logits))
    out = llm.create_completion(llm.detokenize(tokens(llm, 40, seed=1)).decode(errors="ignore"),
                                max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] > 0


def test_f16_tier_follows_the_policy_after_every_step(tiny_model):
    """Random prefill sizes and decodes: the native f16 set equals the token-by-token rule."""
    rng = random.Random(7)
    llm = load(tiny_model, n_batch=64, n_ubatch=64)
    seq = tokens(llm, 700, seed=3)
    n = 0
    while n < len(seq):
        step = rng.choice([1, 1, 1, 2, 5, 17, 64, 130])
        llm.eval(seq[n:n + step])
        n = llm.n_tokens
        assert f16_positions(llm) == policy_model(n, W), f"after {n} tokens"


def test_window_policy_keeps_the_newest_3w(tiny_model):
    llm = load(tiny_model, "q2_window")
    llm.eval(tokens(llm, 200))
    assert f16_positions(llm) == list(range(200 - 3 * W, 200))


def test_batching_does_not_change_the_tiers(tiny_model):
    a = load(tiny_model)
    b = load(tiny_model, n_batch=16, n_ubatch=16)
    seq = tokens(a, 333)
    a.eval(seq)
    for t in seq:
        b.eval([t])
    assert f16_positions(a) == f16_positions(b) == policy_model(333, W)
    # the tiers' token counts agree; their allocations differ (the f16 tier is sized per ubatch)
    assert [t["tokens"] for t in a.kv_stats()["tiers"].values()] == \
        [t["tokens"] for t in b.kv_stats()["tiers"].values()]


def test_decode_shared_by_more_threads_than_kv_heads(tiny_model):
    """A decode step has one query row per kv head here (2): with 6 threads each row's tokens
    are cut into 3 parts, computed apart and merged. The logits equal the one-thread run's (no
    parts) up to float summation order, step after step across demotions."""
    runs = {}
    for n_threads in (1, 6):
        llm = load(tiny_model, n_threads=n_threads, n_threads_batch=2)
        seq = tokens(llm, 260, seed=3)
        llm.eval(seq[:200])
        steps = []
        for t in seq[200:]:
            llm.eval([t])
            steps.append(last_logits(llm))
        runs[n_threads] = np.array(steps)
        llm.close()
    np.testing.assert_allclose(runs[6], runs[1], atol=1e-3, rtol=0)
    assert np.abs(runs[6] - runs[1]).max() > 0  # the parts did change the summation order


@pytest.mark.parametrize("kv_type", ["logquant", "q2_window"])
@pytest.mark.parametrize("fit", [False, True])
def test_state_round_trip_continues_the_saved_context(tiny_model, kv_type, fit):
    """A restored context continues as the saved one would have, bit for bit, step after step.
    The saved context has holes in its f16 cells (the cells of demoted tokens) and the fused
    attention folds the f16 tier in cell order; llama.cpp's read packs the cells from cell 0, so
    the state records where they were and the read puts them back (patch 0015). Without that, some
    steps' logits differed at float-rounding level (up to 4e-5 on this model)."""
    llm = load(tiny_model, kv_type, logquant_fit=fit)
    llm.eval(tokens(llm, 150))
    state = llm.save_state()
    more = tokens(llm, 20, seed=9)
    steps = []
    for t in more:
        llm.eval([t])
        steps.append(last_logits(llm))

    other = load(tiny_model, kv_type, logquant_fit=fit)
    other.load_state(state)
    expected_f16 = policy_model(150, W) if kv_type == "logquant" else list(range(150 - 3 * W, 150))
    assert f16_positions(other) == expected_f16
    for t in more:
        other.eval([t])
        np.testing.assert_array_equal(last_logits(other), steps.pop(0))
    # and the cell layout and search head came back too: the two contexts now save equal states
    assert bytes(other.save_state().llama_state) == bytes(llm.save_state().llama_state)


CELL_LAYOUT_TAG = struct.pack("<I", 0x4C51324C)  # logquant_cell_layout's tag (native/llama/logquant-cache.h)


def cell_layout(state) -> tuple[int, int, list[tuple[int, list[int]]]]:
    """Where a state's cell layout starts and ends (between the model's architecture name and the
    stream count), and each stream's (search head, cell indices)."""
    b = bytes(state.llama_state)
    at = b.find(b"\x05\x00\x00\x00llama") + 9
    assert b[at:at + 4] == CELL_LAYOUT_TAG
    end, streams = at + 8, []
    for _ in range(struct.unpack_from("<I", b, at + 4)[0]):
        head, n = struct.unpack_from("<II", b, end)
        streams.append((head, list(struct.unpack_from(f"<{n}I", b, end + 8))))
        end += 8 + 4 * n
    return at, end, streams


def without_cell_layout(state):
    """The state as a build before patch 0015 wrote it: the same bytes without the cell layout."""
    import copy

    at, end, _ = cell_layout(state)
    old = copy.copy(state)
    old.llama_state = bytes(state.llama_state)[:at] + bytes(state.llama_state)[end:]
    old.llama_state_size = len(old.llama_state)
    return old


def test_state_without_a_cell_layout_loads_packed(tiny_model):
    """A state saved before the cell layout (patch 0015) still loads: its cells go from cell 0, as
    llama.cpp places them, and it continues within float rounding of the saved context."""
    llm = load(tiny_model)
    llm.eval(tokens(llm, 150))
    state = llm.save_state()
    saved = cell_layout(state)[2][0][1]
    assert saved != list(range(len(saved)))  # the saved context has holes
    more = tokens(llm, 8, seed=9)
    llm.eval(more)
    other = load(tiny_model)
    other.load_state(without_cell_layout(state))
    assert f16_positions(other) == policy_model(150, W)
    assert cell_layout(other.save_state())[2] == [(0, list(range(len(saved))))]  # packed, head 0
    other.eval(more)
    np.testing.assert_allclose(last_logits(other), last_logits(llm), rtol=0, atol=1e-4)


def test_corrupt_cell_layout_is_refused_and_the_context_works(tiny_model):
    """Cell indices out of order: refused with llama.cpp's reason, the cache emptied (load_state's
    contract), and the context decodes again from scratch."""
    llm = load(tiny_model)
    llm.eval(tokens(llm, 150))
    state = llm.save_state()
    b = bytearray(state.llama_state)
    first = cell_layout(state)[0] + 16  # tag, stream count, head, cell count, then the first index
    second = struct.unpack_from("<I", b, first + 4)[0]
    struct.pack_into("<I", b, first, second)  # the first index equal to the second: not increasing
    state.llama_state = bytes(b)
    other = load(tiny_model)
    with pytest.raises(ValueError, match="could not load this state .*corrupt f16 cell layout of stream 0"):
        other.load_state(state)
    assert other.n_tokens == 0
    other.eval(tokens(other, 20))
    assert np.all(np.isfinite(last_logits(other)))


def test_state_from_another_window_or_type_is_refused(tiny_model):
    llm = load(tiny_model)
    llm.eval(tokens(llm, 100))
    state = llm.save_state()
    with pytest.raises(ValueError, match="logquant_window=8"):
        load(tiny_model, logquant_window=16).load_state(state)
    with pytest.raises(ValueError, match="kv_type='logquant'"):
        load(tiny_model, "f16").load_state(state)
    with pytest.raises(ValueError, match="kv_type='q2_window'"):
        q2w = load(tiny_model, "q2_window")
        q2w.eval(tokens(q2w, 10))
        load(tiny_model).load_state(q2w.save_state())


def test_truncation_keeps_the_cache_only_when_no_2bit_token_returns(tiny_model):
    """seq_rm of a tail is accepted when the remaining tokens' f16 set is still in f16;
    otherwise it is refused and nothing changes (llama-cpp-python then re-evaluates)."""
    llm = load(tiny_model)
    llm.eval(tokens(llm, 200))
    mem = llm._ctx.memory
    import llama_cpp

    before = f16_positions(llm)
    # dropping the newest token: the remaining 199 tokens' f16 set is a subset of what is in f16
    assert llama_cpp.llama_memory_seq_rm(mem, -1, 199, -1)
    assert f16_positions(llm) == [p for p in before if p < 199]
    # dropping 150 tokens would need 2-bit tokens back in f16: refused, unchanged
    assert not llama_cpp.llama_memory_seq_rm(mem, -1, 50, -1)
    assert f16_positions(llm) == [p for p in before if p < 199]
    # dropping everything is always possible
    assert llama_cpp.llama_memory_seq_rm(mem, -1, 0, -1)
    assert llm.kv_stats()["tokens"] == 0


def test_prefix_reuse_equals_a_fresh_evaluation(tiny_model):
    """Under the documented semantics: where the cache cannot be kept, the prompt is re-evaluated,
    so the logits are exactly a fresh run's."""
    first = tokens(load(tiny_model), 200, seed=11)
    second = first[:60] + tokens(load(tiny_model), 30, seed=12)
    reused = load(tiny_model)
    reused.create_completion(first, max_tokens=1, temperature=0)
    reused.create_completion(second, max_tokens=1, temperature=0)
    fresh = load(tiny_model)
    fresh.create_completion(second, max_tokens=1, temperature=0)
    n = len(second)
    np.testing.assert_array_equal(reused.scores[n - 1], fresh.scores[n - 1])


@pytest.mark.parametrize("window", [0, -3, 1.5, "32", True, 10**6])
def test_bad_window_is_refused(tiny_model, window):
    with pytest.raises(ValueError, match="logquant_window must be an integer"):
        load(tiny_model, logquant_window=window)


def test_window_on_a_non_logquant_type_is_refused(tiny_model):
    with pytest.raises(ValueError, match="logquant_window applies to the LogQuant kv_types"):
        Llama(str(tiny_model), kv_type="q8_0", logquant_window=8, verbose=False)


def test_logquant_without_flash_attention_is_refused(tiny_model):
    with pytest.raises(ValueError, match="flash attention"):
        load(tiny_model, flash_attn=False)


def test_prefill_through_flash_attention_equals_f16_while_nothing_is_2bit(tiny_model):
    """With logquant_prefill_fa_min set, prompts (ubatches of that many tokens or more) attend
    through llama.cpp's flash attention over both tiers laid out in f16. While the window still holds every token,
    that is exactly an f16 cache's computation: the 2-bit tier's slots are all masked, and the f16
    tier's rows and mask are llama.cpp's own."""
    f16 = load(tiny_model, kv_type="f16", flash_attn=True)
    seq = tokens(f16, 150, seed=21)
    f16.eval(seq[:100])
    f16.eval(seq[100:])  # 50 tokens: the prefill path too
    want = np.array(f16.scores[:150])
    f16.close()
    lq = load(tiny_model, logquant_window=256, logquant_prefill_fa_min=32)
    lq.eval(seq[:100])
    lq.eval(seq[100:])
    assert lq.kv_stats()["tiers"]["q2"]["tokens"] == 0
    np.testing.assert_array_equal(np.array(lq.scores[:150]), want)
    lq.close()


def test_prefill_path_is_a_choice(tiny_model):
    """logquant_prefill_fa_min=0 keeps every ubatch on the fused kernel, and so does the default
    (automatic) for a cache in host memory; once tokens are 2-bit the two paths differ (f16
    against f32 scores), and neither changes what is stored."""
    got = {}
    for fa_min in (None, 0, 32):
        llm = load(tiny_model, **({} if fa_min is None else {"logquant_prefill_fa_min": fa_min}))
        assert llm.logquant_prefill_fa_min == fa_min
        seq = tokens(llm, 200, seed=22)
        llm.eval(seq)
        got[fa_min] = (np.array(llm.scores[:200]), llm.kv_stats()["tiers"])
        llm.close()
    np.testing.assert_array_equal(got[None][0], got[0][0])  # automatic in host memory: fused
    assert got[0][1] == got[32][1]
    assert got[0][1]["q2"]["tokens"] > 100
    assert not np.array_equal(got[0][0], got[32][0])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logquant_prefill_fa_min"):
            load(tiny_model, logquant_prefill_fa_min=bad)
    with pytest.raises(ValueError, match="applies to the LogQuant"):
        load(tiny_model, kv_type="f16", logquant_prefill_fa_min=0)


def test_decode_steps_reuse_the_graph(tiny_model):
    """The LogQuant inputs (demotion list, 2-bit mask) are padded, so decode steps keep one graph
    shape across demotions and llama.cpp reuses the graph, as it does for an f16 cache."""
    from logquant_gguf.llama import llama_cpp

    llm = load(tiny_model)
    seq = tokens(llm, 200, seed=5)
    llm.eval(seq[:60])
    for t in seq[60:]:
        llm.eval([t])
    assert llm.kv_stats()["tiers"]["q2"]["tokens"] > 100  # demotions happened all along
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    assert perf.n_eval == 140 and perf.n_reused >= 135
    llm.close()
