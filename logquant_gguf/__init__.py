"""logquant-gguf: LogQuant 2-bit KV-cache compression in a patched llama.cpp.

    from logquant_gguf import Llama
    llm = Llama("model.gguf", kv_type="q8_0")      # any llama_cpp.Llama argument works too
    for piece in generate("def fib(n):", llm=llm): print(piece, end="")

Layers, from the bottom: _runtime (binds llama-cpp-python to our libllama), _capi (cffi binding of
our C API), kv_types (the KV cache types of this build), llama (the Llama class), highlevel
(generate / chat), models (the real models on PyPI), cli.
"""

from ._runtime import load_llama_cpp as _load_llama_cpp

_load_llama_cpp()  # before anything else can import llama_cpp with another libllama

from . import models  # noqa: E402
from ._capi import build_info  # noqa: E402
from .highlevel import chat, generate, load  # noqa: E402
from .kv_types import KV_TYPES  # noqa: E402
from .llama import Llama, ModelFileError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Llama", "ModelFileError", "KV_TYPES", "generate", "chat", "load", "models",
           "build_info", "__version__"]
