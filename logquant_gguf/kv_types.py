"""The KV cache types this build offers, one table row each.

A row says which ggml types hold keys and values and whether flash attention is required
(llama.cpp stores V transposed without flash attention, which a quantized V cannot be).
"""

from __future__ import annotations

from dataclasses import dataclass

# ggml type ids (ggml/include/ggml.h of the pinned llama.cpp).
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_Q2_0 = 42


@dataclass(frozen=True)
class KVType:
    name: str
    type_k: int
    type_v: int
    bits_per_value: float  # storage including block scales
    description: str

    @property
    def needs_flash_attn(self) -> bool:
        return self.type_v != GGML_TYPE_F16


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f16", GGML_TYPE_F16, GGML_TYPE_F16, 16.0, "llama.cpp's default f16 cache"),
        KVType("q8_0", GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, 8.5, "llama.cpp q8_0 keys and values"),
        KVType("q4_0", GGML_TYPE_Q4_0, GGML_TYPE_Q4_0, 4.5,
               "llama.cpp q4_0 keys and values (with its Hadamard rotation)"),
        KVType("q2_0", GGML_TYPE_Q2_0, GGML_TYPE_Q2_0, 2.25,
               "llama.cpp's symmetric 2-bit type, a naive 2-bit baseline"),
    )
}

DEFAULT_KV_TYPE = "f16"


def get(name: str) -> KVType:
    try:
        return KV_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown kv_type {name!r}; valid kv_types: {', '.join(KV_TYPES)}") from None
