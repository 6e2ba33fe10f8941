#!/usr/bin/env python3
"""Logits of two builds of this package, step by step, on the same tokens.

Runs one worker process per build (each imports its own `logquant_gguf` with its own native
libraries, so two builds never share a process), feeds both the same text token by token
(a prompt, then one token per decode step), and compares the full logits of every step as they
stream in: max abs difference, steps that differ at all, steps whose top token differs. Used to
check that a change of the native code (e.g. custom ops -> ggml ops) leaves results unchanged.

    python scripts/compare_logits.py --ref-pkg DIR --model qwen2.5-coder-0.5b --tokens 4096 \\
        --out bench/results/cpu/qwen2.5-coder-0.5b/ops-vs-custom.json

DIR holds the reference build's `logquant_gguf` package (Python code and lib/); the other side is
the package this script's checkout imports (or --new-pkg).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def worker(a: argparse.Namespace) -> int:
    from logquant_gguf import Llama, models  # first: it points llama_cpp at its own libllama
    import llama_cpp
    from logquant_gguf.bench import corpus

    path = a.model if os.path.exists(a.model) else str(models.model_path(a.model))
    llm = Llama(path, kv_type=a.kv_type, n_ctx=a.tokens + 64, n_threads=a.threads, n_batch=512,
                logits_all=False, verbose=False)
    tokens, _ = corpus.token_stream(lambda t: llm.tokenize(t.encode(), add_bos=False), "code", a.tokens)
    tokens = [llm.token_bos()] + tokens[: a.tokens - 1] if llm.token_bos() >= 0 else tokens[: a.tokens]
    out = sys.stdout.buffer
    n_vocab = llm.n_vocab()

    def last_logits() -> bytes:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32).tobytes()

    out.write(struct.pack("<ii", n_vocab, len(tokens)))
    llm.eval(tokens[: a.prompt])
    out.write(last_logits())
    for t in tokens[a.prompt:]:
        llm.eval([t])
        out.write(last_logits())
    out.flush()
    return 0


def spawn(pkg: Path, a: argparse.Namespace, extra_env: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(pkg))
    env.update(kv.split("=", 1) for kv in extra_env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", a.model, "--kv-type", a.kv_type,
           "--tokens", str(a.tokens), "--prompt", str(a.prompt), "--threads", str(a.threads)]
    return subprocess.Popen(cmd, env=env, cwd="/tmp", stdout=subprocess.PIPE)


def read_exact(p: subprocess.Popen, n: int) -> bytes:
    data = p.stdout.read(n)
    if data is None or len(data) != n:
        raise SystemExit(f"compare_logits: a worker stopped early (exit {p.poll()})")
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ref-pkg", type=Path, help="folder holding the reference build's logquant_gguf package")
    ap.add_argument("--new-pkg", type=Path, default=REPO, help="folder holding the other build's package (default: this checkout)")
    ap.add_argument("--ref-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment for the reference worker only (repeatable)")
    ap.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment for the other worker only (repeatable)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--kv-type", default="logquant")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in all: the prompt, then one per decode step")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker (two workers run at once)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if not a.ref_pkg:
        ap.error("--ref-pkg is required")

    t0 = time.time()
    ref, new = spawn(a.ref_pkg.resolve(), a, a.ref_env), spawn(a.new_pkg.resolve(), a, a.new_env)
    n_vocab, n_tok = struct.unpack("<ii", read_exact(ref, 8))
    if struct.unpack("<ii", read_exact(new, 8)) != (n_vocab, n_tok):
        raise SystemExit("compare_logits: the two builds tokenized differently")
    max_abs, n_diff, n_top, steps = 0.0, 0, 0, 0
    worst_step = -1
    for step in range(n_tok - a.prompt + 1):
        x = np.frombuffer(read_exact(ref, 4 * n_vocab), dtype=np.float32)
        y = np.frombuffer(read_exact(new, 4 * n_vocab), dtype=np.float32)
        d = float(np.max(np.abs(x - y)))
        if d > max_abs:
            max_abs, worst_step = d, step
        n_diff += d > 0
        n_top += int(np.argmax(x)) != int(np.argmax(y))
        steps += 1
    rc = ref.wait(), new.wait()
    result = {
        "what": "logits of two builds on the same tokens, every step compared in full",
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "model": a.model, "kv_type": a.kv_type, "tokens": n_tok, "prompt": a.prompt, "steps": steps,
        "max_abs_diff": max_abs, "worst_step": worst_step, "steps_differing": n_diff,
        "steps_top_token_differs": n_top, "exit_codes": list(rc),
        "ref_pkg": str(a.ref_pkg), "new_pkg": str(a.new_pkg), "ref_env": a.ref_env, "new_env": a.new_env, "seconds": round(time.time() - t0, 1),
        "machine": platform.platform(),
    }
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if rc == (0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
