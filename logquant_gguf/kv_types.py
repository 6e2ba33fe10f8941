"""The KV cache types this build offers, one table row each.

A row says which ggml types hold keys and values and whether flash attention is required
(llama.cpp stores V transposed without flash attention, which a quantized V cannot be).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# ggml type ids (ggml/include/ggml.h of the pinned llama.cpp).
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_Q2_0 = 42
GGML_TYPE_LQ2 = 43  # added by patches/0002: selects the LogQuant cache

# LogQuant policies (native/llama/logquant-cache.h)
POLICY_LOG = 0
POLICY_WINDOW = 1
DEFAULT_WINDOW = 32


@dataclass(frozen=True)
class KVType:
    name: str
    type_k: int
    type_v: int
    bits_per_value: float  # storage including block scales (LogQuant: of its 2-bit tier)
    description: str
    policy: Optional[int] = None  # LogQuant types only: which tokens stay f16

    @property
    def is_logquant(self) -> bool:
        return self.policy is not None

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
        KVType("logquant", GGML_TYPE_LQ2, GGML_TYPE_LQ2, 2.5,
               "LogQuant: f16 for the newest W..2W and W log-spaced older tokens, 2-bit for the "
               "rest (keys per channel before RoPE, values per token)", POLICY_LOG),
        KVType("q2_window", GGML_TYPE_LQ2, GGML_TYPE_LQ2, 2.5,
               "the same 2-bit tier with only the newest 3W tokens in f16 (the paper's baseline)",
               POLICY_WINDOW),
    )
}

DEFAULT_KV_TYPE = "f16"


def get(name: str) -> KVType:
    try:
        return KV_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown kv_type {name!r}; valid kv_types: {', '.join(KV_TYPES)}") from None
