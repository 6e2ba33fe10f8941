"""Chooses LogQuant's default window: KL divergence against the f16 cache, decode mode.

For each W, the LogQuant cache and the recent-window baseline (same 2-bit tier, same f16 budget of
3W tokens) run the same real text: a prompt of --prompt tokens, then --steps tokens fed one at a
time (teacher forcing), each step's next-token distribution compared with the f16 cache's.
Writes bench/results/cpu/<model>/window_sweep.{json,md}.

    python bench/window_sweep.py --model qwen2.5-coder-0.5b --prompt 2048 --steps 64 --windows 16,32,64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from logquant_gguf import Llama, build_info, models

TEXT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"  # real code nobody here wrote


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def run(path: str, kv_type: str, toks: list[int], n_prompt: int, threads: int, **kw) -> dict:
    llm = Llama(path, kv_type=kv_type, n_ctx=len(toks) + 16, n_threads=threads, verbose=False,
                logits_all=True, flash_attn=True, **kw)
    t0 = time.perf_counter()
    llm.eval(toks[:n_prompt])
    t1 = time.perf_counter()
    for t in tqdm(toks[n_prompt:], desc=f"{kv_type} {kw}", leave=False):
        llm.eval([t])
    t2 = time.perf_counter()
    logp = log_softmax(np.array(llm.scores[n_prompt - 1: len(toks) - 1]))
    return {"logp": logp, "prefill_s": t1 - t0, "decode_s_per_token": (t2 - t1) / (len(toks) - n_prompt),
            "tiers": llm.kv_stats()["tiers"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=list(models.MODELS))
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--windows", default="16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    a = ap.parse_args()
    path = str(models.model_path(a.model))
    text = TEXT_FILE.read_text()
    tok = Llama(path, vocab_only=True, verbose=False)
    toks = tok.tokenize(text.encode())[: a.prompt + a.steps]
    base = run(path, "f16", toks, a.prompt, a.threads)
    rows: list[dict] = []
    for w in (int(x) for x in a.windows.split(",")):
        for kv in ("logquant", "q2_window"):
            r = run(path, kv, toks, a.prompt, a.threads, logquant_window=w)
            kl = (np.exp(base["logp"]) * (base["logp"] - r["logp"])).sum(-1)
            top1 = (base["logp"].argmax(-1) == r["logp"].argmax(-1)).mean()
            n = len(toks)
            f16_tokens = r["tiers"]["f16"]["tokens"]
            bits = (16 * f16_tokens + 2.5 * (n - f16_tokens)) / n  # K/V bits per value held
            rows.append({"window": w, "kv_type": kv, "kl_mean": float(kl.mean()),
                         "kl_median": float(np.median(kl)), "top1": float(top1),
                         "f16_tokens": f16_tokens, "bits_per_value_held": bits,
                         "prefill_s": r["prefill_s"], "decode_s_per_token": r["decode_s_per_token"]})
            write(a, text, rows)  # after every row: a long sweep cut short keeps what it measured


def write(a: argparse.Namespace, text: str, rows: list[dict]) -> None:
    out = a.out / a.model
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": a.model, "model_sha256": models.MODELS[a.model].sha256, "text": str(TEXT_FILE),
           "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "prompt_tokens": a.prompt,
           "steps": a.steps, "threads": a.threads, "build": build_info(), "rows": rows}
    (out / "window_sweep.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# LogQuant window sweep: {a.model}", "",
             f"Prompt {a.prompt} tokens of `{TEXT_FILE.name}` (Python's standard library), then "
             f"{a.steps} tokens fed one at a time; KL(f16 cache || kv_type) per step, nats.", "",
             "| W | kv_type | f16 tokens | bits/value held | KL mean | KL median | top-1 % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['window']} | {r['kv_type']} | {r['f16_tokens']} | {r['bits_per_value_held']:.2f} "
                     f"| {r['kl_mean']:.4f} | {r['kl_median']:.4f} | {100 * r['top1']:.1f} |")
    lines.append("")
    lines.append(f"Command: `python bench/window_sweep.py --model {a.model} --prompt {a.prompt} "
                 f"--steps {a.steps} --windows {a.windows} --threads {a.threads}`")
    (out / "window_sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
