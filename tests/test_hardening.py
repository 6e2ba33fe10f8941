"""Paths that used to go wrong silently or crash: a failed or oversized state load, use after
close(), rollbacks the LogQuant cache refuses (speculative decoding), the context's RoPE and ubatch
settings, and a 2-bit tier at its limit. Each test fails on the code before its fix."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_logquant import W, load, tokens

from logquant_gguf import _capi
from logquant_gguf.bench import env
from logquant_gguf.llama import ClosedError, llama_cpp


def ctx_ptr(llm) -> int:
    return ctypes.cast(llm._ctx.ctx, ctypes.c_void_p).value


def decode(llm, toks: list[int], p0: int) -> int:
    """One batch of toks at positions p0.. in sequence 0 (logits for the last); llama_decode's
    return value."""
    batch = llama_cpp.llama_batch_init(len(toks), 0, 1)
    try:
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(toks) - 1
        batch.n_tokens = len(toks)
        return llama_cpp.llama_decode(llm._ctx.ctx, batch)
    finally:
        llama_cpp.llama_batch_free(batch)


def logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                 shape=(llm.n_vocab(),)).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# state

def fresh_completion(path, prompt: str, **kw) -> str:
    return load(path, **kw).create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]


def test_state_of_another_sequence_layout_is_refused_before_anything_changes(tiny_model):
    """Saved with one sequence, loaded into n_seq_max=2, kv_unified=False: refused up front, and
    the Llama keeps what it held (its next completion is what it would have been)."""
    src = load(tiny_model)
    src.eval(tokens(src, 100, seed=1))
    state = src.save_state()
    dst = load(tiny_model, n_seq_max=2, kv_unified=False)
    prompt = "def f(x):\n    return"
    want = dst.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    held = dst.n_tokens
    with pytest.raises(ValueError, match="n_seq_max=1, kv_unified=True"):
        dst.load_state(state)
    assert dst.n_tokens == held
    assert dst.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"] == want


def test_a_state_llama_cpp_refuses_leaves_the_llama_empty_and_consistent(tiny_model):
    """A state llama.cpp itself refuses (here one without our checks' attributes, as a pickled
    llama-cpp-python state is, from another sequence layout): llama-cpp-python had already set the
    token list, so the next completion skipped its prefix and printed unrelated text. Now the cache
    and the token list are both emptied, and the next completion is a fresh one."""
    prompt = "import os\nprint(os.getcwd())"
    src = load(tiny_model, n_seq_max=2, kv_unified=False)
    src.create_completion(prompt, max_tokens=4, temperature=0.0)
    state = src.save_state()
    for attr in ("kv_type", "logquant_window", "logquant_bits", "n_seq_max", "kv_unified"):
        delattr(state, attr)
    dst = load(tiny_model)
    dst.create_completion("something else entirely", max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="now empty"):
        dst.load_state(state)
    assert dst.n_tokens == 0
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(dst._ctx.ctx), 0) == -1
    got = dst.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    assert got == fresh_completion(tiny_model, prompt)


def test_a_state_larger_than_the_context_is_refused(tiny_model):
    """403 tokens saved with n_ctx 512 do not fit n_ctx 256. f16 refuses (too many cells); the
    LogQuant cache's f16 tier is small enough to take them, so the cache itself must count both
    tiers, and the Python check says so first."""
    src = load(tiny_model, n_ctx=512)
    src.eval(tokens(src, 403, seed=2))
    state = src.save_state()
    small = load(tiny_model, n_ctx=256)
    with pytest.raises(ValueError, match="403 tokens"):
        small.load_state(state)
    # llama.cpp's own entry point, without the Python check
    raw = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
    assert llama_cpp.llama_state_set_data(small._ctx.ctx, raw, state.llama_state_size) == 0
    mem = llama_cpp.llama_get_memory(small._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == -1  # refused and emptied, not half-loaded
    # and the same state still loads where it fits
    big = load(tiny_model, n_ctx=512)
    big.load_state(state)
    assert big.kv_stats()["tokens"] == 403


# ---------------------------------------------------------------------------------------------
# close

def test_every_method_after_close_raises_instead_of_crashing(tiny_model):
    llm = load(tiny_model)
    llm.create_completion("abc", max_tokens=2)
    llm.close()
    for call in (lambda: llm.create_completion("abc", max_tokens=2), llm.save_state, llm.kv_stats,
                 lambda: llm.tokenize(b"abc"), lambda: llm.eval([5, 6]), llm.n_ctx,
                 lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}])):
        with pytest.raises(ClosedError, match="closed"):
            call()
    llm.close()  # a second close (and __del__'s) is harmless


# ---------------------------------------------------------------------------------------------
# rollbacks the cache refuses

def speculative_runs(tiny_model, w: int, n: int):
    """Greedy text without and with prompt-lookup drafts, and the draft run's usage."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompt = "abcabcabcabc xyzxyzxyz abcabcabc " * 3
    plain = load(tiny_model, logquant_window=w).create_completion(prompt, max_tokens=n, temperature=0.0)
    draft = load(tiny_model, logquant_window=w, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4))
    spec = draft.create_completion(prompt, max_tokens=n, temperature=0.0)
    return plain["choices"][0]["text"], spec["choices"][0]["text"], spec["usage"]


