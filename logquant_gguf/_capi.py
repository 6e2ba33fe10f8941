"""cffi (ABI mode) binding of our own C API, native/api/logquant.h, exported from libllama."""

from __future__ import annotations

import functools
import json

import cffi

from ._runtime import library_path

CDEF = """
const char * logquant_build_info(void);
int32_t logquant_set_params(int32_t window, int32_t policy);
const char * logquant_last_error(void);
int64_t logquant_policy_n_full(int64_t n, int32_t w);
void logquant_clear_last_error(void);
int32_t logquant_set_key_format(int32_t key_group, int32_t keys_post_rope);
int32_t logquant_set_prefill(int32_t fa_min_tokens);
int32_t logquant_set_codes(int32_t fit, int32_t score_correction);
int32_t logquant_set_key_widths(int32_t mode);
int32_t logquant_set_layer_bits_auto(int32_t on);
int32_t logquant_set_value_groups(int32_t per_channel);
int32_t logquant_set_scale_bits(int32_t bits);
int32_t logquant_set_bits(int32_t key_bits, int32_t value_bits, int32_t n_layers,
                          const int32_t * layers, const int32_t * layer_key_bits,
                          const int32_t * layer_value_bits);
struct logquant_kv_stats {
    int64_t bytes_total;
    int32_t n_seq;
    int32_t n_tokens;
    int32_t is_logquant;
    int32_t window;
    int32_t policy;
    int64_t n_f16;
    int64_t n_q2;
    int64_t bytes_f16;
    int64_t bytes_q2;
    double q2_bits_per_value;
    int64_t bytes_host;
    int64_t bytes_aux;
};
int32_t logquant_kv_stats_get(const void * ctx, struct logquant_kv_stats * out);
int64_t logquant_kv_f16_positions(const void * ctx, int32_t seq_id, int32_t * out, int64_t cap);
int64_t logquant_kv_key_widths(const void * ctx, int32_t il, int8_t * out, int64_t cap);
int32_t logquant_kv_layer_bits(const void * ctx, int32_t il, int32_t * key_bits, int32_t * value_bits);
"""


@functools.lru_cache(maxsize=None)
def _lib():
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    # libllama is already loaded by llama_cpp; dlopen returns the same handle.
    return ffi, ffi.dlopen(str(library_path()))


def build_info() -> dict:
    ffi, lib = _lib()
    return json.loads(ffi.string(lib.logquant_build_info()).decode())


def kv_stats(ctx_ptr: int) -> dict:
    """ctx_ptr: the address of a llama_context (llama_cpp's ctypes pointer as an int)."""
    ffi, lib = _lib()
    out = ffi.new("struct logquant_kv_stats *")
    if lib.logquant_kv_stats_get(ffi.cast("const void *", ctx_ptr), out) != 0:
        raise RuntimeError("this context has no KV cache")
    stats = {"bytes_total": out.bytes_total, "n_seq": out.n_seq, "n_tokens": out.n_tokens}
    if out.is_logquant:
        stats["logquant"] = {"window": out.window, "policy": out.policy,
                             "n_f16": out.n_f16, "n_q2": out.n_q2,
                             "bytes_f16": out.bytes_f16, "bytes_q2": out.bytes_q2,
                             "q2_bits_per_value": out.q2_bits_per_value,
                             "bytes_host": out.bytes_host, "bytes_aux": out.bytes_aux}
    return stats


def _read_list(fn: str, ctype: str, ctx_ptr: int, arg: int, missing: str) -> list[int]:
    """A C API call that writes up to cap values and returns how many there are (-1: none)."""
    ffi, lib = _lib()
    ctx = ffi.cast("const void *", ctx_ptr)
    n = getattr(lib, fn)(ctx, arg, ffi.NULL, 0)
    if n < 0:
        raise ValueError(missing)
    out = ffi.new(f"{ctype}[]", max(n, 1))
    getattr(lib, fn)(ctx, arg, out, n)
    return list(out[0:n])


