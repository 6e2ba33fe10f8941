"""What cheaper metadata would buy (issue 14, lever 4): 8-bit scales and minimums instead of f16.

Every 2-bit block (one channel of a group of G tokens) carries an f16 scale d and minimum m: 32 bits
per 64 values, 0.5 of the 2.5 bits per value. With 8 bits each, relative to a per-channel
reference fixed once per layer, a block costs 0.25 bits per value, so groups of 32 tokens would
cost what groups of 64 cost today, and 3-bit keys in groups of 32 would be a 3.0-bit point.

8 bits cannot hold a minimum absolutely: Qwen's key channels carry offsets hundreds of times
their spread. So m = mu_c + sigma_c * k / 8 (k an int8: mu_c +- 16 sigma_c) and d = sigma_c *
2^((e - 128) / 16) (e a uint8: 4.4 % steps over 2^+-8), with per-channel references (mu_c,
sigma_c):

- `weights`: from the model alone, as the runtime predicts key widths
  (native/llama/logquant-key-widths.cpp): mu_c the projection's bias (0 without one), sigma_c^2 =
  sum_i (W[c, i] gamma_i)^2 for a unit-RMS input. A block whose data lies outside the reference's
  range saturates k and widens d to cover it.
- `data`: each channel's mean and standard deviation over every token (an oracle: what a reference
  measured from the sequence's first tokens could at best be).

Each block's (e, k) is the least-squares fit snapped to the grid, then the best of the 3 x 3
neighbours by squared error. Compared with f16 metadata (codes recomputed after rounding d and m
to f16, as the runtime does) and exact float metadata.

The forward is key_noise_study.py's (Qwen2.5-Coder-0.5B, N tokens of code, W = 32, the runtime's
tiers), values and keys measured apart as in the key-noise and value-noise studies:

- keys: 3-bit keys as the runtime builds them (widths {0, 2, 4} at a mean of 3, predicted from the
  weights: channel_bits_study.py's model_024_m3) and 2-bit mixed widths (mean 2), values exact;
  KL(exact || tiered) of the attention probabilities;
- values: 2-bit values per channel, keys exact; relative squared error of the attention output
  after W_o.

    python bench/studies/metadata_study.py --tokens 2048 --queries 64 \\
        --out bench/results/cpu/qwen2.5-coder-0.5b/metadata
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from channel_bits_study import GAUSS_MSE, allocate, weight_energy
from key_noise_study import (
    HD,
    NKV,
    W,
    attention_kl,
    forward_layers,
    lsq_rounds,
    output_error,
    rope,
    study_parser,
    tiers,
)

M_STEP = 1.0 / 8.0  # minimum grid, in sigma_c
D_STEPS = 16.0      # scale grid steps per octave


def fit(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares (d, m) per row of x [..., n]: key_noise_study's best round, as floats."""
    best = None
    for d, m, _y, e in lsq_rounds(x, levels):
        e = e[..., None]
        if best is None:
            best = (d, m, e)
        else:
            best = tuple(np.where(e < best[2], a, b) for a, b in zip((d, m, e), best))
    return best[0], best[1]


def coded_err(x, d, m, levels):
    safe = np.where(d > 0, d, 1.0)
    c = np.clip(np.floor((x - m) / safe + 0.5), 0, levels)
    y = c * d + m
    return ((y - x) ** 2).sum(-1, keepdims=True), c


def decode(x, d, m, levels):
    _, c = coded_err(x, d, m, levels)
    return c * d + m


