"""cffi (ABI mode) binding of our own C API, native/api/logquant.h, exported from libllama."""

from __future__ import annotations

import functools
import json

import cffi

from ._runtime import library_path

CDEF = """
const char * logquant_build_info(void);
struct logquant_kv_stats {
    int64_t bytes_total;
    int32_t n_seq;
    int32_t n_tokens;
};
int32_t logquant_kv_stats_get(const void * ctx, struct logquant_kv_stats * out);
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
    return {"bytes_total": out.bytes_total, "n_seq": out.n_seq, "n_tokens": out.n_tokens}
