"""bench capacity: for a KV memory budget, the longest context and the most parallel sequences.

Computed, then allocated: from the KV bytes measured by `bench memory` (its memory.json for this
model and device when present and covering the kv_types, otherwise measured here at a few sizes),
a line bytes_total = fixed + per_token * n_ctx is fitted per kv_type. Longest context =
(budget - fixed) / per_token. Parallel sequences of length L share one unified cache of S * L
cells, plus what each sequence costs on its own (the LogQuant f16 tier holds 3W tokens per
sequence), measured by allocating 1 and 8 sequences: S = (budget - fixed) / (per_token * L +
per_seq), at most llama.cpp's 256. Each longest context up to --verify-max, and each S x L, is
then allocated (a context with n_seq_max = S; every S x L, whatever its n_ctx: the allocation
is bounded by the budget) and checked against the budget with kv_stats(); an S that does not fit
is lowered until it does.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from . import memory, report
from .core import BenchConfig, PartResult, int_list

NAME = "capacity"
HELP = "longest context and most parallel sequences per KV budget (from measured bytes/token)"
MIB = 2**20
PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets-mib", type=int_list, default=[256, 1024],
                   help="KV memory budgets in MiB (default 256,1024)")
    p.add_argument("--seq-lens", type=int_list, default=[4096, 16384],
                   help="sequence lengths for the parallel-sequence count (default 4096,16384)")
    p.add_argument("--verify-max", type=int, default=None,
                   help="allocate and check predicted contexts up to this many tokens "
                        "(default 65536; --quick 8192; 0: no check)")


def _memory_rows(cfg: BenchConfig) -> tuple[list[dict], str]:
    """memory.json's rows when it matches this model and covers the kv_types, else fresh ones."""
    path = cfg.out_dir / "memory.json"
    if path.exists():
        doc = report.read_json(path)
        rows = doc["results"]["rows"]
        if (doc["model"]["sha256"] == cfg.model.info()["sha256"]
                and set(cfg.kv_types) <= {r["kv_type"] for r in rows}):
            return [r for r in rows if r["kv_type"] in cfg.kv_types], str(path)
    rows, _ = memory.measure(cfg, cfg.pick([1024, 4096], [1024, 4096, 16384]))
    return rows, "measured by this run"


MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ


def plan(budget: int, fixed: float, per_token: float, per_seq: float, seq_lens: list[int]) -> dict:
    longest = int((budget - fixed) // per_token) if budget > fixed else 0
    room = max(0.0, budget - fixed)
    return {"max_ctx": longest, "max_ctx_padded": longest // PAD * PAD,
            "parallel": {str(n): min(MAX_SEQ, int(room // (per_token * n + per_seq)))
                         for n in seq_lens}}


def allocated_bytes(cfg: BenchConfig, kv: str, n_ctx: int, n_seq: int = 1) -> tuple[int, int]:
    """(n_ctx, KV bytes) of a context of n_ctx cells for n_seq sequences, as allocated."""
    s = cfg.session(kv, n_ctx, n_seq_max=n_seq)
    try:
        st = s.kv_stats()
    finally:
        s.close()
    return st["n_ctx"], st["bytes_total"]


def verify(cfg: BenchConfig, kv: str, n_ctx: int, budget: int) -> dict:
    n, b = allocated_bytes(cfg, kv, n_ctx)
    return {"n_ctx": n, "bytes_total": b, "fits": b <= budget}


def per_seq_bytes(cfg: BenchConfig, kv: str, n_ctx: int = 16384) -> float:
    """What one more sequence costs beyond its tokens' cells (0 for llama.cpp's unified types).
    n_ctx large enough that 8 sequences' own parts are not capped by it (a sliding-window cache
    holds window x sequences + one ubatch cells, at most n_ctx)."""
    return (allocated_bytes(cfg, kv, n_ctx, 8)[1] - allocated_bytes(cfg, kv, n_ctx, 1)[1]) / 7


def verify_parallel(cfg: BenchConfig, kv: str, n_seq: int, seq_len: int, budget: int) -> dict:
    """Allocates n_seq sequences of seq_len; steps n_seq down (at most 4 times) until it fits."""
    for _ in range(4):
        if n_seq < 1:
            break
        _, b = allocated_bytes(cfg, kv, n_seq * seq_len, n_seq)
        if b <= budget:
            return {"n_seq": n_seq, "bytes_total": b, "fits": True}
        n_seq -= 1
    return {"n_seq": n_seq, "fits": False}


def _seqs_cell(computed: int, checked: dict | None) -> str:
    if checked is None:
        return f"{computed}" + (" (llama.cpp's limit)" if computed == MAX_SEQ else "")
    if not checked["fits"]:
        return f"{computed}, allocation OVER"
    n = checked["n_seq"]
    return f"{n} (allocated {checked['bytes_total'] / MIB:.0f} MiB)" + \
        (f", computed {computed}" if n != computed else "") + \
        (" (llama.cpp's limit)" if n == MAX_SEQ else "")


def _markdown(cfg: BenchConfig, res: dict, seq_lens: list[int]) -> str:
    rows = []
    for b, per in res["budgets"].items():
        base = per[cfg.baseline]["max_ctx"] or 1
        for kv, r in per.items():
            v = r.get("verified")
            par = r.get("parallel_verified", {})
            rows.append([f"{b} MiB", kv, r["max_ctx"], r["max_ctx"] / base,
                         *[_seqs_cell(r["parallel"][str(n)], par.get(str(n))) for n in seq_lens],
                         "-" if v is None else f"{v['bytes_total'] / MIB:.1f} MiB, "
                                               f"{'fits' if v['fits'] else 'OVER'}"])
    t = report.table(["budget", "kv_type", "longest context", f"vs {cfg.baseline}",
                      *[f"seqs x {n}" for n in seq_lens], "allocated at that n_ctx"], rows)
    fits = report.table(["kv_type", "fixed bytes", "bytes/token", "bytes/sequence"],
                        [[kv, f["fixed"], f["per_token"], f["per_seq"]]
                         for kv, f in res["fits"].items()])
    train = res["n_ctx_train"]
    return (f"Computed from measured KV bytes ({res['source']}): a line fitted per kv_type, "
            f"then budget / bytes per token. Contexts above the model's trained "
            f"{train} tokens fit in memory but are outside what the model was trained on. "
            f"Only the KV cache counts here: weights and compute buffers are extra.\n\n{t}\n\n"
            f"Parallel sequences share one unified cache of S x L cells; each also costs "
            f"bytes/sequence on its own (LogQuant's f16 tier: 3W tokens per sequence).\n\n"
            f"Fitted: bytes_total = fixed + bytes/token x n_ctx + bytes/sequence x S\n\n{fits}\n")


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    verify_max = args.verify_max if args.verify_max is not None else cfg.pick(8192, 65536)
    rows, source = _memory_rows(cfg)
    fits = {kv: dict(zip(("fixed", "per_token"), memory.fit(rows, kv))) for kv in cfg.kv_types}
    for kv in tqdm(cfg.kv_types, desc="bytes per sequence", unit="type"):
        fits[kv]["per_seq"] = per_seq_bytes(cfg, kv)
    budgets: dict = {}
    jobs = [(b, kv) for b in args.budgets_mib for kv in cfg.kv_types]
    for b, kv in tqdm(jobs, desc="capacity", unit="plan"):
        f = fits[kv]
        r = plan(b * MIB, f["fixed"], f["per_token"], f["per_seq"], args.seq_lens)
        if 0 < r["max_ctx_padded"] <= verify_max:
            r["verified"] = verify(cfg, kv, r["max_ctx_padded"], b * MIB)
        for n in args.seq_lens:
            n_seq = r["parallel"][str(n)]
            if n_seq > 0 and verify_max > 0:  # bounded by the budget, not by n_ctx
                r.setdefault("parallel_verified", {})[str(n)] = verify_parallel(cfg, kv, n_seq, n,
                                                                                b * MIB)
        budgets.setdefault(b, {})[kv] = r
    tok = cfg.tokenizer()
    n_ctx_train = tok.n_ctx_train
    tok.close()
    res = {"source": source, "fits": fits, "budgets": budgets, "n_ctx_train": n_ctx_train}
    figs = [report.bar_plot(cfg.out_dir / "capacity.png",
                            f"longest context per KV budget, {cfg.model.slug}",
                            [f"{b} MiB" for b in budgets],
                            {kv: [budgets[b][kv]["max_ctx"] for b in budgets]
                             for kv in cfg.kv_types}, "tokens", logy=True)]
    return PartResult(settings={"budgets_mib": args.budgets_mib, "seq_lens": args.seq_lens,
                                "verify_max": verify_max, "memory_rows": rows},
                      results=res, markdown=_markdown(cfg, res, args.seq_lens),
                      figures=[f for f in figs if f])