@pytest.mark.parametrize("w", [8, 32])
def test_speculative_decoding_gives_the_greedy_text_of_a_run_without_a_draft(tiny_model, w):
    """Prompt-lookup drafts are decoded and then partly dropped. A draft batch that crossed a
    demotion made the LogQuant cache refuse to drop the rejected part (2-bit tokens would have
    to come back to f16), which llama-cpp-python ignored, decoding on top of it (llama_decode
    returned -1 with W = 8), and its earlier tokens saw 2-bit keys a token-by-token run still
    had in f16. Llama.eval now cuts a draft before a token whose arrival demotes."""
    plain, spec, usage = speculative_runs(tiny_model, w, 200)
    assert usage["completion_tokens"] >= 200
    assert spec == plain


def test_a_rollback_the_cache_refuses_is_replayed_in_the_original_batches(tiny_model):
    """Going back before a demotion (llama-cpp-python sets n_tokens back, then evals): the cache
    refuses to drop the tail, which llama-cpp-python ignored, decoding on top of it (llama_decode
    returned -1). Now the cache goes back to the end of an earlier batch and the tokens up to the
    rollback point are evaluated again in their original batches: the logits are those of a run
    that never evaluated the dropped tokens."""
    toks = tokens(load(tiny_model), 120, seed=6)
    p, n, m, more = 40, 100, 90, toks[100:104]

    def run(steps):
        llm = load(tiny_model)
        llm.eval(toks[:p])
        for t in toks[p:steps]:
            llm.eval([t])
        return llm

    llm = run(n)
    assert not llm._ctx.kv_cache_seq_rm(-1, m, -1), "the cache keeps this cut: no refusal to test"
    llm.n_tokens = m  # as llama-cpp-python's rollbacks do
    llm.eval(more)
    ref = run(m)
    ref.eval(more)
    assert llm.n_tokens == ref.n_tokens == m + len(more)
    np.testing.assert_allclose(np.array(llm.scores[m:m + 4]), np.array(ref.scores[m:m + 4]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# the context's settings

@pytest.mark.parametrize("override", [{}, {"rope_freq_base": 2500.0}, {"rope_freq_scale": 0.5}],
                         ids=["model", "freq_base", "freq_scale"])
def test_shifted_2bit_keys_follow_the_context_rope(tiny_model, override):
    """RoPE is relative: a sequence shifted by +K and decoded K further on gives the logits it
    gives unshifted (the f16 tier's keys re-rotated by llama.cpp in f16 cost ~0.02). The 2-bit
    keys are un-rotated at demotion and re-rotated where read: with the model's trained base or
    scale instead of the context's override, a shift moved them by the wrong angles. Groups of
    64, as calibrated: tokens demoted after the shift carry the f16 tier's rounding into their
    codes, and in groups of 128 (the default) that flips more codes (up to 0.12 over shifts of
    1..500, growing with the shift no more than at 64)."""
    a, K = tokens(load(tiny_model), 150, seed=16), 37

    def run(shift: int) -> np.ndarray:
        llm = load(tiny_model, n_ctx=512, logits_all=False, logquant_key_group=64, **override)
        assert decode(llm, a[:-1], 0) == 0
        assert llm.kv_stats()["tiers"]["q2"]["tokens"] > 100
        mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
        llama_cpp.llama_memory_seq_add(mem, 0, -1, -1, shift)
        assert decode(llm, a[-1:], 149 + shift) == 0
        return logits(llm)

    assert np.abs(run(K) - run(0)).max() < 5e-2


def test_yarn_chosen_at_load_time_keeps_keys_after_rope(tiny_model):
    """Our re-rotation is plain RoPE: with YaRN (chosen at load time, not in the model) the keys
    are grouped after RoPE, the explicit fallback, so a shift is refused rather than wrong."""
    plain = load(tiny_model)
    assert llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(plain._ctx.ctx))
    yarn = load(tiny_model, rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=0.5)
    assert not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(yarn._ctx.ctx))
    yarn.eval(tokens(yarn, 100, seed=3))
    assert yarn.kv_stats()["tiers"]["q2"]["tokens"] > 0
    assert np.isfinite(np.array(yarn.scores[99])).all()


def test_f16_tier_holds_one_ubatch_of_the_context_not_of_n_batch(tiny_model):
    """The f16 tier is 3W tokens plus one ubatch: n_ubatch, not max(n_batch, n_ubatch)."""
    per_token = 2 * 2 * 128 * 2  # 2 layers x 2 KV heads x (64 + 64) x f16
    llm = load(tiny_model, n_ctx=4096, n_batch=2048, n_ubatch=256)
    assert llm.kv_stats()["tiers"]["f16"]["bytes"] == (3 * W + 256) * per_token


