"""bench completion: greedy continuations of real code prompts, compared with the f16 cache's.

Prompts are Python standard library modules cut right after a `def ...:` line found past
--prompt-tokens worth of text (so the model writes a function body), keeping the last
--prompt-tokens tokens; one per module first, then (for more prompts than modules) further cuts,
each past another --prompt-tokens worth of text. Per kv_type: the share of generated tokens
identical (position by position) to the baseline's, the common prefix, and exact match of the
first generated line with the baseline's and with the line the real source has there.
"""

from __future__ import annotations

import argparse

from . import corpus, report
from .core import BenchConfig, PartResult

NAME = "completion"
HELP = "greedy code completion: tokens identical to f16 and first-line exact match"
CHARS_PER_TOKEN = 3  # where to start looking for a cut; the prompt is then cut in tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=None, help="number of prompts (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length in tokens (default 1024; --quick 256)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="greedy tokens per prompt (default 48; --quick 16)")


def cut_after_def(text: str, start: int) -> tuple[str, str] | None:
    """(text up to and including the first one-line `def ...:` at or after char `start`,
    the source's next non-blank line), or None when there is no such def."""
    lines = text.splitlines(keepends=True)
    pos = 0
    for i, line in enumerate(lines):
        if pos >= start and line.lstrip().startswith("def ") and line.rstrip().endswith(":"):
            truth = next((x for x in lines[i + 1:] if x.strip()), "")
            return "".join(lines[:i + 1]), truth.rstrip("\n")
        pos += len(line)
    return None


def make_prompts(cfg: BenchConfig, n: int, n_tokens: int) -> tuple[list[dict], list[dict]]:
    """Up to n prompts, and the documents' records: in round 0 each code document is cut after
    its first def past a prompt's worth of text (the prompts of earlier runs); each later round
    cuts every document again a prompt's worth of text past its previous cut."""
    tok = cfg.tokenizer()
    prompts, texts = [], []
    docs = list(corpus.documents("code"))
    step = n_tokens * CHARS_PER_TOKEN
    start = {str(d.path): step for d in docs}  # where each document's next cut is looked for
    try:
        for k in range(1 << 16):
            n_before = len(prompts)
            for doc in docs:
                if len(prompts) == n:
                    break
                cut = cut_after_def(doc.text, start[str(doc.path)])
                if cut is None:
                    continue
                start[str(doc.path)] = len(cut[0]) + step
                tokens = tok.tokenize(cut[0])[-n_tokens:]
                prompts.append({"file": str(doc.path), "tokens": tok.bos + tokens,
                                "truth_line": cut[1]})
                if k == 0:
                    texts.append(doc.record())
            if len(prompts) in (n, n_before):  # enough, or no document has more
                break
    finally:
        tok.close()
    return prompts, texts


def first_line(text: str) -> str:
    return text.lstrip("\n").split("\n", 1)[0]


def compare(ref: list[int], cand: list[int]) -> dict:
    same = sum(a == b for a, b in zip(ref, cand))
    prefix = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b),
                  min(len(ref), len(cand)))
    return {"token_match": same / max(len(ref), 1), "common_prefix": prefix}


def measure(cfg: BenchConfig, prompts: list[dict], gen: int) -> dict:
    """{kv_type: [per-prompt rows]}: generated tokens and text, compared with the baseline."""
    n_ctx = max(len(p["tokens"]) for p in prompts) + gen + 16

    def row(s, _i, p):
        toks = s.greedy(p["tokens"], gen)
        return {"file": p["file"], "tokens": toks, "text": s.detokenize(toks)}

    outputs = cfg.rows_per_type(n_ctx, prompts, row, "completion", "prompt")
    for rows in outputs.values():
        for row, ref, p in zip(rows, outputs[cfg.baseline], prompts):
            row.update(compare(ref["tokens"], row["tokens"]))
            row["first_line_vs_base"] = first_line(row["text"]) == first_line(ref["text"])
            row["first_line_vs_source"] = first_line(row["text"]).strip() == p["truth_line"].strip()
    return outputs


def summarize(outputs: dict) -> dict:
    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {kv: {k: mean([r[k] for r in rows]) for k in
                 ("token_match", "common_prefix", "first_line_vs_base", "first_line_vs_source")}
            for kv, rows in outputs.items()}


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n_prompt_tokens = args.prompt_tokens or cfg.pick(256, 1024)
    gen = args.gen_tokens or cfg.pick(16, 48)
    prompts, texts = make_prompts(cfg, args.prompts or cfg.pick(3, 8), n_prompt_tokens)
    if not prompts:
        raise RuntimeError("no code prompt could be cut from this machine's standard library")
    outputs = measure(cfg, prompts, gen)
    summary = summarize(outputs)
    t = report.table(["kv_type", f"tokens = {cfg.baseline} %", "common prefix (tokens)",
                      f"first line = {cfg.baseline} %", "first line = source %"],
                     [[kv, 100 * s["token_match"], s["common_prefix"],
                       100 * s["first_line_vs_base"], 100 * s["first_line_vs_source"]]
                      for kv, s in summary.items()])
    md = (f"{len(prompts)} prompts of {n_prompt_tokens} tokens (stdlib modules cut after a "
          f"`def` line), {gen} greedy tokens each.\n\n{t}\n")
    figs = [report.bar_plot(cfg.out_dir / "completion.png",
                            f"greedy code completion vs {cfg.baseline}, {cfg.model.slug}",
                            list(summary),
                            {f"tokens = {cfg.baseline} %": [100 * s["token_match"]
                                                            for s in summary.values()],
                             f"first line = {cfg.baseline} %": [100 * s["first_line_vs_base"]
                                                                for s in summary.values()]},
                            "%")]
    return PartResult(settings={"prompts": len(prompts), "prompt_tokens": n_prompt_tokens,
                                "gen_tokens": gen,
                                "truth_lines": [p["truth_line"] for p in prompts]},
                      results={"per_prompt": outputs, "summary": summary}, markdown=md,
                      figures=[f for f in figs if f], texts=texts)
