"""Where a result came from: the machine, the build, the model file, the command line.

Every part's JSON carries this block, so a number can always be traced to what produced it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import KV_TYPES, build_info, models
from .._runtime import BIN_DIR, LIB_DIR
from ..kv_types import DEFAULT_WINDOW, POLICY_WINDOW, bits_of_kwargs, layer_bits_text, parse_variant


def _cpuinfo_field(field: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Platform, CPU model, core counts, memory and load at the time of the call."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpuinfo_field("model name"),
        "cpu_flags_avx2": "avx2" in _cpuinfo_field("flags").split(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "mem_total_bytes": _mem_total_bytes(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


@functools.cache
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelRef:
    """A model chosen on the command line: a known name or a GGUF path."""

    slug: str  # directory name under bench/results/<device>/
    path: Path

    def info(self) -> dict:
        return {"slug": self.slug, "path": str(self.path), "file": self.path.name,
                "size_bytes": self.path.stat().st_size, "sha256": sha256_file(str(self.path))}


def resolve_model(spec: str | None) -> ModelRef:
    """`spec` is a name from logquant_gguf.models.MODELS, a GGUF path, or None (the default)."""
    name = spec or models.DEFAULT_MODEL
    if name in models.MODELS:
        return ModelRef(name, models.model_path(name))
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--model {name!r} is neither a known model ({', '.join(models.MODELS)}) "
                         "nor a file")
    return ModelRef(path.stem.lower(), path)


def select_kv_types(spec: str | None) -> list[str]:
    """Comma-separated kv_types, in the given order; None: every type this build offers."""
    if not spec:
        return list(KV_TYPES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n.split("+")[0] not in KV_TYPES]
    if unknown:
        raise ValueError(f"unknown kv_type(s) {', '.join(unknown)}; this build offers "
                         f"{', '.join(KV_TYPES)}")
    for n in names:
        parse_variant(n)  # a bad lever modifier fails here, before any run
    return names


def kv_type_info(names: list[str]) -> dict:
    """Per kv_type (or lever variant such as "logquant+k4"): its ggml types and description;
    a variant also gets its Llama arguments."""
    out = {}
    for n in names:
        base, levers = parse_variant(n)
        spec = KV_TYPES[base]
        out[n] = {"type_k": ggml_type_name(spec.type_k), "type_v": ggml_type_name(spec.type_v),
                  "bits_per_value": spec.bits_per_value, "description": spec.description}
        if levers:
            out[n]["levers"] = {k: ({str(il): list(b) for il, b in v.items()} if isinstance(v, dict) else v)
                                for k, v in levers.items()}
    return out


@functools.cache
def _ggml() -> ctypes.CDLL:
    name = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}.get(sys.platform,
                                                                          "libggml-base.so")
    lib = ctypes.CDLL(str(LIB_DIR / name))
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def ggml_type_name(type_id: int) -> str:
    """ggml's own name of a type id (what llama.cpp's tools accept after -ctk/-ctv)."""
    name = _ggml().ggml_type_name(type_id)
    return name.decode() if name else f"type{type_id}"


def tool_env(kv: str) -> dict[str, str]:
    """Environment for llama.cpp's tools measuring kv: they select the LogQuant cache with
    -ctk lq2, and its policy and window only through LOGQUANT_POLICY / LOGQUANT_WINDOW."""
    base, levers = parse_variant(kv)
    spec = KV_TYPES[base]
    rot = {} if levers.get("attn_rotation", True) else {"LLAMA_ATTN_ROT_DISABLE": "1"}
    if not spec.is_logquant:
        return rot
    b = bits_of_kwargs(spec, levers)
    return {"LOGQUANT_POLICY": "window" if spec.policy == POLICY_WINDOW else "log",
            "LOGQUANT_WINDOW": str(levers.get("logquant_window", DEFAULT_WINDOW)),
            "LOGQUANT_KEY_BITS": str(b.key),
            "LOGQUANT_VALUE_BITS": str(b.value),
            "LOGQUANT_LAYER_BITS": layer_bits_text(b.layer_arg()),
            "LOGQUANT_KEY_GROUP": str(b.key_group),
            "LOGQUANT_KEYS_POST_ROPE": str(int(b.keys_post_rope)),
            "LOGQUANT_FIT": str(int(b.fit)),
            "LOGQUANT_SCORE_CORRECTION": str(int(b.score_correction)),
            "LOGQUANT_KEY_WIDTHS": b.key_widths,
            "LOGQUANT_VALUE_GROUPS": b.value_groups,
            "LOGQUANT_SCALE_BITS": str(b.scale_bits),
            **rot}


def tool_path(name: str) -> Path | None:
    """A llama.cpp tool of our build (bin/ inside the package), if it was built."""
    exe = BIN_DIR / (name + (".exe" if sys.platform == "win32" else ""))
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def run_tool(cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs one of llama.cpp's tools, output captured (line-buffered through stdbuf where there
    is one, so what the tool wrote before it exits is not lost in a pipe's buffer)."""
    stdbuf = shutil.which("stdbuf")
    full = [stdbuf, "-oL", "-eL", *cmd] if stdbuf else cmd
    return subprocess.run(full, capture_output=True, text=True, check=False,
                          env={**os.environ, **(extra_env or {})})


def build_block() -> dict:
    info = build_info()
    info["tools"] = {t: str(tool_path(t)) if tool_path(t) else None
                     for t in ("llama-perplexity", "llama-bench")}
    return info
