"""A chat's prompt text and tokens as llama-cpp-python's chat handler would make them, without
running the model (the server's length gate, `bench chat`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from llama_cpp import llama_chat_format


def has_chat_template(llm: Any) -> bool:
    """Whether the GGUF holds a chat template (base models have none; llama-cpp-python then falls
    back to its "llama-2" format, which such a model cannot follow)."""
    return "tokenizer.chat_template" in llm.metadata


def uses_fallback_format(llm: Any) -> bool:
    """Whether llm chats in llama-cpp-python's "llama-2" fallback because its GGUF has no template
    and nobody chose a format or handler: a base model (Gemma 3 270M's GGUF, say) answers that with
    nothing, so the chat front ends say so instead of printing empty replies."""
    return not has_chat_template(llm) and llm.chat_handler is None and llm.chat_format == "llama-2"


FALLBACK_NOTE = ("has no chat template (a base model?); the chat uses llama-cpp-python's 'llama-2' "
                 "format, which it may not follow; `logquant-gguf generate` continues text")


def chat_formatter(llm: Any, chat_format: str | None = None) -> Callable[..., Any] | None:
    """The formatter (messages -> prompt text) behind llm's chat handler, or behind the named
    chat format, when it has one.

    llama-cpp-python makes the handlers of chat templates and named chat formats as closures over
    a formatter (chat_formatter_to_chat_completion_handler) and keeps no other reference to it.
    Other handlers (multimodal ones, say) have none.
    """
    name = chat_format or llm.chat_format
    handler = ((None if chat_format else llm.chat_handler) or llm._chat_handlers.get(name)
               or llama_chat_format.get_chat_completion_handler(name))
    code = getattr(handler, "__code__", None)
    cells = dict(zip(code.co_freevars, handler.__closure__ or ())) if code is not None else {}
    cell = cells.get("chat_formatter")
    return cell.cell_contents if cell is not None else None


def chat_tokens(llm: Any, messages: Sequence[dict], chat_format: str | None = None) -> list[int]:
    """The tokens of messages under llm's chat template (or the named chat format), ready for the
    assistant's reply."""
    fmt = chat_formatter(llm, chat_format)
    if fmt is None:
        raise ValueError(f"the chat handler {chat_format or llm.chat_format!r} exposes no formatter")
    result = fmt(messages=list(messages))
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
