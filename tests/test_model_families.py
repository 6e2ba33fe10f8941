"""Model shapes the real test models lack, on tiny random-weight models (tests/tiny_model.py),
and what the LogQuant cache does with each.

Refused, with a ValueError at construction that says why (and the same model runs with an f16
cache): attention sinks (gpt-oss, granite_swa; once a GGML_ASSERT that aborted the process),
layers that reuse another layer's KV (Gemma 3n / Gemma 4; once accepted, and the tokens demoted
from the shared layers' cache were silently lost to the layers that read it), head sizes without
a kernel (96: not a multiple of 64; K 128 / V 64).

Supported: ALiBi (no RoPE: no "not plain RoPE" warning, the 2-bit tier in use), NORM and NEOX
RoPE over whole heads or only their first dimensions (partial rotary), head sizes 64 / 128 / 256.
With 8-bit codes in the low-bit tier (near lossless) the last token's logits follow an f16
cache's, also after llama.cpp's context shift (seq_rm of a middle range, seq_add of the rest)."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from serving import package_env
from tiny_model import (
    write_tiny_alibi,
    write_tiny_k_ne_v,
    write_tiny_kv_reuse,
    write_tiny_llama,
    write_tiny_rope_model,
    write_tiny_sinks,
)

from logquant_gguf import Llama
from logquant_gguf.llama import llama_cpp  # the llama_cpp bound to our build

W = 8     # LogQuant window: the f16 tier holds at most 3W = 24 tokens
N = 160   # prompt tokens: all but the newest ~3W in the low-bit tier (two key groups of 64)
EIGHT_BITS = {"logquant_key_bits": 8, "logquant_value_bits": 8}
# Last-token logits of an 8-bit low-bit tier against the f16 cache, as a share of the logits'
# spread. Seen on these models: up to 0.025 (f16 K-shift rounding included); the 2-bit tier is
# 0.4..1.4 off, and replacing the prompt's 2-bit part moves the f16 logits by 0.5..2.8.
TOL = 0.06
# llama.cpp's context shift: keep the first KEEP tokens, drop the next DISCARD, move the rest back
KEEP, DISCARD = 16, 72

WRITERS = {
    "sinks-gpt-oss": lambda p: write_tiny_sinks(p, arch="gpt-oss"),
    "sinks-granite": lambda p: write_tiny_sinks(p, arch="granite_swa"),
    "kv-reuse-gemma4": lambda p: write_tiny_kv_reuse(p),
    "head96": lambda p: write_tiny_llama(p, head_dim=96, seed=96),
    "k128-v64": lambda p: write_tiny_k_ne_v(p, key_dim=128, value_dim=64),
    "alibi": lambda p: write_tiny_alibi(p, head_dim=64, seed=5),
    "alibi128": lambda p: write_tiny_alibi(p, head_dim=128, n_head=4, n_head_kv=1, seed=6),
}
# (rope, head_dim, rope_dims): NORM and NEOX at each head size, over the whole head and over half
ROPE_CASES = [(rope, hd, rd) for hd in (64, 128, 256) for rope in ("norm", "neox") for rd in (hd, hd // 2)]
for _rope, _hd, _rd in ROPE_CASES:
    # 4 query heads over 2 KV heads; 2 over 1 for the wide heads (n_embd = n_head * head_dim)
    WRITERS[f"{_rope}-hd{_hd}-rot{_rd}"] = (
        lambda p, rope=_rope, hd=_hd, rd=_rd: write_tiny_rope_model(
            p, rope=rope, head_dim=hd, rope_dims=rd, n_head=4 if hd == 64 else 2,
            n_head_kv=2 if hd == 64 else 1, seed=hd + rd))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """name -> the path of that tiny model, written on first use."""
    d = tmp_path_factory.mktemp("families")
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            paths[name] = WRITERS[name](d / f"{name}.gguf")
        return paths[name]
    return get


def load(path: Path, kv_type: str = "logquant", **kw) -> Llama:
    kw.setdefault("n_ctx", 512)
    kw.setdefault("n_threads", 2)
    kw.setdefault("verbose", False)
    kw.setdefault("logits_all", True)
    if kv_type in ("logquant", "q2_window"):
        kw.setdefault("logquant_window", W)
    return Llama(str(path), kv_type=kv_type, **kw)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]  # the byte tokens of the tiny vocabulary


def last_logits(llm: Llama) -> np.ndarray:
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def off(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest logit difference as a share of the reference logits' spread."""
    return float(np.abs(got - ref).max() / ref.std())


