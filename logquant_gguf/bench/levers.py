"""bench levers: what LogQuant's precision levers buy, in quality per bit.

The levers are the code bits of the low-bit tier: keys and values of 2 (LogQuant's format), 4 or 8
bits, for every layer or per layer (a sensitive first layer at 8 bits). Each variant is measured
the way `bench quality` measures a kv_type (a long real prompt, then teacher-forced decode steps,
KL against the f16 cache), and placed on a chart of KL against its storage in bits per value
(of the low-bit tier, scales included, averaged over layers), beside llama.cpp's own types; and
on a second chart against all its bytes at a long context (`--bytes-ctx`, 32k by default): the
cos/sin table, the f16 tier and llama.cpp's room for one ubatch included, as `bench memory`
counts them. The issue's aims are stated in the second.

Variants are named kv_type+modifiers: +k4 (4-bit keys), +v4, +k4v4, +L0:8:8 (layer 0 with 8-bit
keys and values); see logquant_gguf.kv_types.parse_variant.
"""

from __future__ import annotations

import argparse
import dataclasses

from . import memory, quality, report
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
    p.add_argument("--bytes-ctx", type=int, default=None,
                   help="context at which all of each variant's KV bytes are counted, as bits per "
                        "value (default 32768; --quick 4096; 0: not counted)")


def bits_per_value(cfg: BenchConfig, variant: str) -> float:
    """Storage per K or V value as the cache accounts it (LogQuant: of the low-bit tier)."""
    s = cfg.session(variant, 256)
    try:
        return float(s.kv_stats()["bits_per_value"])
    finally:
        s.close()


def all_bytes_bits(cfg: BenchConfig, variant: str, n_ctx: int) -> float:
    """Every byte of the variant's KV cache at n_ctx (kv_stats: llama.cpp's buffers), per K or V
    value of n_ctx tokens: the tier's bits plus the cos/sin table, the f16 tier and the ubatch room."""
    s = cfg.session(variant, n_ctx)
    try:
        geom = memory.kv_geometry(s.llm.metadata)
        st = s.kv_stats()
    finally:
        s.close()
    values = st["n_ctx"] * geom["layers"] * geom["kv_heads"] * (geom["k_len"] + geom["v_len"])
    return st["bytes_total"] * 8 / values


def short_label(variant: str) -> str:
    """A variant's name for a chart: a run of per-layer settings of one kind as a count
    (logquant+k3+L8:3:4+L9:3:4 -> logquant+k3+2xL:3:4)."""
    parts = variant.split("+")
    head = [x for x in parts if not x.startswith("L") or x == "Lauto"]
    layers = [x.split(":", 1)[1] for x in parts if x.startswith("L") and x != "Lauto" and ":" in x]
    if not layers:
        return variant
    kinds = sorted(set(layers))
    return "+".join(head + [f"{layers.count(k)}xL:{k}" for k in kinds])


def _markdown(res: dict, n_prompt: int, steps: int, bytes_ctx: int) -> str:
    per = res["per_type"]
    all_col = [f"all bytes at {bytes_ctx // 1024}k"] if bytes_ctx else []
    rows = [[v, r["bits_per_value"], *([r["bits_all_bytes"]] if bytes_ctx else []), r["kl_mean"],
             r["kl_median"], r["kl_p99"], 100 * r["top1_agreement"], r["ppl"] / res["baseline_ppl"]]
            for v, r in per.items()]
    t = report.table(["variant", "bits/value", *all_col, "KL mean", "KL median", "KL p99", "top-1 agree %",
                      "PPL / f16"], rows)
    all_text = (f" all bytes at {bytes_ctx // 1024}k: every byte of the variant's KV cache in a context of "
                f"{bytes_ctx} tokens (the cos/sin table, the f16 tier and the room for one ubatch "
                f"included) per K or V value of those tokens.") if bytes_ctx else ""
    return (f"Prompt {n_prompt} tokens, then {steps} teacher-forced decode steps, KL(f16 || variant) "
            f"per step (nats). bits/value: storage per K or V value, scales included (LogQuant "
            f"variants: of the low-bit tier, averaged over layers; the fixed f16 tier of 3W tokens "
            f"is not in it).{all_text} The f16 row is a second f16 run (determinism check).\n\n{t}\n")


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n_prompt = args.prompt_tokens or cfg.pick(512, 4096)
    steps = args.steps or cfg.pick(64, 256)
    variants = select_kv_types(args.variants)
    sub = dataclasses.replace(cfg, kv_types=["f16"] + [v for v in variants if v != "f16"])
    tokens, texts = sub.real_tokens(args.text, n_prompt + steps)
    res = quality.measure(sub, tokens, n_prompt, steps)
    bytes_ctx = cfg.pick(4096, 32768) if args.bytes_ctx is None else args.bytes_ctx
    for v, r in res["per_type"].items():
        r["bits_per_value"] = bits_per_value(sub, v)
        if bytes_ctx:
            r["bits_all_bytes"] = all_bytes_bits(sub, v, bytes_ctx)
    shown = {v: r for v, r in res["per_type"].items() if v != "f16"}

    def points(bits_key: str) -> dict:
        return {short_label(v): (r[bits_key], max(r["kl_mean"], 1e-9)) for v, r in shown.items()}

    figs = [report.scatter_plot(cfg.out_dir / "levers.png", f"KL vs f16 against storage, {cfg.model.slug}",
                                points("bits_per_value"), "bits per value (low-bit tier)", "mean KL (nats)",
                                logy=True)]
    if bytes_ctx:
        figs.append(report.scatter_plot(
            cfg.out_dir / "levers_all_bytes.png",
            f"KL vs f16 against all KV bytes at {bytes_ctx // 1024}k, {cfg.model.slug}",
            points("bits_all_bytes"), f"bits per value, all bytes at {bytes_ctx} tokens", "mean KL (nats)",
            logy=True))
    return PartResult(settings={"prompt_tokens": n_prompt, "steps": steps, "text": args.text,
                                "variants": variants, "bytes_ctx": bytes_ctx},
                      results=res, markdown=_markdown(res, n_prompt, steps, bytes_ctx),
                      figures=[f for f in figs if f], texts=texts)
