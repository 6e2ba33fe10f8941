"""bench quality: KL divergence, top-1 agreement and perplexity against the f16 cache, decoding.

A long real prompt is prefilled, then the text's own next tokens are fed one at a time (teacher
forcing) for a stretch of steps. Each step's full next-token distribution is compared with the
baseline (f16) run's at the same step. The baseline is run twice: the second run's KL is a
determinism check and must be exactly 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from . import corpus, report
from .core import BenchConfig, PartResult

NAME = "quality"
HELP = "KL divergence, top-1 agreement, perplexity vs the f16 cache (decode mode, teacher forcing)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prefilled context before the decode stretch (default 4096; --quick 512)")
    p.add_argument("--steps", type=int, default=None,
                   help="teacher-forced decode steps compared (default 256; --quick 64)")
    p.add_argument("--text", choices=corpus.KINDS, default="code", help="real text kind")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities (computed in float64; stored small: the baseline keeps one row
    per step, and both sides of a comparison get the same rounding, so equal logits give KL 0)."""
    x = logits.astype(np.float64)
    x -= x.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


def forced_logprobs(cfg: BenchConfig, kv_type: str, tokens: list[int], n_prompt: int,
                    steps: int, on_step) -> float:
    """Prefills tokens[:n_prompt], then for each of `steps` predictions calls
    on_step(i, logprobs) and feeds tokens[n_prompt + i]. Returns the seconds it took."""
    t0 = time.perf_counter()
    s = cfg.session(kv_type, n_prompt + steps + 16)
    try:
        s.prefill(tokens[:n_prompt])
        for i in tqdm(range(steps), desc=f"quality {kv_type}", unit="step", leave=False):
            on_step(i, log_softmax(s.logits()))
            if i + 1 < steps:
                s.step(tokens[n_prompt + i])
    finally:
        s.close()
    return time.perf_counter() - t0


def compare(ref: np.ndarray, logq: np.ndarray, target: int) -> tuple[float, bool, float]:
    """(KL(ref || q), same argmax, -log q(target)) for one step, from log-probabilities."""
    r, q = ref.astype(np.float64), logq.astype(np.float64)
    return float(np.sum(np.exp(r) * (r - q))), bool(r.argmax() == q.argmax()), float(-q[target])


def summarize(kl: list[float], top1: list[bool], nll: list[float]) -> dict:
    k = np.asarray(kl)
    return {"kl_mean": float(k.mean()), "kl_median": float(np.median(k)),
            "kl_p90": float(np.percentile(k, 90)), "kl_p99": float(np.percentile(k, 99)),
            "kl_max": float(k.max()), "top1_agreement": float(np.mean(top1)),
            "ppl": float(np.exp(np.mean(nll))), "steps": len(kl)}


def measure(cfg: BenchConfig, tokens: list[int], n_prompt: int, steps: int) -> dict:
    """Runs the baseline, keeps its log-probabilities, then every kv_type against them."""
    ref: list[np.ndarray] = []
    base_s = forced_logprobs(cfg, cfg.baseline, tokens, n_prompt, steps,
                             lambda i, lp: ref.append(lp))
    per_type: dict[str, dict] = {}
    for kv in cfg.kv_types:
        acc: dict[str, list] = {"kl": [], "top1": [], "nll": []}

        def on_step(i: int, lp: np.ndarray, acc: dict = acc) -> None:
            for key, value in zip(acc, compare(ref[i], lp, tokens[n_prompt + i])):
                acc[key].append(value)

        secs = forced_logprobs(cfg, kv, tokens, n_prompt, steps, on_step)
        per_type[kv] = {**summarize(acc["kl"], acc["top1"], acc["nll"]), "seconds": secs,
                        "per_step": acc}
    ref_nll = [float(-ref[i][tokens[n_prompt + i]]) for i in range(steps)]
    return {"per_type": per_type, "baseline_seconds": base_s,
            "baseline_ppl": float(np.exp(np.mean(ref_nll)))}


def _rolling(xs: list[float], w: int) -> list[float]:
    c = np.cumsum(np.insert(np.asarray(xs, dtype=np.float64), 0, 0.0))
    w = max(1, min(w, len(xs)))
    return list((c[w:] - c[:-w]) / w)


def _markdown(cfg: BenchConfig, res: dict, n_prompt: int, steps: int) -> str:
    base_ppl = res["baseline_ppl"]
    rows = [[kv, r["kl_mean"], r["kl_median"], r["kl_p99"], r["kl_max"],
             100 * r["top1_agreement"], r["ppl"], r["ppl"] / base_ppl]
            for kv, r in res["per_type"].items()]
    t = report.table(["kv_type", "KL mean", "KL median", "KL p99", "KL max", "top-1 agree %",
                      "PPL", f"PPL / {cfg.baseline}"], rows)
    return (f"Prompt {n_prompt} tokens (prefilled), then {steps} steps fed one token at a time; "
            f"each step's full distribution against the {cfg.baseline} cache's "
            f"(KL(base || kv_type), nats). PPL: of the text's own next tokens over the stretch. "
            f"The {cfg.baseline} row is a second {cfg.baseline} run: a determinism check.\n\n"
            f"{t}\n")


def _plots(cfg: BenchConfig, res: dict) -> list:
    out = cfg.out_dir
    others = {kv: r for kv, r in res["per_type"].items() if kv != cfg.baseline}
    w = min(16, min((r["steps"] for r in others.values()), default=1))
    series = {kv: (list(range(w, r["steps"] + 1)), _rolling(r["per_step"]["kl"], w))
              for kv, r in others.items() if r["kl_mean"] > 0}
    figs = [report.line_plot(out / "quality_kl_steps.png",
                             f"KL vs {cfg.baseline} per decode step ({w}-step mean), "
                             f"{cfg.model.slug}", series, "decode step", "KL (nats)", logy=True)
            if series else None,
            report.bar_plot(out / "quality_kl.png", f"mean KL vs {cfg.baseline}, {cfg.model.slug}",
                            list(others),
                            {"KL": [max(r["kl_mean"], 1e-9) for r in others.values()]},
                            "KL (nats)", logy=True) if others else None]
    return [f for f in figs if f]


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n_prompt = args.prompt_tokens or cfg.pick(512, 4096)
    steps = args.steps or cfg.pick(64, 256)
    tokens, texts = cfg.real_tokens(args.text, n_prompt + steps)
    res = measure(cfg, tokens, n_prompt, steps)
    return PartResult(settings={"prompt_tokens": n_prompt, "steps": steps, "text": args.text,
                                "first_step": "logits of the prefill's last token"},
                      results=res, markdown=_markdown(cfg, res, n_prompt, steps),
                      figures=_plots(cfg, res), texts=texts)
