"""bench speed: prefill and decode tokens/s at several context depths, per KV type.

Every kv_type gets its own context, all alive at once, so the measurements can interleave: at
each depth, each repetition times every kv_type in turn (the order rotates), so slow drifts of a
shared machine hit all types alike. A context is filled to the depth with real text (the fill is
timed once, as information), then each repetition times a prefill of --pp tokens followed by --tg
decode steps, appended: no rollback, since LogQuant caches cannot drop positions, so repetition r
starts at depth + r * (pp + tg) (each row records where). Quoted: medians over repetitions, and
ratios to the baseline taken within each repetition, then medianed.
Optionally llama.cpp's own llama-bench of our build as a cross-check (--llama-bench).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from tqdm import tqdm

from . import env, report
from .core import BenchConfig, PartResult, int_list
from .session import Session, timed

NAME = "speed"
HELP = "prefill and decode tokens/s at depths 0, 4k, 16k (32k with --full), interleaved"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--depths", type=int_list, default=None,
                   help="context depths (default 0,4096,16384; --full adds 32768; --quick 0,1024)")
    p.add_argument("--pp", type=int, default=None, help="prefill tokens timed (default 512)")
    p.add_argument("--tg", type=int, default=None, help="decode steps timed (default 32)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default %(default)s)")
    p.add_argument("--llama-bench", type=int_list, default=None, metavar="DEPTHS",
                   help="also run our build's llama-bench (-fa 1, same pp/tg/reps) at these "
                        "depths, e.g. 0 (it refills the depth on every repetition)")


def _time_here(s: Session, tokens: list[int], pp: int, tg: int) -> dict:
    """One repetition where the cache ends now: a prefill of pp tokens, then tg decode steps."""
    at = s.n_past
    t_pp = timed(s.prefill, tokens[at:at + pp])
    t_tg = timed(lambda: [s.step(t) for t in tokens[at + pp:at + pp + tg]])
    return {"start": at, "pp_s": t_pp, "tg_s": t_tg, "pp_tps": pp / t_pp, "tg_tps": tg / t_tg}


def tokens_needed(depths: list[int], pp: int, tg: int, reps: int) -> int:
    """The deepest depth, plus every repetition and one warm-up appended after it."""
    return max(depths) + (reps + 1) * (pp + tg)


def _rotated(xs: list[str], k: int) -> list[str]:
    k %= len(xs)
    return xs[k:] + xs[:k]


def measure(cfg: BenchConfig, tokens: list[int], depths: list[int], pp: int, tg: int,
            reps: int) -> list[dict]:
    """Raw rows: one per (depth, rep, kv_type), plus one fill row per (depth, kv_type)."""
    n_ctx = tokens_needed(depths, pp, tg, reps) + 16
    sessions = {kv: cfg.session(kv, n_ctx) for kv in cfg.kv_types}
    rows: list[dict] = []
    bar = tqdm(total=len(depths) * len(sessions) * (reps + 1), desc="speed", unit="run")
    try:
        for depth in depths:
            for kv, s in sessions.items():
                fill = tokens[s.n_past:depth]
                secs = timed(s.prefill, fill)
                rows.append({"depth": depth, "kv_type": kv, "rep": None, "fill_tokens": len(fill),
                             "fill_s": secs})
                if depth == depths[0]:
                    _time_here(s, tokens, min(pp, 64), min(tg, 4))  # warm-up, discarded
                bar.update()
            for rep in range(reps):
                for kv in _rotated(cfg.kv_types, rep):
                    bar.set_postfix(depth=depth, kv=kv)
                    rows.append({"depth": depth, "kv_type": kv, "rep": rep,
                                 **_time_here(sessions[kv], tokens, pp, tg)})
                    bar.update()
    finally:
        bar.close()
        for s in sessions.values():
            s.close()
    return rows


def summarize(cfg: BenchConfig, rows: list[dict]) -> dict:
    """{depth: {kv_type: medians of tps and of same-rep ratios to the baseline}}."""
    timed_rows = [r for r in rows if r["rep"] is not None]
    by = {(r["depth"], r["rep"], r["kv_type"]): r for r in timed_rows}
    out: dict = defaultdict(dict)
    for depth in sorted({r["depth"] for r in timed_rows}):
        reps = sorted({r["rep"] for r in timed_rows if r["depth"] == depth})
        for kv in cfg.kv_types:
            mine = [by[depth, rep, kv] for rep in reps]
            base = [by[depth, rep, cfg.baseline] for rep in reps]
            out[depth][kv] = {
                "pp_tps": report.median(r["pp_tps"] for r in mine),
                "tg_tps": report.median(r["tg_tps"] for r in mine),
                "pp_vs_base": report.median(m["pp_tps"] / b["pp_tps"] for m, b in zip(mine, base)),
                "tg_vs_base": report.median(m["tg_tps"] / b["tg_tps"] for m, b in zip(mine, base)),
                "reps": len(mine),
            }
    return dict(out)


def llama_bench(cfg: BenchConfig, depths: list[int], pp: int, tg: int, reps: int) -> dict:
    """Our build's llama-bench per kv_type (-fa 1); its JSON, or the error it gave."""
    exe = env.tool_path("llama-bench")
    if exe is None:
        return {"skipped": "llama-bench is not in this build's bin/"}
    out: dict = {}
    for kv in tqdm(cfg.kv_types, desc="llama-bench", unit="type"):
        info = env.kv_type_info([kv])[kv]
        cmd = [str(exe), "-m", str(cfg.model.path), "-p", str(pp), "-n", str(tg),
               "-d", ",".join(map(str, depths)), "-ctk", info["type_k"], "-ctv", info["type_v"],
               "-fa", "1", "-t", str(cfg.threads), "-r", str(reps), "-o", "json",
               "-ngl", "0" if cfg.device == "cpu" else "99"]
        p = env.run_tool(cmd, env.tool_env(kv))
        entry: dict = {"command": cmd, "returncode": p.returncode, "env": env.tool_env(kv)}
        if p.returncode == 0:
            entry["results"] = [{k: r.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts",
                                                       "stddev_ts", "samples_ts", "type_k",
                                                       "type_v")}
                                for r in json.loads(p.stdout)]
        else:
            entry["stderr_tail"] = p.stderr[-2000:]
        out[kv] = entry
    return out