def test_llama_bench_runs_the_logquant_cache_with_a_large_ubatch(tiny_model):
    """llama-bench -ub 1024: the f16 tier must take a 1024-token ubatch (it took the process
    default of 512 and failed)."""
    exe = env.tool_path("llama-bench")
    if exe is None:
        pytest.skip("llama-bench not built (LOGQUANT_BUILD_TOOLS=OFF)")
    r = env.run_tool([str(exe), "-m", str(tiny_model), "-p", "1024", "-n", "0", "-b", "1024", "-ub", "1024",
                      "-ctk", "lq2", "-ctv", "lq2", "-fa", "1", "-r", "1", "-t", "2", "-o", "json"],
                     env.tool_env("logquant"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"n_ubatch": 1024' in r.stdout and '"avg_ts"' in r.stdout


# ---------------------------------------------------------------------------------------------
# a full 2-bit tier

def test_a_full_2bit_tier_refuses_the_decode_instead_of_marking_stale_codes(tiny_model):
    """W = 150 > G = 64: one merge of the window demotes about W tokens, several groups, for a
    one-token ubatch. Removing most of each closed group (a range inside the sequence, as a
    context shift does) leaves every group in use, so the 2-bit tier fills while the context holds
    few tokens. The old room check reserved groups for the ubatch's tokens only; the plan then
    ran out of slots half way, marked the slots it had handed out valid with no codes written,
    left the rest in f16, and the decode reported success. Now a decode either places every
    demotion (the f16 tier stays within 3W) or is refused with nothing changed."""
    w = 150
    llm = load(tiny_model, n_ctx=1024, n_batch=64, n_ubatch=64, logits_all=False, logquant_window=w)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    toks = tokens(llm, 4000, seed=4)
    pos, refused = 0, None
    for step in range(len(toks)):
        f16_before = _capi.f16_positions(ctx_ptr(llm))
        q2_before = llm.kv_stats()["tiers"]["q2"]["tokens"]
        if decode(llm, [toks[step]], pos) != 0:
            refused = step
            assert _capi.f16_positions(ctx_ptr(llm)) == f16_before
            assert llm.kv_stats()["tiers"]["q2"]["tokens"] == q2_before
            break
        pos += 1
        assert len(_capi.f16_positions(ctx_ptr(llm))) <= 3 * w
        if pos % 64 == 0 and pos > 3 * w + 64:
            # drop all but the first token of the 64 positions that entered the 2-bit tier last
            lo = pos - 3 * w - 64
            assert llama_cpp.llama_memory_seq_rm(mem, 0, lo + 1, lo + 64)
    assert refused is not None, "the 2-bit tier never filled: the test does not reach its limit"
    # the cache is still usable: after dropping old tokens there is room again
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 1, pos - 3 * w)
    assert decode(llm, [toks[refused]], pos) == 0
    assert np.isfinite(logits(llm)).all()


def test_a_single_sequence_fills_its_whole_context(tiny_model):
    """The room check counts what a ubatch will actually demote, not a bound: one sequence still
    uses every one of its n_ctx positions, one token at a time, with W much larger than a group."""
    w, n_ctx = 150, 1024
    llm = load(tiny_model, n_ctx=n_ctx, n_batch=64, n_ubatch=64, logits_all=False, logquant_window=w)
    toks = tokens(llm, n_ctx, seed=5)
    assert decode(llm, toks[:64], 0) == 0
    for p in range(64, n_ctx):
        assert decode(llm, [toks[p]], p) == 0, f"refused at position {p}"
    assert llm.kv_stats()["tokens"] == n_ctx


def test_a_context_larger_than_asked_has_buffers_for_all_of_it(tiny_model):
    """llama.cpp makes n_ctx=64 a context of 256; llama-cpp-python sized its token and logit
    buffers for 64, so a 100-token prompt failed with a numpy broadcast error."""
    llm = load(tiny_model, n_ctx=64)
    assert llm.n_ctx() == 256
    llm.eval(tokens(llm, 100, seed=7))
    assert llm.n_tokens == 100 and np.isfinite(np.array(llm.scores[99])).all()


@pytest.mark.parametrize("kv_type", ["f16", "logquant"])
def test_a_state_saved_right_after_a_context_shift_keeps_the_shift(tiny_model, kv_type):
    """llama.cpp moves positions at seq_add and rotates the keys at the next decode; a state
    written in between kept the new positions with unrotated keys, and a context loaded from it
    gave other logits (by ~18 here), for every kv_type. Pending shifts are applied first now."""
    toks = tokens(load(tiny_model), 320, seed=8)
    llm = load(tiny_model, kv_type, n_ctx=512)
    llm.eval(toks[:300])
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    n_keep, n_discard = 32, 134
    assert llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
    llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, 300, -n_discard)
    llm.input_ids[n_keep:300 - n_discard] = llm.input_ids[n_keep + n_discard:300].copy()
    llm.n_tokens = 300 - n_discard
    state = llm.save_state()

    def probe() -> np.ndarray:
        out = []
        for t in toks[300:306]:
            llm.eval([t])
            out.append(logits(llm))
        return np.array(out)

    live = probe()
    llm.load_state(state)
    np.testing.assert_allclose(probe(), live, atol=1e-3, rtol=0)
