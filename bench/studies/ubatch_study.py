"""What a smaller n_ubatch buys a long LogQuant context, and what it costs (issue 14, all bytes).

Every token of a ubatch gets an f16 cell before the layer's attention (llama.cpp's design), so the
f16 tier keeps room for one ubatch beside its 3W tokens: with llama-cpp-python's n_ubatch = 512
that room is most of the cache's fixed part (6.3 MB of 9.9 MiB on Qwen2.5-Coder-0.5B), 0.25 bits
per value at 32k. This study measures, in one run with the repetitions interleaved, the default
logquant at each n_ubatch: the KV bytes (`Llama.kv_stats()`) and the prefill speed of a prompt
from depth 0 (medians; ratios to the first n_ubatch within each repetition).

    python bench/studies/ubatch_study.py --out bench/results/cpu/qwen2.5-coder-0.5b/stop22-ubatch
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from logquant_gguf import Llama, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ubatches", default="512,128")
    ap.add_argument("--n-ctx", type=int, default=32768)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    ubatches = [int(x) for x in a.ubatches.split(",")]
    path = models.model_path(a.model)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 20000, a.prompt_tokens)]
    seconds = {ub: [] for ub in ubatches}
    stats = {}
    for _ in range(a.reps):
        for ub in ubatches:
            llm = Llama(str(path), kv_type="logquant", n_ctx=a.n_ctx, n_batch=max(ubatches), n_ubatch=ub,
                        n_threads=a.threads, verbose=False)
            t = time.perf_counter()
            llm.eval(prompt)
            seconds[ub].append(time.perf_counter() - t)
            stats[ub] = llm.kv_stats()
            llm.close()
    rows = []
    for ub in ubatches:
        ratios = [seconds[ubatches[0]][r] / seconds[ub][r] for r in range(a.reps)]
        st = stats[ub]
        rows.append({
            "n_ubatch": ub,
            "bytes_total": st["bytes_total"],
            "bytes_per_token": st["bytes_per_token"],
            "f16_tier_bytes": st["tiers"]["f16"]["bytes"],
            "prefill_tps_median": a.prompt_tokens / statistics.median(seconds[ub]),
            "prefill_vs_first_median": statistics.median(ratios),
        })
    a.out.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/studies/ubatch_study.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items())
    record = {"command": cmd, "rows": rows, "seconds": seconds}
    (a.out / "ubatch.json").write_text(json.dumps(record, indent=1))
    lines = [f"# n_ubatch and the LogQuant cache: {a.model}, n_ctx {a.n_ctx}, CPU {a.threads} threads", "",
             f"- command: `{cmd}`",
             f"- prompt of {a.prompt_tokens} tokens from depth 0, {a.reps} repetitions interleaved; "
             "medians, ratios within each repetition", "",
             "| n_ubatch | KV bytes | bytes/token at n_ctx | f16 tier bytes | prefill t/s "
             "| prefill vs first |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_ubatch']} | {r['bytes_total']} | {r['bytes_per_token']:.0f} | "
                     f"{r['f16_tier_bytes']} | {r['prefill_tps_median']:.1f} | "
                     f"{r['prefill_vs_first_median']:.3f} |")
    (a.out / "ubatch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
