"""bench chat: replies to open-ended chat messages, and how soon each kv_type falls into a loop.

Issue 14 saw open-ended chats fall into repetition much sooner with the 2-bit cache than with f16
or q8_0. Each message (a fixed set of open-ended requests, one turn under the model's chat
template) gets a greedy reply of up to --gen-tokens (or, with --temperature, a sampled one: every
kv_type draws the same random numbers for a request, so replies part only where logits do). Per
reply:

- whether it ends stuck in a verbatim loop: cut by the token limit, its last tokens a unit of at
  most LOOP_MAX_PERIOD tokens repeated, at least LOOP_MIN_TOKENS tokens of repeats after the first
  unit; and where the loop starts (the tokens before it: the reply's length when it has none);
- the share of its 4-grams that are distinct;
- the tokens equal (position by position) to the baseline's reply, and the common prefix.
"""

from __future__ import annotations

import argparse
import statistics

from ..chat_format import chat_tokens, has_chat_template
from . import report
from .completion import compare
from .core import BenchConfig, PartResult

NAME = "chat"
HELP = "open-ended chat replies: how soon each kv_type falls into a verbatim loop"
LOOP_MAX_PERIOD = 128
LOOP_MIN_TOKENS = 32

MESSAGES = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works, as if to a new programmer.",
    "What are some good habits for keeping a codebase maintainable over many years?",
    "Describe a walk through a city market early in the morning.",
    "Give me a plan for learning to play the guitar in six months.",
    "Why do leaves change colour in autumn? Explain in detail.",
    "Write a letter from a retired engineer to a student who wants to build bridges.",
    "Compare trains and planes for travelling across a continent.",
    "Tell me about the history of the printing press and why it mattered.",
    "Write a product description for a solar-powered backpack.",
    "What should someone consider before adopting a dog?",
    "Explain the difference between processes and threads, with examples.",
    "Describe how bread is made, from the field to the table.",
    "Write a dialogue between two robots who disagree about art.",
    "What are the pros and cons of working from home?",
    "Tell a fable about a fox, a crow and a river, and explain its moral.",
    "Describe the life cycle of a star, from cloud to remnant.",
    "Write a short speech for the opening of a small town library.",
    "How does a refrigerator keep food cold? Explain step by step.",
    "Write a story about a child who builds a raft and sails down a river.",
    "What makes a good teacher? Give examples.",
    "Explain recursion to someone who has never programmed.",
    "Describe a thunderstorm over the sea as seen from a ship.",
    "Plan a three-day trip to the mountains for a family with two children.",
    "Write a review of an imaginary restaurant that serves only soup.",
    "Why is sleep important? Discuss the body and the mind.",
    "Write a conversation between a gardener and a bee.",
    "Explain how the internet delivers a web page, from click to screen.",
    "Tell me about the invention of the bicycle and how it changed cities.",
    "Write instructions for building a simple bookshelf.",
    "Describe the perfect autumn afternoon.",
    "What are the most important skills for a software engineer, and why?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=None,
                   help=f"number of messages, at most {len(MESSAGES)} (default all; --quick 2)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="tokens per reply at most (default 512; --quick 48)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy replies (default); else sampled as llama-cpp-python samples by default "
                        "(top-k 40, top-p 0.95, min-p 0.05), every kv_type with the same seed per request")
    p.add_argument("--chat-format", default=None,
                   help="a llama-cpp-python chat format name (chatml, gemma, llama-2, ...) for a model "
                        "whose GGUF has no chat template (default: the GGUF's template; none: refused)")


