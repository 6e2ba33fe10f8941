"""`Llama`: llama-cpp-python's one high-level class, bound to our runtime, with `kv_type`."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import _capi, _llama_log, kv_types, rpc
from ._runtime import load_llama_cpp

llama_cpp = load_llama_cpp()

GGUF_MAGIC = b"GGUF"

# The LogQuant settings are read when llama.cpp creates the context: set and create under one lock.
_context_lock = threading.Lock()


class ModelFileError(ValueError):
    """The model file is missing, not GGUF, or could not be loaded."""


def check_model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"model path is not a file: {p}")
    with p.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"{p} is not a GGUF model file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r})")
    if len(head) < 8:
        raise ModelFileError(f"{p} is truncated ({p.stat().st_size} bytes)")
    return p


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama with a choice of KV cache type.

    kv_type: one of `logquant_gguf.KV_TYPES` (default "f16"). It sets llama.cpp's type_k/type_v
    and turns flash attention on where the V cache is quantized (llama.cpp needs it then).
    logquant_window: W for the "logquant" and "q2_window" caches (default 32): the f16 tier holds
    up to 3W tokens.
    logquant_key_bits, logquant_value_bits: code bits of those caches' low-bit tier, 2 (default),
    4 or 8; keys also 3: mixed key widths of 0, 2 or 4 bits per channel at a mean of 3 (there are no
    3-bit codes), 3.0 bits per value with 2-bit values; logquant_layer_bits: per-layer overrides
    {layer: (key_bits, value_bits)}, e.g. {0: (8, 8)} for a sensitive first layer, or "auto":
    3-bit keys for the half of the layers of 2-bit keys whose Q/K weights predict the most gain
    from them (Gemma 3 270M: its layer 11; docs/levers.md). These are the
    precision levers: b-bit codes cost b + 0.5 bits per value (see docs/levers.md for what they
    buy).
    logquant_key_group (32, 64, 128) and logquant_keys_post_rope: the key layout knobs of the
    format study (before RoPE by default). The default format has groups of 128 tokens per channel
    and logquant_layer_bits="auto": 2.5 bits per value, the quarter bit that groups of 128 save
    spent on 3-bit keys where the weights say (docs/levers.md). Asking for code bits, layer bits,
    a group or a layout of before (uniform widths, keys after RoPE, values per token) gives groups
    of 64 and only the layers asked for: the format the measured settings have.
    logquant_fit, logquant_score_correction: how the low-bit codes are made and read, at no
    memory cost. logquant_fit (default True) fits each group's scale and minimum by least squares
    (False: min/max, the format before; the stored format is the same); logquant_score_correction
    (default False) lowers each 2-bit key group's scores by the noise inflation its codes cause
    in exp(score), measured to hurt end to end and kept for study (docs/levers.md).
    logquant_key_widths: "auto" (the default) gives each key channel of a layer of b-bit keys (b = 2
    or 4) 0, b or 2b bits, a mean of b and the same bytes, chosen from the model's Q/K weights where
    they remove the most score error (docs/levers.md: Qwen's KL at 4k 0.159 -> 0.078); "uniform":
    b bits on every channel, the format before. The CUDA and Metal kernels read them too (never
    run on a GPU yet).
    logquant_value_groups: "channel" (the default) gives each channel of a key group's G tokens
    its own scale and minimum, as the keys have; "token": each token's 64 channels share one
    (KIVI's layout, the format before). The same bytes; per channel halves the values' share of
    the error on Qwen (docs/levers.md). Host memory only so far, as the key widths.
    logquant_scale_bits: 16 (the default) stores each block's scale and minimum in f16; 8 stores
    a byte each, relative to per-channel references computed once from the model's K/V weights:
    a quarter of a bit per value less (docs/levers.md). Needs keys grouped before RoPE; values
    grouped per token keep f16 ones. A Metal device does not take such a layer yet.
    logquant_prefill_fa_min: ubatches of at least this many tokens (prompts) attend through
    llama.cpp's flash attention over both tiers dequantized to f16, like an f16 cache, instead
    of LogQuant's fused kernel that reads the 2-bit tier in place; 0: always the fused kernel,
    the faster on the CPU at every prompt size measured, with f32 scores that do not depend on
    how a prompt was batched. Default None: automatic, 0 when the cache is in host memory, 32
    when it is on a GPU (whose flash attention runs on tensor cores; untuned, never measured).
    attn_rotation: False turns off llama.cpp's Hadamard rotation of quantized K/V types
    (LLAMA_ATTN_ROT_DISABLE; on by default for q8_0, q4_0, q2_0).
    n_seq_max: sequences the context holds at once (default 1), for llama.cpp's batch API on
    `self.ctx` (several sequences decoded side by side). kv_unified: with several sequences,
    True (default) shares the n_ctx cells among them; False gives each its own stream of
    n_ctx / n_seq_max cells (llama.cpp's default). Both work with every kv_type.
    rpc_servers: "host:port,..." of llama.cpp RPC servers (`logquant-gguf rpc-server`) that
    n_gpu_layers places layers on, each with its part of the KV cache (the LogQuant ops run on
    the servers' CPUs); registered for this model's load only. Close this Llama before stopping
    them.
    Every other argument and method is llama_cpp.Llama's.
    """

    def __init__(self, model_path: str, *, kv_type: str = kv_types.DEFAULT_KV_TYPE,
                 logquant_window: int | None = None, logquant_key_bits: int | None = None,
                 logquant_value_bits: int | None = None,
                 logquant_layer_bits: dict[int, tuple[int, int]] | str | None = None,
                 logquant_key_group: int | None = None, logquant_keys_post_rope: bool | None = None,
                 logquant_fit: bool | None = None, logquant_score_correction: bool | None = None,
                 logquant_key_widths: str | None = None, logquant_value_groups: str | None = None,
                 logquant_scale_bits: int | None = None, logquant_prefill_fa_min: int | None = None,
                 attn_rotation: bool = True,
                 n_seq_max: int = 1, kv_unified: bool = True, rpc_servers: str | None = None,
                 **kwargs: Any):
        spec = kv_types.get(kv_type)
        max_seq = int(llama_cpp.llama_max_parallel_sequences())
        if not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= max_seq:
            raise ValueError(f"n_seq_max must be an integer from 1 to {max_seq}, got {n_seq_max!r}")
        self._n_seq_max = n_seq_max
        self._kv_unified = bool(kv_unified)
        window = _check_window(spec, logquant_window)
        prefill_fa_min = _check_prefill(spec, logquant_prefill_fa_min)
        bits = kv_types.check_bits(spec, logquant_key_bits, logquant_value_bits, logquant_layer_bits,
                                   logquant_key_group, logquant_keys_post_rope, logquant_fit,
                                   logquant_score_correction, logquant_key_widths, logquant_value_groups,
                                   logquant_scale_bits)
        for key, want in (("type_k", spec.type_k), ("type_v", spec.type_v)):
            given = kwargs.pop(key, None)
            if given is not None and given != want:
                raise ValueError(
                    f"{key}={given} conflicts with kv_type={kv_type!r}; pass kv_type only")
        if spec.is_logquant:
            # Sliding-window layers (Gemma 3) stay f16 under LogQuant; llama-cpp-python's default
            # full-size SWA cache would give them n_ctx cells each and undo the savings.
            kwargs.setdefault("swa_full", False)
        if spec.needs_flash_attn:
            if kwargs.get("flash_attn", True) is False:
                raise ValueError(
                    f"kv_type={kv_type!r} quantizes the V cache, which llama.cpp supports only "
                    "with flash attention; drop flash_attn=False")
            kwargs["flash_attn"] = True
        path = check_model_file(model_path)
        # "host:port,...": layers go to these llama.cpp RPC servers (n_gpu_layers); checked now
        remote = rpc.connect(rpc_servers)
        try:
            with _context_lock, _rotation_env(attn_rotation), remote:
                if spec.is_logquant:
                    # the f16 tier's room for a ubatch comes from the context's n_ubatch
                    _capi.set_logquant_params(window, spec.policy)
                    _capi.set_logquant_bits(bits)
                    _capi.set_logquant_prefill(-1 if prefill_fa_min is None else prefill_fa_min)
                    _capi.take_refusal()
                try:
                    with _llama_log.errors_logged() as load_errors:
                        super().__init__(str(path), type_k=spec.type_k, type_v=spec.type_v, **kwargs)
                except BaseException:
                    # what was made before the failure (the model, its buffers on RPC servers
                    # too) goes now, while its devices are registered, not at garbage collection
                    if hasattr(self, "_stack"):
                        self._stack.close()
                    raise
                finally:
                    refusal = _capi.take_refusal() if spec.is_logquant else ""
        except ValueError as e:
            if "Failed to load model" in str(e):
                why = _llama_log.reason(load_errors)
                why = f"llama.cpp: {why}" if why else "run with verbose=True for llama.cpp's log"
                raise ModelFileError(
                    f"llama.cpp could not load {path} ({path.stat().st_size} bytes): the file is "
                    f"truncated, corrupt, or of an architecture this llama.cpp does not know ({why})") from e
            if refusal:  # llama.cpp only logs why the cache was refused
                raise ValueError(f"kv_type={kv_type!r} cannot be used with {path.name}: LogQuant cache: "
                                 f"{refusal}") from None
            raise
        # llama.cpp may make the context larger than asked (n_ctx=64 gives 256); llama-cpp-python
        # sized its token and logit buffers by the request, so a prompt that fits the context
        # overflowed them
        n_ctx = self._n_ctx
        if len(self.input_ids) < n_ctx:
            self.input_ids = np.zeros(n_ctx, dtype=np.intc)
            if self._logits_all:
                self.scores = np.zeros((n_ctx, self._n_vocab), dtype=np.single)
        self.kv_type = kv_type
        self._prompt_pending = False
        self._batch_ends: list[int] = []  # where each eval's batch ended: a rollback replays them
        self.logquant_window = window
        self.logquant_bits = bits
        self.logquant_prefill_fa_min = prefill_fa_min
        self.rpc_servers = rpc_servers
        self.attn_rotation = attn_rotation
        if bits is not None:
            n_layer = self.n_layer()
            far = [il for il, _, _ in bits.layers if il >= n_layer]
            if far:
                self.close()
                raise ValueError(f"logquant_layer_bits names layer(s) {far}, but this model has "
                                 f"{n_layer} layers (0..{n_layer - 1})")

    def close(self) -> None:
        """Frees the model and context; any later use raises ClosedError (not a crash)."""
        if hasattr(self, "_stack") and not isinstance(self.__dict__.get("_ctx"), _Closed):
            super().close()  # absent when __init__ refused its arguments
            # every method reaches llama.cpp through these: make them say so instead of
            # handing a freed pointer to C
            self._ctx = self._model = self._batch = self.tokenizer_ = _Closed()

    def eval(self, tokens) -> None:
        """llama_cpp.Llama.eval, for a cache that may refuse to drop its tail: a LogQuant cache
        refuses a truncation that would bring 2-bit tokens back to f16 (their f16 values are
        gone), and llama-cpp-python's rollbacks (a rejected draft, a mismatching sampled token)
        ignore the refusal. Here the cache goes back to the end of an earlier batch it can cut
        at and the tokens up to the rollback point are evaluated again in their batches, so the
        result is that of a run that never saw the dropped tokens."""
        if not self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1):
            # Back to the end of an earlier batch the cache can cut at, then again in the batches
            # the tokens were first evaluated in: a batch's queries see the tiers as they are
            # after its last token, so other batches would give other K/V rows.
            keep = self.n_tokens
            ends = sorted({e for e in self._batch_ends if e < keep} | {0}, reverse=True)
            start = next(e for e in ends if self._ctx.kv_cache_seq_rm(-1, e, -1))  # 0 always is
            self.n_tokens = start
            for end in sorted({e for e in self._batch_ends if start < e < keep} | {keep}):
                self._eval_batch(self.input_ids[self.n_tokens:end].tolist())
        if self.draft_model is None or self.logquant_window is None or self._prompt_pending:
            self._prompt_pending = False
            self._eval_batch(tokens)
            return
        # A draft is verified by reading the logits of every token of the batch, and every query
        # of a batch sees the tiers as they are after its last token: a batch that crossed a
        # demotion would show the tokens before it 2-bit keys that a token-by-token run still had
        # in f16. So the draft is cut before the next token whose arrival demotes (generate()
        # evaluates only what it was given, and drafts again from there): the draft run's greedy
        # text is the plain run's.
        self._eval_batch(tokens[:self._until_demotion(tokens)])

    def _eval_batch(self, tokens) -> None:
        self._batch_ends = [e for e in self._batch_ends if e <= self.n_tokens]
        super().eval(tokens)
        self._batch_ends.append(self.n_tokens)

    def _until_demotion(self, tokens) -> int:
        """How many of tokens, appended now, come before the next token whose arrival demotes
        (the first token may be one): a batch of those gives every token the logits a
        token-by-token run does."""
        return next((i for i in range(1, len(tokens)) if self._demotes_at(self.n_tokens + i + 1)),
                    len(tokens))

    def generate(self, *args, **kwargs):
        self._prompt_pending = True  # its first eval is the prompt: evaluated whole
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            self._prompt_pending = False

    def _demotes_at(self, n: int) -> bool:
        """Does the n-th token of a sequence (n = 1, 2, ...) send tokens to the low-bit tier? (The
        f16 tier grows by one token except when the window's oldest W merge into the log-sparse
        set; the window baseline keeps the newest 3W.)"""
        w = self.logquant_window
        if kv_types.get(self.kv_type).policy == kv_types.POLICY_WINDOW:
            return n > 3 * w
        return n > 1 and _capi.policy_n_full(n, w) < _capi.policy_n_full(n - 1, w) + 1

    # llama_cpp.Llama fills self.context_params field by field and creates the context right
    # away, with no argument for the number of sequences: set it as the struct is assigned.
    @property
    def context_params(self) -> llama_cpp.llama_context_params:
        return self._context_params

    @context_params.setter
    def context_params(self, params: llama_cpp.llama_context_params) -> None:
        if getattr(self, "_n_seq_max", 1) > 1:
            params.n_seq_max = self._n_seq_max
            params.kv_unified = self._kv_unified
        self._context_params = params

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("type_k", None)
        state.pop("type_v", None)
        state["kv_type"] = self.kv_type
        state["logquant_window"] = self.logquant_window
        if self.logquant_prefill_fa_min is not None:
            state["logquant_prefill_fa_min"] = self.logquant_prefill_fa_min
        state["attn_rotation"] = self.attn_rotation
        if self.rpc_servers:
            state["rpc_servers"] = self.rpc_servers
        state["n_seq_max"] = self._n_seq_max
        state["kv_unified"] = self._kv_unified
        if self.logquant_bits is not None:
            state["logquant_key_bits"] = self.logquant_bits.key
            state["logquant_value_bits"] = self.logquant_bits.value
            state["logquant_layer_bits"] = self.logquant_bits.layer_arg()
            state["logquant_key_group"] = self.logquant_bits.key_group
            state["logquant_keys_post_rope"] = self.logquant_bits.keys_post_rope
            state["logquant_fit"] = self.logquant_bits.fit
            state["logquant_score_correction"] = self.logquant_bits.score_correction
            state["logquant_key_widths"] = self.logquant_bits.key_widths
            state["logquant_value_groups"] = self.logquant_bits.value_groups
            state["logquant_scale_bits"] = self.logquant_bits.scale_bits
        return state

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        # checked by load_state: llama.cpp's own error is opaque
        state.kv_type = self.kv_type
        state.logquant_window = self.logquant_window
        state.logquant_bits = self.logquant_bits
        state.n_seq_max = self._n_seq_max
        state.kv_unified = self._kv_unified
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """llama_cpp.Llama.load_state, checked first against this Llama's cache (a refusal then
        changes nothing); if llama.cpp still fails to load it, the cache and the token list are
        both emptied, so the next completion evaluates its prompt from scratch."""
        saved = (getattr(state, "kv_type", None), getattr(state, "logquant_window", None),
                 getattr(state, "logquant_bits", None))
        if saved[0] is not None and saved != (self.kv_type, self.logquant_window, self.logquant_bits):
            def describe(kv: str, w: int | None, b: kv_types.LogQuantBits | None) -> str:
                return (f"kv_type={kv!r}" + (f", logquant_window={w}" if w is not None else "")
                        + (f", {b}" if b is not None and not b.is_default else ""))
            raise ValueError(
                f"this state was saved with {describe(*saved)}; this Llama uses "
                f"{describe(self.kv_type, self.logquant_window, self.logquant_bits)}. "
                f"Load it into a Llama with {describe(*saved)}.")
        layout = (getattr(state, "n_seq_max", None), getattr(state, "kv_unified", None))
        if layout[0] is not None and layout != (self._n_seq_max, self._kv_unified):
            raise ValueError(
                f"this state was saved with n_seq_max={layout[0]}, kv_unified={layout[1]}; this Llama "
                f"uses n_seq_max={self._n_seq_max}, kv_unified={self._kv_unified}. Load it into a "
                "Llama with the same sequence layout.")
        if state.n_tokens > self.n_ctx():
            raise ValueError(f"this state holds {state.n_tokens} tokens, more than this Llama's "
                             f"n_ctx={self.n_ctx()}; load it into a Llama with n_ctx >= {state.n_tokens}")
        try:
            with _llama_log.errors_logged() as errors:
                super().load_state(state)
        except Exception as e:
            # llama-cpp-python set the token list before llama.cpp refused the data: a later
            # completion would skip evaluating a prefix the cache does not hold
            self.n_tokens = 0
            self._batch_ends = []
            self._ctx.kv_cache_clear()
            why = _llama_log.reason(errors)
            raise ValueError(f"could not load this state ({e}{': ' + why if why else ''}); the KV cache "
                             "and the token list are now empty") from e
        self._batch_ends = [state.n_tokens]  # a rollback into the state replays from its end

    def n_layer(self) -> int:
        return int(llama_cpp.llama_model_n_layer(self._model.model))

    def key_widths(self, il: int) -> list[int]:
        """Layer il's key code bits per channel (kv head by kv head) under
        logquant_key_widths="auto"; [] when its channels all have the same width."""
        return _capi.key_widths(ctypes.cast(self._ctx.ctx, ctypes.c_void_p).value, il)

    def layer_bits(self) -> dict[int, tuple[int, int]]:
        """{layer: (key bits, value bits)} of the layers with a low-bit tier, as this context
        has them (logquant_layer_bits="auto" resolved: the layers given 3-bit keys show 3)."""
        ctx = ctypes.cast(self._ctx.ctx, ctypes.c_void_p).value
        bits = {il: _capi.layer_bits(ctx, il) for il in range(self.n_layer())}
        return {il: b for il, b in bits.items() if b is not None}

    def kv_stats(self) -> dict:
        """What the KV cache holds now: tokens, bytes in all, bytes per token."""
        raw = _capi.kv_stats(ctypes.cast(self._ctx.ctx, ctypes.c_void_p).value)
        spec = kv_types.get(self.kv_type)
        n_ctx = self.n_ctx()
        tiers = {}
        if "logquant" in raw:
            lq = raw["logquant"]
            tiers = {"f16": {"tokens": lq["n_f16"], "bytes": lq["bytes_f16"]},
                     "q2": {"tokens": lq["n_q2"], "bytes": lq["bytes_q2"],
                            # of those bytes: host memory beside the 2-bit tensors (the
                            # cos/sin table of pre-RoPE keys, slot bookkeeping), and tensors
                            # beside the stores (staging of partial key groups, the table)
                            "host_bytes": lq["bytes_host"], "aux_bytes": lq["bytes_aux"]}}
        return {
            "kv_type": self.kv_type,
            "n_ctx": n_ctx,
            "tokens": raw["n_tokens"],
            "sequences": raw["n_seq"],
            "bytes_total": raw["bytes_total"],
            "bytes_per_token": raw["bytes_total"] / n_ctx if n_ctx else 0.0,
            # LogQuant: the cache's own figure for its low-bit tier (its layers only: Gemma's
            # sliding-window layers stay f16 and are not in it)
            "bits_per_value": raw["logquant"]["q2_bits_per_value"] if "logquant" in raw
            else spec.bits_per_value,
            "logquant_window": self.logquant_window,
            "logquant_bits": None if self.logquant_bits is None else self.logquant_bits.as_dict(),
            "tiers": tiers,
        }