def quant(x: np.ndarray, bits: int, meta: str, mu=None, sig=None) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] coded at `bits` (0: the row's mean) with metadata `meta` (exact, f16, 8bit);
    mu, sig [..., 1] the references for 8bit. -> (decoded x, rows whose reference saturated)."""
    sat = np.zeros(x.shape[:-1] + (1,), bool)
    if bits == 0:
        m = x.mean(-1, keepdims=True)
        d = np.zeros_like(m)
        levels = 0
    else:
        levels = (1 << bits) - 1
        d, m = fit(x, levels)
    if meta == "exact":
        return (decode(x, d, m, levels) if levels else np.broadcast_to(m, x.shape)), sat
    if meta == "f16":
        d, m = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
        return (decode(x, d, m, levels) if levels else np.broadcast_to(m, x.shape)), sat
    sig = np.maximum(sig, 1e-12)
    top = m + levels * d
    k0 = np.floor((m - mu) / (sig * M_STEP))
    sat = (k0 < -128) | (k0 > 127)
    if levels == 0:
        k = np.clip(np.floor((m - mu) / (sig * M_STEP) + 0.5), -128, 127)
        return np.broadcast_to(mu + sig * M_STEP * k, x.shape), sat
    best_e, best_y = None, None
    for dk in (-1, 0, 1):
        k = np.clip(k0 + dk, -128, 127)
        mq = mu + sig * M_STEP * k
        dt = np.maximum((top - mq) / levels, 1e-30)  # keep the top of the fitted range
        e0 = np.round(np.log2(dt / sig) * D_STEPS) + 128
        sat = sat | (e0 < 0) | (e0 > 255)
        for de in (-1, 0, 1):
            dq = sig * 2.0 ** ((np.clip(e0 + de, 0, 255) - 128) / D_STEPS)
            e, c = coded_err(x, dq, mq, levels)
            y = c * dq + mq
            if best_e is None:
                best_e, best_y = e, y
            else:
                better = e < best_e
                best_e, best_y = np.where(better, e, best_e), np.where(better, y, best_y)
    return best_y, sat


def code_tier(x: np.ndarray, low: np.ndarray, widths: np.ndarray, G: int, meta: str, mu, sig):
    """x [N, NKV, HD] with the tokens `low` coded per channel in groups of G, channel (g, c) at
    widths[g, c] bits. -> (coded x of every token, share of saturated blocks)."""
    out = x.copy()
    n_sat = n_blk = 0
    for g0 in range(0, len(low), G):
        sel = low[g0:g0 + G]
        xs = np.moveaxis(x[sel], 0, -1).astype(np.float64)  # [NKV, HD, n]
        y = np.empty_like(xs)
        for b in np.unique(widths):
            msk = widths == b
            yb, sat = quant(xs[msk], int(b), meta, None if mu is None else mu[msk][:, None],
                            None if sig is None else sig[msk][:, None])
            y[msk] = yb
            n_sat += int(sat.sum())
            n_blk += int(msk.sum())
        out[sel] = np.moveaxis(y, -1, 0).astype(np.float32)
    return out, n_sat / max(n_blk, 1)


def model_refs(model: str, il: int, kind: str):
    """Per-channel (mu, sigma) [NKV, HD] of layer il's keys or values from the weights alone."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from logquant_gguf import models
    if not hasattr(model_refs, "T"):
        r = GGUFReader(models.model_path(model))
        model_refs.T = {t.name: t for t in r.tensors}
    T = model_refs.T

    def Wt(name):
        t = T[name]
        shape = tuple(int(x) for x in reversed(t.shape))
        return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)

    gamma = Wt(f"blk.{il}.attn_norm.weight")
    w = Wt(f"blk.{il}.attn_{kind}.weight") * gamma[None, :]
    sig = np.sqrt((w ** 2).sum(1)).reshape(NKV, HD)
    bias = f"blk.{il}.attn_{kind}.bias"
    mu = Wt(bias).reshape(NKV, HD) if bias in T else np.zeros((NKV, HD))
    return mu, sig


METAS = ("exact", "f16", "8bit_weights", "8bit_data")


