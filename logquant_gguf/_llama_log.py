"""llama.cpp's error lines, caught while one call runs on this thread.

llama.cpp logs why it refused a model file or a saved state and returns a bare failure
("Failed to set llama state data"); llama-cpp-python prints the log only when verbose. So the
Python errors can say what went wrong, this module's callback sits in front of llama-cpp-python's
(which still prints as before) and, inside `errors_logged()`, also keeps the error lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

from ._runtime import load_llama_cpp

llama_cpp = load_llama_cpp()
from llama_cpp import _logger  # noqa: E402  (after load_llama_cpp: bound to our libllama)

# ggml.h's enum ggml_log_level in the pinned llama.cpp (llama-cpp-python's _logger still maps an
# older order, in which 3 was the error level)
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

_local = threading.local()  # .lines: the list being filled on this thread, .in_error: last level


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    lines = getattr(_local, "lines", None)
    if lines is not None:
        if level != GGML_LOG_LEVEL_CONT:
            _local.in_error = level == GGML_LOG_LEVEL_ERROR
        if _local.in_error:
            lines.append(text.decode("utf-8", errors="replace"))
    _logger.llama_log_callback(level, text, user_data)


llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def errors_logged() -> Iterator[list[str]]:
    """Yields a list that collects the error lines llama.cpp logs on this thread meanwhile."""
    outer = getattr(_local, "lines", None)
    _local.lines, _local.in_error = [], False
    try:
        yield _local.lines
    finally:
        _local.lines = outer


def reason(lines: list[str], limit: int = 3) -> str:
    """The last few error lines as one sentence-sized string ("" when there were none)."""
    text = [ln.strip() for ln in "".join(lines).splitlines() if ln.strip()]
    return "; ".join(text[-limit:])
