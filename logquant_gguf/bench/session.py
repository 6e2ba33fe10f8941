"""`Session`: one `Llama` with one KV type, driven token by token the way the benchmarks need.

Prefill in batches, decode one token at a time, read the last position's logits, roll the cache
back to an earlier length. Everything goes through llama-cpp-python's `Llama.eval` (which keeps
its token bookkeeping right) plus `llama_get_logits_ith` for the logits.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import Llama
from ..kv_types import KV_TYPES, parse_variant
from ..llama import llama_cpp

# llama.cpp's log, one line per KV cache it creates (two for iSWA models).
_KV_SIZE_RE = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB")


def placement(device: str, kv_type: str, gpu_kernels: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a context's parts go: every layer on the accelerator unless the device tag is cpu.
    A LogQuant cache stays in host memory there (offload_kqv=False: its attention runs on the
    CPU) unless this build has the LogQuant kernels for that device (`gpu_kernels`, by default
    the build info's `logquant_gpu_kernels`: a -DLOGQUANT_CUDA=ON build has "cuda"; Metal's are
    used only with LOGQUANT_METAL=1, as ggml-metal's supports_op says)."""
    if device == "cpu":
        return {"n_gpu_layers": 0}
    if KV_TYPES[parse_variant(kv_type)[0]].is_logquant:
        if gpu_kernels is None:
            from .._capi import build_info
            gpu_kernels = build_info().get("logquant_gpu_kernels", [])
        import os

        metal_off = device == "metal" and os.environ.get("LOGQUANT_METAL") != "1"  # off unless asked
        if device not in gpu_kernels or metal_off:
            return {"n_gpu_layers": -1, "offload_kqv": False}
    return {"n_gpu_layers": -1}


class Session:
    """A context of n_ctx cells with `kv_type`, on `device` ("cpu" keeps every layer on the CPU).

    capture_log=True keeps llama.cpp's log of the context creation in `self.log`.
    """

    def __init__(self, model_path: str, kv_type: str, n_ctx: int, *, threads: int = 2,
                 device: str = "cpu", n_batch: int = 512, capture_log: bool = False,
                 **kwargs: Any):
        buf = io.StringIO()
        base, levers = parse_variant(kv_type)  # "logquant+k4": a kv_type with precision levers
        with contextlib.redirect_stderr(buf) if capture_log else contextlib.nullcontext():
            self.llm = Llama(str(model_path), kv_type=base, n_ctx=n_ctx, n_batch=n_batch, **levers,
                             n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                             verbose=capture_log, **placement(device, kv_type), **kwargs)
        self.log = buf.getvalue()
        self.kv_type = kv_type
        self.n_vocab = self.llm.n_vocab()

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    @property
    def bos(self) -> list[int]:
        """The BOS token when the model wants one (Gemma does, Qwen does not)."""
        tok = self.llm.token_bos()
        return [tok] if tok >= 0 and self.llm._model.add_bos_token() else []

    @property
    def n_ctx_train(self) -> int:
        """The model's trained context (from metadata: a vocab-only load reports 0)."""
        md = self.llm.metadata
        return int(md.get(f"{md.get('general.architecture')}.context_length", 0))

    # -- cache -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def prefill(self, tokens: Sequence[int]) -> None:
        """Appends tokens to the cache in batches of n_batch."""
        if tokens:
            self.llm.eval(list(tokens))

    def step(self, token: int) -> None:
        """Appends one token: a decode step."""
        self.llm.eval([token])

    def logits(self) -> np.ndarray:
        """The logits after the last token evaluated (a float32 copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def truncate(self, n: int) -> None:
        """Drops every cached position >= n (raises if this cache cannot)."""
        if not self.llm._ctx.kv_cache_seq_rm(-1, n, -1):
            raise RuntimeError(f"the {self.kv_type} cache cannot drop positions >= {n}")
        self.llm.n_tokens = n

    def reset(self) -> None:
        self.truncate(0)

    def greedy(self, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of prompt (evaluated from an empty cache), up to n tokens."""
        return self.generate(prompt, n, stop=stop)

    def generate(self, prompt: Sequence[int], n: int, stop: Sequence[int] = (), temperature: float = 0.0,
                 seed: int = 0) -> list[int]:
        """Continuation of prompt (from an empty cache), up to n tokens: greedy at temperature 0,
        else sampled as llama-cpp-python samples by default (top-k 40, top-p 0.95, min-p 0.05, then
        the temperature) from a generator seeded with seed. Two caches given the same seed draw the
        same random numbers, so their texts part only where their logits do."""
        rng = np.random.default_rng(seed)
        self.reset()
        self.prefill(prompt)
        out: list[int] = []
        for _ in range(n):
            logits = self.logits()
            tok = int(np.argmax(logits)) if temperature <= 0 else sample(logits, temperature, rng.random())
            out.append(tok)
            if tok in stop or self.is_eog(tok):
                break
            self.step(tok)
        return out

    def is_eog(self, tok: int) -> bool:
        """Whether tok ends a generation (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, tok))

    def kv_stats(self) -> dict:
        return self.llm.kv_stats()

    def log_kv_sizes(self) -> list[int]:
        """KV bytes of each cache as llama.cpp's own log states them (MiB, 2 decimals)."""
        return [round(float(m) * 2**20) for m in _KV_SIZE_RE.findall(self.log)]

    def close(self) -> None:
        self.llm.close()


def sample(logits: np.ndarray, temperature: float, u: float, top_k: int = 40, top_p: float = 0.95,
           min_p: float = 0.05) -> int:
    """The token the uniform draw u in [0, 1) picks through llama-cpp-python's default sampler
    chain, in its order: the top_k logits; the fewest of them whose probability reaches top_p; those
    of probability >= min_p times the largest; then the temperature, and the draw."""
    idx = np.argpartition(-logits, top_k - 1)[:top_k]
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    x = logits[idx].astype(np.float64)
    p = np.exp(x - x[0])
    p /= p.sum()
    n = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, len(idx))
    idx, x, p = idx[:n], x[:n], p[:n]
    keep = p >= min_p * p[0]
    idx, x = idx[keep], x[keep]
    q = np.exp((x - x[0]) / temperature)
    c = np.cumsum(q / q.sum())
    return int(idx[min(int(np.searchsorted(c, u, side="right")), len(idx) - 1)])


def timed(fn, *args: Any) -> float:
    """Seconds fn(*args) takes (perf_counter)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