def context_shift(llm: Llama) -> str | None:
    """What llama.cpp's context shift does to sequence 0: drop [KEEP, KEEP + DISCARD), move the
    tokens after it back by DISCARD. Returns why it could not, or None."""
    mem = llama_cpp.llama_get_memory(llm.ctx)
    if not llama_cpp.llama_memory_can_shift(mem):
        return f"the {llm.kv_type} cache refuses position shifts (llama_memory_can_shift is false)"
    if not llama_cpp.llama_memory_seq_rm(mem, 0, KEEP, KEEP + DISCARD):
        return f"the {llm.kv_type} cache refused seq_rm of [{KEEP}, {KEEP + DISCARD})"
    llama_cpp.llama_memory_seq_add(mem, 0, KEEP + DISCARD, -1, -DISCARD)
    llm.n_tokens -= DISCARD
    pos_max = llama_cpp.llama_memory_seq_pos_max(mem, 0)
    if pos_max != llm.n_tokens - 1:
        return f"after the shift the {llm.kv_type} cache ends at {pos_max}, not {llm.n_tokens - 1}"
    return None


def run(path: Path, kv_type: str, seq: list[int], then: Sequence[int] = (), **kw) -> np.ndarray:
    """Last-token logits after `seq`, then `then` fed one token at a time."""
    llm = load(path, kv_type, **kw)
    try:
        llm.eval(seq)
        for t in then:
            llm.eval([t])
        return last_logits(llm)
    finally:
        llm.close()


PROMPT, THEN = tokens(N, seed=1), tokens(8, seed=3)
# the prompt with its part that goes to the low-bit tier replaced
OTHER_PROMPT = tokens(N - 3 * W, seed=2) + PROMPT[N - 3 * W:]


@functools.lru_cache(maxsize=None)
def f16_and_logquant(path: Path) -> dict[str, dict]:
    """The f16 cache and the LogQuant cache with 8-bit codes on PROMPT: last-token logits after
    it ("prompt"), the LogQuant tiers then, and after a context shift and THEN fed one token at a
    time, as generation goes on ("shifted"; "shift_error" says why a cache could not shift)."""
    out = {}
    for kv_type, kw in (("f16", {}), ("logquant", EIGHT_BITS)):
        llm = load(path, kv_type, **kw)
        try:
            llm.eval(PROMPT)
            r = out[kv_type] = {"prompt": last_logits(llm), "tiers": llm.kv_stats()["tiers"]}
            r["shift_error"] = context_shift(llm)
            if r["shift_error"]:
                continue
            for t in THEN:
                llm.eval([t])
            r["shifted"] = last_logits(llm)
            r["shifted_tiers"] = llm.kv_stats()["tiers"]
        finally:
            llm.close()
    return out


def check_prompt_logits(path: Path) -> None:
    """The low-bit tier holds most of the prompt; with 8-bit codes the last logits stay within
    TOL of the f16 cache's, while replacing that old part of the prompt moves them by far more:
    the tier's tokens, at their positions, count."""
    r = f16_and_logquant(path)
    ref = r["f16"]["prompt"]
    assert r["logquant"]["tiers"]["q2"]["tokens"] >= N - 3 * W
    assert off(r["logquant"]["prompt"], ref) < TOL
    assert off(run(path, "f16", OTHER_PROMPT), ref) > 5 * TOL


def check_shifted_logits(path: Path) -> None:
    r = f16_and_logquant(path)
    for kv_type in ("f16", "logquant"):
        assert r[kv_type]["shift_error"] is None, r[kv_type]["shift_error"]
    assert r["logquant"]["shifted_tiers"]["q2"]["tokens"] > 0
    assert off(r["logquant"]["shifted"], r["f16"]["shifted"]) < TOL


