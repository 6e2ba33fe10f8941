"""bench passkey: a number hidden at several depths in real filler text; is it retrieved?

The filler is real prose (license texts, see corpus.py), cut to the wanted length in tokens. The
same keys, lengths and depths are used for every kv_type; the answer is greedy, and a trial counts
as retrieved when the key's digits appear in the first --answer-tokens generated tokens.
"""

from __future__ import annotations

import argparse
import random

from tqdm import tqdm

from . import corpus, report
from .core import BenchConfig, PartResult, int_list

NAME = "passkey"
HELP = "passkey retrieval at 2k..16k tokens, several depths, greedy, accuracy per kv_type"

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=int_list, default=None,
                   help="total prompt lengths in tokens (default 2048,4096,8192,16384; "
                        "--quick 1024,2048)")
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="needle positions as fractions of the filler (default 0.1,0.5,0.9; "
                        "--quick 0.5)")
    p.add_argument("--answer-tokens", type=int, default=10, help="greedy tokens generated")
    p.add_argument("--seed", type=int, default=1234, help="seed of the keys")


def build_prompt(tok, filler: list[int], length: int, depth: float, key: int) -> list[int]:
    """BOS + intro + filler with the needle at `depth` + question, `length` tokens in all."""
    head, needle, tail = (tok.bos + tok.tokenize(INTRO), tok.tokenize(NEEDLE.format(key=key)),
                          tok.tokenize(QUESTION))
    n_fill = length - len(head) - len(needle) - len(tail)
    if n_fill <= 0:
        raise ValueError(f"passkey length {length} is too short for the prompt's fixed parts")
    if n_fill > len(filler):
        raise ValueError(f"only {len(filler)} filler tokens for a {length}-token prompt")
    at = int(n_fill * depth)
    return head + filler[:at] + needle + filler[at:n_fill] + tail


def trials(lengths: list[int], depths: list[float], seed: int) -> list[dict]:
    """Every (length, depth) with its key; the same list for every kv_type."""
    rng = random.Random(seed)
    return [{"length": n, "depth": d, "key": rng.randint(10000, 99999)}
            for n in lengths for d in depths]


def make_prompts(cfg: BenchConfig, todo: list[dict]) -> tuple[list[list[int]], list[dict]]:
    """One prompt per trial, and the filler documents used."""
    tok = cfg.tokenizer()
    try:
        filler, texts = corpus.token_stream(tok.tokenize, "prose", max(t["length"] for t in todo))
        return [build_prompt(tok, filler, t["length"], t["depth"], t["key"]) for t in todo], texts
    finally:
        tok.close()


def measure(cfg: BenchConfig, todo: list[dict], prompts: list[list[int]],
            answer_tokens: int) -> list[dict]:
    """One row per (kv_type, trial): the greedy answer and whether it holds the key."""
    rows: list[dict] = []
    n_ctx = max(len(p) for p in prompts) + answer_tokens + 16
    bar = tqdm(total=len(todo) * len(cfg.kv_types), desc="passkey", unit="trial")
    for kv in cfg.kv_types:
        s = cfg.session(kv, n_ctx)
        try:
            for t, prompt in zip(todo, prompts):
                answer = s.detokenize(s.greedy(prompt, answer_tokens))
                rows.append({**t, "kv_type": kv, "prompt_tokens": len(prompt), "answer": answer,
                             "retrieved": str(t["key"]) in answer})
                bar.update()
        finally:
            s.close()
    bar.close()
    return rows


def summarize(cfg: BenchConfig, rows: list[dict]) -> dict:
    out: dict = {}
    for kv in cfg.kv_types:
        mine = [r for r in rows if r["kv_type"] == kv]
        by_len = {}
        for n in sorted({r["length"] for r in mine}):
            sel = [r["retrieved"] for r in mine if r["length"] == n]
            by_len[str(n)] = sum(sel) / len(sel)
        out[kv] = {"accuracy": sum(r["retrieved"] for r in mine) / len(mine), "by_length": by_len}
    return out


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    lengths = args.lengths or cfg.pick([1024, 2048], [2048, 4096, 8192, 16384])
    depths = args.depths or cfg.pick([0.5], [0.1, 0.5, 0.9])
    todo = trials(lengths, depths, args.seed)
    prompts, texts = make_prompts(cfg, todo)
    rows = measure(cfg, todo, prompts, args.answer_tokens)
    summary = summarize(cfg, rows)
    t = report.table(["kv_type", "accuracy %", *[f"{n} tokens %" for n in lengths]],
                     [[kv, 100 * s["accuracy"], *[100 * s["by_length"][str(n)] for n in lengths]]
                      for kv, s in summary.items()])
    md = (f"{len(todo)} trials per kv_type: lengths {lengths}, needle depths {depths}; "
          f"greedy, {args.answer_tokens} tokens; retrieved = the key's digits in the answer.\n\n"
          f"{t}\n")
    figs = [report.line_plot(cfg.out_dir / "passkey.png", f"passkey retrieval, {cfg.model.slug}",
                             {kv: (lengths, [100 * s["by_length"][str(n)] for n in lengths])
                              for kv, s in summary.items()},
                             "prompt length (tokens)", "retrieved (%)", logx=True)]
    return PartResult(settings={"lengths": lengths, "depths": depths,
                                "answer_tokens": args.answer_tokens, "seed": args.seed,
                                "intro": INTRO, "needle": NEEDLE, "question": QUESTION},
                      results={"rows": rows, "summary": summary}, markdown=md,
                      figures=[f for f in figs if f], texts=texts)