def loop_onset(tokens: list[int]) -> int | None:
    """Where the verbatim loop the tokens end in starts (the first token of its first unit), or
    None: for each period p the longest suffix with t[j] == t[j - p] is a unit repeated; it counts
    when at least LOOP_MIN_TOKENS tokens follow the first unit. The earliest start over p."""
    n, best = len(tokens), None
    for p in range(1, min(LOOP_MAX_PERIOD, n // 2) + 1):
        s = n
        while s - 1 >= p and tokens[s - 1] == tokens[s - 1 - p]:
            s -= 1
        if n - s >= max(p, LOOP_MIN_TOKENS):
            best = s - p if best is None else min(best, s - p)
    return best


def distinct_4grams(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def measure(cfg: BenchConfig, n_prompts: int, gen: int, chat_format: str | None = None,
            temperature: float = 0.0) -> tuple[dict, list[int]]:
    """({kv_type: [per-reply rows]}, prompt lengths in tokens)."""
    messages = list(MESSAGES[:n_prompts])
    tok = cfg.tokenizer()
    try:
        if chat_format is None and not has_chat_template(tok.llm):
            raise ValueError(f"{cfg.model.slug} has no chat template in its GGUF (a base model?): bench "
                             "chat needs a chat model, or --chat-format NAME for the prompt format it was "
                             "tuned on")
        prompts = [chat_tokens(tok.llm, [{"role": "user", "content": m}], chat_format) for m in messages]
    finally:
        tok.close()
    n_ctx = max(len(p) for p in prompts) + gen + 16

    def row(s, i, prompt):
        toks = s.generate(prompt, gen, temperature=temperature, seed=i)
        stopped = len(toks) < gen or s.is_eog(toks[-1])
        onset = None if stopped else loop_onset(toks)
        return {"message": messages[i], "tokens": toks, "text": s.detokenize(toks), "stopped": stopped,
                "loop_onset": onset, "before_loop": len(toks) if onset is None else onset,
                "distinct_4grams": distinct_4grams(toks)}

    outputs = cfg.rows_per_type(n_ctx, prompts, row, "chat", "reply")
    for rows in outputs.values():
        for row, ref in zip(rows, outputs[cfg.baseline]):
            row.update(compare(ref["tokens"], row["tokens"]))
    return outputs, [len(p) for p in prompts]


def summarize(outputs: dict) -> dict:
    return {kv: {"looping": sum(r["loop_onset"] is not None for r in rows) / len(rows),
                 "before_loop_median": statistics.median(r["before_loop"] for r in rows),
                 "distinct_4grams": statistics.mean(r["distinct_4grams"] for r in rows),
                 "token_match": statistics.mean(r["token_match"] for r in rows),
                 "common_prefix": statistics.mean(r["common_prefix"] for r in rows)}
            for kv, rows in outputs.items()}


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    n = min(args.prompts or cfg.pick(2, len(MESSAGES)), len(MESSAGES))
    gen = args.gen_tokens or cfg.pick(48, 512)
    outputs, prompt_lens = measure(cfg, n, gen, args.chat_format, args.temperature)
    summary = summarize(outputs)
    t = report.table(["kv_type", "replies stuck in a loop %", "tokens before a loop (median)",
                      "distinct 4-grams %", f"tokens = {cfg.baseline} %", "common prefix (tokens)"],
                     [[kv, 100 * s["looping"], s["before_loop_median"], 100 * s["distinct_4grams"],
                       100 * s["token_match"], s["common_prefix"]] for kv, s in summary.items()])
    how = "greedy" if args.temperature <= 0 else f"sampled (temperature {args.temperature}, the same seeds)"
    md = (f"{n} open-ended chat messages (one turn, the model's chat template), {how} replies of up to "
          f"{gen} tokens. A reply is stuck in a loop when the token limit cuts it while its last tokens "
          f"repeat a unit of at most {LOOP_MAX_PERIOD} tokens ({LOOP_MIN_TOKENS} or more tokens of "
          f"repeats); a reply without one counts its length as tokens before a loop.\n\n{t}\n")
    bars = {"replies stuck in a loop %": [100 * s["looping"] for s in summary.values()],
            "distinct 4-grams %": [100 * s["distinct_4grams"] for s in summary.values()],
            f"tokens = {cfg.baseline} %": [100 * s["token_match"] for s in summary.values()]}
    title = f"open-ended chat, {how} replies of {gen} tokens, {cfg.model.slug}"
    figs = [report.bar_plot(cfg.out_dir / "chat.png", title, list(summary), bars, "%")]
    return PartResult(settings={"prompts": n, "gen_tokens": gen, "prompt_tokens": prompt_lens,
                                "chat_format": args.chat_format or "the GGUF's template",
                                "temperature": args.temperature,
                                "loop_max_period": LOOP_MAX_PERIOD, "loop_min_tokens": LOOP_MIN_TOKENS},
                      results={"per_reply": outputs, "summary": summary}, markdown=md,
                      figures=[f for f in figs if f])