def f16_generates(path: Path) -> None:
    llm = load(path, "f16")
    try:
        llm.eval(PROMPT)
        assert np.isfinite(last_logits(llm)).all()
        out = llm.create_completion("def f(x):", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


# --- refused shapes -------------------------------------------------------------------------

# The child builds a Llama with each LogQuant type and reports the ValueError; if the model is
# accepted it runs a prompt past the f16 tier, so a failure at decode shows too. An abort (as
# the sinks' GGML_ASSERT did) ends the child with a signal: this test fails, pytest lives on.
CHILD = """
import json, sys
from logquant_gguf import Llama
out = {}
for kv_type in ("logquant", "q2_window"):
    try:
        llm = Llama(sys.argv[1], kv_type=kv_type, logquant_window=8, n_ctx=512, n_threads=2,
                    verbose=False)
    except ValueError as e:
        out[kv_type] = {"refused": str(e)}
        continue
    llm.eval([3 + (i * 37) % 256 for i in range(200)])
    out[kv_type] = {"accepted": llm.kv_stats()["tiers"]}
    llm.close()
print("RESULT " + json.dumps(out))
"""


def construct_in_child(path: Path) -> dict:
    env = dict(package_env(), GGML_NO_BACKTRACE="1")  # an abort should not wait for gdb
    # cwd: `python -c` puts it first on sys.path, and the checkout's package may have no library
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=path.parent, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (f"constructing a LogQuant Llama killed the process (exit status "
                               f"{r.returncode}):\n{r.stderr[-3000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


REFUSED = [("sinks-gpt-oss", "sinks"), ("sinks-granite", "sinks"), ("kv-reuse-gemma4", "reuse"),
           ("head96", "head size"), ("k128-v64", "head size")]


@pytest.mark.parametrize("name", [name for name, _ in REFUSED])
def test_refused_shape_runs_with_an_f16_cache(model, name):
    """The tiny model itself is sound: llama.cpp loads it and generates with its own cache."""
    f16_generates(model(name))


@pytest.mark.parametrize("name,reason", REFUSED)
def test_unsupported_shape_is_refused_with_its_reason(model, name, reason):
    for kv_type, got in construct_in_child(model(name)).items():
        assert "refused" in got, f"{kv_type} accepted {name}: {got}"
        msg = got["refused"]
        assert "LogQuant" in msg and reason in msg, f"{kv_type} on {name}: {msg!r}"


# --- ALiBi ----------------------------------------------------------------------------------

def test_alibi_is_not_warned_as_not_plain_rope(model, capsys):
    """ALiBi has no RoPE to undo: keys before and after RoPE are the same, nothing to warn about."""
    llm = load(model("alibi"), verbose=True, **EIGHT_BITS)
    llm.eval(PROMPT)
    q2 = llm.kv_stats()["tiers"]["q2"]["tokens"]
    llm.close()
    log = capsys.readouterr().err
    assert "llama_context" in log  # the log was captured
    assert "not plain" not in log.lower(), [ln for ln in log.splitlines() if "plain" in ln.lower()]
    assert q2 > 0


@pytest.mark.parametrize("name", ["alibi", "alibi128"])
def test_alibi_logits_follow_f16_at_8_bits(model, name):
    """The 2-bit tokens get their ALiBi bias from their positions; the heads with small slopes
    read far back, so the old part of the prompt counts."""
    check_prompt_logits(model(name))


def test_alibi_context_shift_follows_f16(model):
    """ALiBi biases follow positions: after a context shift the 2-bit tokens are at their new
    distances from the query (there is no RoPE, so nothing needs re-rotating)."""
    path = model("alibi")
    check_shifted_logits(path)
    # the shift did change the logits: the positions, not only the cells, moved
    unshifted = run(path, "f16", PROMPT, THEN)
    assert off(unshifted, f16_and_logquant(path)["f16"]["shifted"]) > 3 * TOL


# --- RoPE: NORM / NEOX, whole head / partial rotary, head sizes 64 / 128 / 256 ----------------

def rope_id(case) -> str:
    rope, hd, rd = case
    return f"{rope}-hd{hd}-" + ("full" if rd == hd else f"rot{rd}")


@pytest.mark.parametrize("case", ROPE_CASES, ids=rope_id)
def test_rope_logits_follow_f16_at_8_bits(model, case):
    """2-bit keys are stored before RoPE and re-rotated where they are read: over the rotated
    dimensions only, in NORM or NEOX pairs. A wrong rotation of the 2-bit part (most of the
    prompt) would move the logits about as much as replacing that part does."""
    rope, hd, rd = case
    check_prompt_logits(model(f"{rope}-hd{hd}-rot{rd}"))


@pytest.mark.parametrize("case", ROPE_CASES, ids=rope_id)
def test_rope_context_shift_follows_f16(model, case):
    """After llama.cpp's context shift the f16 cache re-rotates its keys (K-shift, in f16); the
    LogQuant cache moves its 2-bit keys' positions (re-rotated where they are read) and K-shifts
    its f16 tier. Decoding on from the new positions, both give the same logits."""
    rope, hd, rd = case
    check_shifted_logits(model(f"{rope}-hd{hd}-rot{rd}"))
