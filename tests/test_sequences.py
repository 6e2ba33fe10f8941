"""Several sequences in one LogQuant context (n_seq_max > 1), through llama.cpp's own batch and
memory API, with a unified KV cache and with one stream per sequence (kv_unified=False): each
sequence is grouped and demoted exactly as if it were alone, seq_rm / seq_cp / seq_keep act on one
sequence's 2-bit slots, the state carries them all. llama-cpp-python's Llama runs one sequence;
its embedding mode is the one that opens several."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_logquant import W, load, policy_model, tokens

from logquant_gguf import Llama, _capi, kv_types
from logquant_gguf.llama import llama_cpp  # the llama_cpp bound to our build

N_CTX = 1024
# Logits of a sequence beside another vs alone: the same 2-bit groups, other summation orders (the
# cells and slots are scanned in another order). Seen: up to 2.3e-4 on logits of size ~7; a
# different grouping of the 2-bit tier moves them by ~1e-2 or more.
TOL = 1e-3


class Ctx:
    """A Llama of the test model with n_seq sequences, driven through llama.cpp's batch API."""

    def __init__(self, llm: Llama, n_seq: int, kv_type: str = "logquant", unified: bool = True):
        # the fused kernel for every ubatch: its f32 scores do not depend on how tokens are batched
        fused = {"logquant_prefill_fa_min": 0} if kv_types.get(kv_type).is_logquant else {}
        self.llm = load(llm.model_path, kv_type, n_seq_max=n_seq, kv_unified=unified, n_ctx=N_CTX,
                        n_batch=256, n_ubatch=256, logits_all=False, flash_attn=True, **fused)
        self.n_vocab = self.llm.n_vocab()
        self.ctx = self.llm._ctx.ctx
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.llm.close()

    @property
    def mem(self):
        return llama_cpp.llama_get_memory(self.ctx)

    def decode(self, parts: dict[int, tuple[int, list[int]]]) -> dict[int, np.ndarray]:
        """One batch: for each sequence s, tokens at positions p0, p0+1, ...; returns the
        logits after each sequence's last token."""
        b, n, last = self.batch, 0, {}
        for s, (p0, toks) in parts.items():
            for i, t in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, p0 + i, 1
                b.seq_id[n][0] = s
                b.logits[n] = i == len(toks) - 1
                n += 1
            last[s] = n - 1
        b.n_tokens = n
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        return {s: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i),
                                         shape=(self.n_vocab,)).astype(np.float64)
                for s, i in last.items()}

    def f16_positions(self, s: int) -> list[int]:
        return _capi.f16_positions(ctypes.cast(self.ctx, ctypes.c_void_p).value, s)

    def q2_tokens(self) -> int:
        return _capi.kv_stats(ctypes.cast(self.ctx, ctypes.c_void_p).value)["logquant"]["n_q2"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    model = load(tiny_model, logquant_prefill_fa_min=0)
    yield model
    model.close()


# every multi-sequence test runs on both layouts of llama.cpp's cache: one stream shared by all
# sequences, and one stream (its own f16 cells) per sequence
@pytest.fixture(params=[True, False], ids=["unified", "streams"])
def unified(request) -> bool:
    return request.param


def run_alone(llm: Llama, chunks: list[list[int]]) -> list[np.ndarray]:
    """The reference: one sequence in its own context, fed the same chunks."""
    one = Ctx(llm, 1)
    out, pos = [], 0
    for c in chunks:
        out.append(one.decode({0: (pos, c)})[0])
        pos += len(c)
    one.close()
    return out


def chunked(toks: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    for n in sizes:
        out.append(toks[i:i + n])
        i += n
    return out


def test_two_sequences_each_match_their_single_sequence_run(llm, unified):
    """Two sequences prefilled in shared batches, then decoded side by side past several
    demotions: each one's logits equal its run alone (up to float summation order: the 2-bit
    groups are the same, the tiers are scanned in another order), and its f16 tier follows the
    policy of its own positions."""
    sizes_a, sizes_b = [70, 50] + [1] * 30, [40, 40] + [1] * 30
    if not unified:
        # with a stream per sequence llama.cpp cuts a batch into ubatches holding as many tokens
        # of each sequence (70 + 40 -> 40 + 40, then 30), and a prompt's 2-bit groups depend on
        # its ubatches (a group's scales are set by the tokens demoted so far): equal chunks here
        sizes_b = sizes_a
    a, b = tokens(llm, sum(sizes_a), seed=1), tokens(llm, sum(sizes_b), seed=2)
    ca, cb = chunked(a, sizes_a), chunked(b, sizes_b)
    ctx = Ctx(llm, 2, unified=unified)
    got_a, got_b, pa, pb = [], [], 0, 0
    for xa, xb in zip(ca, cb):
        out = ctx.decode({0: (pa, xa), 1: (pb, xb)})
        got_a.append(out[0])
        got_b.append(out[1])
        pa, pb = pa + len(xa), pb + len(xb)
    na, nb = len(a), len(b)
    assert ctx.f16_positions(0) == policy_model(na, W)
    assert ctx.f16_positions(1) == policy_model(nb, W)
    assert ctx.q2_tokens() == na + nb - len(policy_model(na, W)) - len(policy_model(nb, W))
    ctx.close()
    for got, want in ((got_a, run_alone(llm, ca)), (got_b, run_alone(llm, cb))):
        for g, w in zip(got, want):
            # 10 TOL: summation order. In a unified cache the tiers are scanned in another
            # order, an f16 K/V value then rounds the other way now and then, and fitted scales
            # pass that on to the whole group: one token's values with values grouped per token
            # (1.2e-3 off at most here), a channel's 64 tokens with values grouped per channel
            # (3.7e-3). A wrong slot, group or sequence is off by the logits' own size (the
            # check below).
            np.testing.assert_allclose(g, w, atol=10 * TOL, rtol=0)
    # the sequences are not independent by accident: another sequence's tokens do change logits
    assert not np.allclose(got_a[-1], got_b[-1], atol=1e-2)


def test_removing_a_sequence_leaves_the_other_and_frees_its_slots(llm, unified):
    a, b, c = tokens(llm, 120, seed=3), tokens(llm, 120, seed=4), tokens(llm, 100, seed=5)
    ctx = Ctx(llm, 2, unified=unified)
    ctx.decode({0: (0, a[:-1]), 1: (0, b)})
    q2_both = ctx.q2_tokens()
    assert llama_cpp.llama_memory_seq_rm(ctx.mem, 1, -1, -1)
    assert ctx.q2_tokens() == q2_both - (120 - len(policy_model(120, W)))
    assert ctx.f16_positions(1) == []
    assert llama_cpp.llama_memory_seq_pos_max(ctx.mem, 1) == -1
    got_a = ctx.decode({0: (119, a[-1:])})[0]
    # sequence 1 starts over with other text: fresh groups, as if alone
    got_c = ctx.decode({1: (0, c)})[1]
    ctx.close()
    np.testing.assert_allclose(got_a, run_alone(llm, [a[:-1], a[-1:]])[1], atol=TOL, rtol=0)
    np.testing.assert_allclose(got_c, run_alone(llm, [c])[0], atol=TOL, rtol=0)


def test_truncating_one_sequence_is_refused_or_exact(llm, unified):
    """A tail truncation of one sequence follows the single-sequence rule (refused when 2-bit
    tokens would have to come back to f16); the other sequence is untouched either way."""
    a, b = tokens(llm, 120, seed=6), tokens(llm, 120, seed=7)
    ctx = Ctx(llm, 2, unified=unified)
    ctx.decode({0: (0, a), 1: (0, b)})
    before = ctx.f16_positions(1)
    assert llama_cpp.llama_memory_seq_rm(ctx.mem, 0, 119, -1)  # the last token: f16, allowed
    assert ctx.f16_positions(0) == [p for p in policy_model(120, W) if p < 119]
    assert not llama_cpp.llama_memory_seq_rm(ctx.mem, 0, 60, -1)  # deep: would need 2-bit back
    assert ctx.f16_positions(1) == before
    assert llama_cpp.llama_memory_seq_pos_max(ctx.mem, 0) == 118
    ctx.close()


def test_seq_cp_shares_the_2bit_slots(llm, unified):
    """seq_cp of a whole sequence: the copy reads the same 2-bit slots (no new ones) and gives the
    same next-token logits; the source, continued, still matches its run alone."""
    a, x, y = tokens(llm, 130, seed=8), tokens(llm, 40, seed=9), tokens(llm, 40, seed=10)
    ctx = Ctx(llm, 2, unified=unified)
    ctx.decode({0: (0, a)})
    q2 = ctx.q2_tokens()
    llama_cpp.llama_memory_seq_cp(ctx.mem, 0, 1, -1, -1)
    assert ctx.q2_tokens() == q2
    assert ctx.f16_positions(1) == ctx.f16_positions(0)
    assert llama_cpp.llama_memory_seq_pos_min(ctx.mem, 1) == 0
    out = ctx.decode({0: (130, x[:1]), 1: (130, x[:1])})
    np.testing.assert_allclose(out[1], out[0], atol=TOL, rtol=0)
    # then they diverge, each demoting into its own groups
    got = [ctx.decode({0: (131 + i, [x[1 + i]]), 1: (131 + i, [y[1 + i]])}) for i in range(39)]
    ctx.close()
    alone = run_alone(llm, [a] + [[t] for t in x])
    np.testing.assert_allclose(got[-1][0], alone[-1], atol=TOL, rtol=0)
    assert np.isfinite(got[-1][1]).all()


def test_seq_keep(llm, unified):
    """seq_keep(0) drops the other sequences of sequence 0's stream, in both tiers: all of them
    in a unified cache, none with one stream per sequence (llama.cpp's rule for its cells)."""
    a, b = tokens(llm, 120, seed=11), tokens(llm, 120, seed=12)
    ctx = Ctx(llm, 2, unified=unified)
    ctx.decode({0: (0, a[:-1]), 1: (0, b)})
    llama_cpp.llama_memory_seq_keep(ctx.mem, 0)
    q2_a, q2_b = 119 - len(policy_model(119, W)), 120 - len(policy_model(120, W))
    if unified:
        assert ctx.q2_tokens() == q2_a
        assert ctx.f16_positions(1) == []
    else:
        assert ctx.q2_tokens() == q2_a + q2_b
        assert ctx.f16_positions(1) == policy_model(120, W)
    got = ctx.decode({0: (119, a[-1:])})[0]
    ctx.close()
    np.testing.assert_allclose(got, run_alone(llm, [a[:-1], a[-1:]])[1], atol=TOL, rtol=0)


def test_state_round_trip_with_two_sequences(llm, unified):
    a, b = tokens(llm, 120, seed=13), tokens(llm, 100, seed=14)
    ctx = Ctx(llm, 2, unified=unified)
    ctx.decode({0: (0, a[:-1]), 1: (0, b[:-1])})
    n = llama_cpp.llama_state_get_size(ctx.ctx)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_get_data(ctx.ctx, buf, n) == n
    want = ctx.decode({0: (119, a[-1:]), 1: (99, b[-1:])})
    other = Ctx(llm, 2, unified=unified)
    assert llama_cpp.llama_state_set_data(other.ctx, buf, n) == n
    assert other.f16_positions(0) == policy_model(119, W)
    got = other.decode({0: (119, a[-1:]), 1: (99, b[-1:])})
    # one sequence's own state would have to cut the shared groups apart: refused (size 0)
    assert llama_cpp.llama_state_seq_get_size(other.ctx, 0) == 0
    ctx.close()
    other.close()
    for s in (0, 1):  # the cells go back where they were (patch 0015): the same sums, bit for bit
        np.testing.assert_array_equal(got[s], want[s])


def test_llama_cpp_default_context_has_a_stream_per_sequence(llm):
    """A context made with llama.cpp's default parameters and several sequences (one stream per
    sequence, as llama.cpp's tools make them) works with the LogQuant cache: each stream's f16
    tier is 3W plus one ubatch, and a sequence decoded there gives its single-sequence logits."""
    spec = kv_types.get("logquant")
    params = llama_cpp.llama_context_default_params()
    assert not params.kv_unified
    params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = N_CTX, 3, 256, 256
    params.type_k, params.type_v = spec.type_k, spec.type_v
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    _capi.set_logquant_params(W, spec.policy)  # the f16 tier takes n_ubatch from the context
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    assert ctx
    try:
        stats = _capi.kv_stats(ctypes.cast(ctx, ctypes.c_void_p).value)
        per_token = 2 * 2 * 128 * 2  # 2 layers x 2 KV heads x (64 + 64) x f16
        assert stats["logquant"]["bytes_f16"] == 3 * (3 * W + 256) * per_token
        a = tokens(llm, 100, seed=21)
        batch = llama_cpp.llama_batch_init(100, 0, 1)
        for i, t in enumerate(a):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, i == 99
            batch.seq_id[i][0] = 2
        batch.n_tokens = 100
        assert llama_cpp.llama_decode(ctx, batch) == 0
        got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 99), shape=(llm.n_vocab(),)).copy()
        llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(ctx)
    np.testing.assert_allclose(got, run_alone(llm, [a])[0], atol=TOL, rtol=0)


