"""Where LogQuant's 2-bit keys lose quality: attention mass per tier, and two cures, per layer.

An exact float32 numpy forward pass of Qwen2.5-Coder-0.5B (weights dequantized from the GGUF) over
N tokens of real code. At every layer, for the last Q queries, attention is recomputed with the
runtime's tiers: the f16 set of LogQuant's rule (W = 32: sink, log-spaced, recent) keeps exact
keys, every other token gets 2-bit keys (per channel, before RoPE, groups of 64 of the 2-bit
tokens in position order; values exact, so this isolates the keys). Measured per layer, mean over
queries and heads:

- mass: share of the softmax on the 2-bit tier, the sink, the log-spaced and the recent tokens,
  with exact keys and with 2-bit keys (noise on a key inflates its expected exp(score): Jensen);
- KL(exact || 2-bit) of the attention probabilities for the key codes below, without and with the
  bias correction (each 2-bit score minus sigma^2 / 2, sigma^2 the score noise variance predicted
  per (group, query head) from the group's per-channel error variance and the query: for a RoPE
  pair (a, b), sigma^2 += scale^2 * (q_a^2 + q_b^2) / 2 * (var_a + var_b), the rotation averaged out):
    minmax: codes over [min, max] (today's format), error variance step^2 / 12;
    lsq:    from [min, max], a few rounds of least-squares refit of (d, m) to the codes and re-rounding;
    mse:    the group's [lo, hi] chosen by grid search for the least squared error (clipping),
            error variance as measured at quantization time (+bc), or step^2 / 12 (+bc_step: what
            the kernel can compute from the stored scale alone).

The residual stream is continued with exact attention, so each layer sees exact inputs.

    python bench/studies/key_noise_study.py --tokens 2048 --queries 64 --out bench/results/cpu/qwen2.5-coder-0.5b/key-noise
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from logquant_gguf import Llama, models
from logquant_gguf.bench import corpus

HD, NH, NKV, THETA, EPS, W, G = 64, 14, 2, 1e6, 1e-6, 32, 64
SCALE = 1.0 / np.sqrt(HD)


def full_set(n: int, w: int = W) -> np.ndarray:
    """Indices kept in f16 among n tokens fed one at a time (logquant-policy.h's rule), as
    (sparse, local) so the study can tell the log-spaced tokens from the recent ones."""
    local: list[int] = []
    sparse: list[int] = []
    for t in range(n):
        local.append(t)
        if len(local) > 2 * w:
            sparse = (sparse + local[:w])[::2] if sparse else local[:w]
            local = local[w:]
    return np.array(sparse, dtype=np.int64), np.array(local, dtype=np.int64)


def tiers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sparse, local, is_low) for n tokens: full_set's f16 tokens, and a mask of the 2-bit ones."""
    sparse, local = full_set(n)
    is_low = np.ones(n, bool)
    is_low[sparse] = False
    is_low[local] = False
    return sparse, local, is_low


def rope(v: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """NEOX RoPE (Qwen2) of v [..., n, heads, HD] at positions pos [n]."""
    ang = pos[:, None] * (THETA ** (-np.arange(0, HD, 2) / HD))[None, :]
    c, s = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
    a, b = v[..., : HD // 2], v[..., HD // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], -1)


def quant_minmax(x: np.ndarray, levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] -> (dequantized, error variance per group) with codes over [min, max]."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d = (hi - lo) / levels
    safe = np.where(d > 0, d, 1.0)
    y = np.clip(np.floor((x - lo) / safe + 0.5), 0, levels) * d + lo
    v = (d ** 2 / 12.0)[..., 0]
    return y, v, v


def keep_best(best, y, e, d):
    """Per group, the candidate (codes' values y, squared error e, step d) with the smaller error."""
    if best is None:
        return y, e, d[..., 0]
    better = e < best[1]
    return (np.where(better[..., None], y, best[0]), np.where(better, e, best[1]),
            np.where(better, d[..., 0], best[2]))


def quant_mse(x: np.ndarray, levels: int = 3, steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Codes over the [lo, hi] inside [min, max] with the least squared error, searched on a
    grid of shrinks lo = min + i r / (2 steps), hi = max - j r / (2 steps); error variance as
    measured."""
    lo0, hi0 = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    r = hi0 - lo0
    best = None
    for i in range(steps):
        for j in range(steps):
            lo = lo0 + r * (i / (2 * steps))
            hi = hi0 - r * (j / (2 * steps))
            d = (hi - lo) / levels
            safe = np.where(d > 0, d, 1.0)
            y = np.clip(np.floor((x - lo) / safe + 0.5), 0, levels) * d + lo
            best = keep_best(best, y, ((y - x) ** 2).sum(-1), d)
    return best[0], best[1] / x.shape[-1], best[2] ** 2 / 12.0


def lsq_rounds(x: np.ndarray, levels: int = 3, iters: int = 4):
    """Codes from [min, max], then a few rounds of: refit (d, m) to the codes by least squares,
    re-round (llama.cpp's k-quants search the same way). O(n) per round. Yields each round's
    (d, m, dequantized x, squared error per group)."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d, m = (hi - lo) / levels, lo
    n = x.shape[-1]
    for _ in range(iters + 1):
        safe = np.where(d > 0, d, 1.0)
        c = np.clip(np.floor((x - m) / safe + 0.5), 0, levels)
        y = c * d + m
        yield d, m, y, ((y - x) ** 2).sum(-1)
        sc, sx = c.sum(-1, keepdims=True), x.sum(-1, keepdims=True)
        scc, scx = (c * c).sum(-1, keepdims=True), (c * x).sum(-1, keepdims=True)
        den = n * scc - sc * sc
        ok = den > 0
        d = np.where(ok, (n * scx - sc * sx) / np.where(ok, den, 1.0), d)
        m = np.where(ok, (sx - d * sc) / n, m)


def quant_lsq(x: np.ndarray, levels: int = 3, iters: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lsq_rounds' best round: (dequantized, error variance per group, step^2 / 12)."""
    best = None
    for d, _m, y, e in lsq_rounds(x, levels, iters):
        best = keep_best(best, y, e, d)
    return best[0], best[1] / x.shape[-1], best[2] ** 2 / 12.0


def quantize_tier(kp: np.ndarray, idx: np.ndarray, method):
    """Pre-RoPE keys kp [N, NKV, HD]; 2-bit tokens idx (ascending) in groups of G. Returns the
    dequantized keys of those tokens and each token's per-channel error variance [len, NKV, HD],
    as measured and as the uniform model step^2 / 12 gives it."""
    out = np.empty((len(idx), NKV, HD), np.float32)
    var = np.empty((len(idx), NKV, HD), np.float32)
    var_step = np.empty((len(idx), NKV, HD), np.float32)
    for g0 in range(0, len(idx), G):
        sel = idx[g0:g0 + G]
        x = np.moveaxis(kp[sel], 0, -1)  # [NKV, HD, n]
        y, v, vs = method(x)
        out[g0:g0 + len(sel)] = np.moveaxis(y, -1, 0)
        var[g0:g0 + len(sel)] = v[None]
        var_step[g0:g0 + len(sel)] = vs[None]
    return out, var, var_step


def noise_variance(q: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Score noise variance per token for one query head: q [HD], var [n, HD] (one kv head)."""
    qp = (q[: HD // 2] ** 2 + q[HD // 2:] ** 2) / 2.0          # [HD/2]
    vp = var[:, : HD // 2] + var[:, HD // 2:]                   # [n, HD/2]
    return SCALE ** 2 * (vp @ qp)


def softmax(s: np.ndarray) -> np.ndarray:
    p = np.exp(s - s.max())
    return p / p.sum()


def kl(p: np.ndarray, pq: np.ndarray) -> float:
    return float((p * (np.log(p + 1e-30) - np.log(pq + 1e-30))).sum())


def attention_kl(q, k, coded_keys: dict, queries) -> dict:
    """{kl_<name>: KL(exact || tiered) of the attention, mean over queries and heads} for each
    coded_keys[name] (post-RoPE keys of every position, the 2-bit tier's coded): the 2-bit tokens
    of each query's own tiers read them, the others exact keys; values exact."""
    acc: dict[str, list[float]] = {}
    for i in queries:
        n = i + 1
        is_low = tiers(n)[2]
        for h in range(NH):
            g = h // (NH // NKV)
            p = softmax(k[:n, g] @ q[i, h] * SCALE)
            for name, full_k in coded_keys.items():
                kk = np.where(is_low[:, None], full_k[:n, g], k[:n, g])
                acc.setdefault(f"kl_{name}", []).append(kl(p, softmax(kk @ q[i, h] * SCALE)))
    return {name: float(np.mean(x)) for name, x in acc.items()}


def output_error(q, k, v, w_o, coded_values: dict, queries) -> dict:
    """{name: relative squared error of the attention output after W_o, mean over queries} for
    each coded_values[name] (values of every position, the 2-bit tier's coded); keys exact."""
    acc: dict[str, list[float]] = {}
    for i in queries:
        n = i + 1
        is_low = tiers(n)[2]
        o = np.empty((NH, HD), np.float32)
        oc = {name: np.empty((NH, HD), np.float32) for name in coded_values}
        for h in range(NH):
            g = h // (NH // NKV)
            p = softmax(k[:n, g] @ q[i, h] * SCALE)
            o[h] = p @ v[:n, g]
            for name, vc in coded_values.items():
                oc[name][h] = p @ np.where(is_low[:, None], vc[:n, g], v[:n, g])
        y = w_o @ o.reshape(-1)
        ref = float(y @ y)
        for name in coded_values:
            e = w_o @ (oc[name] - o).reshape(-1)
            acc.setdefault(name, []).append(float(e @ e) / ref)
    return {name: float(np.mean(x)) for name, x in acc.items()}


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The options every study takes: model, tokens of real code, last queries measured, output."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=64, help="last queries measured per layer")
    ap.add_argument("--out", type=Path, required=True)
    return ap


def layer_stats(q, k, kp, queries, methods) -> dict:
    """Per-layer means over queries x heads."""
    acc: dict[str, list[float]] = {}

    def add(name, v):
        acc.setdefault(name, []).append(float(v))

    n_last = queries[-1] + 1
    low_final = np.flatnonzero(tiers(n_last)[2])
    coded = {}
    for name, m in methods.items():
        kq, var, var_step = quantize_tier(kp, low_final, m)
        full_k = k[:n_last].copy()
        full_k[low_final] = rope(kq, low_final.astype(np.float64))
        full_var = np.zeros((2, n_last, NKV, HD), np.float32)
        full_var[0, low_final] = var
        full_var[1, low_final] = var_step
        coded[name] = (full_k, full_var)
    for i in queries:
        n = i + 1
        sp, lo, is_low = tiers(n)
        sink = np.zeros(n, bool)
        sink[0] = True
        logsp = np.zeros(n, bool)
        logsp[sp] = True
        logsp[0] = False
        recent = np.zeros(n, bool)
        recent[lo] = True
        for h in range(NH):
            g = h // (NH // NKV)
            s = k[:n, g] @ q[i, h] * SCALE
            p = softmax(s)
            for tier, msk in (("low", is_low), ("sink", sink), ("logsparse", logsp), ("recent", recent)):
                add(f"mass_{tier}_exact", p[msk].sum())
            for name, (full_k, full_var) in coded.items():
                kk = np.where(is_low[:, None], full_k[:n, g], k[:n, g])
                sq = kk @ q[i, h] * SCALE
                pq = softmax(sq)
                add(f"mass_low_{name}", pq[is_low].sum())
                add(f"mass_sink_{name}", pq[0])
                add(f"kl_{name}", kl(p, pq))
                for tag, fv in (("+bc", full_var[0]), ("+bc_step", full_var[1])):
                    sig2 = noise_variance(q[i, h], fv[:n, g])
                    pc = softmax(np.where(is_low, sq - sig2 / 2.0, sq))
                    add(f"mass_low_{name}{tag}", pc[is_low].sum())
                    add(f"kl_{name}{tag}", kl(p, pc))
                    if tag == "+bc":
                        add(f"sigma2_{name}", sig2[is_low].mean() if is_low.any() else 0.0)
    return {k_: float(np.mean(v)) for k_, v in acc.items()}


def forward_layers(model: str, n_tokens: int, values: bool = False):
    """The exact float32 forward of `model` over n_tokens of real code, layer by layer: yields
    (il, q, k, kp) (post-RoPE queries and keys, pre-RoPE keys of every position) before the layer's
    exact attention and FFN continue the residual stream; with values, (il, q, k, kp, v, w_o, b_v)
    (values of every position, the output projection, the value bias). The texts used are left in
    forward_layers.texts."""
    path = models.model_path(model)
    llm = Llama(str(path), n_ctx=256, verbose=False)
    ids, used = corpus.token_stream(lambda s: llm.tokenize(s.encode(), add_bos=False), "code", n_tokens)
    llm.close()
    forward_layers.texts = used
    r = GGUFReader(path)
    T = {t.name: t for t in r.tensors}

    def Wt(name):
        t = T[name]
        return dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape))).astype(np.float32)

    def rms(x, w):
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)) * w

    N = len(ids)
    x = Wt("token_embd.weight")[np.array(ids)]
    posN = np.arange(N, dtype=np.float64)
    mask = np.triu(np.full((N, N), -np.inf, dtype=np.float32), 1)
    n_layer = int(r.fields["qwen2.block_count"].parts[-1][0])
    for il in range(n_layer):
        pre = f"blk.{il}."
        h = rms(x, Wt(pre + "attn_norm.weight"))
        q = (h @ Wt(pre + "attn_q.weight").T + Wt(pre + "attn_q.bias")).reshape(N, NH, HD)
        kp = (h @ Wt(pre + "attn_k.weight").T + Wt(pre + "attn_k.bias")).reshape(N, NKV, HD)
        v = (h @ Wt(pre + "attn_v.weight").T + Wt(pre + "attn_v.bias")).reshape(N, NKV, HD)
        q, k = rope(q, posN), rope(kp, posN)
        if values:
            yield il, q, k, kp, v, Wt(pre + "attn_output.weight"), Wt(pre + "attn_v.bias")
        else:
            yield il, q, k, kp
        out = np.empty((N, NH, HD), dtype=np.float32)
        for hh in range(NH):
            g = hh // (NH // NKV)
            s = q[:, hh] @ k[:, g].T * SCALE + mask
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[:, hh] = p @ v[:, g]
        x = x + out.reshape(N, -1) @ Wt(pre + "attn_output.weight").T
        h2 = rms(x, Wt(pre + "ffn_norm.weight"))
        gt, up = h2 @ Wt(pre + "ffn_gate.weight").T, h2 @ Wt(pre + "ffn_up.weight").T
        x = x + ((gt / (1 + np.exp(-gt))) * up) @ Wt(pre + "ffn_down.weight").T


def main() -> None:
    a = study_parser(__doc__).parse_args()
    t0 = time.time()
    methods = {"minmax": quant_minmax, "mse": quant_mse, "lsq": quant_lsq}
    report = {"model": a.model, "tokens": a.tokens, "queries": a.queries, "window": W, "group": G, "layers": {}}
    for il, q, k, kp in forward_layers(a.model, a.tokens):
        N = q.shape[0]
        report["tokens"] = N
        report["layers"][il] = layer_stats(q, k, kp, list(range(N - a.queries, N)), methods)
        print(il, {kk: round(vv, 4) for kk, vv in report["layers"][il].items()}, f"{time.time() - t0:.0f}s",
              flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    report["texts"] = forward_layers.texts
    (a.out / "key_noise.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, a.out / "key_noise.md")


def write_markdown(rep: dict, path: Path) -> None:
    cols = ["mass_low_exact", "mass_low_minmax", "mass_low_minmax+bc", "mass_sink_exact", "mass_sink_minmax",
            "mass_logsparse_exact", "mass_recent_exact", "kl_minmax", "kl_minmax+bc", "kl_mse", "kl_mse+bc", "kl_mse+bc_step", "kl_lsq", "kl_lsq+bc_step"]
    lines = ["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for il, row in rep["layers"].items():
        lines.append(f"| {il} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    mean = {c: np.mean([row[c] for row in rep["layers"].values()]) for c in cols}
    lines.append("| mean | " + " | ".join(f"{mean[c]:.4f}" for c in cols) + " |")
    path.write_text(f"Qwen2.5-Coder-0.5B, {rep['tokens']} tokens of code, last {rep['queries']} queries, "
                    f"W = {rep['window']}, G = {rep['group']}; means over queries and heads.\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
