"""Command-line options for loading a model, shared by `generate`, `chat` and `serve`."""

from __future__ import annotations

import argparse

from . import kv_types

# The commands run the cache this package is for. The Python `Llama` keeps llama.cpp's f16
# (kv_types.DEFAULT_KV_TYPE), so that it stays a drop-in for llama_cpp.Llama.
CLI_KV_TYPE = "logquant"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF file (default: Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--kv-type", default=CLI_KV_TYPE, choices=list(kv_types.KV_TYPES),
                   help="KV cache type (default: %(default)s)")
    p.add_argument("--logquant-window", type=int, default=None, metavar="W",
                   help="W for the logquant / q2_window caches (default: %d)" % kv_types.DEFAULT_WINDOW)
    p.add_argument("--key-bits", type=int, default=None, choices=kv_types.KEY_CODE_BITS,
                   help="code bits of the logquant / q2_window low-bit tier's keys (default: 2; 3: mixed "
                        "widths of 0, 2 or 4 bits at a mean of 3)")
    p.add_argument("--value-bits", type=int, default=None, choices=kv_types.CODE_BITS,
                   help="code bits of its values (default: 2)")
    p.add_argument("--layer-bits", type=_layer_bits, default=None, metavar="L:K:V[,...]|auto",
                   help="per-layer code bits, e.g. 0:8:8 keeps layer 0 at 8-bit keys and values; auto: "
                        "3-bit keys for the half of the layers the model's weights pick")
    p.add_argument("--key-widths", default=None, choices=kv_types.KEY_WIDTHS,
                   help="bits per key channel: auto (default: 0/b/2b for b-bit keys, from the "
                        "model's weights, same size; GPU caches keep uniform ones so far) or uniform")
    p.add_argument("--value-groups", default=None, choices=kv_types.VALUE_GROUPS,
                   help="what shares a value scale: channel (default: each channel of a key group's "
                        "tokens, as keys; GPU caches keep per-token ones so far) or token")
    p.add_argument("--scale-bits", type=int, default=None, choices=kv_types.SCALE_BITS,
                   help="bits of each low-bit block's scale and minimum: 16 (default, f16) or 8 (a byte "
                        "each, relative to per-channel references from the model's weights)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def model_kwargs(a: argparse.Namespace) -> dict:
    """The optional Llama arguments the command line sets."""
    extra = {"n_threads": a.threads} if a.threads else {}
    if a.logquant_window is not None:
        extra["logquant_window"] = a.logquant_window
    for opt, key in (("key_bits", "logquant_key_bits"), ("value_bits", "logquant_value_bits"),
                     ("layer_bits", "logquant_layer_bits"), ("key_widths", "logquant_key_widths"),
                     ("value_groups", "logquant_value_groups"), ("scale_bits", "logquant_scale_bits")):
        if getattr(a, opt, None) is not None:
            extra[key] = getattr(a, opt)
    return extra


def _layer_bits(text: str) -> dict[int, tuple[int, int]] | str:
    if text == kv_types.LAYER_BITS_AUTO:
        return text
    try:
        return kv_types.parse_layer_bits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
