"""Points llama-cpp-python at the patched llama.cpp shipped inside this package.

llama-cpp-python loads libllama once, at import, from $LLAMA_CPP_LIB_PATH (else from its own
llama_cpp/lib). So this module must run before anything imports llama_cpp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"
BIN_DIR = Path(__file__).resolve().parent / "bin"


class RuntimeMismatchError(ImportError):
    pass


def _lib_file() -> Path:
    name = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")
    return LIB_DIR / name


def load_llama_cpp():
    """Imports llama_cpp bound to our libllama and returns the module."""
    if not _lib_file().exists():
        raise RuntimeMismatchError(
            f"logquant_gguf's compiled runtime is missing ({_lib_file()}). Reinstall the package "
            "with `pip install .` from a checkout (it compiles llama.cpp).")
    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is not None:
        loaded = Path(getattr(already, "_base_path", "")).resolve()
        if loaded != LIB_DIR:
            raise RuntimeMismatchError(
                f"llama_cpp was imported before logquant_gguf and is bound to {loaded}, not to "
                f"logquant_gguf's patched build ({LIB_DIR}). Import logquant_gguf first, or set "
                f"LLAMA_CPP_LIB_PATH={LIB_DIR} before starting Python.")
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    import llama_cpp

    return llama_cpp


def library_path() -> Path:
    return _lib_file()
