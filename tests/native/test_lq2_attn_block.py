"""The GPU decode attention's per-thread work (native/common/lq2-attn-block.h), run on the host over
every thread index of a block, phase by phase between the kernel's barriers
(lq2_attn_block_host.c), against the CPU: each block's rows and softmax state against
lq2_attn_partial (the scalar build) for the same kv head and token ranges, the combine step against
lq2_attn_merge, and the whole against the float64 reference. The threads of each phase run in
three orders, which must agree bit for bit: a thread reading what another wrote in the same
phase, or two threads writing one place, would make them differ."""
from __future__ import annotations

import ctypes

import lq2_reference as ref
import numpy as np
import pytest
from lq2_ctypes import AttnParams, RopeParams, TierF16, TierQ2
from test_lq2_attn import CASES, F16_BYTES, Case, make, reference

ORDERS = (0, 1, 2)  # first to last, last to first, odd threads then even ones

# the CPU cases, plus the shapes the block's limits are about: G = 128 (a whole chunk), 8 query
# heads per kv head (the most), head size 512 (four channels per thread), one token
BLOCK_CASES = [*CASES,
               Case(128, 8, 1, 300, 3 * 128 + 7, 128, mode=0),
               Case(512, 2, 1, 140, 70, 64, max_bias=8.0),
               Case(64, 8, 1, 1, 0, 64, mask="none")]


@pytest.fixture(scope="module")
def lib(native_libs):
    return native_libs["scalar"]  # the block code is plain C: one build is enough


def tiers(lib, case: Case, d, a0: int, a1: int, g0: int, g1: int):
    """The f16 cells [a0, a1) and the 2-bit groups [g0, g1) as one part's tiers (with the RoPE
    table: the GPU path always has it)."""
    D, Hkv, G = case.D, case.Hkv, case.G
    rope = RopeParams(case.mode, d["n_dims"], case.base, case.fscale, 1.0)
    tab = np.zeros(max(1, lib.lq2_rope_table_size(ctypes.byref(rope), case.nB, G)), np.float16)
    if case.nB:
        lib.lq2_rope_table(ctypes.byref(rope), d["pos_b"].ctypes.data, case.nB, G, tab.ctypes.data)
    d["tab"] = tab  # kept alive with the case's arrays
    kg_bytes = Hkv * D * ref.block_bytes(G, case.k_bits)
    v_bytes = Hkv * D // 64 * ref.block_bytes(64, case.v_bits)
    row_a = Hkv * D * F16_BYTES
    b0, b1 = g0 * G, min(case.nB, g1 * G)

    def at(a: np.ndarray | None, off: int) -> int | None:
        return None if a is None else a.ctypes.data + int(off)

    ta = TierF16(a1 - a0, at(d["ka"], a0 * row_a), row_a, at(d["va"], a0 * row_a), row_a, at(d["ma"], a0 * 4))
    tb = TierQ2(max(0, b1 - b0), G, case.k_bits, case.v_bits, at(d["kb"], g0 * kg_bytes), kg_bytes,
                at(d["vb"], b0 * v_bytes), v_bytes, at(d["pos_b"], b0 * 4), rope,
                at(tab, g0 * d["n_dims"] * G * F16_BYTES), at(d["mb"], b0 * 4), case.score_correction)
    return ta, tb


def params(case: Case) -> AttnParams:
    return AttnParams(case.D, case.H, case.Hkv, 1.0 / np.sqrt(case.D), case.softcap, case.max_bias)


def block_rows(lib, case: Case, d, ta, tb, hk: int, order: int) -> np.ndarray:
    gq = case.H // case.Hkv
    out = np.full((gq, case.D + 2), np.nan, np.float32)
    assert lib.lq2_ab_emulate_block(ctypes.byref(params(case)), d["q"], ctypes.byref(ta), ctypes.byref(tb),
                                    hk, order, out) == 0
    return out


