"""What spending the 2-bit keys' bits unevenly across channels would buy (issue 14, a lever beside 3-4).

Every channel of a 2-bit key group gets 2 bits today. But a channel's share of the score error is
its query energy times its key error, and both vary by orders of magnitude across the channels
of a head (RoPE's low frequencies carry the large, slowly varying key channels). Reverse
water-filling says: at the same mean of 2 bits, give more bits to the channels that matter and
fewer (down to none: the group's mean alone) to those that do not.

This study runs the exact float32 forward of key_noise_study.py (Qwen2.5-Coder-0.5B, N tokens of
real code, W = 32) and at every layer recomputes the attention of the last Q queries with the
runtime's tiers: 2-bit-tier keys get codes, values stay exact. Per (layer, kv head) one allocation
of bits to RoPE pairs (both channels of a pair alike: the rotation mixes them), mean 2 bits per
key value, chosen greedily by the squared error each pair's channels would have at each width,
weighted by:

- `keys`: 1 (key error alone: what a cache that never sees a query can do);
- `queries`: the mean squared pair norm of the H queries before the measured ones (RoPE keeps a
  pair's norm, so this is the pair's weight in the score error; a runtime could gather it from the
  prompt, or a per-model recipe could hold it);
- `early`: the same from the queries of tokens 64.. (far from the measured ones: is the weight a
  property of the model rather than of the text?);
- `weights`: the query energy predicted from W_q, b_q and attn_norm alone (no data), with the
  measured key errors;
- `model`: both predicted from the weights (the key error as the key's variance times a Gaussian's
  error at b bits): what the runtime does (native/llama/logquant-key-widths.cpp);
- `freq_z`: a fixed rule by RoPE frequency, the z fastest pairs 0 bits and the z slowest 4.

Widths from {0, 2, 4} (0: the group's mean only; 2 and 4: today's formats) and, for what an ideal
packing would give, from {0, 1, 2, 3, 4}. Reported per layer and averaged: KL(exact || tiered) of
the attention probabilities, beside uniform 2- and 3-bit keys.

    python bench/studies/channel_bits_study.py --tokens 2048 --queries 64 --history 64 \
        --out bench/results/cpu/qwen2.5-coder-0.5b/channel-bits
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from key_noise_study import (
    HD,
    NH,
    NKV,
    G,
    W,
    attention_kl,
    forward_layers,
    quant_lsq,
    rope,
    study_parser,
    tiers,
)

WIDTHS = {"024": (0, 2, 4), "01234": (0, 1, 2, 3, 4)}
MEAN_BITS = 2
FREQ_RULES = (6, 8, 10, 12, 14, 16)
# mean squared error of a unit Gaussian's best uniform quantizer with 2^b levels (b = 0: its mean)
GAUSS_MSE = {0: 1.0, 2: 0.1188, 4: 0.01154, 8: 9.0e-5}


def quant_width(x: np.ndarray, bits: int) -> np.ndarray:
    """x [..., n] -> its values after b-bit fitted codes per row (b = 0: the row's mean)."""
    if bits == 0:
        return np.broadcast_to(x.mean(-1, keepdims=True), x.shape)
    return quant_lsq(x, levels=(1 << bits) - 1)[0]


def coded_keys(kp: np.ndarray, low: np.ndarray, bits: int) -> np.ndarray:
    """Pre-RoPE keys of the 2-bit-tier tokens `low` at `bits` per channel, groups of G tokens."""
    out = np.empty((len(low), NKV, HD), np.float32)
    for g0 in range(0, len(low), G):
        sel = low[g0:g0 + G]
        out[g0:g0 + len(sel)] = np.moveaxis(quant_width(np.moveaxis(kp[sel], 0, -1), bits), -1, 0)
    return out


def allocate(err: dict[int, np.ndarray], weight: np.ndarray, widths: tuple[int, ...],
             mean_bits: int = MEAN_BITS) -> np.ndarray:
    """Greedy reverse water-filling per kv head: err[b] [NKV, HD/2] squared error of each RoPE pair
    at width b, weight [NKV, HD/2]; every pair starts at the narrowest width and the step with the
    largest weighted error drop per bit is taken while the mean stays <= mean_bits. -> [NKV, HD/2]."""
    half = HD // 2
    alloc = np.full((NKV, half), widths[0])
    for g in range(NKV):
        budget = mean_bits * half - widths[0] * half  # bits per pair-channel left to give
        while True:
            best, best_gain = None, 0.0
            for p in range(half):
                i = widths.index(alloc[g, p])
                if i + 1 == len(widths):
                    continue
                step = widths[i + 1] - widths[i]
                if step > budget:
                    continue
                gain = weight[g, p] * (err[widths[i]][g, p] - err[widths[i + 1]][g, p]) / step
                if gain > best_gain:
                    best, best_gain = p, gain
            if best is None:
                break
            i = widths.index(alloc[g, best])
            budget -= widths[i + 1] - widths[i]
            alloc[g, best] = widths[i + 1]
    return alloc


def layer_stats(q, k, kp, queries, history) -> dict:
    n_last = queries[-1] + 1
    low = np.flatnonzero(tiers(n_last)[2])
    half = HD // 2
    by_bits = {b: coded_keys(kp, low, b) for b in (0, 1, 2, 3, 4, 8)}
    # squared error per (kv head, pair), both channels of the pair
    err = {}
    for b, kq in by_bits.items():
        e = ((kq - kp[low]) ** 2).sum(0)  # [NKV, HD]
        err[b] = e[:, :half] + e[:, half:]
    qe = (q[history] ** 2)  # [H, NH, HD]
    qe = (qe[..., :half] + qe[..., half:]).mean(0)  # [NH, HD/2]
    qw = qe.reshape(NKV, NH // NKV, half).mean(1)
    rows = {"k2": np.full((NKV, half), 2), "k3": np.full((NKV, half), 3), "k4": np.full((NKV, half), 4)}
    for wname, widths in WIDTHS.items():
        rows[f"keys_{wname}"] = allocate(err, np.ones((NKV, half)), widths)
        rows[f"queries_{wname}"] = allocate(err, qw, widths)
    # calibrated on other text: queries of the first tokens (far from the measured ones)
    qc = q[64:64 + len(history)] ** 2
    qc = (qc[..., :half] + qc[..., half:]).mean(0).reshape(NKV, NH // NKV, half).mean(1)
    rows["early_024"] = allocate(err, qc, WIDTHS["024"])
    if layer_stats.model_weights is not None:
        qwt, kvar = layer_stats.model_weights
        rows["weights_024"] = allocate(err, qwt, WIDTHS["024"])
        # keys' error predicted too: the pair's key variance times a Gaussian's error at b bits
        rows["model_024"] = allocate({b: kvar * GAUSS_MSE[b] for b in (0, 2, 4)}, qwt, WIDTHS["024"])
        # a mean of 3 bits (a 3.0-bits/value point beside 2-bit values): widths from {0, 2, 4}
        # and from {0, 2, 4, 8}, the formats there are
        model_err = {b: kvar * GAUSS_MSE[b] for b in (0, 2, 4, 8)}
        rows["model_024_m3"] = allocate(model_err, qwt, (0, 2, 4), 3)
        rows["model_0248_m3"] = allocate(model_err, qwt, (0, 2, 4, 8), 3)
        rows["queries_0248_m3"] = allocate(err, qw, (0, 2, 4, 8), 3)
    # a fixed rule by RoPE frequency: the z fastest pairs get 0 bits, the z slowest 4
    for z in FREQ_RULES:
        rows[f"freq_{z}"] = np.array([[0 if p < z else 4 if p >= half - z else 2 for p in range(half)]] * NKV)
    coded = {}
    for name, alloc in rows.items():
        kq = np.empty((len(low), NKV, HD), np.float32)
        for g in range(NKV):
            for p in range(half):
                b = int(alloc[g, p])
                kq[:, g, p] = by_bits[b][:, g, p]
                kq[:, g, p + half] = by_bits[b][:, g, p + half]
        full_k = k[:n_last].copy()
        full_k[low] = rope(kq, low.astype(np.float64))
        coded[name] = full_k
    out = attention_kl(q, k, coded, queries)
    for name, alloc in rows.items():
        out[f"bits_{name}"] = float(alloc.mean())
        if name.startswith(("keys", "queries")):
            out[f"alloc_{name}"] = alloc.tolist()
    return out


layer_stats.model_weights = None


def weight_energy(model: str):
    """Per layer, the query energy of each (kv head, RoPE pair) predicted from the weights alone:
    for an input of unit RMS before attn_norm with independent channels, E[q_r^2] = sum_i
    (W_q[r, i] gamma_i)^2 + b_r^2; and the keys' variance about their mean (the bias is a constant a
group's minimum absorbs), sum_i (W_k[c, i] gamma_i)^2. -> {layer: ([NKV, HD/2], [NKV, HD/2])}."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from logquant_gguf import models

    r = GGUFReader(models.model_path(model))
    T = {t.name: t for t in r.tensors}

    def Wt(name):
        t = T[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        tuple(int(x) for x in reversed(t.shape)))

    half = HD // 2
    out = {}
    il = 0
    while f"blk.{il}.attn_q.weight" in T:
        gamma = Wt(f"blk.{il}.attn_norm.weight")
        e = ((Wt(f"blk.{il}.attn_q.weight") * gamma[None, :]) ** 2).sum(1) + Wt(f"blk.{il}.attn_q.bias") ** 2
        e = e.reshape(NH, HD)
        e = (e[:, :half] + e[:, half:]).reshape(NKV, NH // NKV, half).mean(1)
        ek = ((Wt(f"blk.{il}.attn_k.weight") * gamma[None, :]) ** 2).sum(1).reshape(NKV, HD)
        out[il] = (e, ek[:, :half] + ek[:, half:])
        il += 1
    return out


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--history", type=int, default=64, help="queries before them that weigh the pairs")
    a = ap.parse_args()
    t0 = time.time()
    rep = {"model": a.model, "queries": a.queries, "history": a.history, "window": W, "group": G,
           "mean_bits": MEAN_BITS, "layers": {}}
    energy = weight_energy(a.model)
    for il, q, k, kp in forward_layers(a.model, a.tokens):
        N = q.shape[0]
        rep["tokens"] = N
        queries = list(range(N - a.queries, N))
        history = list(range(N - a.queries - a.history, N - a.queries))
        layer_stats.model_weights = energy[il]
        rep["layers"][il] = layer_stats(q, k, kp, queries, history)
        print(il, {kk: round(vv, 4) for kk, vv in rep["layers"][il].items() if kk.startswith("kl")},
              f"{time.time() - t0:.0f}s", flush=True)
    rep["texts"] = forward_layers.texts
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "channel_bits.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, a.out / "channel_bits.md")


LABELS = {
    "k2": "2 bits on every channel (today)",
    "k3": "3 bits on every channel",
    "k4": "4 bits on every channel",
    "keys_024": "{0, 2, 4} by key error",
    "queries_024": "{0, 2, 4} by key error x query energy",
    "keys_01234": "{0..4} by key error",
    "queries_01234": "{0..4} by key error x query energy",
    "early_024": "{0, 2, 4} by key error x query energy of tokens 64-127",
    "weights_024": "{0, 2, 4} by key error x query energy predicted from W_q, b_q, attn_norm",
    "model_024": "{0, 2, 4} by key error and query energy both predicted from the weights",
    "model_024_m3": "mean 3 bits: {0, 2, 4} predicted from the weights",
    "model_0248_m3": "mean 3 bits: {0, 2, 4, 8} predicted from the weights",
    "queries_0248_m3": "mean 3 bits: {0, 2, 4, 8} by key error x query energy",
    **{f"freq_{z}": f"fixed: {z} fastest pairs 0 bits, {z} slowest 4" for z in FREQ_RULES},
}


def write_markdown(rep: dict, path: Path) -> None:
    rows = list(rep["layers"].values())
    lines = ["| key channels | mean code bits | attention KL (mean over layers) | worst layer |",
             "|---|---|---|---|"]
    for name, label in LABELS.items():
        kls = [r[f"kl_{name}"] for r in rows]
        lines.append(f"| {label} | {np.mean([r[f'bits_{name}'] for r in rows]):.2f} | {np.mean(kls):.4f} | "
                     f"{max(kls):.4f} |")
    path.write_text(f"Qwen2.5-Coder-0.5B, {rep['tokens']} tokens of code, last {rep['queries']} queries, "
                    f"query weights from the {rep['history']} before, W = {rep['window']}, "
                    f"G = {rep['group']}; "
                    "KL(exact || tiered) of the attention probabilities, means over queries and heads "
                    "(values exact).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
