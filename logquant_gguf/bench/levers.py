"""bench levers: what LogQuant's precision levers buy, in quality per bit.

The levers are the code bits of the low-bit tier: keys and values of 2 (LogQuant's format), 4 or 8
bits, for every layer or per layer (a sensitive first layer at 8 bits). Each variant is measured
the way `bench quality` measures a kv_type (a long real prompt, then teacher-forced decode steps,
KL against the f16 cache), and placed on a chart of KL against its storage in bits per value
(of the low-bit tier, scales included, averaged over layers), beside llama.cpp's own types.

Variants are named kv_type+modifiers: +k4 (4-bit keys), +v4, +k4v4, +L0:8:8 (layer 0 with 8-bit
keys and values); see logquant_gguf.kv_types.parse_variant.
"""

from __future__ import annotations

import argparse
import dataclasses

from . import quality, report
from .core import BenchConfig, PartResult
from .env import select_kv_types

NAME = "levers"
HELP = "KL vs bits per value for LogQuant's precision levers (key/value bits, per-layer bits)"

DEFAULT_VARIANTS = ("q8_0,q4_0,q2_window,logquant,logquant+L0:8:8,logquant+k4,logquant+k4+L0:8:8,"
                    "logquant+k4v4,logquant+k8v8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated kv_types and lever variants, measured against f16 "
                        "(default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prefilled context before the decode stretch (default 4096; --quick 512)")
    p.add_argument("--steps", type=int, default=None,
                   help="teacher-forced decode steps compared (default 256; --quick 64)")
    p.add_argument("--text", choices=quality.corpus.KINDS, default="code", help="real text kind")


def bits_per_value(cfg: BenchConfig, variant: str) -> float:
    """Storage per K or V value as the cache accounts it (LogQuant: of the low-bit tier)."""
    s = cfg.session(variant, 256)
    try:
        return float(s.kv_stats()["bits_per_value"])
    finally:
        s.close()


def _markdown(res: dict, n_prompt: int, steps: int) -> str:
    rows = [[v, r["bits_per_value"], r["kl_mean"], r["kl_median"], r["kl_p99"], 100 * r["top1_agreement"],
             r["ppl"] / res["baseline_ppl"]] for v, r in res["per_type"].items()]
    t = report.table(["variant", "bits/value", "KL mean", "KL median", "KL p99", "top-1 agree %",
                      "PPL / f16"], rows)
    return (f"Prompt {n_prompt} tokens, then {steps} teacher-forced decode steps, KL(f16 || variant) "
            f"per step (nats). bits/value: storage per K or V value, scales included (LogQuant "
            f"variants: of the low-bit tier, averaged over layers; the fixed f16 tier of 3W tokens "
            f"is not in it). The f16 row is a second f16 run (determinism check).\n\n{t}\n")


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n_prompt = args.prompt_tokens or cfg.pick(512, 4096)
    steps = args.steps or cfg.pick(64, 256)
    variants = select_kv_types(args.variants)
    sub = dataclasses.replace(cfg, kv_types=["f16"] + [v for v in variants if v != "f16"])
    tokens, texts = sub.real_tokens(args.text, n_prompt + steps)
    res = quality.measure(sub, tokens, n_prompt, steps)
    for v, r in res["per_type"].items():
        r["bits_per_value"] = bits_per_value(sub, v)
    others = {v: (r["bits_per_value"], max(r["kl_mean"], 1e-9))
              for v, r in res["per_type"].items() if v != "f16"}
    fig = report.scatter_plot(cfg.out_dir / "levers.png",
                              f"KL vs f16 against storage, {cfg.model.slug}", others,
                              "bits per value (low-bit tier)", "mean KL (nats)", logy=True)
    return PartResult(settings={"prompt_tokens": n_prompt, "steps": steps, "text": args.text,
                                "variants": variants},
                      results=res, markdown=_markdown(res, n_prompt, steps),
                      figures=[f for f in (fig,) if f], texts=texts)
