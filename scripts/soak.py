"""Soak test of the LogQuant cache: a long session through every cache operation, watching memory
and the logits. Not part of CI (the default run takes about 75 minutes on a 2-core machine);
docs/soak.md has the last result.

One `logquant_gguf.Llama` (kv_type="logquant") runs, until --tokens tokens have gone through the
cache, a session made of:
  - conversation turns: a user turn of real text (Python's standard library sources) fed as one
    batch, then a reply sampled token by token; when the context is full, llama.cpp's context
    shift (keep the first --n-keep tokens, discard half of the rest, move the remainder back:
    llama_memory_seq_rm + llama_memory_seq_add, as llama.cpp's server and CLI do);
  - every --reuse-every tokens, prefix reuse: create_completion on prompts that share a prefix
    with what the cache holds (a branch, a continuation, a regenerated reply): llama-cpp-python
    keeps the common prefix where the cache accepts the truncation, else re-evaluates;
  - every --state-every tokens, a save_state / load_state round trip: a probe decoded on the live
    context, then twice from the loaded state; the logits compared.
Every decode's logits (the last token of each batch, every sampled token) are checked for NaN and
Inf; the process's RSS (VmRSS) is recorded every --rss-every tokens.

Pass: nothing non-finite, every context shift accepted, the two runs from a loaded state agree
(within --state-tol, default exactly), and RSS after warm-up grows by at most --max-rss-growth-mb
(the median of the last 3 samples against the median of the first 3 after --warmup tokens). Exit
status 1 otherwise. Writes <out>/soak.json (every sample and count) and <out>/soak.png.

    nice -n 10 python scripts/soak.py                       # 100k tokens, the default model
    python scripts/soak.py --model tiny --tokens 3000 --n-ctx 256 --out /tmp/soak   # the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from logquant_gguf import Llama, models
from logquant_gguf.bench import corpus, env
from logquant_gguf.llama import llama_cpp  # the llama_cpp bound to our build

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def resolve_model(spec: str, workdir: Path) -> tuple[str, Path]:
    """A name from logquant_gguf.models, "tiny" (a random-weight llama written by tests/tiny_model.py,
    for checking the script), or a GGUF path."""
    if spec == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_model import write_tiny_llama

        return "tiny", write_tiny_llama(workdir / "tiny.gguf")
    ref = env.resolve_model(spec)
    return ref.slug, ref.path


class TextStream:
    """Tokens of real text, in order, round and round."""

    def __init__(self, llm: Llama):
        self.docs = corpus.documents("code")
        self.llm = llm
        self.tokens: list[int] = []
        self.pos = 0
        self.doc = 0

    def take(self, n: int) -> list[int]:
        while len(self.tokens) - self.pos < n:
            text = self.docs[self.doc % len(self.docs)].text
            self.doc += 1
            self.tokens = self.tokens[self.pos:] + self.llm.tokenize(text.encode(), add_bos=False)
            self.pos = 0
        out = self.tokens[self.pos:self.pos + n]
        self.pos += n
        return out


class Soak:
    def __init__(self, llm: Llama, a: argparse.Namespace):
        self.llm, self.a = llm, a
        self.rng = np.random.default_rng(a.seed)
        self.text = TextStream(llm)
        self.n_vocab = llm.n_vocab()
        self.eog = [t for t in range(self.n_vocab)
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)]
        # tokens = fed + sampled + completion + state_probe (every token through the cache)
        self.counts = dict.fromkeys(
            ("tokens", "fed", "sampled", "completion", "state_probe", "logit_rows_checked",
             "non_finite_rows", "context_shifts", "context_shifts_refused",
             "tokens_discarded_by_shifts", "state_round_trips", "state_round_trip_mismatches",
             "completions", "prefix_reuse_hits", "prefix_reuse_misses"), 0)
        self.reuse = {k: {"hits": 0, "misses": 0, "tokens_kept": 0}
                      for k in ("first", "branch", "continuation", "regenerate")}
        # |logit difference| of the probe runs: two from the loaded state; live vs loaded
        self.state_diff: dict = {"reloaded_max": 0.0, "live_vs_loaded_max": 0.0, "round_trips": []}
        self.events: list[str] = []  # cache operations since the last state round trip
        self.first_non_finite: dict | None = None
        self.samples: list[dict] = []
        self.phase = "start"
        self.t0 = time.perf_counter()
        self.next_rss = 0
        self.eval_calls: list[int] = []  # lengths of the eval calls of the current completion
        self.last_logits = np.zeros(self.n_vocab, dtype=np.float32)
        # every eval, the ones create_completion makes included, goes through _eval
        self._llm_eval = llm.eval
        llm.eval = self._eval

    # -- decoding --------------------------------------------------------------------------------
    def _eval(self, tokens) -> None:
        tokens = list(tokens)
        self.eval_calls.append(len(tokens))
        n_batch = self.llm.n_batch
        for i in range(0, len(tokens), n_batch):  # one batch at a time: each batch's logits checked
            piece = tokens[i:i + n_batch]
            self._llm_eval(piece)
            self.counts["tokens"] += len(piece)
            self._check_logits()
            self._maybe_sample_rss()

    def _check_logits(self) -> None:
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        self.last_logits = row
        self.counts["logit_rows_checked"] += 1
        if not np.isfinite(row).all():
            self.counts["non_finite_rows"] += 1
            if self.first_non_finite is None:
                self.first_non_finite = {"tokens": self.counts["tokens"], "phase": self.phase,
                                         "n_nan": int(np.isnan(row).sum()),
                                         "n_inf": int(np.isinf(row).sum())}

    def sample(self) -> int:
        """Top-40, temperature 0.8, never an end-of-generation token (the session goes on)."""
        logits = self.last_logits.astype(np.float64)
        logits[self.eog] = -np.inf
        if not np.isfinite(logits).any():
            return int(self.rng.integers(self.n_vocab))
        top = np.argpartition(-logits, 40)[:40]
        z = logits[top] / 0.8
        p = np.exp(z - z.max())
        return int(top[self.rng.choice(len(top), p=p / p.sum())])

    def feed(self, tokens: list[int], counter: str) -> None:
        """Evaluates tokens at the end of the context, shifting it first where they do not fit."""
        while self.llm.n_tokens + len(tokens) > self.llm.n_ctx():
            self.context_shift()
        self.llm.eval(tokens)
        self.counts[counter] += len(tokens)

    def context_shift(self) -> None:
        """llama.cpp's context shift: keep [0, n_keep), drop half of the rest, move the remainder
        back by that much (common/ and tools/server do exactly this)."""
        llm, n_keep = self.llm, self.a.n_keep
        n_past = llm.n_tokens
        n_discard = (n_past - n_keep) // 2
        mem = llama_cpp.llama_get_memory(llm.ctx)
        ok = llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
        self.counts["context_shifts"] += 1
        if not ok:
            # documented as allowed for LogQuant; start over rather than stop the soak
            self.counts["context_shifts_refused"] += 1
            llama_cpp.llama_memory_seq_rm(mem, -1, -1, -1)
            llm.n_tokens = 0
            return
        llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, n_past, -n_discard)
        ids = llm.input_ids
        ids[n_keep:n_past - n_discard] = ids[n_keep + n_discard:n_past].copy()
        llm.n_tokens = n_past - n_discard
        self.counts["tokens_discarded_by_shifts"] += n_discard
        self.events.append(f"shift@{n_past}-{n_discard}")
        pos_min = llama_cpp.llama_memory_seq_pos_min(mem, 0)
        pos_max = llama_cpp.llama_memory_seq_pos_max(mem, 0)
        if (pos_min, pos_max) != (0, llm.n_tokens - 1):
            raise RuntimeError(f"after a context shift the cache holds positions {pos_min}..{pos_max}, "
                               f"expected 0..{llm.n_tokens - 1}")

    # -- the session's parts -----------------------------------------------------------------------
    def turn(self) -> None:
        self.phase = "turn"
        self.feed(self.text.take(int(self.rng.integers(32, 129))), "fed")
        for _ in range(int(self.rng.integers(32, 129))):
            self.feed([self.sample()], "sampled")

    def prefix_reuse(self) -> None:
        """create_completion on prompts that share a prefix with what the cache holds: a first
        prompt, a branch (same prefix, another ending), a continuation (everything the cache
        holds plus a new turn) and a regenerated reply (the same prompt again)."""
        self.phase = "prefix_reuse"
        take, rand = self.text.take, lambda lo, hi: int(self.rng.integers(lo, hi + 1))
        prefix = take(self.a.prefix_tokens)
        first = prefix + take(rand(8, 24))
        self.complete("first", first, rand(4, 24))
        self.complete("branch", prefix + take(rand(8, 24)), rand(4, 24))
        cont = [int(t) for t in self.llm.input_ids[:self.llm.n_tokens]] + take(rand(16, 48))
        self.complete("continuation", cont, rand(4, 24))
        self.complete("regenerate", cont, rand(1, 8))

    def complete(self, kind: str, prompt: list[int], max_tokens: int) -> None:
        self.eval_calls = []
        self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.8, top_k=40,
                                   seed=int(self.rng.integers(1 << 30)))
        self.counts["completions"] += 1
        self.counts["completion"] += sum(self.eval_calls)
        # the first eval is the part of the prompt that was not kept in the cache
        evaluated = self.eval_calls[0] if self.eval_calls else 0
        hit = evaluated < len(prompt)
        self.counts["prefix_reuse_hits" if hit else "prefix_reuse_misses"] += 1
        self.reuse[kind]["hits" if hit else "misses"] += 1
        self.reuse[kind]["tokens_kept"] += len(prompt) - evaluated if hit else 0
        self.events.append(f"{kind}:{'kept' if hit else 're-evaluated'}@{len(prompt)}")

    def state_round_trip(self) -> None:
        """save_state, a probe decoded on the live context, load_state, the probe again, load_state,
        the probe a third time. The two runs from the loaded state must agree (within --state-tol,
        default exact): the state alone decides what follows. How far the live run is from them
        is recorded (not judged: see docs/soak.md)."""
        self.phase = "state"
        if self.llm.n_tokens + self.a.probe_tokens + 1 > self.llm.n_ctx():
            # llama.cpp applies a shift's K rotation at the next decode, and a state saved before
            # that decode does not carry it (every kv_type, f16 included): decode one token first
            self.context_shift()
            self.feed(self.text.take(1), "fed")
        probe = self.text.take(self.a.probe_tokens)
        state = self.llm.save_state()
        runs = []
        for _ in range(3):
            rows = []
            for t in probe:
                self.llm.eval([t])
                rows.append(self.last_logits)
            runs.append(np.array(rows, dtype=np.float64))
            self.llm.load_state(state)
        del state
        self.counts["state_probe"] += 3 * len(probe)
        self.counts["state_round_trips"] += 1
        reloaded = float(np.abs(runs[1] - runs[2]).max())
        live = float(np.abs(runs[0] - runs[1]).max())
        if not math.isfinite(reloaded) or reloaded > self.a.state_tol:
            self.counts["state_round_trip_mismatches"] += 1
        if math.isfinite(reloaded):
            self.state_diff["reloaded_max"] = max(self.state_diff["reloaded_max"], reloaded)
        if math.isfinite(live):
            self.state_diff["live_vs_loaded_max"] = max(self.state_diff["live_vs_loaded_max"], live)
        per_token = np.abs(runs[0] - runs[1]).max(1)
        self.state_diff["round_trips"].append({
            "tokens": self.counts["tokens"], "ctx_tokens": self.llm.n_tokens,
            "reloaded": reloaded, "live_vs_loaded": round(live, 6),
            "live_vs_loaded_per_probe_token": [round(float(x), 6) for x in per_token],
            "events_before": self.events})
        self.events = []

    def _maybe_sample_rss(self, force: bool = False) -> None:
        if not force and self.counts["tokens"] < self.next_rss:
            return
        self.next_rss = (self.counts["tokens"] // self.a.rss_every + 1) * self.a.rss_every
        gc.collect()
        kv = self.llm.kv_stats()
        self.samples.append({"tokens": self.counts["tokens"], "rss_mb": round(rss_mb(), 2),
                             "ctx_tokens": self.llm.n_tokens, "kv_bytes": kv["bytes_total"],
                             "f16_tokens": kv["tiers"]["f16"]["tokens"],
                             "q2_tokens": kv["tiers"]["q2"]["tokens"],
                             "elapsed_s": round(time.perf_counter() - self.t0, 1)})
        s = self.samples[-1]
        print(f"soak: {s['tokens']:>7} tokens  rss {s['rss_mb']:.1f} MB  ctx {s['ctx_tokens']:>5}  "
              f"shifts {self.counts['context_shifts']}  {s['elapsed_s']:.0f} s", file=sys.stderr,
              flush=True)

    def run(self, on_progress) -> None:
        next_reuse, next_state = self.a.reuse_every, self.a.state_every
        last_written = 0
        while self.counts["tokens"] < self.a.tokens:
            self.turn()
            if self.counts["tokens"] >= next_state:
                self.state_round_trip()
                next_state += self.a.state_every
            if self.counts["tokens"] >= next_reuse:
                self.prefix_reuse()
                next_reuse += self.a.reuse_every
            if len(self.samples) != last_written:  # a run cut short keeps what it measured
                on_progress(self)
                last_written = len(self.samples)
        self._maybe_sample_rss(force=True)


def rss_verdict(samples: list[dict], warmup: int, threshold_mb: float) -> dict:
    after = [s for s in samples if s["tokens"] >= warmup]
    if len(after) < 6:
        return {"warmup_tokens": warmup, "samples_after_warmup": len(after), "growth_mb": None,
                "threshold_mb": threshold_mb, "ok": None}
    rss = np.array([s["rss_mb"] for s in after])
    toks = np.array([s["tokens"] for s in after], dtype=np.float64)
    baseline, final = float(np.median(rss[:3])), float(np.median(rss[-3:]))
    slope = float(np.polyfit(toks, rss, 1)[0]) * 10_000
    return {"warmup_tokens": warmup, "samples_after_warmup": len(after),
            "baseline_mb": round(baseline, 2), "final_mb": round(final, 2),
            "growth_mb": round(final - baseline, 2),
            "max_after_warmup_mb": round(float(rss.max()), 2),
            "min_after_warmup_mb": round(float(rss.min()), 2),
            "slope_mb_per_10k_tokens": round(slope, 3), "threshold_mb": threshold_mb,
            "ok": final - baseline <= threshold_mb}


def report(soak: Soak, a: argparse.Namespace, model: dict, argv: list[str], final: bool) -> dict:
    c = soak.counts
    elapsed = time.perf_counter() - soak.t0
    rss = rss_verdict(soak.samples, a.warmup, a.max_rss_growth_mb)
    failures = []
    if c["non_finite_rows"]:
        failures.append(f"{c['non_finite_rows']} logit rows with NaN/Inf (first: {soak.first_non_finite})")
    if c["context_shifts_refused"]:
        failures.append(f"{c['context_shifts_refused']} context shifts refused")
    if c["state_round_trip_mismatches"]:
        failures.append(f"{c['state_round_trip_mismatches']} state round trips: two runs from one "
                        f"loaded state differ or are not finite (largest finite |diff| "
                        f"{soak.state_diff['reloaded_max']:.3g}, allowed {a.state_tol:g})")
    if rss["ok"] is False:
        failures.append(f"RSS grew {rss['growth_mb']} MB after warm-up (> {a.max_rss_growth_mb} MB)")
    if final and rss["ok"] is None:
        failures.append(f"too few RSS samples after warm-up ({rss['samples_after_warmup']}) to judge")
    return {
        "command": " ".join(["python scripts/soak.py", *argv]),
        "complete": final,
        "passed": final and not failures,
        "failures": failures,
        "model": model,
        "settings": {"kv_type": "logquant", "logquant_window": soak.llm.logquant_window,
                     "n_ctx": soak.llm.n_ctx(), "n_batch": soak.llm.n_batch, "n_keep": a.n_keep,
                     "n_threads": soak.llm.n_threads, "tokens_target": a.tokens, "seed": a.seed,
                     "rss_every": a.rss_every, "reuse_every": a.reuse_every,
                     "state_every": a.state_every, "prefix_tokens": a.prefix_tokens,
                     "probe_tokens": a.probe_tokens, "state_tol": a.state_tol},
        "counts": c,
        "prefix_reuse": soak.reuse,
        "state_logit_diff": soak.state_diff,
        "first_non_finite": soak.first_non_finite,
        "elapsed_s": round(elapsed, 1),
        "tokens_per_s": round(c["tokens"] / elapsed, 2) if elapsed else None,
        "rss": {**rss, "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 2)},
        "rss_series": soak.samples,
        "machine": env.machine_info(),
        "build": env.build_block(),
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["rss_series"]
    toks = [x["tokens"] for x in s]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.0, 5.2), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(toks, [x["rss_mb"] for x in s], label="RSS (VmRSS)")
    r = doc["rss"]
    ax.axvline(r["warmup_tokens"], color="gray", ls=":", label="end of warm-up")
    if r.get("baseline_mb") is not None:
        ax.axhline(r["baseline_mb"], color="gray", ls="--", lw=0.8, label="baseline after warm-up")
        ax.axhline(r["baseline_mb"] + r["threshold_mb"], color="red", ls="--", lw=0.8,
                   label=f"baseline + {r['threshold_mb']:g} MB (fail above)")
    c = doc["counts"]
    ax.set(ylabel="MB", title=f"Soak, {doc['model']['slug']}, kv_type=logquant, "
                              f"n_ctx={doc['settings']['n_ctx']}\n{c['tokens']} tokens, "
                              f"{c['context_shifts']} context shifts, {c['state_round_trips']} state "
                              f"round trips, {c['completions']} completions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax2.plot(toks, [x["ctx_tokens"] for x in s], color="tab:green", label="tokens in context")
    ax2.plot(toks, [x["f16_tokens"] for x in s], color="tab:orange", label="f16 tier tokens")
    ax2.set(xlabel="tokens through the cache", ylabel="tokens")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens through the cache (default 100000)")
    ap.add_argument("--model", default=models.DEFAULT_MODEL,
                    help=f"{', '.join(models.MODELS)}, tiny, or a GGUF path (default {models.DEFAULT_MODEL})")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context size (default 1024)")
    ap.add_argument("--n-keep", type=int, default=32, help="tokens a context shift keeps (default 32)")
    ap.add_argument("--n-batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--threads", type=int, default=None, help="llama-cpp-python's default if unset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-every", type=int, default=None,
                    help="tokens between RSS samples (default 1000; fewer tokens: --tokens / 50)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="tokens before RSS must stay flat (default: a tenth of --tokens, at most 10000)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=32.0,
                    help="allowed RSS growth after warm-up (default 32 MB)")
    ap.add_argument("--reuse-every", type=int, default=None,
                    help="tokens between prefix-reuse rounds (default 5000, at most --tokens / 6)")
    ap.add_argument("--state-every", type=int, default=None,
                    help="tokens between save/load round trips (default 2500, at most --tokens / 12)")
    ap.add_argument("--prefix-tokens", type=int, default=None,
                    help="shared prefix of the reuse prompts (default 256, at most --n-ctx / 4)")
    ap.add_argument("--probe-tokens", type=int, default=16, help="tokens of a state round trip's probe")
    ap.add_argument("--state-tol", type=float, default=0.0,
                    help="largest |logit difference| between two runs from one loaded state (default 0)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>/soak.png from <out>/soak.json")
    a = ap.parse_args(argv)
    if a.replot:
        plot(json.loads((a.out / "soak.json").read_text(encoding="utf-8")), a.out / "soak.png")
        return 0
    # a short run (checking the script) still samples and exercises everything several times
    a.rss_every = a.rss_every or max(10, min(1000, a.tokens // 50))
    a.reuse_every = a.reuse_every or max(100, min(5000, a.tokens // 6))
    a.state_every = a.state_every or max(50, min(2500, a.tokens // 12))
    a.prefix_tokens = a.prefix_tokens or min(256, a.n_ctx // 4)
    if a.warmup is None:
        a.warmup = min(10_000, a.tokens // 10)
    if a.prefix_tokens + 160 > a.n_ctx:
        ap.error("--prefix-tokens must leave 160 tokens of --n-ctx for the endings and replies")

    with tempfile.TemporaryDirectory() as tmp:
        slug, path = resolve_model(a.model, Path(tmp))
        model = {"slug": slug, "file": path.name, "size_bytes": path.stat().st_size,
                 "sha256": env.sha256_file(str(path))}
        kw = {} if a.threads is None else {"n_threads": a.threads}
        llm = Llama(str(path), kv_type="logquant", n_ctx=a.n_ctx, n_batch=a.n_batch,
                    seed=a.seed, verbose=False, **kw)
        if not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(llm.ctx)):
            print(f"soak: {slug}'s cache cannot shift positions", file=sys.stderr)
            llm.close()
            return 2
        soak = Soak(llm, a)
        a.out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = a.out / "soak.json", a.out / "soak.png"

        def write(s: Soak, final: bool = False) -> dict:
            doc = report(s, a, model, argv, final)
            json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            return doc

        soak.run(write)
        doc = write(soak, final=True)
        llm.close()
    plot(doc, png_path)
    c, r = doc["counts"], doc["rss"]
    growth = "n/a" if r["growth_mb"] is None else f"{r['growth_mb']:+.1f} MB"
    print(f"soak {'PASS' if doc['passed'] else 'FAIL'}: {c['tokens']} tokens ({c['sampled']} sampled, "
          f"{c['fed']} fed, {c['completion']} in completions, {c['state_probe']} state probes) "
          f"in {doc['elapsed_s']:.0f} s; "
          f"{c['logit_rows_checked']} logit rows checked, {c['non_finite_rows']} non-finite; "
          f"{c['context_shifts']} context shifts ({c['context_shifts_refused']} refused); "
          f"{c['state_round_trips']} state round trips (reloaded max |diff| "
          f"{doc['state_logit_diff']['reloaded_max']:.3g}, live vs loaded "
          f"{doc['state_logit_diff']['live_vs_loaded_max']:.3g}); "
          f"prefix reuse {c['prefix_reuse_hits']} hits / {c['prefix_reuse_misses']} re-evaluated; "
          f"RSS {r.get('baseline_mb', float('nan')):.1f} -> {r.get('final_mb', float('nan')):.1f} MB "
          f"after warm-up ({growth}, limit {r['threshold_mb']:g} MB), peak {r['vm_hwm_mb']:.1f} MB"
          + ("" if doc["passed"] else "; " + "; ".join(doc["failures"])))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
