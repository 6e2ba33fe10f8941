"""Command-line options for loading a model, shared by `generate`, `chat` and `serve`."""

from __future__ import annotations

import argparse

from . import kv_types


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF file (default: Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--kv-type", default=kv_types.DEFAULT_KV_TYPE, choices=list(kv_types.KV_TYPES),
                   help="KV cache type (default: %(default)s)")
    p.add_argument("--logquant-window", type=int, default=None, metavar="W",
                   help="W for the logquant / q2_window caches (default: %d)" % kv_types.DEFAULT_WINDOW)
    p.add_argument("--n-ctx", type=int, default=4096, help="context size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def model_kwargs(a: argparse.Namespace) -> dict:
    """The optional Llama arguments the command line sets."""
    extra = {"n_threads": a.threads} if a.threads else {}
    if a.logquant_window is not None:
        extra["logquant_window"] = a.logquant_window
    return extra