def f16_positions(ctx_ptr: int, seq_id: int = 0) -> list[int]:
    """Positions of a sequence in the LogQuant f16 tier (ValueError if not a LogQuant cache)."""
    return _read_list("logquant_kv_f16_positions", "int32_t", ctx_ptr, seq_id,
                      f"this context's KV cache is not a LogQuant cache, or has no sequence {seq_id}")


def key_widths(ctx_ptr: int, il: int) -> list[int]:
    """Layer il's mixed key widths (bits per key channel, kv head by kv head); [] when uniform
    (ValueError when the layer has no LogQuant tier)."""
    return _read_list("logquant_kv_key_widths", "int8_t", ctx_ptr, il,
                      f"layer {il} has no LogQuant tier in this context")


def layer_bits(ctx_ptr: int, il: int) -> tuple[int, int] | None:
    """Layer il's (key bits, value bits) in this context; None when it has no LogQuant tier."""
    ffi, lib = _lib()
    k, v = ffi.new("int32_t *"), ffi.new("int32_t *")
    if lib.logquant_kv_layer_bits(ffi.cast("void *", ctx_ptr), il, k, v) != 0:
        return None
    return k[0], v[0]


def set_logquant_params(window: int, policy: int) -> None:
    """Settings for the next LogQuant context created in this process."""
    _, lib = _lib()
    if lib.logquant_set_params(window, policy) != 0:
        raise ValueError(f"invalid LogQuant settings: window={window}, policy={policy}")


def set_logquant_prefill(fa_min_tokens: int) -> None:
    """The prefill path of the next LogQuant context created in this process: ubatches of at
    least fa_min_tokens tokens go through flash attention over both tiers in f16; 0: never; -1:
    automatic (never in host memory, 32 on a GPU)."""
    _, lib = _lib()
    if lib.logquant_set_prefill(fa_min_tokens) != 0:
        raise ValueError(f"invalid LogQuant prefill setting: {fa_min_tokens}")


def policy_n_full(n: int, window: int) -> int:
    """How many of a sequence's n tokens LogQuant's policy keeps in f16 (logquant-policy.h)."""
    _, lib = _lib()
    return int(lib.logquant_policy_n_full(n, window))


def take_refusal() -> str:
    """Why the last LogQuant cache created on this thread was refused ("" if none was), cleared."""
    ffi, lib = _lib()
    why = ffi.string(lib.logquant_last_error()).decode(errors="replace")
    lib.logquant_clear_last_error()
    return why


def set_logquant_bits(bits) -> None:
    """The low-bit tier's format (a kv_types.LogQuantBits) for the next LogQuant context created
    in this process."""
    ffi, lib = _lib()
    n = len(bits.layers)
    cols = [ffi.new("int32_t[]", [row[i] for row in bits.layers] or [0]) for i in range(3)]
    if lib.logquant_set_bits(bits.key, bits.value, n, *cols) != 0:
        raise ValueError(f"invalid LogQuant code bits: {bits}")
    if lib.logquant_set_layer_bits_auto(int(bits.layers_auto)) != 0:
        raise ValueError(f"invalid LogQuant layer bits: {bits}")
    if lib.logquant_set_key_format(bits.key_group, int(bits.keys_post_rope)) != 0:
        raise ValueError(f"invalid LogQuant key format: {bits}")
    if lib.logquant_set_codes(int(bits.fit), int(bits.score_correction)) != 0:
        raise ValueError(f"invalid LogQuant code settings: {bits}")
    if lib.logquant_set_key_widths(int(bits.key_widths == "auto")) != 0:
        raise ValueError(f"invalid LogQuant key widths: {bits}")
    if lib.logquant_set_value_groups(int(bits.value_groups == "channel")) != 0:
        raise ValueError(f"invalid LogQuant value groups: {bits}")
    if lib.logquant_set_scale_bits(bits.scale_bits) != 0:
        raise ValueError(f"invalid LogQuant scale bits: {bits}")
