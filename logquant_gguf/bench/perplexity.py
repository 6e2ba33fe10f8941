"""bench perplexity: llama.cpp's own llama-perplexity KL divergence, for comparison upstream.

Our build's `llama-perplexity` saves the baseline's (f16 cache) log-probabilities with
--kl-divergence-base, then runs each kv_type with -ctk/-ctv, flash attention on and
--kl-divergence against them. This is llama.cpp's batch (prefill) evaluation over chunks of -c
tokens, scored on each chunk's second half: the figures upstream quotes, unlike `bench quality`,
which compares decode steps. The text is real (corpus.py) and written to a temporary file.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from tqdm import tqdm

from . import corpus, env, report
from .core import BenchConfig, PartResult

NAME = "perplexity"
HELP = "llama-perplexity --kl-divergence of our build per kv_type (prefill, upstream-comparable)"

# "Mean    KLD:   0.012345 ±   0.000123", "Same top p: 97.123 ± 0.456 %", "99.0%   KLD:   0.1"
_STAT_RE = re.compile(r"^([A-Za-z0-9.%()/\- ]+?)\s*:\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)"
                      r"(?:\s*±\s*([0-9.]+(?:[eE][-+]?[0-9]+)?))?", re.MULTILINE)
_FINAL_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
WANTED = ("Mean PPL(Q)", "Mean PPL(base)", "Mean PPL(Q)/PPL(base)", "Mean    KLD", "Maximum KLD",
          "99.9%   KLD", "99.0%   KLD", "Median  KLD", "Same top p", "Mean    Δp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="chunks scored (default 8; --quick 2)")
    p.add_argument("--text", choices=corpus.KINDS, default="code", help="real text kind")


def _norm(label: str) -> str:
    return " ".join(label.split())


def parse_stats(output: str) -> dict:
    """The summary lines llama-perplexity prints, as {label: value} (and "label unc")."""
    wanted = {_norm(w) for w in WANTED}
    stats: dict = {}
    for m in _STAT_RE.finditer(output):
        key = _norm(m.group(1))
        if key in wanted:
            stats[key] = float(m.group(2))
            if m.group(3):
                stats[key + " unc"] = float(m.group(3))
    final = _FINAL_PPL_RE.search(output)
    if final:
        stats["Final PPL"] = float(final.group(1))
    return stats


def _command(cfg: BenchConfig, exe: Path, kv: str, text: Path, base: Path, ctx: int,
             chunks: int, score: bool) -> list[str]:
    info = env.kv_type_info([kv])[kv]
    cmd = [str(exe), "-m", str(cfg.model.path), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(cfg.threads), "-fa", "on",
           "-ctk", info["type_k"], "-ctv", info["type_v"],
           "-ngl", "0" if cfg.device == "cpu" else "99", "--kl-divergence-base", str(base)]
    return cmd + (["--kl-divergence"] if score else ["-f", str(text)])


def _run(cmd: list[str], expect: str, extra_env: dict[str, str], tries: int = 8) -> dict:
    """Runs the tool until its output has `expect`. The pinned llama.cpp's logger is an
    asynchronous queue that is not drained at exit (upstream issue 22142): the summary, printed
    last, is lost in a good share of runs (exit status 0). "attempts" records how many it took."""
    for attempt in range(1, tries + 1):
        p = env.run_tool(cmd, extra_env)
        out = p.stdout + p.stderr
        entry = {"command": cmd, "returncode": p.returncode, "stats": parse_stats(out),
                 "attempts": attempt}
        if p.returncode != 0 or expect in entry["stats"]:
            break
    if p.returncode != 0 or expect not in entry["stats"]:
        entry["output_tail"] = out[-3000:]
    return entry


def measure(cfg: BenchConfig, exe: Path, text: str, ctx: int, chunks: int) -> dict:
    """The baseline pass (saving log-probs), then every kv_type scored against it."""
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="lq-bench-ppl-") as tmp:
        text_file, base = Path(tmp) / "text.txt", Path(tmp) / "base.kld"
        text_file.write_text(text, encoding="utf-8")
        runs["_base"] = _run(_command(cfg, exe, cfg.baseline, text_file, base, ctx, chunks,
                                      False), "Final PPL", env.tool_env(cfg.baseline))
        for kv in tqdm(cfg.kv_types, desc="llama-perplexity", unit="type"):
            runs[kv] = _run(_command(cfg, exe, kv, text_file, base, ctx, chunks, True), "Mean KLD",
                            env.tool_env(kv))
    return runs


def _markdown(cfg: BenchConfig, runs: dict, ctx: int, chunks: int) -> str:
    def g(kv: str, key: str):
        return runs[kv]["stats"].get(key)

    def status(r: dict) -> str:
        return "ok" if r["returncode"] == 0 else "FAILED"

    rows = [[kv, g(kv, "Mean KLD"), g(kv, "99.0% KLD"), g(kv, "Same top p"), g(kv, "Mean PPL(Q)"),
             g(kv, "Mean PPL(Q)/PPL(base)"), status(r)]
            for kv, r in runs.items() if kv != "_base"]
    t = report.table(["kv_type", "KLD mean", "KLD p99", "same top p %", "PPL", "PPL ratio",
                      "run"], rows)
    return (f"`llama-perplexity` of our build, -c {ctx}, {chunks} chunks, -fa on, "
            f"{cfg.threads} threads; baseline {cfg.baseline} cache "
            f"(PPL {runs['_base']['stats'].get('Final PPL')}). Prefill (batch) evaluation, "
            f"scored on the second half of each chunk.\n\n{t}\n")


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    exe = env.tool_path("llama-perplexity")
    chunks = args.chunks or cfg.pick(2, 8)
    settings = {"ctx": args.ctx, "chunks": chunks, "text": args.text}
    if exe is None:
        return PartResult(settings, {"skipped": "llama-perplexity is not in this build's bin/"},
                          "Skipped: this build has no `llama-perplexity`.\n")
    need = args.ctx * chunks + args.ctx
    tok = cfg.tokenizer()
    try:
        tokens, texts = corpus.token_stream(tok.tokenize, args.text, need)
        text = tok.detokenize(tokens)
    finally:
        tok.close()
    runs = measure(cfg, exe, text, args.ctx, chunks)
    return PartResult(settings, {"runs": runs}, _markdown(cfg, runs, args.ctx, chunks),
                      texts=texts)
