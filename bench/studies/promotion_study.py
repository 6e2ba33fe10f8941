"""What promoting the most-attended 2-bit tokens back to full precision would buy (issue 14, lever 5).

Before the attention op reports per-token attention mass, this study asks whether it is worth
it. It runs the same exact float32 forward as key_noise_study.py (Qwen2.5-Coder-0.5B, N tokens of
real code, W = 32). At every layer it recomputes the attention of the last Q queries with the
runtime's tiers: keys outside LogQuant's f16 set get 2-bit fitted codes, values stay exact. It
then restores the exact keys of a budget of the 2-bit tokens, per kv head, chosen two ways:

- history: by the attention mass the tokens got, under the 2-bit keys, from the H queries before
  the measured ones, summed over the kv head's query heads. This is what a runtime could do with
  a mass output from its attention op.
- oracle: by the mass the measured query gives them under the exact keys. This is an upper bound:
  a runtime cannot know it in advance.

Reported per layer and averaged: KL(exact || tiered) of the attention probabilities, and the
extra bits per value the budget costs (a promoted token keeps 16-bit keys beside its 2-bit codes).
Compare with 3- and 4-bit keys (`k3`, `k4`: fitted codes of 7 and 15 levels) in the same study.

    python bench/studies/promotion_study.py --tokens 2048 --queries 64 --history 64 \
        --out bench/results/cpu/qwen2.5-coder-0.5b/promotion
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from key_noise_study import (
    NH,
    NKV,
    SCALE,
    G,
    W,
    forward_layers,
    kl,
    quant_lsq,
    quantize_tier,
    rope,
    softmax,
    study_parser,
    tiers,
)

BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.10)  # share of the 2-bit tokens promoted (per kv head)


def quant_lsq3(x: np.ndarray):
    return quant_lsq(x, levels=7)


def quant_lsq4(x: np.ndarray):
    return quant_lsq(x, levels=15)


def layer_stats(q, k, kp, queries, history) -> dict:
    n_last = queries[-1] + 1
    low = np.flatnonzero(tiers(n_last)[2])  # the 2-bit tokens
    coded = {}
    for name, method in (("k2", quant_lsq), ("k3", quant_lsq3), ("k4", quant_lsq4)):
        kq, _, _ = quantize_tier(kp, low, method)
        full_k = k[:n_last].copy()
        full_k[low] = rope(kq, low.astype(np.float64))
        coded[name] = full_k
    k2 = coded["k2"]
    # history: the mass each token got under 2-bit keys from the queries before the measured ones
    # (the tiers of the last measured query: tokens demoted later have less history, as at runtime)
    hist = np.zeros((NKV, n_last))
    for i in history:
        for h in range(NH):
            g = h // (NH // NKV)
            hist[g, : i + 1] += softmax(k2[: i + 1, g] @ q[i, h] * SCALE)
    acc: dict[str, list[float]] = {}

    def add(name, v):
        acc.setdefault(name, []).append(v)

    for i in queries:
        n = i + 1
        is_low = tiers(n)[2]
        low_idx = np.flatnonzero(is_low)
        for h in range(NH):
            g = h // (NH // NKV)
            p = softmax(k[:n, g] @ q[i, h] * SCALE)
            for name in ("k3", "k4"):
                kk = np.where(is_low[:, None], coded[name][:n, g], k[:n, g])
                add(f"kl_{name}", kl(p, softmax(kk @ q[i, h] * SCALE)))
            s2 = np.where(is_low[:, None], k2[:n, g], k[:n, g]) @ q[i, h] * SCALE
            add("kl_k2", kl(p, softmax(s2)))
            for b in BUDGETS[1:]:
                m = int(round(b * len(low_idx)))
                for how, score in (("history", hist[g, low_idx]), ("oracle", p[low_idx])):
                    chosen = low_idx[np.argsort(-score, kind="stable")[:m]]
                    s = s2.copy()
                    s[chosen] = k[chosen, g] @ q[i, h] * SCALE
                    add(f"kl_{how}_{b:g}", kl(p, softmax(s)))
    return {name: float(np.mean(v)) for name, v in acc.items()}


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--history", type=int, default=64, help="queries before them whose mass selects")
    a = ap.parse_args()
    t0 = time.time()
    rep = {"model": a.model, "queries": a.queries, "history": a.history, "window": W, "group": G,
           "budgets": list(BUDGETS), "layers": {}}
    for il, q, k, kp in forward_layers(a.model, a.tokens):
        N = q.shape[0]
        rep["tokens"] = N
        queries = list(range(N - a.queries, N))
        history = list(range(N - a.queries - a.history, N - a.queries))
        rep["layers"][il] = layer_stats(q, k, kp, queries, history)
        print(il, {kk: round(vv, 4) for kk, vv in rep["layers"][il].items()}, f"{time.time() - t0:.0f}s",
              flush=True)
    rep["texts"] = forward_layers.texts
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "promotion.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, a.out / "promotion.md")


def write_markdown(rep: dict, path: Path) -> None:
    rows = rep["layers"].values()
    mean = {c: float(np.mean([r[c] for r in rows])) for c in next(iter(rows))}
    # extra bits per value of the 2-bit tier, keys and values averaged: a promoted key costs 16 bits
    # beside its 2-bit codes (the slot keeps its codes: the tier's layout does not move)
    lines = ["| keys | extra bits/value (tier) | attention KL, history | attention KL, oracle |",
             "|---|---|---|---|",
             f"| 2-bit, fitted (today) | 0 | {mean['kl_k2']:.4f} | {mean['kl_k2']:.4f} |"]
    for b in rep["budgets"][1:]:
        lines.append(f"| + {b:.0%} promoted | {b * 16 / 2:.2f} | {mean[f'kl_history_{b:g}']:.4f} | "
                     f"{mean[f'kl_oracle_{b:g}']:.4f} |")
    lines.append(f"| 3-bit, fitted (not a format yet) | 0.50 | {mean['kl_k3']:.4f} | {mean['kl_k3']:.4f} |")
    lines.append(f"| 4-bit, fitted | 1.00 | {mean['kl_k4']:.4f} | {mean['kl_k4']:.4f} |")
    path.write_text(f"Qwen2.5-Coder-0.5B, {rep['tokens']} tokens of code, last {rep['queries']} queries, "
                    f"selection history {rep['history']} queries, W = {rep['window']}, G = {rep['group']}; "
                    "means over layers, queries and heads of KL(exact || tiered) of the attention "
                    "probabilities (values exact).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
