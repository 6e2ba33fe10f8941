"""numpy reference of the LogQuant native core: low-bit formats, RoPE, two-tier attention, policy.

Written from the format description in native/common/lq2-format.h, not from the C code, so that
agreement is evidence. Quantization is computed in float32 exactly as specified (bit exact with C);
RoPE and attention in float64 (the C code is compared against them with a tolerance).
"""
from __future__ import annotations

import numpy as np

QK_V = 64
HALF_MAX = np.float32(65504.0)


def block_bytes(n: int, bits: int = 2, s8: bool = False) -> int:
    return (2 if s8 else 4) + n * bits // 8


# ---- 8-bit headers: (e, k) bytes relative to a channel's references (mu, sigma)
#   d = sigma * S[e % 16] * 2^(e // 16 - 15), S[i] = round(128 * 2^(i / 16))
#   m = fma(sigma, k / 8, mu), k an int8
# sigma has at most 8 significant bits (the host rounds it), so both products are exact in float32.

S8_STEPS = np.round(128 * 2 ** (np.arange(16) / 16)).astype(np.float32)


def ref_round(sigma) -> np.ndarray:
    """A reference scale as the runtime stores it: clamped to [1e-20, 1e30], 8 significant bits
    (nearest even)."""
    s = np.clip(np.nan_to_num(np.asarray(sigma, np.float32), nan=0.0), np.float32(1e-20), np.float32(1e30))
    u = s.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def s8_scale(e, sigma) -> np.ndarray:
    e = np.asarray(e, np.int64)
    p2 = np.ldexp(np.float32(1), (e // 16 - 15).astype(np.int32)).astype(np.float32)
    return ((np.asarray(sigma, np.float32) * S8_STEPS[e % 16]).astype(np.float32) * p2).astype(np.float32)


def s8_min(k, mu, sigma) -> np.ndarray:
    # the fma in float64: sigma * k / 8 has at most 12 significant bits, so the sum is exact for
    # the magnitudes the tests use, and one rounding to float32 follows
    return (np.asarray(sigma, np.float64) * (np.asarray(k, np.float64) / 8) + np.asarray(mu, np.float64)).astype(np.float32)


def s8_params(d, m, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    """(e, k) nearest to the wanted (d, m): e the closest scale (the smaller on a tie), k rounded."""
    d = np.asarray(d, np.float32)
    sig = np.asarray(sigma, np.float32)
    sc = s8_scale(np.arange(256), sig[..., None])  # [..., 256], increasing
    with np.errstate(invalid="ignore"):
        e = np.minimum((~(sc >= d[..., None])).sum(-1), 255)  # first scale >= d (NaN: 255)
    lower = np.take_along_axis(sc, np.maximum(e - 1, 0)[..., None], -1)[..., 0]
    at = np.take_along_axis(sc, e[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where((e > 0) & ((d - lower).astype(np.float32) <= (at - d).astype(np.float32)), e - 1, e)
        t = np.floor(((np.asarray(m, np.float32) - np.asarray(mu, np.float32)).astype(np.float32) / sig)
                     .astype(np.float32) * np.float32(8) + np.float32(0.5))
    k = np.where(t >= 127, 127, np.where(t >= -128, np.nan_to_num(t, nan=-128), -128)).astype(np.int64)
    return e.astype(np.int64), k


def _header(b: np.ndarray, refs) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) float32 of blocks b [..., bytes]; refs [..., 2] (mu, sigma) or None (f16)."""
    if refs is None:
        return (b[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32),
                b[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32))
    refs = np.asarray(refs, np.float32)
    return (s8_scale(b[..., 0].astype(np.int64), refs[..., 1]),
            s8_min(b[..., 1].astype(np.int8).astype(np.int64), refs[..., 0], refs[..., 1]))


# ---- blocks of b-bit codes (b = 2, 4, 8)

def quantize_blocks(x: np.ndarray, bits: int = 2, refs=None) -> np.ndarray:
    """x float32 [..., n] (NaN marks absent values too) -> blocks uint8 [..., 4 + n*bits/8]; with
    refs [..., 2] (each block's channel's (mu, sigma)): 8-bit headers, [..., 2 + n*bits/8]."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    levels = (1 << bits) - 1
    fin = np.isfinite(x)
    lo = np.where(fin, x, np.float32(np.inf)).min(-1)
    hi = np.where(fin, x, np.float32(-np.inf)).max(-1)
    none = ~fin.any(-1)
    lo = np.where(none, np.float32(0), lo).astype(np.float32)
    hi = np.where(none, np.float32(0), hi).astype(np.float32)
    if refs is None:
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.clip((hi - lo) / np.float32(levels), -HALF_MAX, HALF_MAX).astype(np.float16)
        m = np.clip(lo, -HALF_MAX, HALF_MAX).astype(np.float16)
        head = np.stack([d.view(np.uint16), m.view(np.uint16)], -1).astype("<u2").view(np.uint8)
    else:
        refs = np.asarray(refs, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            e, k = s8_params((hi - lo).astype(np.float32) / np.float32(levels), lo, refs[..., 0], refs[..., 1])
        head = np.stack([e.astype(np.uint8), k.astype(np.int8).view(np.uint8)], -1)
    df, mf = _header(head, refs)
    df, mf = df[..., None], mf[..., None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = np.floor((x - mf) / df + np.float32(0.5))
    code = np.where(np.isnan(v), 0, np.clip(v, 0, levels))
    code = np.where(df == 0, 0, code).astype(np.uint8)
    nb = n * bits // 8  # byte l holds codes l, l + nb, l + 2nb, ... at bits 0, b, 2b, ...
    qs = np.zeros(x.shape[:-1] + (nb,), dtype=np.uint8)
    for k in range(8 // bits):
        qs |= (code[..., k * nb:(k + 1) * nb] << (bits * k)).astype(np.uint8)
    return np.concatenate([head, qs], -1)


def dequantize_blocks(b: np.ndarray, n: int, bits: int = 2, refs=None) -> np.ndarray:
    """blocks uint8 [..., 4 + n*bits/8] (or, with refs, [..., 2 + n*bits/8]) -> float32 [..., n]."""
    b = np.ascontiguousarray(b)
    d, m = _header(b, refs)
    qs = b[..., 4 if refs is None else 2:]
    levels = (1 << bits) - 1
    code = np.concatenate([(qs >> (bits * k)) & levels for k in range(8 // bits)], -1).astype(np.float32)
    assert code.shape[-1] == n
    return d[..., None] * code + m[..., None]


def quantize_v(x: np.ndarray, bits: int = 2) -> np.ndarray:
    """rows float32 [..., n] -> [..., n/64, 4 + 8*bits] value blocks."""
    x = np.asarray(x, dtype=np.float32)
    return quantize_blocks(x.reshape(x.shape[:-1] + (x.shape[-1] // QK_V, QK_V)), bits)


def dequantize_v(b: np.ndarray, bits: int = 2) -> np.ndarray:
    y = dequantize_blocks(b, QK_V, bits)
    return y.reshape(y.shape[:-2] + (-1,))


def quantize_k_group(x: np.ndarray, G: int, bits: int = 2, refs=None) -> np.ndarray:
    """x float32 [n_tok <= G, n_ch] (pre-RoPE) -> [n_ch, 4 + G*bits/8]: channel c across the tokens
    (refs [n_ch, 2]: 8-bit headers, [n_ch, 2 + G*bits/8])."""
    n_tok, n_ch = x.shape
    pad = np.full((G, n_ch), np.nan, dtype=np.float32)
    pad[:n_tok] = x
    return quantize_blocks(pad.T, bits, refs)


def dequantize_k_group(b: np.ndarray, G: int, bits: int = 2, refs=None) -> np.ndarray:
    """[n_ch, 4 + G*bits/8] -> float32 [G, n_ch] (token-major)."""
    return dequantize_blocks(b, G, bits, refs).T


# ---- mixed key widths: channel c of a key group has codes of widths[c] bits (0, 2 or 4); its
# block follows the previous channel's; a 0-bit block is d = 0 and m = f16(mean of the finite
# values, summed in order in float32), and stands for m at every token (with 8-bit headers: e = 0
# and the mean's k)

def quantize_k_group_w(x: np.ndarray, G: int, widths, refs=None) -> bytes:
    """x float32 [n_tok <= G, n_ch] -> the group's bytes, block after block."""
    n_tok, n_ch = x.shape
    out = []
    for c in range(n_ch):
        w = int(widths[c])
        rc = None if refs is None else np.asarray(refs, np.float32)[c:c + 1]
        if w == 0:
            col = x[:, c][np.isfinite(x[:, c])].astype(np.float32)
            s = np.cumsum(col, dtype=np.float32)[-1] if len(col) else np.float32(0)
            m = np.float32(s) / np.float32(len(col)) if len(col) else np.float32(0)
            if rc is None:
                m16 = np.clip(m, -HALF_MAX, HALF_MAX).astype(np.float16)
                out.append(np.array([0, m16.view(np.uint16)], "<u2").view(np.uint8))
            else:
                e, k = s8_params(np.float32(0), m, rc[0, 0], rc[0, 1])
                out.append(np.array([e, np.int8(k).view(np.uint8)], np.uint8))
        else:
            out.append(quantize_k_group(x[:, c:c + 1], G, w, rc)[0])
    return np.concatenate(out)


def dequantize_k_group_w(b: np.ndarray, G: int, widths, refs=None) -> np.ndarray:
    """A group's bytes -> float32 [G, n_ch] (token-major)."""
    cols, off = [], 0
    for c, w in enumerate(widths):
        w = int(w)
        rc = None if refs is None else np.asarray(refs, np.float32)[c]
        n_b = block_bytes(G, w, refs is not None)
        blk = b[off:off + n_b]
        if w == 0:
            cols.append(np.full(G, _header(blk, rc)[1], np.float32))
        else:
            cols.append(dequantize_blocks(blk, G, w, rc))
        off += n_b
    return np.stack(cols, 1)


# ---- RoPE (float64)

def rope_angles(pos: np.ndarray, n_dims: int, base: float, fscale: float) -> np.ndarray:
    i = np.arange(n_dims // 2, dtype=np.float64)
    return np.asarray(pos, dtype=np.float64)[..., None] * fscale * base ** (-2.0 * i / n_dims)


def rope_pairs(mode: int, n_dims: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n_dims // 2)
    return (i, i + n_dims // 2) if mode == 2 else (2 * i, 2 * i + 1)


def rope_table_value(x: np.ndarray, attn_factor: float) -> np.ndarray:
    """What the attention's cos/sin table holds: f16 of the f32 product (lq2_rope_table)."""
    return (np.asarray(x).astype(np.float32) * np.float32(attn_factor)).astype(np.float16)


def rope(x: np.ndarray, pos: np.ndarray, mode: int, n_dims: int, base: float, fscale: float,
         attn_factor: float = 1.0, inverse: bool = False, table: bool = False) -> np.ndarray:
    """x [n_tok, n_head, D], pos [n_tok] -> float64 rotated copy (or un-rotated with inverse).
    table: with the attention table's f16 cos/sin (attn_factor folded in) instead of exact ones."""
    y = np.array(x, dtype=np.float64)
    th = rope_angles(pos, n_dims, base, fscale)[:, None, :]
    c, s = np.cos(th), np.sin(th)
    if table:
        c, s = (rope_table_value(v, attn_factor).astype(np.float64) for v in (c, s))
        attn_factor = 1.0
    a, b = rope_pairs(mode, n_dims)
    x0, x1 = y[..., a].copy(), y[..., b].copy()
    if inverse:
        y[..., a] = (x0 * c + x1 * s) / attn_factor
        y[..., b] = (x1 * c - x0 * s) / attn_factor
    else:
        y[..., a] = (x0 * c - x1 * s) * attn_factor
        y[..., b] = (x0 * s + x1 * c) * attn_factor
    return y


# ---- attention (float64)

def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    if max_bias <= 0:
        return np.ones(n_head)
    n2 = 1 << int(np.floor(np.log2(n_head)))
    m0 = 2.0 ** (-max_bias / n2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n2)
    h = np.arange(n_head)
    return np.where(h < n2, m0 ** (h + 1), m1 ** (2 * (h - n2) + 1))


def attention(q, ka, va, mask_a, kb_blocks, vb_blocks, pos_b, mask_b, *, G, n_head_kv, scale,
              softcap, max_bias, rope_mode, n_dims, base, fscale, attn_factor=1.0, k_bits=2, v_bits=2,
              score_correction=False, k_widths=None, v_per_channel=False, refs=None):
    """q [H, D] f32; tier A: ka, va [nA, Hkv, D] f16 post-RoPE; tier B: kb_blocks
    [n_groups, Hkv * D, 4 + G*k_bits/8], vb_blocks [nB, Hkv * D / 64, 4 + 8*v_bits], pos_b [nB].
    score_correction: tier B's raw dot products lowered by scale * v / 2, v the query-weighted
    code noise variance of the token's group (lq2-format.h). k_widths: mixed key widths
    [Hkv * D] (each group's blocks then as quantize_k_group_w lays them out). v_per_channel:
    vb_blocks [n_groups, Hkv * D, 4 + G*v_bits/8], grouped as the keys are. refs: 8-bit headers
    ([Hkv * D (+ Hkv * D per-channel values), 2] (mu, sigma), keys' first). -> [H, D] f64."""
    H, D = q.shape
    nA, nB = len(ka), len(pos_b)
    keys = [np.asarray(ka, dtype=np.float64).reshape(nA, n_head_kv, D)]
    vals = [np.asarray(va, dtype=np.float64).reshape(nA, n_head_kv, D)]
    kref = None if refs is None else np.asarray(refs, np.float32)[:n_head_kv * D]
    vref = None if refs is None else np.asarray(refs, np.float32)[n_head_kv * D:]
    if nB:
        kpre = np.concatenate([dequantize_k_group(g, G, k_bits, kref) if k_widths is None else
                               dequantize_k_group_w(g.reshape(-1), G, k_widths, kref) for g in kb_blocks], 0)[:nB]
        kpre = kpre.reshape(nB, n_head_kv, D)
        keys.append(rope(kpre, pos_b, rope_mode, n_dims, base, fscale, attn_factor, table=True))
        vb = (np.concatenate([dequantize_k_group(g, G, v_bits, vref) for g in vb_blocks], 0)[:nB] if v_per_channel
              else dequantize_v(vb_blocks, v_bits))
        vals.append(vb.reshape(nB, n_head_kv, D).astype(np.float64))
    k = np.concatenate(keys, 0)
    v = np.concatenate(vals, 0)
    mask = np.concatenate([np.zeros(nA) if mask_a is None else mask_a,
                           np.zeros(nB) if mask_b is None else mask_b]).astype(np.float64)
    slopes = alibi_slopes(H, max_bias)
    out = np.zeros((H, D))
    gq = H // n_head_kv
    corr = np.zeros((H, nA + nB))
    if score_correction and nB:
        pa, pb = rope_pairs(rope_mode, n_dims)
        for g, blocks in enumerate(kb_blocks):
            if k_widths is None:
                d = _header(np.asarray(blocks), kref)[0].astype(np.float64).reshape(n_head_kv, D)
            else:  # each channel's block at its offset (a 0-bit one has d = 0: no code noise)
                flat = np.asarray(blocks).reshape(-1)
                offs = np.concatenate([[0], np.cumsum([block_bytes(G, int(w), refs is not None)
                                                       for w in k_widths])[:-1]])
                d = np.array([0.0 if int(w) == 0 else
                              _header(flat[o:o + 4], None if kref is None else kref[c])[0]
                              for c, (o, w) in enumerate(zip(offs, k_widths))], np.float64)
                d = d.reshape(n_head_kv, D)
            var = d * d / 12.0
            var[:, :n_dims] *= np.float64(np.float32(attn_factor)) ** 2
            for h in range(H):
                qh, vh = q[h].astype(np.float64), var[h // gq]
                w = (0.5 * (qh[pa] ** 2 + qh[pb] ** 2) * (vh[pa] + vh[pb])).sum() + (qh[n_dims:] ** 2 * vh[n_dims:]).sum()
                corr[h, nA + g * G:nA + min((g + 1) * G, nB)] = 0.5 * scale * w
    for h in range(H):
        s = (k[:, h // gq, :] @ q[h].astype(np.float64) - corr[h]) * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = s + slopes[h] * mask
        if len(s) == 0 or not np.isfinite(s).any():
            continue
        p = np.exp(s - s.max())
        out[h] = (p @ v[:, h // gq, :]) / p.sum()
    return out


# ---- LogQuant policy: the decode rule of LOGQUANT.md, token by token

class DecodeRule:
    """The reference decode rule, fed one position at a time."""

    def __init__(self, w: int):
        self.w = w
        self.local: list[int] = []
        self.sparse: list[int] = []

    def feed(self, p: int) -> None:
        self.local.append(p)
        if len(self.local) > 2 * self.w:
            head = self.local[:self.w]
            self.sparse = (self.sparse + head)[::2] if self.sparse else head
            self.local = self.local[self.w:]

    def full(self) -> list[int]:
        return self.sparse + self.local
