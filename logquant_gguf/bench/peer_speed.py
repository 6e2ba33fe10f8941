"""Speed of our build beside a peer build (bench peers --speed-depths): both builds' llama-bench.

Each (build, cache type) runs llama.cpp's own `llama-bench` (-fa 1, the same model, threads,
prompt and decode lengths, -d DEPTH), one repetition per call, and the calls are interleaved:
repetition r runs every (build, type) once, in an order rotated by r, so slow drifts of a shared
machine hit all of them alike. Quoted: medians over repetitions of prefill and decode tokens/s,
and each type's ratio to its own build's f16 taken within each repetition, then medianed (each
build against its own f16, as in the quality table). The peer's llama-bench is the one next to
its llama-perplexity; a type its CPU path cannot run shows the tool's error instead of numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import env, report

BASE = "f16"


def _call(exe: Path, model: Path, kv_k: str, kv_v: str, depth: int, pp: int, tg: int, threads: int,
          extra_env: dict[str, str]) -> dict:
    cmd = [str(exe), "-m", str(model), "-p", str(pp), "-n", str(tg), "-d", str(depth),
           "-ctk", kv_k, "-ctv", kv_v, "-fa", "1", "-t", str(threads), "-r", "1", "-o", "json", "-ngl", "0"]
    p = env.run_tool(cmd, extra_env)
    out: dict = {"command": cmd, "env": extra_env, "returncode": p.returncode}
    if p.returncode != 0:
        out["error"] = (p.stderr or p.stdout)[-1500:]
        return out
    try:
        rows = json.loads(p.stdout)
    except json.JSONDecodeError:
        out["returncode"] = -1
        out["error"] = "llama-bench printed no JSON: " + p.stdout[-500:]
        return out
    for r in rows:
        key = "pp_tps" if r.get("n_prompt") else "tg_tps"
        out[key] = r.get("avg_ts")
    return out


def entries(ours_types: list[str], peer_types: list[str], peer_env: dict[str, str],
            peer_variants: list[dict[str, str]]) -> list[dict]:
    """Every (build, label, K type, V type, env) llama-bench runs: each build's f16 first."""
    out = []
    for kv in [BASE] + [t for t in ours_types if t != BASE]:
        info = env.kv_type_info([kv])[kv]
        out.append({"build": "ours", "label": kv, "ctk": info["type_k"], "ctv": info["type_v"],
                    "env": env.tool_env(kv)})
    out.append({"build": "peer", "label": BASE, "ctk": "f16", "ctv": "f16", "env": dict(peer_env)})
    for t in peer_types:
        for variant in [{}, *peer_variants]:
            label = " ".join([t, *(f"{k}={v}" for k, v in variant.items())])
            out.append({"build": "peer", "label": label, "ctk": t, "ctv": t, "env": {**peer_env, **variant}})
    return out


def measure(model: Path, our_exe: Path, peer_exe: Path, runs: list[dict], depths: list[int], pp: int,
            tg: int, reps: int, threads: int) -> list[dict]:
    """Rows {build, label, depth, rep, pp_tps, tg_tps | error}, interleaved as the module says."""
    rows = []
    for depth in depths:
        for r in range(reps):
            k = r % len(runs)
            for e in runs[k:] + runs[:k]:
                exe = our_exe if e["build"] == "ours" else peer_exe
                print(f"bench peers: speed {e['build']} {e['label']} depth {depth} rep {r + 1}/{reps}",
                      file=sys.stderr)
                got = _call(exe, model, e["ctk"], e["ctv"], depth, pp, tg, threads, e["env"])
                rows.append({"build": e["build"], "label": e["label"], "depth": depth, "rep": r, **got})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (depth, build, label): median tokens/s and median same-repetition ratio to that
    build's f16; failed runs give their error instead."""
    out = []
    keys = []
    for row in rows:
        key = (row["depth"], row["build"], row["label"])
        if key not in keys:
            keys.append(key)
    for depth, build, label in keys:
        mine = [x for x in rows if (x["depth"], x["build"], x["label"]) == (depth, build, label)]
        ok = [x for x in mine if x["returncode"] == 0]
        s: dict = {"depth": depth, "build": build, "label": label, "reps": len(ok)}
        if not ok:
            s["error"] = mine[0].get("error", "")[-300:]
            out.append(s)
            continue
        base = {x["rep"]: x for x in rows if (x["depth"], x["build"], x["label"]) == (depth, build, BASE)
                and x["returncode"] == 0}
        for m in ("pp_tps", "tg_tps"):
            s[m] = report.median(x[m] for x in ok)
            ratios = [x[m] / base[x["rep"]][m] for x in ok if x["rep"] in base and base[x["rep"]].get(m)]
            s[m.replace("_tps", "_vs_f16")] = report.median(ratios) if ratios else None
        out.append(s)
    return out


def markdown(summary: list[dict], pp: int, tg: int, reps: int, threads: int) -> str:
    lines = [f"Both builds' `llama-bench` (-fa 1, -p {pp} -n {tg}, {threads} threads, -d DEPTH), one "
             f"repetition per call, {reps} repetitions interleaved (order rotated each time); medians, "
             "and ratios to the same build's f16 within each repetition, then medianed.", "",
             f"| depth | build | kv type | prefill t/s (pp{pp}) | vs own f16 | decode t/s (tg{tg}) | vs own f16 |",
             "|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.3g}"
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['depth']} | {s['build']} | {s['label']} | failed: "
                         f"{s['error'].strip().splitlines()[-1][:80] if s['error'].strip() else '?'} | | | |")
        else:
            lines.append(f"| {s['depth']} | {s['build']} | {s['label']} | {f(s['pp_tps'])} | {f(s['pp_vs_f16'])} "
                         f"| {f(s['tg_tps'])} | {f(s['tg_vs_f16'])} |")
    return "\n".join(lines) + "\n"
