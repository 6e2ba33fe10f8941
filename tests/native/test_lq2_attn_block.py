"""The GPU decode attention's program (native/common/lq2-attn-block.h: lq2_ab_step and the combine),
run on the host exactly as the CUDA kernel runs it: every block, step by step, every thread index
of each step between the kernel's barriers (lq2_attn_block_host.c), on GGML_OP_LQ2_ATTN's tensor
layout (struct lq2_attn_args). Against the CPU: each block's rows and softmax state against
lq2_attn_partial (the scalar build) over the same token ranges, and the result against the float64
reference and the CPU kernel. The threads of each step run in three orders, which must agree bit
for bit: a thread reading what another wrote in the same step, or two threads writing one place,
would make them differ."""
from __future__ import annotations

import ctypes

import lq2_reference as ref
import numpy as np
import pytest
from lq2_ctypes import AbShape, AttnArgs, AttnGeom, AttnParams, RopeParams, TierF16, TierQ2
from test_lq2_attn import CASES, F16_BYTES, Case, make, reference

ORDERS = (0, 1, 2)  # first to last, last to first, odd threads then even ones

# the CPU cases (mixed key widths and values grouped per channel included), plus the shapes the
# block's limits are about: G = 128 (a whole chunk), 8 query heads per kv head (the most), head
# size 512 (four channels per thread), one token
BLOCK_CASES = [*CASES,
               Case(128, 8, 1, 300, 3 * 128 + 7, 128, mode=0),
               Case(512, 2, 1, 140, 70, 64, max_bias=8.0),
               Case(64, 8, 1, 1, 0, 64, mask="none")]


@pytest.fixture(scope="module")
def lib(native_libs):
    lib = native_libs["scalar"]  # the block code is plain C: one build is enough
    assert lib.lq2_ab_args_size() == ctypes.sizeof(AttnArgs)
    return lib


