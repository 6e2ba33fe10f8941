"""RoPE helpers against float64, and the one-pass two-tier attention against a float64 reference
(dequantize, re-rotate, softmax) over empty tiers, masked rows, group tails, GQA, head sizes
64/128/256, softcap and ALiBi, thread splits, with and without a precomputed RoPE table, and 2-,
4- and 8-bit codes, 8-bit block headers."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import lq2_reference as ref
import numpy as np
import pytest
from lq2_ctypes import AttnParams, RopeParams, TierF16, TierQ2, ptr

F16_BYTES = 2


@pytest.mark.parametrize("mode,n_dims,base,fscale,af", [
    (0, 128, 10000.0, 1.0, 1.0), (2, 128, 1e6, 1.0, 1.0), (2, 64, 10000.0, 0.25, 1.0),
    (0, 32, 500000.0, 1.0, 1.3)])
def test_rope_rows_and_table(lib, mode, n_dims, base, fscale, af):
    rng = np.random.default_rng(n_dims + mode)
    D, H = 128, 3
    rp = RopeParams(mode, n_dims, base, fscale, af)
    for pos in (0, 1, 17, 4095, 100000):
        x = rng.standard_normal((H, D)).astype(np.float32)
        want = ref.rope(x[None], np.array([pos]), mode, n_dims, base, fscale, af)[0]
        y = x.copy()
        lib.lq2_rope_rows(ctypes.byref(rp), y, D, H, pos, 0)
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())
        assert (y[:, n_dims:] == x[:, n_dims:]).all()  # dims past n_dims pass through
        lib.lq2_rope_rows(ctypes.byref(rp), y, D, H, pos, 1)  # inverse undoes it
        np.testing.assert_allclose(y, x, rtol=0, atol=4e-6 * np.abs(x).max())
    G = 32
    pos = np.sort(rng.choice(200000, 70, replace=False)).astype(np.int32)
    size = lib.lq2_rope_table_size(ctypes.byref(rp), len(pos), G)
    assert size == 3 * n_dims * G
    tab = np.zeros(size, np.float16)
    lib.lq2_rope_table(ctypes.byref(rp), pos.ctypes.data, len(pos), G, tab.ctypes.data)
    tab = tab.reshape(3, n_dims // 2, 2, G)
    th = ref.rope_angles(pos, n_dims, base, fscale)  # [70, n_dims/2]
    for t in range(len(pos)):
        g, j = divmod(t, G)  # f16 of the f32 value, rounded to nearest even (numpy's conversion)
        np.testing.assert_array_equal(tab[g, :, 0, j], ref.rope_table_value(np.cos(th[t]), af))
        np.testing.assert_array_equal(tab[g, :, 1, j], ref.rope_table_value(np.sin(th[t]), af))
    assert (tab[2, :, 0, 70 - 64:] == 1).all() and (tab[2, :, 1, 70 - 64:] == 0).all()


@dataclass
class Case:
    D: int
    H: int
    Hkv: int
    nA: int
    nB: int
    G: int
    mask: str = "random"  # none | random | all | a_all | first_group
    softcap: float = 0.0
    max_bias: float = 0.0
    mode: int = 2
    n_dims: int | None = None
    base: float = 10000.0
    fscale: float = 1.0
    k_bits: int = 2
    v_bits: int = 2
    score_correction: int = 0
    widths: bool = False  # mixed key widths (random, a mean of k_bits per kv head)
    v_channels: bool = False  # values grouped per channel, as the keys (v_per_channel)
    s8: bool = False  # 8-bit block headers relative to per-channel references (lq2-format.h)


def random_widths(rng, Hkv: int, D: int, mode: int, n_dims: int, b: int) -> np.ndarray:
    """0, b or 2b bits per RoPE pair (as many 0s as 2bs: a mean of b), b past n_dims; 3-bit keys
    (b = 3): 2 or 4 bits, as many of each."""
    w = np.full((Hkv, D), b, np.int8)
    pa, pb = ref.rope_pairs(mode, n_dims)
    for h in range(Hkv):
        pick = rng.choice([2, 4] if b == 3 else [0, b, 2 * b], len(pa) // 2)
        pair_w = rng.permutation(np.concatenate([pick, 2 * b - pick, [b] * (len(pa) % 2)]))
        w[h, pa] = w[h, pb] = pair_w
    return w.reshape(-1)


CASES = [
    Case(64, 4, 4, 37, 130, 64),
    Case(128, 8, 2, 0, 3 * 32 + 5, 32, mode=0, n_dims=64, softcap=50.0),
    Case(256, 6, 2, 70, 0, 64, max_bias=8.0),
    Case(128, 14, 2, 129, 300, 128, max_bias=8.0, softcap=30.0, base=1e6),
    Case(64, 4, 2, 10, 70, 64, mask="all"),
    Case(64, 4, 2, 0, 0, 64),
    Case(64, 2, 1, 1, 1, 32, mask="none"),
    Case(128, 8, 8, 65, 40, 32, mask="a_all", fscale=0.25),
    Case(256, 4, 1, 3, 200, 64, mask="first_group", mode=0),
    # the decode shape of Qwen2.5-0.5B (bench/kernels/attn_bench.c): many groups, 7 heads per kv head
    Case(64, 14, 2, 96, 1000, 64, mask="none", base=1e6),
    Case(64, 14, 2, 96, 1000, 64, max_bias=8.0, base=1e6),
    # the precision levers: 4- and 8-bit codes for keys and/or values
    Case(64, 14, 2, 96, 300, 64, k_bits=4, base=1e6),
    Case(128, 8, 2, 20, 130, 64, k_bits=8, v_bits=8, mode=0, n_dims=64, softcap=30.0),
    Case(64, 4, 4, 37, 130, 64, k_bits=2, v_bits=4, max_bias=8.0),
    Case(256, 4, 1, 3, 100, 64, k_bits=4, v_bits=8, mask="first_group"),
    # the score correction: NEOX and normal RoPE, partial rotation, softcap, ALiBi, wider codes
    Case(64, 14, 2, 96, 1000, 64, mask="none", base=1e6, score_correction=1),
    Case(128, 8, 2, 20, 130, 32, mode=0, n_dims=64, softcap=30.0, score_correction=1),
    Case(64, 4, 4, 37, 130, 64, k_bits=4, v_bits=4, max_bias=8.0, score_correction=1),
    # mixed key widths: NEOX and normal RoPE, partial rotation, GQA, group sizes, masks
    Case(64, 14, 2, 96, 300, 64, mask="none", base=1e6, widths=True),
    Case(128, 8, 2, 20, 130, 32, mode=0, n_dims=64, softcap=30.0, widths=True),
    Case(128, 4, 4, 37, 200, 128, max_bias=8.0, v_bits=4, widths=True),
    Case(256, 4, 1, 3, 100, 64, mask="first_group", widths=True),
    Case(64, 14, 2, 96, 300, 64, k_bits=4, v_bits=4, base=1e6, widths=True),
    # 3-bit keys (mixed widths of 2 and 4 bits), with per-channel values and the score correction
    Case(64, 14, 2, 96, 300, 64, k_bits=3, base=1e6, widths=True, v_channels=True),
    Case(128, 8, 2, 20, 130, 64, mode=0, n_dims=128, k_bits=3, widths=True, score_correction=1),
    # values grouped per channel: group sizes, 4- and 8-bit values, partial last group, masks, widths
    Case(64, 14, 2, 96, 300, 64, mask="none", base=1e6, v_channels=True),
    Case(128, 8, 2, 20, 130, 32, mode=0, n_dims=64, softcap=30.0, v_channels=True),
    Case(128, 4, 4, 37, 200, 128, max_bias=8.0, v_channels=True, widths=True),
    Case(64, 4, 4, 37, 130, 64, k_bits=4, v_bits=4, v_channels=True),
    Case(256, 4, 1, 3, 100, 64, k_bits=4, v_bits=8, mask="first_group", v_channels=True),
    # 8-bit headers: keys (and per-channel values), mixed widths, 3- and 4-bit keys, the correction
    Case(64, 14, 2, 96, 300, 64, base=1e6, widths=True, v_channels=True, s8=True),
    Case(128, 8, 2, 20, 130, 32, mode=0, n_dims=64, softcap=30.0, s8=True),
    Case(64, 14, 2, 96, 300, 64, k_bits=3, base=1e6, widths=True, v_channels=True, s8=True, score_correction=1),
    Case(64, 4, 4, 37, 130, 64, k_bits=4, v_bits=4, max_bias=8.0, v_channels=True, s8=True),
    # wider codes in groups of 32 and 128: 3-bit keys at G = 32 (the 3.0-bit point), 4- and 8-bit
    Case(64, 14, 2, 96, 300, 32, k_bits=3, base=1e6, widths=True, v_channels=True, s8=True),
    Case(128, 8, 2, 20, 130, 32, k_bits=4, v_bits=4, mode=0, n_dims=64, v_channels=True),
    Case(64, 4, 4, 37, 300, 128, k_bits=8, v_bits=4, max_bias=8.0, v_channels=True, s8=True),
    # the default format (groups of 128, 3-bit keys on some layers) at Qwen's decode shape, and an
    # odd number of query heads per kv head, with a masked first group: the kernel reads a group's
    # keys 32 tokens at a time for every head and its values 4 channels at a time for every head
    Case(64, 14, 2, 96, 1000, 128, k_bits=3, base=1e6, widths=True, v_channels=True),
    Case(64, 14, 2, 96, 1000, 128, base=1e6, widths=True, v_channels=True),
    Case(128, 7, 1, 10, 300, 128, mask="first_group", widths=True, v_channels=True, softcap=30.0),
]


def make(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    D, H, Hkv, nA, nB, G = case.D, case.H, case.Hkv, case.nA, case.nB, case.G
    n_dims = case.n_dims or D
    q = rng.standard_normal((H, D)).astype(np.float32)
    ka = rng.standard_normal((nA, Hkv, D)).astype(np.float16)
    va = rng.standard_normal((nA, Hkv, D)).astype(np.float16)
    # pre-RoPE keys with per-channel offsets, as real key channels have
    kpre = (rng.standard_normal((nB, Hkv * D)) * 0.5 + rng.standard_normal(Hkv * D)).astype(np.float32)
    vpre = rng.standard_normal((nB, Hkv * D)).astype(np.float32)
    ng = -(-nB // G)
    refs = kref = vref = None
    if case.s8:  # references off the channels' own statistics, as the weights' are
        def around(x):
            m, sd = x.mean(0), x.std(0) + 1e-3
            return np.stack([m + sd * rng.uniform(-2, 2, len(m)), ref.ref_round(sd * 2.0 ** rng.uniform(-2, 2, len(sd)))], 1)
        refs = np.ascontiguousarray(np.concatenate([around(kpre)] + ([around(vpre)] if case.v_channels else []))
                                    .astype(np.float32))
        kref, vref = refs[:Hkv * D], refs[Hkv * D:]
    kb = np.zeros((ng, Hkv * D, ref.block_bytes(G, case.k_bits, case.s8)), np.uint8)
    kw = random_widths(rng, Hkv, D, case.mode, n_dims, case.k_bits) if case.widths else None
    for g in range(ng):
        if case.widths:  # the same bytes per group as uniform 2-bit codes, laid out otherwise
            kb[g] = ref.quantize_k_group_w(kpre[g * G:(g + 1) * G], G, kw, kref).reshape(Hkv * D, -1)
        else:
            kb[g] = ref.quantize_k_group(kpre[g * G:(g + 1) * G], G, case.k_bits, kref)
    if case.v_channels:  # one block of G codes per channel and group, as the keys
        vb = np.zeros((ng, Hkv * D, ref.block_bytes(G, case.v_bits, case.s8)), np.uint8)
        for g in range(ng):
            vb[g] = ref.quantize_k_group(vpre[g * G:(g + 1) * G], G, case.v_bits, vref)
    else:
        vb = (ref.quantize_v(vpre, case.v_bits) if nB
              else np.zeros((0, Hkv * D // 64, ref.block_bytes(64, case.v_bits)), np.uint8))
    pos_b = np.sort(rng.choice(5000, nB, replace=False)).astype(np.int32)
    pos_a = 5000 + np.arange(nA)

    def mask(n, pos):
        if case.mask == "none":
            return None
        m = np.zeros(n, np.float32)
        if case.max_bias > 0:  # ALiBi: llama.cpp puts -|distance| in the mask
            m = -np.abs(pos - (5000 + nA)).astype(np.float32)
        m[rng.random(n) < 0.3] = -np.inf
        return m
    ma, mb = mask(nA, pos_a), mask(nB, pos_b)
    if case.mask == "all":
        ma[:], mb[:] = -np.inf, -np.inf
    if case.mask == "a_all":
        ma[:] = -np.inf
    if case.mask == "first_group":
        mb[:G] = -np.inf
    return {"q": q, "ka": ka, "va": va, "ma": ma, "kb": kb, "vb": vb, "pos_b": pos_b, "mb": mb,
            "n_dims": n_dims, "kw": kw, "refs": refs}


def v_stride(case: Case) -> int:
    """Bytes from one token's values to the next's (per token) or one group's to the next's."""
    if case.v_channels:
        return case.Hkv * case.D * ref.block_bytes(case.G, case.v_bits, case.s8)
    return case.Hkv * case.D // 64 * ref.block_bytes(64, case.v_bits)


def run_c(lib, fn, case: Case, d, nth: int, table: bool) -> np.ndarray:
    D, H, Hkv, G = case.D, case.H, case.Hkv, case.G
    params = AttnParams(D, H, Hkv, 1.0 / np.sqrt(D), case.softcap, case.max_bias)
    rope = RopeParams(case.mode, d["n_dims"], case.base, case.fscale, 1.0)
    tab = None
    if table and case.nB:
        tab = np.zeros(lib.lq2_rope_table_size(ctypes.byref(rope), case.nB, G), np.float16)
        lib.lq2_rope_table(ctypes.byref(rope), d["pos_b"].ctypes.data, case.nB, G, tab.ctypes.data)
    ta = TierF16(case.nA, ptr(d["ka"]), Hkv * D * F16_BYTES, ptr(d["va"]), Hkv * D * F16_BYTES, ptr(d["ma"]))
    tb = TierQ2(case.nB, G, case.k_bits, case.v_bits, ptr(d["kb"]), Hkv * D * ref.block_bytes(G, case.k_bits, case.s8),
                ptr(d["vb"]), v_stride(case), ptr(d["pos_b"]), rope,
                ptr(tab), ptr(d["mb"]), case.score_correction, ptr(d["kw"]), case.v_channels, ptr(d["refs"]))
    out = np.full((H, D), np.nan, np.float32)
    ws = lib.lq2_attn_work_size(ctypes.byref(params), G, d["n_dims"])
    for ith in range(nth):
        work = np.full(ws // 4 + 1, np.nan, np.float32)  # garbage scratch must not matter
        assert fn(ctypes.byref(params), d["q"], ctypes.byref(ta), ctypes.byref(tb), out, ith, nth,
                  work.ctypes.data) == 0
    return out


def reference(case: Case, d, score_correction: int | None = None) -> np.ndarray:
    sc = case.score_correction if score_correction is None else score_correction
    return ref.attention(d["q"], d["ka"], d["va"], d["ma"], d["kb"], d["vb"], d["pos_b"], d["mb"],
                         G=case.G, n_head_kv=case.Hkv, scale=1.0 / np.sqrt(case.D),
                         softcap=case.softcap, max_bias=case.max_bias, rope_mode=case.mode,
                         n_dims=d["n_dims"], base=case.base, fscale=case.fscale,
                         k_bits=case.k_bits, v_bits=case.v_bits, score_correction=bool(sc), k_widths=d["kw"],
                         v_per_channel=case.v_channels, refs=d["refs"])


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_attention_matches_float64(lib, ci):
    case = CASES[ci]
    d = make(case, 1000 + ci)
    want = reference(case, d)
    worst = 0.0
    for fn in (lib.lq2_attn_heads, lib.lq2_attn_heads_ref):
        for nth, table in ((1, True), (3, False)):
            got = run_c(lib, fn, case, d, nth, table)
            assert np.isfinite(got).all()
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 5e-6, worst
    if case.mask == "all" or case.nA + case.nB == 0:
        assert not want.any()
    if case.score_correction:  # the correction moves the result far more than the tolerance
        assert np.abs(reference(case, d, 0) - want).max() > 10 * 5e-6
    print(f"case {ci}: max |err| {worst:.2e}")


def run_split(lib, case: Case, d, cuts_a: list[int], cuts_g: list[int]) -> np.ndarray:
    """The attention as the cache's op runs a decode step: per kv head, parts over disjoint
    token ranges of both tiers (lq2_attn_partial), then lq2_attn_merge per query head."""
    D, H, Hkv, G = case.D, case.H, case.Hkv, case.G
    params = AttnParams(D, H, Hkv, 1.0 / np.sqrt(D), case.softcap, case.max_bias)
    rope = RopeParams(case.mode, d["n_dims"], case.base, case.fscale, 1.0)
    tab = np.zeros(max(1, lib.lq2_rope_table_size(ctypes.byref(rope), case.nB, G)), np.float16)
    if case.nB:
        lib.lq2_rope_table(ctypes.byref(rope), d["pos_b"].ctypes.data, case.nB, G, tab.ctypes.data)
    kg_bytes = Hkv * D * ref.block_bytes(G, case.k_bits, case.s8)
    v_bytes = v_stride(case)
    row_a = Hkv * D * F16_BYTES

    def at(a: np.ndarray | None, off_bytes: int) -> int | None:
        return None if a is None else a.ctypes.data + int(off_bytes)

    n_part = len(cuts_a) - 1
    parts = np.full((n_part, H, D + 2), np.nan, np.float32)
    work = np.full(lib.lq2_attn_work_size(ctypes.byref(params), G, d["n_dims"]) // 4 + 1, np.nan,
                   np.float32)
    for i in range(n_part):
        a0, a1 = cuts_a[i], cuts_a[i + 1]
        b0, b1 = cuts_g[i] * G, min(case.nB, cuts_g[i + 1] * G)
        ta = TierF16(a1 - a0, at(d["ka"], a0 * row_a), row_a, at(d["va"], a0 * row_a), row_a,
                     at(d["ma"], a0 * 4))
        tb = TierQ2(max(0, b1 - b0), G, case.k_bits, case.v_bits, at(d["kb"], cuts_g[i] * kg_bytes),
                    kg_bytes, at(d["vb"], (cuts_g[i] if case.v_channels else b0) * v_bytes), v_bytes,
                    at(d["pos_b"], b0 * 4), rope, at(tab, cuts_g[i] * d["n_dims"] * G * F16_BYTES),
                    at(d["mb"], b0 * 4), case.score_correction, ptr(d["kw"]), case.v_channels, ptr(d["refs"]))
        acc = np.full((H, D), np.nan, np.float32)
        M, S = np.full(H, np.nan, np.float32), np.full(H, np.nan, np.float32)
        gq = H // Hkv
        for hk in range(Hkv):
            assert lib.lq2_attn_partial(ctypes.byref(params), d["q"], ctypes.byref(ta), ctypes.byref(tb),
                                        hk * gq, (hk + 1) * gq, acc, M, S, work.ctypes.data) == 0
        parts[i, :, :D], parts[i, :, D], parts[i, :, D + 1] = acc, M, S
    out = np.full((H, D), np.nan, np.float32)
    for h in range(H):
        row = np.ascontiguousarray(parts[:, h, :])
        lib.lq2_attn_merge(D, n_part, row, D + 2, out[h])
    return out


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_attention_split_into_parts_and_merged(lib, ci):
    """Parts over disjoint token ranges (some empty), merged, equal the float64 reference like
    the one-pass kernel; one part is the one-pass kernel bit for bit."""
    case = CASES[ci]
    d = make(case, 1000 + ci)
    ng = -(-case.nB // case.G)
    rng = np.random.default_rng(ci)
    cuts_a = [0, *sorted(int(c) for c in rng.integers(0, case.nA + 1, 2)), case.nA]
    cuts_g = [0, *sorted(int(c) for c in rng.integers(0, ng + 1, 2)), ng]
    got = run_split(lib, case, d, cuts_a, cuts_g)
    assert np.isfinite(got).all()
    assert float(np.abs(got - reference(case, d)).max()) <= 5e-6
    whole = run_split(lib, case, d, [0, case.nA], [0, ng])
    np.testing.assert_array_equal(whole, run_c(lib, lib.lq2_attn_heads, case, d, 1, True))


def test_null_tiers_and_bad_params(lib):
    params = AttnParams(64, 4, 2, 0.125, 0.0, 0.0)
    q = np.ones((4, 64), np.float32)
    out = np.full((4, 64), np.nan, np.float32)
    work = np.zeros(lib.lq2_attn_work_size(ctypes.byref(params), 64, 64) // 4 + 1, np.float32)
    assert lib.lq2_attn_heads(ctypes.byref(params), q, None, None, out, 0, 1, work.ctypes.data) == 0
    assert not out.any()
    bad = AttnParams(96, 4, 2, 0.125, 0.0, 0.0)  # head_dim not a multiple of the value group
    assert lib.lq2_attn_heads(ctypes.byref(bad), q, None, None, out, 0, 1, work.ctypes.data) == -1
    bad = AttnParams(64, 4, 3, 0.125, 0.0, 0.0)  # query heads not a multiple of kv heads
    assert lib.lq2_attn_heads(ctypes.byref(bad), q, None, None, out, 0, 1, work.ctypes.data) == -1


def test_kernel_benchmark_still_compiles(tmp_path):
    """bench/kernels/attn_bench.c calls the kernel API directly; keep it in step with it."""
    import shutil
    import subprocess

    from conftest import ROOT, cpu_has_avx2

    if not cpu_has_avx2():
        pytest.skip("the kernel benchmark is built for AVX2")
    cmd = [shutil.which("cc") or "cc", "-std=c11", "-O2", "-mavx2", "-mfma", "-mf16c", "-Wall",
           "-Werror", "-fsyntax-only", str(ROOT / "bench/kernels/attn_bench.c")]
    subprocess.run(cmd, check=True, cwd=tmp_path)
