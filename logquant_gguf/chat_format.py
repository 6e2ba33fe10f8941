"""A chat's prompt text and tokens as llama-cpp-python's chat handler would make them, without
running the model (the server's length gate, `bench chat`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from llama_cpp import llama_chat_format


def chat_formatter(llm: Any) -> Callable[..., Any] | None:
    """The formatter (messages -> prompt text) behind llm's chat handler, when it has one.

    llama-cpp-python makes the handlers of chat templates and named chat formats as closures over
    a formatter (chat_formatter_to_chat_completion_handler) and keeps no other reference to it.
    Other handlers (multimodal ones, say) have none.
    """
    handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
               or llama_chat_format.get_chat_completion_handler(llm.chat_format))
    code = getattr(handler, "__code__", None)
    cells = dict(zip(code.co_freevars, handler.__closure__ or ())) if code is not None else {}
    cell = cells.get("chat_formatter")
    return cell.cell_contents if cell is not None else None


def chat_tokens(llm: Any, messages: Sequence[dict]) -> list[int]:
    """The tokens of messages under llm's chat template (or named chat format), ready for the
    assistant's reply."""
    fmt = chat_formatter(llm)
    if fmt is None:
        raise ValueError(f"the chat handler of this model ({llm.chat_format}) exposes no formatter")
    result = fmt(messages=list(messages))
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