class Op:
    """GGML_OP_LQ2_ATTN's tensors for T query tokens over S streams (T / S tokens each): f16 cells
    [S][nA][Hkv][D] with a mask row per token, a 2-bit store of ng whole groups (the slots past nB
    hidden by -inf in each token's 2-bit mask, as the cache pads them), the RoPE table."""

    def __init__(self, lib, case: Case, q, ka, va, ma, kb, vb, pos_b, mb, mask_f16: bool,
                 unused_groups: int = 0, fill: int = 0, kw=None, refs=None):
        D, H, Hkv, G = case.D, case.H, case.Hkv, case.G
        self.case, self.T, self.S = case, q.shape[0], ka.shape[0]
        ng = -(-case.nB // G)
        self.n_slots = (max(ng, 1) + unused_groups) * G
        self.q = np.ascontiguousarray(q, np.float32)
        self.ka, self.va = np.ascontiguousarray(ka), np.ascontiguousarray(va)
        mdt = np.float16 if mask_f16 else np.float32
        self.ma = np.ascontiguousarray(ma.astype(mdt))
        self.mb = np.full((self.T, self.n_slots), -np.inf, np.float16)
        self.mb[:, :case.nB] = mb
        self.kb = np.full((self.n_slots // G, Hkv * D, ref.block_bytes(G, case.k_bits, case.s8)), fill, np.uint8)
        self.kb[:ng] = kb
        if case.v_channels:  # a group's blocks, one per channel
            self.vb = np.full((self.n_slots // G, Hkv * D, ref.block_bytes(G, case.v_bits, case.s8)), fill, np.uint8)
            self.vb[:ng] = vb
        else:  # a row of blocks per slot
            self.vb = np.full((self.n_slots, Hkv * D // 64, ref.block_bytes(64, case.v_bits)), fill, np.uint8)
            self.vb[:case.nB] = vb
        self.kw = None if kw is None else np.ascontiguousarray(kw, np.int8)
        self.refs = None if refs is None else np.ascontiguousarray(refs, np.float32)
        rope = RopeParams(case.mode, D if case.n_dims is None else case.n_dims, case.base, case.fscale, 1.0)
        self.rope = rope
        # rows for every group of the store (the cache keeps them for all slots)
        self.tab = np.zeros(lib.lq2_rope_table_size(ctypes.byref(rope), self.n_slots, G), np.float16)
        if case.nB:
            lib.lq2_rope_table(ctypes.byref(rope), pos_b.ctypes.data, case.nB, G, self.tab.ctypes.data)
        self.dst = np.full((self.T, H, D), np.nan, np.float32)

    def args(self, n_part: int) -> AttnArgs:
        c, D, H, Hkv = self.case, self.case.D, self.case.H, self.case.Hkv
        self.parts = np.full((n_part, self.T, H, D + 2), np.nan, np.float32)
        row = Hkv * D * F16_BYTES
        nd = self.rope.n_dims
        shape = AbShape(D, H // Hkv, H, 0, 1.0 / np.sqrt(D), c.softcap, c.max_bias, c.G, c.k_bits, c.v_bits,
                        c.mode, nd, 1.0, c.score_correction, int(c.v_channels), int(self.kw is not None),
                        int(self.refs is not None))
        g = AttnGeom(q_nb1=D * 4, q_nb2=H * D * 4, k_nb2=row, k_nb3=c.nA * row, v_nb2=row, v_nb3=c.nA * row,
                     n_kv=c.nA, mask_nb1=self.ma.strides[0], kg_bytes=self.kb[0].nbytes,
                     v2_stride=self.vb[0].nbytes, mask2_nb1=self.mb.strides[0],
                     rope_nb1=nd * c.G * F16_BYTES,
                     n_slots=self.n_slots, n_tokens=self.T, n_tps=self.T // self.S, dst_nb1=D * 4,
                     dst_nb2=H * D * 4, mask_f16=int(self.ma.dtype == np.float16), n_head_kv=Hkv,
                     n_part=n_part, shape=shape)
        return AttnArgs(self.q.ctypes.data, self.ka.ctypes.data, self.va.ctypes.data, self.ma.ctypes.data,
                        self.kb.ctypes.data, self.vb.ctypes.data, self.mb.ctypes.data,
                        self.tab.ctypes.data if nd > 0 else None, self.parts.ctypes.data,
                        self.dst.ctypes.data, None if self.kw is None else self.kw.ctypes.data,
                        None if self.refs is None else self.refs.ctypes.data, g)

    def tiers(self, tok: int, a0: int, a1: int, g0: int, g1: int):
        """Token tok's tiers over the f16 cells [a0, a1) and the slots of groups [g0, g1), as the CPU
        kernel takes them (f32 masks with the values the op's masks hold)."""
        c, D, Hkv, G = self.case, self.case.D, self.case.Hkv, self.case.G
        s = tok // (self.T // self.S)
        row = Hkv * D * F16_BYTES
        self._ma32 = self.ma[tok].astype(np.float32)
        self._mb32 = self.mb[tok].astype(np.float32)
        ka, va = self.ka[s], self.va[s]
        ta = TierF16(a1 - a0, ka.ctypes.data + a0 * row, row, va.ctypes.data + a0 * row, row,
                     self._ma32.ctypes.data + a0 * 4)
        v0 = g0 if c.v_channels else g0 * G  # the first value group or row of the part
        tb = TierQ2((g1 - g0) * G, G, c.k_bits, c.v_bits, self.kb.ctypes.data + g0 * self.kb[0].nbytes,
                    self.kb[0].nbytes, self.vb.ctypes.data + v0 * self.vb[0].nbytes, self.vb[0].nbytes,
                    None, self.rope, self.tab.ctypes.data + g0 * self.rope.n_dims * G * F16_BYTES,
                    self._mb32.ctypes.data + g0 * G * 4, c.score_correction,
                    None if self.kw is None else self.kw.ctypes.data, int(c.v_channels),
                    None if self.refs is None else self.refs.ctypes.data)
        return ta, tb


def single(lib, case: Case, d, mask_f16: bool = True, **kw) -> Op:
    """The op for make()'s one query token over one stream."""
    return Op(lib, case, d["q"][None], d["ka"][None], d["va"][None], d["ma"][None], d["kb"], d["vb"],
              d["pos_b"], d["mb"][None], mask_f16, kw=d["kw"], refs=d["refs"], **kw)


def work(lib, case: Case, op: Op) -> np.ndarray:
    """The CPU kernel's scratch, garbage-filled."""
    n = lib.lq2_attn_work_size(ctypes.byref(params(case)), case.G, op.rope.n_dims) // 4 + 1
    return np.full(n, np.nan, np.float32)


def params(case: Case) -> AttnParams:
    return AttnParams(case.D, case.H, case.Hkv, 1.0 / np.sqrt(case.D), case.softcap, case.max_bias)


def cpu_rows(lib, case: Case, op: Op, tok: int, a0, a1, g0, g1) -> np.ndarray:
    """lq2_attn_partial over one part's ranges: [H][D + 2] rows (acc, M, S) as the blocks store them."""
    D, H = case.D, case.H
    p = params(case)
    ta, tb = op.tiers(tok, a0, a1, g0, g1)
    acc = np.full((H, D), np.nan, np.float32)
    M, S = np.full(H, np.nan, np.float32), np.full(H, np.nan, np.float32)
    assert lib.lq2_attn_partial(ctypes.byref(p), op.q[tok], ctypes.byref(ta), ctypes.byref(tb), 0, H,
                                acc, M, S, work(lib, case, op).ctypes.data) == 0
    return np.concatenate([acc, M[:, None], S[:, None]], axis=1)


def cpu_result(lib, case: Case, op: Op, tok: int) -> np.ndarray:
    p = params(case)
    ta, tb = op.tiers(tok, 0, case.nA, 0, op.n_slots // case.G)
    out = np.full((case.H, case.D), np.nan, np.float32)
    assert lib.lq2_attn_heads(ctypes.byref(p), op.q[tok], ctypes.byref(ta), ctypes.byref(tb), out, 0, 1,
                              work(lib, case, op).ctypes.data) == 0
    return out


def scaled(rows: np.ndarray, D: int) -> np.ndarray:
    """Rows as (acc, S) times exp(M - max M), so two blocks whose running max went different ways
    compare; rows that saw no token are zero."""
    M, S = rows[:, D], rows[:, D + 1]
    seen = S > 0
    top = np.max(M[seen], initial=0.0)
    w = np.where(seen, np.exp(np.where(seen, M, top) - top), 0.0)
    return np.concatenate([np.where(seen[:, None], rows[:, :D], 0) * w[:, None], (S * w)[:, None]], axis=1)


def emulate(lib, op: Op, n_part: int) -> tuple[np.ndarray, np.ndarray]:
    """The result and the parts, checked equal in every thread order."""
    results = []
    for order in ORDERS:
        a = op.args(n_part)
        assert lib.lq2_ab_emulate(ctypes.byref(a), order) == 0
        results.append((op.dst.copy(), op.parts.copy()))
    for dst, parts in results[1:]:
        np.testing.assert_array_equal(dst, results[0][0])
        np.testing.assert_array_equal(parts, results[0][1])
    return results[0]


def check_parts(lib, case: Case, op: Op, parts: np.ndarray):
    n_part, ng = parts.shape[0], op.n_slots // case.G
    D = case.D
    for tok in range(op.T):
        for part in range(n_part):  # the ranges lq2_ab_step gives a part
            a0, a1 = case.nA * part // n_part, case.nA * (part + 1) // n_part
            g0, g1 = ng * part // n_part, ng * (part + 1) // n_part
            want = cpu_rows(lib, case, op, tok, a0, a1, g0, g1)
            got = parts[part, tok]
            assert np.isfinite(np.delete(got, D, axis=1)).all()  # M is -inf where no token was seen
            assert ((got[:, D + 1] > 0) == (want[:, D + 1] > 0)).all()
            w = scaled(want, D)
            tol = 2e-5 * max(1.0, float(np.abs(w).max()))
            np.testing.assert_allclose(scaled(got, D), w, rtol=0, atol=tol)


@pytest.mark.parametrize("ci", range(len(BLOCK_CASES)))
def test_gpu_program_equals_the_cpu(lib, ci):
    case = BLOCK_CASES[ci]
    d = make(case, 1000 + ci)
    f16_masks = case.max_bias == 0  # ALiBi distances past 2048 do not fit f16 exactly: f32 then
    ma = d["ma"] if d["ma"] is not None else np.zeros(case.nA, np.float32)
    mb = d["mb"] if d["mb"] is not None else np.zeros(case.nB, np.float32)
    op = Op(lib, case, d["q"][None], d["ka"][None], d["va"][None], ma[None], d["kb"], d["vb"], d["pos_b"],
            mb[None], f16_masks, kw=d["kw"], refs=d["refs"])
    # the float64 reference sees the masks as the op holds them
    d["ma"] = None if d["ma"] is None else op.ma[0].astype(np.float32)
    d["mb"] = None if d["mb"] is None else op.mb[0, :case.nB].astype(np.float32)
    want = reference(case, d)
    for n_part in (1, 3):
        got, parts = emulate(lib, op, n_part)
        check_parts(lib, case, op, parts)
        err = float(np.abs(got[0] - want).max())
        assert err <= 5e-6, (n_part, err)
        np.testing.assert_allclose(got[0], cpu_result(lib, case, op, 0), rtol=0, atol=5e-6)
        if case.mask == "all" or case.nA + case.nB == 0:
            assert not got.any()
        print(f"case {ci}, {n_part} part(s): max |err| {err:.2e}")


def test_several_tokens_and_streams(lib):
    """4 query tokens in 2 streams (each stream its own f16 cells, every token its own mask rows;
    the 2-bit store shared), score correction on, as llama.cpp's split_equal ubatch lays them out."""
    case = Case(64, 6, 2, 150, 200, 64, score_correction=1)
    rng = np.random.default_rng(3)
    T, S = 4, 2
    d = make(case, 77)
    q = rng.standard_normal((T, case.H, case.D)).astype(np.float32)
    ka = rng.standard_normal((S, case.nA, case.Hkv, case.D)).astype(np.float16)
    va = rng.standard_normal((S, case.nA, case.Hkv, case.D)).astype(np.float16)
    ma = np.where(rng.random((T, case.nA)) < 0.3, -np.inf, 0).astype(np.float32)
    mb = np.where(rng.random((T, case.nB)) < 0.5, -np.inf, 0).astype(np.float32)
    op = Op(lib, case, q, ka, va, ma, d["kb"], d["vb"], d["pos_b"], mb, True)
    got, parts = emulate(lib, op, 2)
    check_parts(lib, case, op, parts)
    for tok in range(T):
        np.testing.assert_allclose(got[tok], cpu_result(lib, case, op, tok), rtol=0, atol=5e-6)
    assert np.abs(got[0] - got[2]).max() > 1e-3  # the tokens did see different data


def test_unused_slots_may_hold_anything(lib):
    """Slots no token uses (past a partial last group, whole groups never written) are hidden by
    -inf in the 2-bit mask; the GPU program must not let their bytes in (0xff: NaN scales), as the
    CPU kernel skips them."""
    case = Case(64, 4, 2, 20, 100, 64, max_bias=0.0)
    d = make(case, 21)
    op = single(lib, case, d, unused_groups=2, fill=0xFF)
    assert np.isnan(op.vb[-1].view(np.float16)).any()
    got, parts = emulate(lib, op, 2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], cpu_result(lib, case, op, 0), rtol=0, atol=5e-6)


def test_shapes_the_program_does_not_take(lib):
    case = Case(64, 18, 2, 10, 70, 64)  # 9 query heads per kv head
    d = make(case, 7)
    op = single(lib, case, d)
    assert lib.lq2_ab_emulate(ctypes.byref(op.args(1)), 0) == -1
    case = Case(64, 4, 2, 10, 70, 64)
    d = make(case, 8)
    op = single(lib, case, d)
    a = op.args(1)
    a.rope = None  # pre-RoPE keys need the table on the GPU path
    assert lib.lq2_ab_emulate(ctypes.byref(a), 0) == -1


def test_rope_angle_without_double_is_within_1e_6(lib):
    """Metal has no double: its demotion takes (cos, sin) of pos * f from f split in two floats
    (lq2_rope_cos_sin_f32). Against float64, over the frequencies of a 128-channel NEOX RoPE
    (bases 1e4 and 1e6) and positions up to 2^20: within 1e-6, where casting the float64 value to
    float32 (what the CPU stores) is within 6e-8."""
    rng = np.random.default_rng(0)
    pos = np.concatenate([np.arange(0, 4096), rng.integers(0, 1 << 20, 4000)]).astype(np.int32)
    worst = 0.0
    out = np.zeros(2, np.float32)
    for base in (1e4, 1e6):
        for i in range(0, 64, 3):
            f = base ** (-2.0 * i / 128)
            hi = np.float32(f)
            lo = np.float32(f - np.float64(hi))
            for p in pos[::7]:
                lib.lq2_test_rope_cos_sin_f32(int(p), float(hi), float(lo), out)
                th = float(p) * f
                worst = max(worst, abs(out[0] - np.cos(th)), abs(out[1] - np.sin(th)))
    print(f"max |error| {worst:.2e}")
    assert worst <= 1e-6
