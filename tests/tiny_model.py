"""Tiny random-weight GGUF models, written with the `gguf` package: fast, and any shape we like.

Each writer makes one architecture of the pinned llama.cpp with exactly the tensors its loader
creates (an extra or a missing one and llama.cpp refuses the file), all f32, and the same
byte-level SPM vocabulary (259 tokens):

- `write_tiny_llama`: llama, NORM RoPE over the whole head
- `write_tiny_rope_model`: command-r (NORM) or stablelm (NEOX), full or partial rotary
- `write_tiny_alibi`: mpt, ALiBi and no RoPE
- `write_tiny_sinks`: gpt-oss (MoE) or granite_swa, attention sinks (iSWA: window and full layers)
- `write_tiny_kv_reuse`: gemma4, later layers reuse an earlier layer's KV (shared_kv_layers)
- `write_tiny_k_ne_v`: plm, K head size != V head size (MLA-style)
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
N_VOCAB = len(TOKENS)


class _Writer:
    """A GGUFWriter with the common keys and vocabulary, and random f32 tensors."""

    def __init__(self, path: Path, arch: str, *, n_embd: int, n_layer: int, n_ctx: int, seed: int):
        self.path = path
        self.rng = np.random.default_rng(seed)
        self.n_embd = n_embd
        w = self.w = gguf.GGUFWriter(str(path), arch)
        w.add_name(f"tiny-random-{arch}")
        w.add_context_length(n_ctx)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_token_list(TOKENS)
        w.add_token_scores([0.0] * N_VOCAB)
        w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                          + [gguf.TokenType.BYTE] * 256)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)

    def heads(self, n_head: int, n_head_kv: int, key_length: int, value_length: int,
              rope_dims: int | None) -> None:
        self.w.add_head_count(n_head)
        self.w.add_head_count_kv(n_head_kv)
        self.w.add_key_length(key_length)
        self.w.add_value_length(value_length)
        if rope_dims is not None:
            self.w.add_rope_dimension_count(rope_dims)
            self.w.add_rope_freq_base(10000.0)

    def t(self, name: str, *shape: int, scale: float) -> None:
        """Gaussian weights; shape in numpy order (llama.cpp's ne reversed: rows last)."""
        self.w.add_tensor(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def lin(self, name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        """A projection whose outputs have about `gain` times its inputs' per-channel spread."""
        self.t(name, n_out, n_in, scale=gain / np.sqrt(n_in))

    def qk(self, name: str, heads: int, head_dim: int, n_in: int, scale: float, z,
           quant: gguf.GGMLQuantizationType | None = None) -> None:
        """A Q or K projection, Gaussian, whose row for head channel c is scaled by z[c]; stored
        quantized to `quant` when given."""
        x = self.rng.standard_normal((heads * head_dim, n_in)).astype(np.float32) * np.float32(scale)
        x = x * np.tile(np.asarray(z, np.float32), heads)[:, None]
        if quant is None:
            self.w.add_tensor(name, x)
        else:
            self.w.add_tensor(name, gguf.quants.quantize(x, quant), raw_dtype=quant)

    def channel_scales(self, head_dim: int, spread: float) -> np.ndarray:
        """exp(spread * N(0, 1)) per head channel (1 when spread is 0), shared by the heads."""
        return np.exp(spread * self.rng.standard_normal(head_dim)) if spread else np.ones(head_dim)

    def fill(self, name: str, value: float, *shape: int) -> None:
        self.w.add_tensor(name, np.full(shape, value, dtype=np.float32))

    def ones(self, name: str, *shape: int) -> None:
        self.fill(name, 1.0, *shape)

    def zeros(self, name: str, *shape: int) -> None:
        self.fill(name, 0.0, *shape)

    def embeddings(self, *, output: bool = True, output_norm_bias: bool = False) -> None:
        self.t("token_embd.weight", N_VOCAB, self.n_embd, scale=1.0)
        self.ones("output_norm.weight", self.n_embd)
        if output_norm_bias:
            self.zeros("output_norm.bias", self.n_embd)
        if output:  # else llama.cpp ties the output to token_embd
            self.lin("output.weight", N_VOCAB, self.n_embd, gain=3.0)

    def close(self) -> Path:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        return self.path


def write_tiny_llama(path: Path, *, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                     head_dim: int = 64, n_layer: int = 2, n_ff: int = 128, n_ctx: int = 2048,
                     qk_scale: float = 0.5, channel_spread: float = 0.0, seed: int = 0,
                     qk_quant: gguf.GGMLQuantizationType | None = None) -> Path:
    """A llama-architecture model with a byte-level SPM vocabulary (259 tokens).

    qk_scale: spread of the Q/K projections; the default gives sharp attention (differences
    between KV caches show), a small one soft attention (rounding differences stay small).
    channel_spread: Q/K rows of head channel c scaled by exp(channel_spread * z_c), z_c ~ N(0, 1)
    shared by the heads, so that channels matter unequally, as in real models. qk_quant: the Q/K
    weights' type (with channel_spread; e.g. Q4_0, which the CPU repacks on AVX2 and ARM)."""
    m = _Writer(path, "llama", n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    w = m.w
    w.add_feed_forward_length(n_ff)
    m.heads(n_head, n_head_kv, head_dim, head_dim, head_dim)
    w.add_layer_norm_rms_eps(1e-5)

    m.t("token_embd.weight", N_VOCAB, n_embd, scale=1.0)
    m.ones("output_norm.weight", n_embd)
    m.t("output.weight", N_VOCAB, n_embd, scale=0.5)
    for i in range(n_layer):
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        if channel_spread:
            z = m.channel_scales(head_dim, channel_spread)
            m.qk(f"blk.{i}.attn_q.weight", n_head, head_dim, n_embd, qk_scale, z, qk_quant)
            m.qk(f"blk.{i}.attn_k.weight", n_head_kv, head_dim, n_embd, qk_scale, z, qk_quant)
        else:
            m.t(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd, scale=qk_scale)
            m.t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, scale=qk_scale)
        m.t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd, scale=0.5)
        m.t(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim, scale=0.1)
        m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
        m.t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd, scale=0.2)
        m.t(f"blk.{i}.ffn_up.weight", n_ff, n_embd, scale=0.2)
        m.t(f"blk.{i}.ffn_down.weight", n_embd, n_ff, scale=0.2)
    return m.close()


# The writers below scale every projection by 1/sqrt(fan-in), so a model's behaviour does not
# depend on its width: `sharpness` is about the spread of the attention scores q.k/sqrt(d)
# (its square: q and k entries each have spread `sharpness`).


def write_tiny_rope_model(path: Path, *, rope: str = "neox", head_dim: int = 64,
                          rope_dims: int | None = None, n_head: int = 4, n_head_kv: int = 2,
                          n_layer: int = 2, n_ff: int = 128, n_ctx: int = 2048,
                          sharpness: float = 1.5, channel_spread: float = 0.0, seed: int = 0) -> Path:
    """RoPE of either kind over the first rope_dims (default: all) dimensions of each head.
    channel_spread: as write_tiny_llama's.

    rope="norm": command-r (llama.cpp's NORM rotation, pairs of neighbours; llama itself refuses
    partial rotary); rope="neox": stablelm (NEOX, pairs half a rotated span apart). Both tie the
    width to the heads: n_embd = n_head * head_dim."""
    if rope not in ("norm", "neox"):
        raise ValueError(f"rope must be 'norm' or 'neox', got {rope!r}")
    rope_dims = head_dim if rope_dims is None else rope_dims
    if not 0 < rope_dims <= head_dim or rope_dims % 2:
        raise ValueError(f"rope_dims must be even and in (0, {head_dim}], got {rope_dims}")
    n_embd = n_head * head_dim
    arch = "command-r" if rope == "norm" else "stablelm"
    m = _Writer(path, arch, n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    m.w.add_feed_forward_length(n_ff)
    m.heads(n_head, n_head_kv, head_dim, head_dim, rope_dims)
    m.w.add_layer_norm_eps(1e-5)
    if rope == "norm":  # command-r ties the output to token_embd: scale its logits down
        m.w.add_logit_scale(3.0 / np.sqrt(n_embd))

    m.embeddings(output=rope == "neox", output_norm_bias=rope == "neox")
    for i in range(n_layer):
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        if rope == "neox":
            m.zeros(f"blk.{i}.attn_norm.bias", n_embd)
        if channel_spread:
            z = m.channel_scales(head_dim, channel_spread)
            m.qk(f"blk.{i}.attn_q.weight", n_head, head_dim, n_embd, sharpness / np.sqrt(n_embd), z)
            m.qk(f"blk.{i}.attn_k.weight", n_head_kv, head_dim, n_embd, sharpness / np.sqrt(n_embd), z)
        else:
            m.lin(f"blk.{i}.attn_q.weight", n_embd, n_embd, gain=sharpness)
            m.lin(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, gain=sharpness)
        m.lin(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        m.lin(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        if rope == "neox":  # stablelm: ffn_norm present = sequential residual
            m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
            m.zeros(f"blk.{i}.ffn_norm.bias", n_embd)
        m.lin(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    return m.close()


def write_tiny_alibi(path: Path, *, head_dim: int = 64, n_head: int = 4, n_head_kv: int = 2,
                     max_alibi_bias: float = 8.0, n_layer: int = 2, n_ff: int = 128,
                     n_ctx: int = 2048, sharpness: float = 1.5, seed: int = 0) -> Path:
    """mpt with ALiBi (no RoPE, no position embeddings): head h's scores get -slope_h * distance,
    slope_h = 2^(-max_alibi_bias * (h + 1) / n_head); the last heads reach far back."""
    n_embd = n_head * head_dim
    n_embd_kv = n_head_kv * head_dim
    m = _Writer(path, "mpt", n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    m.w.add_feed_forward_length(n_ff)
    m.heads(n_head, n_head_kv, head_dim, head_dim, None)
    m.w.add_layer_norm_eps(1e-5)
    m.w.add_max_alibi_bias(max_alibi_bias)

    m.embeddings(output=True)
    for i in range(n_layer):
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        # fused [Q; K; V] rows
        q = m.rng.standard_normal((n_embd, n_embd)) * sharpness
        k = m.rng.standard_normal((n_embd_kv, n_embd)) * sharpness
        v = m.rng.standard_normal((n_embd_kv, n_embd))
        m.w.add_tensor(f"blk.{i}.attn_qkv.weight",
                       (np.concatenate([q, k, v]) / np.sqrt(n_embd)).astype(np.float32))
        m.lin(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
        m.lin(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    return m.close()


def write_tiny_sinks(path: Path, *, arch: str = "gpt-oss", head_dim: int = 64, n_head: int = 4,
                     n_head_kv: int = 2, n_embd: int = 128, n_layer: int = 2, n_ff: int = 64,
                     n_expert: int = 4, n_expert_used: int = 2, sliding_window: int = 32,
                     n_ctx: int = 2048, sharpness: float = 1.5, seed: int = 0) -> Path:
    """A model with attention sinks (a learned per-head logit in every softmax), iSWA: even layers
    sliding-window, odd layers full attention (where a LogQuant cache would go).

    arch="gpt-oss" (llama.cpp's OPENAI_MOE: MoE FFN of n_expert experts, biases everywhere) or
    "granite_swa" (dense FFN; n_expert and n_expert_used unused)."""
    if arch not in ("gpt-oss", "granite_swa"):
        raise ValueError(f"arch must be 'gpt-oss' or 'granite_swa', got {arch!r}")
    m = _Writer(path, arch, n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    w = m.w
    m.heads(n_head, n_head_kv, head_dim, head_dim, head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(sliding_window)
    w.add_array(f"{arch}.attention.sliding_window_pattern", [i % 2 == 0 for i in range(n_layer)])
    if arch == "gpt-oss":
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff)
        w.add_feed_forward_length(n_ff)
    else:
        w.add_feed_forward_length(n_ff)
        w.add_logit_scale(1.0)

    m.embeddings(output=True)
    for i in range(n_layer):
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        m.lin(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd, gain=sharpness)
        m.lin(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, gain=sharpness)
        m.lin(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        m.lin(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        m.t(f"blk.{i}.attn_sinks.weight", n_head, scale=1.0)
        if arch == "gpt-oss":
            m.zeros(f"blk.{i}.attn_output.bias", n_embd)
            m.ones(f"blk.{i}.post_attention_norm.weight", n_embd)
            m.lin(f"blk.{i}.ffn_gate_inp.weight", n_expert, n_embd)
            m.zeros(f"blk.{i}.ffn_gate_inp.bias", n_expert)
            for name in ("gate", "up"):
                m.t(f"blk.{i}.ffn_{name}_exps.weight", n_expert, n_ff, n_embd,
                    scale=1 / np.sqrt(n_embd))
                m.zeros(f"blk.{i}.ffn_{name}_exps.bias", n_expert, n_ff)
            m.t(f"blk.{i}.ffn_down_exps.weight", n_expert, n_embd, n_ff, scale=1 / np.sqrt(n_ff))
            m.zeros(f"blk.{i}.ffn_down_exps.bias", n_expert, n_embd)
        else:
            m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
            m.lin(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
            m.lin(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
            m.lin(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    return m.close()


def write_tiny_kv_reuse(path: Path, *, head_dim: int = 64, n_head: int = 2, n_head_kv: int = 1,
                        n_embd: int = 128, n_layer: int = 4, n_shared: int = 2, n_ff: int = 128,
                        sliding_window: int = 32, n_ctx: int = 2048, sharpness: float = 1.0,
                        seed: int = 0) -> Path:
    """gemma4 whose last n_shared layers have no K/V of their own: each reads the KV cache of the
    last earlier layer of its kind (sliding-window or full), as Gemma 3n / Gemma 4 do. Layers
    alternate sliding-window (even) and full attention (odd); llama.cpp needs at least two layers
    with KV. The full-attention layers carry gemma4's rope_freqs (all ones here)."""
    if not 2 <= n_layer - n_shared < n_layer:
        raise ValueError(f"need 2 <= n_layer - n_shared < n_layer, got {n_layer} - {n_shared}")
    m = _Writer(path, "gemma4", n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    w = m.w
    w.add_feed_forward_length(n_ff)
    m.heads(n_head, n_head_kv, head_dim, head_dim, head_dim)
    w.add_uint32("gemma4.attention.key_length_swa", head_dim)
    w.add_uint32("gemma4.attention.value_length_swa", head_dim)
    w.add_uint32("gemma4.embedding_length_per_layer_input", 0)
    w.add_uint32("gemma4.attention.shared_kv_layers", n_shared)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(sliding_window)
    swa = [i % 2 == 0 for i in range(n_layer)]
    w.add_array("gemma4.attention.sliding_window_pattern", swa)

    m.embeddings(output=False)
    m.ones("rope_freqs.weight", head_dim // 2)  # one tensor, shared by the full layers
    for i in range(n_layer):
        has_kv = i < n_layer - n_shared
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        m.lin(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        # q and k are RMS-normed per head and scores are not scaled (gemma4): the q norm's
        # weight sets the spread of the scores
        m.fill(f"blk.{i}.attn_q_norm.weight", sharpness / np.sqrt(head_dim), head_dim)
        if has_kv:
            m.lin(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
            m.lin(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
            m.ones(f"blk.{i}.attn_k_norm.weight", head_dim)
        m.lin(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        m.ones(f"blk.{i}.post_attention_norm.weight", n_embd)
        m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
        m.lin(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        m.ones(f"blk.{i}.post_ffw_norm.weight", n_embd)
    return m.close()


def write_tiny_k_ne_v(path: Path, *, key_dim: int = 128, value_dim: int = 64, rope_dims: int = 64,
                      n_head: int = 2, n_embd: int = 128, kv_lora_rank: int = 64, n_layer: int = 2,
                      n_ff: int = 128, n_ctx: int = 2048, sharpness: float = 1.5,
                      seed: int = 0) -> Path:
    """plm (MLA-style attention, not absorbed): K heads of key_dim (key_dim - rope_dims
    dimensions from a low-rank projection, rope_dims rotated ones shared by the heads), V heads
    of value_dim, so the KV cache holds K and V rows of different sizes. One KV head per query
    head."""
    nope = key_dim - rope_dims
    m = _Writer(path, "plm", n_embd=n_embd, n_layer=n_layer, n_ctx=n_ctx, seed=seed)
    w = m.w
    w.add_feed_forward_length(n_ff)
    m.heads(n_head, n_head, key_dim, value_dim, rope_dims)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_kv_lora_rank(kv_lora_rank)

    m.embeddings(output=False)
    for i in range(n_layer):
        m.ones(f"blk.{i}.attn_norm.weight", n_embd)
        m.lin(f"blk.{i}.attn_q.weight", n_head * key_dim, n_embd, gain=sharpness)
        m.lin(f"blk.{i}.attn_kv_a_mqa.weight", kv_lora_rank + rope_dims, n_embd, gain=sharpness)
        m.ones(f"blk.{i}.attn_kv_a_norm.weight", kv_lora_rank)
        m.lin(f"blk.{i}.attn_kv_b.weight", n_head * (nope + value_dim), kv_lora_rank)
        m.lin(f"blk.{i}.attn_output.weight", n_embd, n_head * value_dim)
        m.ones(f"blk.{i}.ffn_norm.weight", n_embd)
        m.lin(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        m.lin(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    return m.close()
