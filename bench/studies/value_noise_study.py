"""Where LogQuant's 2-bit values lose quality, and what a value code could do about it, per layer.

Mixed key widths (issue 14) left the values as the larger share of the error: on Qwen at 4k the
default's decode KL is 0.078 with 2-bit values and 0.029 with 4-bit ones. A value group is one
token's 64 channels (one head on Qwen) with a fitted scale and minimum, so what hurts it is a
spread of channel offsets and magnitudes inside the token: a few large channels set the range and
the rest get few distinct levels. This study tries transforms of a token's values before its
2-bit codes (undone after dequantization; attention is linear in the values, so the runtime would
undo them once per output, not per token):

    lsq:          today's code (fitted scale and minimum, 3 levels above it)
    v4:           4-bit values (for scale: what 2 more bits buy)
    bias:         subtract the model's value bias b_v first (known from the weights; Qwen has one)
    center:       subtract each channel's mean over the first 64 tokens (what a runtime knows at
                  its first demotion)
    hadamard:     rotate each head's values by the normalised 64 x 64 Hadamard matrix first, so
                  no channel dominates a token's range
    bias+hadamard, center+hadamard
    channel:      groups along tokens instead, as the keys are: channel c of 64 coded tokens
    channel+widths: and each channel 0, 2 or 4 bits (mean 2) by greedy reverse water-filling on
                  its importance (the energy of the W_o columns it feeds) times its variance times
                  a Gaussian's error at that width, as the key widths do

It runs the exact float32 forward of key_noise_study.py (Qwen2.5-Coder-0.5B, N tokens of code,
W = 32). At every layer, for the last Q queries, attention is recomputed with exact keys and with
values coded per the tiers (LogQuant's f16 set exact, the rest coded); measured is the relative
squared error of the layer's attention output after W_o, ||W_o (o' - o)||^2 / ||W_o o||^2, the
thing added to the residual stream. The residual stream continues exact.

    python bench/studies/value_noise_study.py --tokens 2048 --queries 64 \
        --out bench/results/cpu/qwen2.5-coder-0.5b/value-noise
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from channel_bits_study import GAUSS_MSE, quant_width
from key_noise_study import HD, NH, NKV, G, W, forward_layers, output_error, quant_lsq, study_parser, tiers


def hadamard(n: int) -> np.ndarray:
    """Sylvester's n x n Hadamard matrix (n a power of two), normalised: symmetric, its own inverse."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


H64 = hadamard(HD)


def code(v: np.ndarray, levels: int = 3) -> np.ndarray:
    """v [n, NKV, HD]: each token's head (64 channels) coded as one fitted group."""
    return quant_lsq(v, levels=levels)[0]


def channel_widths(var: np.ndarray, importance: np.ndarray, widths=(0, 2, 4), mean_bits: int = 2):
    """Per kv head, channel widths [NKV, HD] of mean mean_bits: greedy steps by the largest drop of
    importance x variance x Gaussian error per bit."""
    alloc = np.full((NKV, HD), widths[0])
    for g in range(NKV):
        budget = (mean_bits - widths[0]) * HD
        while budget > 0:
            i = np.searchsorted(widths, alloc[g])
            ok = i + 1 < len(widths)
            nxt = np.array(widths)[np.minimum(i + 1, len(widths) - 1)]
            gain = importance[g] * var[g] * (np.array([GAUSS_MSE[w] for w in alloc[g]])
                                             - np.array([GAUSS_MSE[w] for w in nxt]))
            gain = np.where(ok & (nxt - alloc[g] <= budget), gain / np.maximum(nxt - alloc[g], 1), -1)
            c = int(np.argmax(gain))
            if gain[c] < 0:
                break
            budget -= nxt[c] - alloc[g, c]
            alloc[g, c] = nxt[c]
    return alloc


def code_channels(v: np.ndarray, low: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Values of every token with those in `low` coded per channel in groups of G of them, channel
    (g, c) at widths[g, c] bits."""
    out = v.copy()
    for g0 in range(0, len(low), G):
        sel = low[g0:g0 + G]
        x = np.moveaxis(v[sel], 0, -1)  # [NKV, HD, n]
        y = np.empty_like(x)
        for b in np.unique(widths):
            m = widths == b
            y[m] = quant_width(x[m], int(b))
        out[sel] = np.moveaxis(y, -1, 0)
    return out


def variants(v: np.ndarray, b_v: np.ndarray, low: np.ndarray, w_o: np.ndarray) -> dict[str, np.ndarray]:
    """Every variant's dequantized values [n, NKV, HD] of all tokens (low: the 2-bit tokens)."""
    # importance of value channel (g, c): the energy of the W_o columns of the query heads it feeds
    imp = (w_o ** 2).sum(0).reshape(NKV, NH // NKV, HD).sum(1)
    var = v[low].var(0)
    bias = b_v.reshape(NKV, HD)[None]
    center = v[:64].mean(0, keepdims=True)
    rot = lambda x: x @ H64  # noqa: E731  (H64 is symmetric and its own inverse)
    return {
        "lsq": code(v),
        "v4": code(v, 15),
        "bias": code(v - bias) + bias,
        "center": code(v - center) + center,
        "hadamard": rot(code(rot(v))),
        "bias+hadamard": rot(code(rot(v - bias))) + bias,
        "center+hadamard": rot(code(rot(v - center))) + center,
        "channel": code_channels(v, low, np.full((NKV, HD), 2)),
        "channel+widths": code_channels(v, low, channel_widths(var, imp)),
    }


def layer_stats(q, k, v, w_o, b_v, queries) -> dict:
    low = np.flatnonzero(tiers(queries[-1] + 1)[2])
    return output_error(q, k, v, w_o, variants(v, b_v, low, w_o), queries)


def main() -> None:
    a = study_parser(__doc__).parse_args()
    t0 = time.time()
    rep = {"model": a.model, "queries": a.queries, "window": W, "layers": {}}
    for il, q, k, _kp, v, w_o, b_v in forward_layers(a.model, a.tokens, values=True):
        N = q.shape[0]
        rep["tokens"] = N
        rep["layers"][il] = layer_stats(q, k, v, w_o, b_v, list(range(N - a.queries, N)))
        print(il, {kk: round(vv, 5) for kk, vv in rep["layers"][il].items()}, f"{time.time() - t0:.0f}s",
              flush=True)
    rep["texts"] = forward_layers.texts
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "value_noise.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, a.out / "value_noise.md")


def write_markdown(rep: dict, path: Path) -> None:
    rows = rep["layers"]
    cols = list(next(iter(rows.values())))
    lines = ["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for il, r in rows.items():
        lines.append(f"| {il} | " + " | ".join(f"{r[c]:.5f}" for c in cols) + " |")
    mean = {c: float(np.mean([r[c] for r in rows.values()])) for c in cols}
    lines.append("| mean | " + " | ".join(f"{mean[c]:.5f}" for c in cols) + " |")
    path.write_text(f"Qwen2.5-Coder-0.5B, {rep['tokens']} tokens of code, last {rep['queries']} queries, "
                    f"W = {rep['window']}, keys exact; relative squared error of the attention output "
                    "after W_o, mean over queries.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