def test_embedding_mode_opens_several_sequences(tiny_model):
    """llama-cpp-python's embedding mode creates a unified cache with many sequences (here 256)
    and embeds texts side by side; texts shorter than 2W stay in the f16 tier, so their
    embeddings equal the f16 cache's."""
    texts = ["def f(x):\n    return x + 1", "import os\nprint(os.getcwd())"]
    got = load(tiny_model, embedding=True, logits_all=False, logquant_window=32)
    assert got.context_params.n_seq_max > 1 and got.context_params.kv_unified
    want = load(tiny_model, kv_type="f16", embedding=True, logits_all=False, flash_attn=True)
    try:
        e_got, e_want = got.embed(texts), want.embed(texts)
    finally:
        got.close()
        want.close()
    for g, w in zip(e_got, e_want):
        np.testing.assert_allclose(np.array(g), np.array(w), atol=1e-3, rtol=0)


def test_llama_n_seq_max(tiny_model):
    """Llama(n_seq_max=S) opens a unified context for S sequences; the LogQuant f16 tier grows by
    3W tokens per extra sequence (2 layers x 2 KV heads x (64 + 64) x 2 bytes per token here),
    and the high-level API keeps working on sequence 0."""
    one, three = load(tiny_model), load(tiny_model, n_seq_max=3)
    try:
        assert three.context_params.n_seq_max == 3 and three.context_params.kv_unified
        grown = three.kv_stats()["tiers"]["f16"]["bytes"] - one.kv_stats()["tiers"]["f16"]["bytes"]
        assert grown == 2 * 3 * W * (2 * 2 * 128 * 2)
        seq = tokens(one, 100, seed=15)
        one.eval(seq)
        three.eval(seq)
        np.testing.assert_allclose(three.scores[99], one.scores[99], atol=TOL, rtol=0)
        assert three.__getstate__()["n_seq_max"] == 3
    finally:
        one.close()
        three.close()
    for bad in (0, 257, 2.0):
        with pytest.raises(ValueError, match="n_seq_max"):
            load(tiny_model, n_seq_max=bad)