def layer_stats(model, il, q, k, kp, v, w_o, queries, energy) -> dict:
    n_last = queries[-1] + 1
    low = np.flatnonzero(tiers(n_last)[2])
    qwt, kvar = energy
    model_err = {b: kvar * GAUSS_MSE[b] for b in (0, 2, 4)}
    pair = {2: allocate(model_err, qwt, (0, 2, 4), 2), 3: allocate(model_err, qwt, (0, 2, 4), 3)}
    kwidths = {b: np.concatenate([a, a], axis=1) for b, a in pair.items()}  # NEOX: pair p = (p, p + HD/2)
    def data_refs(x):
        return x.mean(0).astype(np.float64), x.std(0).astype(np.float64)

    refs = {"weights": model_refs(model, il, "k"), "data": data_refs(kp)}
    vrefs = {"weights": model_refs(model, il, "v"), "data": data_refs(v)}
    out: dict[str, float] = {}
    coded_k, coded_v = {}, {}
    for G in (64, 32):
        for meta in METAS:
            mu, sig = refs[meta.split("_")[1]] if meta.startswith("8bit") else (None, None)
            for kb in (2, 3):
                kq, sat = code_tier(kp, low, kwidths[kb], G, meta, mu, sig)
                full_k = k[:n_last].copy()
                full_k[low] = rope(kq[low], low.astype(np.float64))
                coded_k[f"k{kb}_g{G}_{meta}"] = full_k
                out[f"sat_k{kb}_g{G}_{meta}"] = sat
            mu, sig = vrefs[meta.split("_")[1]] if meta.startswith("8bit") else (None, None)
            vq, sat = code_tier(v, low, np.full((NKV, HD), 2), G, meta, mu, sig)
            coded_v[f"v2_g{G}_{meta}"] = vq
            out[f"sat_v2_g{G}_{meta}"] = sat
    out.update(attention_kl(q, k, coded_k, queries))
    out.update({f"err_{name}": e for name, e in output_error(q, k, v, w_o, coded_v, queries).items()})
    return out


def main() -> None:
    a = study_parser(__doc__).parse_args()
    t0 = time.time()
    rep = {"model": a.model, "queries": a.queries, "window": W, "layers": {}}
    energy = weight_energy(a.model)
    for il, q, k, kp, v, w_o, _b_v in forward_layers(a.model, a.tokens, values=True):
        N = q.shape[0]
        rep["tokens"] = N
        queries = list(range(N - a.queries, N))
        rep["layers"][il] = layer_stats(a.model, il, q, k, kp, v, w_o, queries, energy[il])
        shown = {kk: round(vv, 4) for kk, vv in rep["layers"][il].items() if kk.startswith(("kl_k3", "err"))}
        print(il, shown,
              f"{time.time() - t0:.0f}s", flush=True)
    rep["texts"] = forward_layers.texts
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "metadata.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, a.out / "metadata.md")


def write_markdown(rep: dict, path: Path) -> None:
    rows = list(rep["layers"].values())

    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    meta_bits = {"exact": None, "f16": 32, "8bit_weights": 16, "8bit_data": 16}
    lines = ["| tier | G | metadata | header bits per value | attention KL (keys) / output error (values) "
             "| worst layer | blocks saturated |", "|---|---|---|---|---|---|---|"]
    for kind in ("k2", "k3", "v2"):
        for G in (64, 32):
            for meta in METAS:
                name = f"{kind}_g{G}_{meta}"
                key = ("kl_" if kind[0] == "k" else "err_") + name
                hb = meta_bits[meta]
                worst = max(r[key] for r in rows)
                lines.append(f"| {kind} | {G} | {meta} | {'-' if hb is None else f'{hb / G:.3f}'} | "
                             f"{mean(key):.4f} | {worst:.4f} | {mean('sat_' + name):.3%} |")
    path.write_text(f"Qwen2.5-Coder-0.5B, {rep['tokens']} tokens of code, last {rep['queries']} queries, "
                    f"W = {rep['window']}; keys: k2/k3 mixed widths from the weights (mean 2 / 3 bits), "
                    "values exact, KL(exact || tiered) of the attention; values: 2-bit per channel, keys "
                    "exact, relative squared error after W_o. Means over layers.\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
