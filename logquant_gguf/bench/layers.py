"""bench layers: which layers to give wider key codes, measured on the model at hand.

Key bits are the lever that buys most quality (docs/levers.md), and some layers' keys may matter
more than others'. For each LogQuant layer in turn, that layer alone gets the wider codes (by
default 4-bit keys, 2-bit values) and the cache is measured the way `bench quality` measures a
kv_type (a real prompt, then teacher-forced decode steps, KL against the f16 cache). A layer's
gain is the base cache's mean KL minus that run's. The layers ranked by gain give the recipes:
the n best layers at the wider codes, for a few n, each with its bits per value and the
`logquant_layer_bits` / `--layer-bits` text to use it; the recipes are then measured whole
(gains do not simply add up). One layer's gain can be smaller than the run's noise (on Qwen it
is: docs/levers.md); the recipes' own figures are what to go by.

    logquant-gguf bench layers --model qwen2.5-coder-0.5b --prompt-tokens 2048 --steps 128
"""

from __future__ import annotations

import argparse
import dataclasses

from . import quality, report
from .core import BenchConfig, PartResult
from .levers import bits_per_value

NAME = "layers"
HELP = "per-layer gain from wider key codes, and the best layers to give them for a bit budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="logquant", help="the cache every layer starts from (default: %(default)s)")
    p.add_argument("--codes", default="4:2", metavar="K:V",
                   help="key:value code bits of the layer under test (default: %(default)s)")
    p.add_argument("--counts", default=None,
                   help="comma-separated numbers of best layers to measure as recipes "
                        "(default: a quarter, a third and half of the LogQuant layers)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prefilled context before the decode stretch (default 2048; --quick 512)")
    p.add_argument("--steps", type=int, default=None,
                   help="teacher-forced decode steps compared (default 128; --quick 32)")
    p.add_argument("--text", choices=quality.corpus.KINDS, default="code", help="real text kind")


def recipe(layers: list[int], codes: str) -> str:
    """The layer_bits text (LOGQUANT_LAYER_BITS / --layer-bits) for these layers."""
    return ",".join(f"{il}:{codes}" for il in sorted(layers))


def variant(base: str, layers: list[int], codes: str) -> str:
    return base + "".join(f"+L{il}:{codes}" for il in sorted(layers))


def logquant_layers(cfg: BenchConfig, base: str, base_bits: float, codes: str, n_layer: int) -> list[int]:
    """The layers the cache holds in its low-bit tier: those whose override changes the base's
    bits per value (Gemma's sliding-window layers stay f16 and ignore one)."""
    return [il for il in range(n_layer) if bits_per_value(cfg, variant(base, [il], codes)) != base_bits]


def _counts(text: str | None, n: int) -> list[int]:
    if text:
        return sorted({int(c) for c in text.split(",") if 0 < int(c) <= n})
    return sorted({max(1, n // 4), max(1, n // 3), max(1, n // 2)})


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n_prompt = args.prompt_tokens or cfg.pick(512, 2048)
    steps = args.steps or cfg.pick(32, 128)
    codes = args.codes
    k, _, v = codes.partition(":")
    if not (k.isdigit() and v.isdigit()):
        raise ValueError(f"--codes must be K:V code bits, e.g. 4:2, got {codes!r}")
    probe = cfg.session("f16", 64)
    n_layer = probe.llm.n_layer()
    probe.close()
    base_bits = bits_per_value(cfg, args.base)
    layers = logquant_layers(cfg, args.base, base_bits, codes, n_layer)
    if not layers:
        raise ValueError(f"{args.base}: no layer of this model is in a LogQuant low-bit tier")

    one = {il: variant(args.base, [il], codes) for il in layers}
    sub = dataclasses.replace(cfg, kv_types=["f16", args.base, *one.values()])
    tokens, texts = sub.real_tokens(args.text, n_prompt + steps)
    res = quality.measure(sub, tokens, n_prompt, steps)
    base_kl = res["per_type"][args.base]["kl_mean"]
    gains = {il: base_kl - res["per_type"][one[il]]["kl_mean"] for il in layers}
    ranked = sorted(layers, key=lambda il: -gains[il])

    recipes = {}
    for n in _counts(args.counts, len(layers)):
        recipes[n] = {"layers": sorted(ranked[:n]), "layer_bits": recipe(ranked[:n], codes),
                      "variant": variant(args.base, ranked[:n], codes)}
    whole = dataclasses.replace(cfg, kv_types=["f16", *(r["variant"] for r in recipes.values())])
    res_whole = quality.measure(whole, tokens, n_prompt, steps)
    for r in recipes.values():
        got = res_whole["per_type"][r["variant"]]
        r.update(kl_mean=got["kl_mean"], kl_median=got["kl_median"], top1_agreement=got["top1_agreement"],
                 bits_per_value=bits_per_value(cfg, r["variant"]))

    rows = [[il, res["per_type"][one[il]]["kl_mean"], gains[il], ranked.index(il) + 1] for il in layers]
    t1 = report.table(["layer", f"KL with {codes} there", "gain", "rank"], rows)
    t2 = report.table(["best layers", "bits/value", "KL mean", "KL median", "top-1 %", "layer_bits"],
                      [[n, r["bits_per_value"], r["kl_mean"], r["kl_median"], 100 * r["top1_agreement"],
                        f"`{r['layer_bits']}`"] for n, r in recipes.items()])
    md = (f"Prompt {n_prompt} tokens, then {steps} teacher-forced decode steps, KL(f16 || cache) per "
          f"step. Base `{args.base}`: KL mean {report.fmt(base_kl)}, "
          f"{report.fmt(base_bits)} bits/value (low-bit tier). One layer at a "
          f"time with {codes} codes:\n\n{t1}\n\n"
          f"The best layers together (use with `logquant_layer_bits` or `--layer-bits`):\n\n{t2}\n")
    fig = report.bar_plot(cfg.out_dir / "layers.png", f"KL gain from {codes} codes per layer, {cfg.model.slug}",
                          [str(il) for il in layers], {"gain": [gains[il] for il in layers]},
                          "mean KL gain (nats)")
    return PartResult(settings={"prompt_tokens": n_prompt, "steps": steps, "text": args.text, "base": args.base,
                                "base_bits_per_value": base_bits, "codes": codes, "layers": layers},
                      results={"per_layer": res, "gains": {str(il): g for il, g in gains.items()},
                               "ranked": ranked, "recipes": {str(n): r for n, r in recipes.items()},
                               "recipes_measured": res_whole},
                      markdown=md, figures=[f for f in (fig,) if f], texts=texts)