def _markdown(cfg: BenchConfig, summary: dict, pp: int, tg: int, reps: int, lb: dict | None) -> str:
    rows = [[d, kv, s["pp_tps"], s["pp_vs_base"], s["tg_tps"], s["tg_vs_base"]]
            for d, per in summary.items() for kv, s in per.items()]
    t = report.table(["depth", "kv_type", f"prefill t/s (pp{pp})", f"vs {cfg.baseline}",
                      f"decode t/s (tg{tg})", f"vs {cfg.baseline}"], rows)
    md = (f"Medians of {reps} interleaved repetitions; ratios taken within each repetition, "
          f"then medianed. {cfg.threads} threads. Each repetition appends its pp + tg tokens, "
          f"so repetition r runs at depth + r x {pp + tg}.\n\n{t}\n")
    if lb and "skipped" not in lb:
        lrows = [[kv, r["n_depth"], "pp" if r["n_prompt"] else "tg", r["n_prompt"] or r["n_gen"],
                  r["avg_ts"], r["stddev_ts"]]
                 for kv, e in lb.items() for r in e.get("results", [])]
        failed = [kv for kv, e in lb.items() if e["returncode"] != 0]
        lt = report.table(["kv_type", "depth", "test", "tokens", "t/s", "stddev"], lrows)
        md += f"\n## llama-bench (our build), cross-check\n\n{lt}\n"
        if failed:
            md += f"\nllama-bench refused: {', '.join(failed)} (see the JSON for its message).\n"
    return md


def _plots(cfg: BenchConfig, summary: dict) -> list:
    depths = list(summary)
    figs = [report.line_plot(cfg.out_dir / f"speed_{key}.png",
                             f"{label} tokens/s vs depth, {cfg.model.slug}",
                             {kv: (depths, [summary[d][kv][f"{key}_tps"] for d in depths])
                              for kv in cfg.kv_types}, "context depth (tokens)", "tokens/s")
            for key, label in (("pp", "prefill"), ("tg", "decode"))]
    return [f for f in figs if f]


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    depths = args.depths or cfg.pick([0, 1024], [0, 4096, 16384], [0, 4096, 16384, 32768])
    pp = args.pp or cfg.pick(128, 512)
    tg = args.tg or cfg.pick(16, 32)
    gap = (args.reps + 1) * (pp + tg)  # what one depth's repetitions (and warm-up) append
    if sorted(depths) != depths or any(b - a < gap for a, b in zip(depths, depths[1:])):
        raise ValueError(f"--depths must increase by at least (reps + 1) x (pp + tg) = {gap}")
    tokens, texts = cfg.real_tokens("code", tokens_needed(depths, pp, tg, args.reps))
    rows = measure(cfg, tokens, depths, pp, tg, args.reps)
    summary = summarize(cfg, rows)
    lb = llama_bench(cfg, args.llama_bench, pp, tg, args.reps) if args.llama_bench else None
    return PartResult(
        settings={"depths": depths, "pp": pp, "tg": tg, "reps": args.reps,
                  "order": "interleaved, rotated per repetition",
                  "rollback": "none: repetition r starts at depth + r * (pp + tg)",
                  "decode": "one token per llama_decode, teacher-forced from the text"},
        results={"rows": rows, "summary": summary, "llama_bench": lb},
        markdown=_markdown(cfg, summary, pp, tg, args.reps, lb),
        figures=_plots(cfg, summary), texts=texts)
