"""`generate` and `chat`: one call from a prompt (or a message list) to streamed text."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import models
from .chat_format import FALLBACK_NOTE, uses_fallback_format
from .llama import Llama

_loaded: dict[tuple, Llama] = {}


def load(model_path: str | None = None, *, kv_type: str = "f16", n_ctx: int = 4096,
         verbose: bool = False, **kwargs: Any) -> Llama:
    """A Llama for model_path (the default model when None), kept for the next call."""
    path = str(model_path or models.default_model_path())
    key = (path, kv_type, n_ctx, verbose, repr(sorted(kwargs.items())))  # repr: dict values too
    if key not in _loaded:
        _loaded.clear()  # one model in memory at a time
        _loaded[key] = Llama(path, kv_type=kv_type, n_ctx=n_ctx, verbose=verbose, **kwargs)
    return _loaded[key]


def generate(prompt: str, *, llm: Llama | None = None, model_path: str | None = None,
             kv_type: str = "f16", max_tokens: int = 128, temperature: float = 0.0,
             **kwargs: Any) -> Iterator[str]:
    """Streams the continuation of prompt, piece by piece."""
    llm = llm or load(model_path, kv_type=kv_type)
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                       stream=True, **kwargs):
        yield chunk["choices"][0]["text"]


def chat(messages: Sequence[dict], *, llm: Llama | None = None, model_path: str | None = None,
         kv_type: str = "f16", max_tokens: int = 256, temperature: float = 0.0,
         **kwargs: Any) -> Iterator[str]:
    """Streams the assistant's reply to messages ([{"role": ..., "content": ...}, ...])."""
    llm = llm or load(model_path, kv_type=kv_type)
    if uses_fallback_format(llm):
        warnings.warn(f"{Path(str(llm.model_path)).name} {FALLBACK_NOTE}", stacklevel=2)
    for chunk in llm.create_chat_completion(list(messages), max_tokens=max_tokens,
                                            temperature=temperature, stream=True, **kwargs):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            yield text
