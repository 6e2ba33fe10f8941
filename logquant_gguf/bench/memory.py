"""bench memory: KV bytes per token and in total, per KV type and context length.

Three figures for every (kv_type, n_ctx): what our C API reports (`kv_stats()`, from llama.cpp's
own buffer sizes), what llama.cpp's log line "llama_kv_cache: size = ... MiB" says, and the theory
2 * layers * kv_heads * head_dim * bits / 8 from the model's metadata and the type's bits/value.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from . import report
from .core import BenchConfig, PartResult, int_list

NAME = "memory"
HELP = "KV bytes per token and total KV bytes at 1k..32k context, per kv_type"
MIB = 2**20
# the log prints MiB with 2 decimals, once per cache (two caches for iSWA models)
LOG_TOLERANCE_PER_CACHE = 0.006 * MIB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx-sizes", type=int_list, default=None,
                   help="context lengths (default 1024,...,32768; --quick 1024,2048,4096)")
    p.add_argument("--n-ubatch", type=int, default=None,
                   help="llama.cpp's ubatch (and batch) size, default 512 as llama-cpp-python's: a "
                        "LogQuant cache keeps f16 room for one ubatch")


def kv_geometry(metadata: Mapping[str, str]) -> dict:
    """layers, kv heads and key/value head sizes from GGUF metadata (llama.cpp's key names)."""
    arch = metadata["general.architecture"]

    def get(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise KeyError(f"{arch}.{key} missing from the model metadata")
            return default
        return int(value)

    n_head = get("attention.head_count")
    head_dim = get("embedding_length") // n_head
    return {"layers": get("block_count"), "kv_heads": get("attention.head_count_kv", n_head),
            "k_len": get("attention.key_length", head_dim),
            "v_len": get("attention.value_length", head_dim)}


def theory_bytes_per_token(geom: Mapping[str, int], bits_per_value: float) -> float:
    """layers * kv_heads * (k_len + v_len) * bits / 8 (the 2 * head_dim of the usual formula)."""
    return geom["layers"] * geom["kv_heads"] * (geom["k_len"] + geom["v_len"]) * bits_per_value / 8


def measure(cfg: BenchConfig, ctx_sizes: list[int], n_ubatch: int | None = None) -> tuple[list[dict], dict]:
    """One context per (n_ctx, kv_type), log captured; returns rows and the model geometry."""
    rows: list[dict] = []
    geom: dict = {}
    jobs = [(n, kv) for n in ctx_sizes for kv in cfg.kv_types]
    batch = {"n_batch": n_ubatch} if n_ubatch else {}
    for n_ctx, kv in tqdm(jobs, desc="memory", unit="ctx"):
        s = cfg.session(kv, n_ctx, capture_log=True, **batch)
        try:
            geom = geom or kv_geometry(s.llm.metadata)
            st = s.kv_stats()
            log_sizes = s.log_kv_sizes()
        finally:
            s.close()
        theory = theory_bytes_per_token(geom, st["bits_per_value"]) * st["n_ctx"]
        log_bytes = sum(log_sizes) if log_sizes else None
        rows.append({
            "kv_type": kv, "n_ctx_requested": n_ctx, "n_ctx": st["n_ctx"],
            "bytes_total": st["bytes_total"], "bytes_per_token": st["bytes_per_token"],
            "log_bytes": log_bytes, "theory_bytes": theory,
            "log_agrees": log_bytes is not None
            and abs(log_bytes - st["bytes_total"]) <= LOG_TOLERANCE_PER_CACHE * len(log_sizes),
            "theory_ratio": st["bytes_total"] / theory if theory else None,
            "bits_per_value_measured": st["bytes_per_token"] * 8 / (
                geom["layers"] * geom["kv_heads"] * (geom["k_len"] + geom["v_len"])),
            "tiers": st.get("tiers", {}),
            "bits_per_value_declared": st["bits_per_value"],
        })
    return rows, geom


def fit(rows: list[dict], kv: str) -> tuple[float, float]:
    """(fixed bytes, marginal bytes per token) of bytes_total against n_ctx, least squares: a
    cache with a fixed-size part (e.g. a full-precision tier) is not bytes_total / n_ctx."""
    pts = [(r["n_ctx"], r["bytes_total"]) for r in rows if r["kv_type"] == kv]
    if len(pts) == 1:
        return 0.0, pts[0][1] / pts[0][0]
    slope, intercept = np.polyfit(*zip(*pts), 1)
    return float(round(intercept)), round(float(slope), 6)  # no 1727.9999999 bytes/token


def _summary(cfg: BenchConfig, rows: list[dict], geom: dict) -> dict:
    """Per kv_type at the largest context: bytes/token, bits/value, ratio to the baseline; and
    the fitted fixed bytes and marginal bytes/token over all contexts."""
    largest = max(r["n_ctx_requested"] for r in rows)
    at = {r["kv_type"]: r for r in rows if r["n_ctx_requested"] == largest}
    base = at[cfg.baseline]["bytes_per_token"]
    values_per_token = geom["layers"] * geom["kv_heads"] * (geom["k_len"] + geom["v_len"])
    out = {}
    for kv, r in at.items():
        fixed, marginal = fit(rows, kv)
        mine = [x for x in rows if x["kv_type"] == kv]
        out[kv] = {"n_ctx": r["n_ctx"], "bytes_per_token": r["bytes_per_token"],
                   "bits_per_value_measured": r["bits_per_value_measured"],
                   "bits_per_value_declared": r["bits_per_value_declared"],
                   "fixed_bytes": fixed, "marginal_bytes_per_token": marginal,
                   "marginal_bits_per_value": marginal * 8 / values_per_token,
                   "vs_baseline": r["bytes_per_token"] / base,
                   "all_log_agree": all(x["log_agrees"] for x in mine),
                   "max_theory_deviation": max(abs(x["theory_ratio"] - 1) for x in mine)}
    return out


def _markdown(cfg: BenchConfig, rows: list[dict], summary: dict, ctx_sizes: list[int], n_ubatch: int) -> str:
    t1 = report.table(
        ["kv_type", "bytes/token", "bits/value (measured)", "bits/value (declared)",
         f"vs {cfg.baseline}", "fixed MiB (fit)", "marginal bits/value (fit)", "log agrees",
         "max |kv_stats/theory - 1|"],
        [[kv, s["bytes_per_token"], s["bits_per_value_measured"], s["bits_per_value_declared"],
          s["vs_baseline"], s["fixed_bytes"] / MIB, s["marginal_bits_per_value"],
          s["all_log_agree"], s["max_theory_deviation"]]
         for kv, s in summary.items()])
    by = {(r["kv_type"], r["n_ctx_requested"]): r for r in rows}
    t2 = report.table(["n_ctx", *[f"{kv} MiB" for kv in cfg.kv_types]],
                      [[n, *[by[kv, n]["bytes_total"] / MIB for kv in cfg.kv_types]]
                       for n in ctx_sizes])
    return ("Bytes from `Llama.kv_stats()` (llama.cpp's buffer sizes through our C API), "
            "checked against llama.cpp's log line and against layers x kv_heads x (k+v) x bits/8. "
            "bytes/token = bytes_total / n_ctx at the largest context; fixed and marginal: a line "
            "fitted over all contexts (a fixed-size f16 tier shows up as fixed bytes). "
            f"n_ubatch {n_ubatch}."
            f"\n\n## Per token (n_ctx {max(ctx_sizes)})\n\n{t1}\n\n## Total KV cache\n\n{t2}\n")


def _plots(cfg: BenchConfig, rows: list[dict], summary: dict, ctx_sizes: list[int]) -> list:
    out = cfg.out_dir
    series = {kv: (ctx_sizes, [r["bytes_total"] / MIB for n in ctx_sizes for r in rows
                               if r["kv_type"] == kv and r["n_ctx_requested"] == n])
              for kv in cfg.kv_types}
    figs = [report.line_plot(out / "memory_total.png", f"KV cache size, {cfg.model.slug}", series,
                             "context length (tokens)", "KV cache (MiB)", logx=True, logy=True),
            report.bar_plot(out / "memory_per_token.png", f"KV bytes per token, {cfg.model.slug}",
                            list(summary), {"bytes/token": [s["bytes_per_token"]
                                                            for s in summary.values()]},
                            "bytes per token")]
    return [f for f in figs if f]


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    ctx_sizes = args.ctx_sizes or cfg.pick([1024, 2048, 4096],
                                           [1024, 2048, 4096, 8192, 16384, 32768])
    n_ubatch = args.n_ubatch or 512  # Session's default, llama-cpp-python's
    rows, geom = measure(cfg, ctx_sizes, n_ubatch)
    summary = _summary(cfg, rows, geom)
    return PartResult(
        settings={"ctx_sizes": ctx_sizes, "geometry": geom, "n_ubatch": n_ubatch},
        results={"rows": rows, "summary": summary},
        markdown=_markdown(cfg, rows, summary, ctx_sizes, n_ubatch),
        figures=_plots(cfg, rows, summary, ctx_sizes),
    )