class ClosedError(RuntimeError):
    """A Llama was used after close()."""


class _Closed:
    """Stands in for a closed Llama's model, context and batch: any use raises ClosedError."""

    def __getattr__(self, name: str):
        raise ClosedError("this Llama has been closed (close() freed its model and KV cache); "
                          "create a new Llama")


@contextlib.contextmanager
def _rotation_env(rotation: bool):
    """llama.cpp reads LLAMA_ATTN_ROT_DISABLE when it creates a KV cache: set it for that moment."""
    if not isinstance(rotation, bool):
        raise ValueError(f"attn_rotation must be True or False, got {rotation!r}")
    if rotation:
        yield
        return
    old = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLAMA_ATTN_ROT_DISABLE"]
        else:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = old


def _check_window(spec: kv_types.KVType, window: int | None) -> int | None:
    if not spec.is_logquant:
        if window is not None:
            raise ValueError(f"logquant_window applies to the LogQuant kv_types "
                             f"({', '.join(n for n, t in kv_types.KV_TYPES.items() if t.is_logquant)}),"
                             f" not to kv_type={spec.name!r}")
        return None
    if window is None:
        return kv_types.DEFAULT_WINDOW
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 65536:
        raise ValueError(f"logquant_window must be an integer from 1 to 65536, got {window!r}")
    return window


DEFAULT_PREFILL_FA_MIN = None  # automatic (logquant_set_prefill(-1)): fused in host memory, FA on a GPU


def _check_prefill(spec: kv_types.KVType, fa_min: int | None) -> int | None:
    if not spec.is_logquant:
        if fa_min is not None:
            raise ValueError(f"logquant_prefill_fa_min applies to the LogQuant kv_types, not to kv_type={spec.name!r}")
        return None
    if fa_min is None:
        return DEFAULT_PREFILL_FA_MIN
    if isinstance(fa_min, bool) or not isinstance(fa_min, int) or fa_min < 0:
        raise ValueError(f"logquant_prefill_fa_min must be an integer >= 0 (0: never), got {fa_min!r}")
    return fa_min