def test_positions_shift_with_the_keys(llm):
    """seq_add moves 2-bit keys too (they are stored before RoPE and rotated where they are read):
    a sequence shifted by +K and decoded at K further on gives the logits it gives unshifted (RoPE
    is relative; the f16 tier's keys are re-rotated by llama.cpp's K-shift, in f16, which costs
    it ~0.02 on these logits), and a shift there and back changes nothing. Moving only [0, 100)
    (2-bit but for position 0) closer to the end moves the logits: the 2-bit keys did move.
    (A fresh evaluation starting at K is NOT a reference: the f16 rows a token is demoted from
    are rounded at its absolute position, and 2-bit codes amplify that rounding.)"""
    a, K = tokens(llm, 150, seed=16), 37

    def run(shifts: list[int], decode_at: int, p1: int = -1) -> np.ndarray:
        ctx = Ctx(llm, 1)
        ctx.decode({0: (0, a[:-1])})
        assert llama_cpp.llama_memory_can_shift(ctx.mem)
        for sh in shifts:
            llama_cpp.llama_memory_seq_add(ctx.mem, 0, -1, p1, sh)
        if shifts:
            assert llama_cpp.llama_memory_seq_pos_min(ctx.mem, 0) == sum(shifts)
        out = ctx.decode({0: (decode_at, a[-1:])})[0]
        ctx.close()
        return out

    unshifted = run([], 149)
    assert np.abs(run([K], 149 + K) - unshifted).max() < 5e-2
    np.testing.assert_array_equal(run([K, -K], 149), unshifted)
    assert np.abs(run([10], 149, p1=100) - unshifted).max() > 0.1


def test_context_shift(llm):
    """llama.cpp's context shift: drop [n_keep, n_keep + n_discard), move the rest back. The f16
    tier and the 2-bit tier both follow; decoding goes on at the new positions."""
    a = tokens(llm, 200, seed=17)
    ctx = Ctx(llm, 1)
    ctx.decode({0: (0, a[:160])})
    q2 = ctx.q2_tokens()
    assert llama_cpp.llama_memory_seq_rm(ctx.mem, 0, 20, 80)  # inside the sequence: allowed
    llama_cpp.llama_memory_seq_add(ctx.mem, 0, 80, -1, -60)
    assert llama_cpp.llama_memory_seq_pos_min(ctx.mem, 0) == 0
    assert llama_cpp.llama_memory_seq_pos_max(ctx.mem, 0) == 99
    assert ctx.q2_tokens() == q2 - 60  # the window is f16 and was not in the discarded range
    outs = [ctx.decode({0: (100 + i, [t])})[0] for i, t in enumerate(a[160:])]
    assert all(np.isfinite(o).all() for o in outs)
    f16 = ctx.f16_positions(0)
    assert f16 == sorted(f16) and f16[-1] == 139 and len(f16) <= 3 * W
    ctx.close()