def cpu_rows(lib, case: Case, d, ta, tb, hk: int) -> np.ndarray:
    gq, D = case.H // case.Hkv, case.D
    p = params(case)
    acc = np.full((case.H, D), np.nan, np.float32)
    M, S = np.full(case.H, np.nan, np.float32), np.full(case.H, np.nan, np.float32)
    work = np.full(lib.lq2_attn_work_size(ctypes.byref(p), case.G, d["n_dims"]) // 4 + 1, np.nan, np.float32)
    h0, h1 = hk * gq, (hk + 1) * gq
    assert lib.lq2_attn_partial(ctypes.byref(p), d["q"], ctypes.byref(ta), ctypes.byref(tb), h0, h1,
                                    acc, M, S, work.ctypes.data) == 0
    return np.concatenate([acc[h0:h1], M[h0:h1, None], S[h0:h1, None]], axis=1)


def scaled(rows: np.ndarray, D: int) -> np.ndarray:
    """Rows as probabilities: (acc, S) times exp(M) relative to the largest M, so two blocks whose
    running max went different ways compare."""
    M, S = rows[:, D], rows[:, D + 1]
    w = np.where(S > 0, np.exp(np.where(S > 0, M, 0) - np.max(np.where(S > 0, M, -np.inf), initial=0)), 0)
    return np.concatenate([rows[:, :D] * w[:, None], (S * w)[:, None]], axis=1)


@pytest.mark.parametrize("ci", range(len(BLOCK_CASES)))
def test_block_equals_the_cpu_part_and_merges_to_the_reference(lib, ci):
    case = BLOCK_CASES[ci]
    d = make(case, 1000 + ci)
    D, H, Hkv, gq = case.D, case.H, case.Hkv, case.H // case.Hkv
    ng = -(-case.nB // case.G)
    rng = np.random.default_rng(ci)
    cuts_a = [0, *sorted(int(c) for c in rng.integers(0, case.nA + 1, 2)), case.nA]
    cuts_g = [0, *sorted(int(c) for c in rng.integers(0, ng + 1, 2)), ng]
    n_part = len(cuts_a) - 1
    parts = np.full((n_part, H, D + 2), np.nan, np.float32)
    cpu_parts = np.full((n_part, H, D + 2), np.nan, np.float32)
    for i in range(n_part):
        ta, tb = tiers(lib, case, d, cuts_a[i], cuts_a[i + 1], cuts_g[i], cuts_g[i + 1])
        for hk in range(Hkv):
            rows = [block_rows(lib, case, d, ta, tb, hk, order) for order in ORDERS]
            for other in rows[1:]:  # phases are race-free: every thread order gives the same bits
                np.testing.assert_array_equal(other, rows[0])
            parts[i, hk * gq:(hk + 1) * gq] = rows[0]
            cpu_parts[i, hk * gq:(hk + 1) * gq] = cpu_rows(lib, case, d, ta, tb, hk)
    assert np.isfinite(np.delete(parts, D, axis=2)).all()  # M is -inf where no token was seen
    # the block's softmax state is the CPU's up to float rounding (the same M when a score is the max)
    for i in range(n_part):
        got, want = scaled(parts[i], D), scaled(cpu_parts[i], D)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))
        assert ((parts[i, :, D + 1] > 0) == (cpu_parts[i, :, D + 1] > 0)).all()

    out = np.full((H, D), np.nan, np.float32)
    cpu_out = np.full((H, D), np.nan, np.float32)
    for h in range(H):
        row = np.ascontiguousarray(parts[:, h, :])
        lib.lq2_ab_emulate_combine(D, n_part, row, D + 2, 0, out[h])
        rev = np.full(D, np.nan, np.float32)
        lib.lq2_ab_emulate_combine(D, n_part, row, D + 2, 1, rev)
        np.testing.assert_array_equal(rev, out[h])
        lib.lq2_attn_merge(D, n_part, row, D + 2, cpu_out[h])
    np.testing.assert_allclose(out, cpu_out, rtol=0, atol=1e-6)
    want = reference(case, d)
    err = float(np.abs(out - want).max())
    assert err <= 5e-6, err
    if case.mask == "all" or case.nA + case.nB == 0:
        assert not out.any()
    print(f"case {ci}: max |err| {err:.2e} over {n_part} parts")


def test_shapes_the_block_does_not_take(lib):
    case = Case(64, 4, 2, 10, 70, 64)
    d = make(case, 7)
    ta, tb = tiers(lib, case, d, 0, 10, 0, 2)
    out = np.zeros((4, 66), np.float32)
    too_many = AttnParams(64, 18, 2, 0.125, 0.0, 0.0)  # 9 query heads per kv head
    assert lib.lq2_ab_emulate_block(ctypes.byref(too_many), np.zeros((18, 64), np.float32), ctypes.byref(ta),
                                    ctypes.byref(tb), 0, 0, out) == -1
    tb.rope_table = None  # pre-RoPE keys need the table on the GPU path
    assert lib.lq2_ab_emulate_block(ctypes.byref(params(case)), d["q"], ctypes.byref(ta), ctypes.byref(tb),
                                    0, 0, out) == -1
