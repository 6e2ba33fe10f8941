"""The native LogQuant policy equals the token-by-token decode rule of LOGQUANT.md after every step
of random prefills, decodes and truncations, and reports the right demotions and promotions."""
from __future__ import annotations

import ctypes

import lq2_reference as ref
import numpy as np
import pytest


def native_full(lib, pos: list[int], w: int) -> list[int]:
    n = len(pos)
    cnt = lib.logquant_policy_n_full(n, w)
    idx = np.zeros(max(cnt, 1), np.int64)
    assert lib.logquant_policy_full_indices(n, w, idx.ctypes.data) == cnt
    return [pos[i] for i in idx[:cnt]]


def native_transition(lib, prev: list[int], cur: list[int], w: int) -> tuple[list[int], list[int]]:
    p = np.array(prev, np.int32)
    c = np.array(cur, np.int32)
    dem = np.zeros(max(len(cur), 1), np.int32)
    pro = np.zeros(max(len(cur), 1), np.int32)
    nd, npro = ctypes.c_int64(-1), ctypes.c_int64(-1)
    rc = lib.logquant_policy_transition(p.ctypes.data, len(p), c.ctypes.data, len(c), w,
                                        dem.ctypes.data, ctypes.byref(nd),
                                        pro.ctypes.data, ctypes.byref(npro))
    assert rc == 0
    return dem[:nd.value].tolist(), pro[:npro.value].tolist()


def model_transition(prev, full_prev, cur, full_cur):
    prev_s, fp, fc = set(prev), set(full_prev), set(full_cur)
    demote = [p for p in cur if p not in fc and (p in fp or p not in prev_s)]
    promote = [p for p in cur if p in fc and p in prev_s and p not in fp]
    return demote, promote


@pytest.fixture
def plib(native_libs):
    return native_libs["scalar"]  # the policy has no SIMD code: one build is enough


@pytest.mark.parametrize("w", [1, 2, 3, 5, 8, 42])
def test_random_prefill_decode_truncate(plib, w):
    rng = np.random.default_rng(100 + w)
    model = ref.DecodeRule(w)
    pos: list[int] = []
    next_pos = 0
    n_promoted = 0
    for step in range(160):
        prev, full_prev = list(pos), model.full()
        op = rng.choice(["prefill", "decode", "decode", "truncate"])
        if op == "prefill":
            m = int(rng.integers(1, 8 * w + 20))
            new = [next_pos + i for i in range(m)]
        elif op == "decode":
            new = [next_pos]
        else:  # drop a tail, then maybe continue with a batch right away
            keep = int(rng.integers(0, len(pos) + 1))
            pos = pos[:keep]
            model = ref.DecodeRule(w)
            for p in pos:  # state after truncation = feeding the remaining positions fresh
                model.feed(p)
            next_pos = (pos[-1] + 1) if pos else 0
            new = [next_pos + i for i in range(int(rng.integers(0, 3)))]
        if new and rng.random() < 0.2:  # positions need not be contiguous
            new = [p + 5 for p in new]
        for p in new:
            model.feed(p)
        pos += new
        next_pos = (pos[-1] + 1) if pos else 0

        got = native_full(plib, pos, w)
        assert got == model.full(), (step, op, len(pos))
        assert len(got) <= 3 * w and (not pos or got[0] == pos[0])  # the sink stays
        demote, promote = native_transition(plib, prev, pos, w)
        assert (demote, promote) == model_transition(prev, full_prev, pos, got), (step, op)
        n_promoted += len(promote)
    assert n_promoted > 0  # the truncations did exercise promotion


def test_batching_does_not_matter(plib):
    """One prefill of n tokens and n single decodes reach the same set (the reference's prefill
    rule, `>= 3W`, would not)."""
    w = 7
    for n in (3 * w, 3 * w + 1, 100, 257):
        model = ref.DecodeRule(w)
        for p in range(n):
            model.feed(p)
        assert native_full(plib, list(range(n)), w) == model.full()


def test_constant_cost_for_huge_sequences(plib):
    w = 42
    n = 10**12
    idx = np.zeros(3 * w, np.int64)
    cnt = plib.logquant_policy_full_indices(n, w, idx.ctypes.data)
    idx = idx[:cnt]
    assert cnt == plib.logquant_policy_n_full(n, w) and w + 1 <= cnt - w <= 2 * w
    assert idx[0] == 0 and (np.diff(idx) > 0).all()
    assert idx[-1] == n - 1 and (np.diff(idx[w:]) == 1).all()  # local is the newest run
    # log-distributed: the sparse gaps grow (never shrink) going back in time
    gaps = np.diff(idx[1:w + 1])
    assert (np.diff(gaps[::-1]) >= 0).all()


def test_rejects_bad_arguments(plib):
    idx = np.zeros(4, np.int64)
    assert plib.logquant_policy_full_indices(3, 0, idx.ctypes.data) == -1
    unsorted = np.array([3, 1], np.int32)
    out = np.zeros(2, np.int32)
    nd = ctypes.c_int64()
    assert plib.logquant_policy_transition(unsorted.ctypes.data, 2, unsorted.ctypes.data, 2, 4,
                                           out.ctypes.data, ctypes.byref(nd),
                                           out.ctypes.data, ctypes.byref(nd)) == -1
