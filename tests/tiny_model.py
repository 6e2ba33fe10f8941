"""Tiny random-weight GGUF models, written with the `gguf` package: fast, and any shape we like."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_tiny_llama(path: Path, *, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                     head_dim: int = 64, n_layer: int = 2, n_ff: int = 128, n_ctx: int = 2048,
                     qk_scale: float = 0.5, seed: int = 0) -> Path:
    """A llama-architecture model with a byte-level SPM vocabulary (259 tokens).

    qk_scale: spread of the Q/K projections; the default gives sharp attention (differences
    between KV caches show), a small one soft attention (rounding differences stay small)."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(name: str, *shape: int, scale: float = 0.05) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    ones("output_norm.weight", n_embd)
    t("output.weight", n_vocab, n_embd, scale=0.5)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        t(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd, scale=qk_scale)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, scale=qk_scale)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd, scale=0.5)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim, scale=0.1)
        ones(f"blk.{i}.ffn_norm.weight", n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd, scale=0.2)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd, scale=0.2)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff, scale=0.2)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
