#!/usr/bin/env python3
"""Materialise the pinned llama.cpp source, with our patch series applied.

The pin is the llama.cpp vendored in the llama-cpp-python sdist named below. The build calls
`materialize`; developers use `prepare` (a git checkout with one commit per patch, to edit) and
`export` (write that checkout's commits back to patches/). Nothing of llama.cpp is kept in this repo.

Offline builds: set LOGQUANT_LLAMA_CPP_SOURCE to the sdist archive, to the unpacked sdist, or to
its vendor/llama.cpp tree. `pack` writes that tree without what our build never reads (docs,
vocabulary files, other backends: 5 MB instead of the sdist's 77), for a machine that cannot reach
PyPI and takes little luggage (scripts/gpu_kit.sh).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PIN_PACKAGE = "llama-cpp-python"
PIN_VERSION = "0.3.36"
PIN_ARCHIVE = f"llama_cpp_python-{PIN_VERSION}.tar.gz"
PIN_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_DIR = f"llama_cpp_python-{PIN_VERSION}/vendor/llama.cpp"

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"
SOURCE_ENV = "LOGQUANT_LLAMA_CPP_SOURCE"


class SourceError(RuntimeError):
    pass


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def series_digest() -> str:
    """Identifies pin + patch series + this script, so a build tree knows when it is stale."""
    h = hashlib.sha256(PIN_SHA256.encode())
    h.update(Path(__file__).read_bytes())
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_archive(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / PIN_ARCHIVE
    if not archive.exists():
        print(f"-- logquant: downloading {PIN_PACKAGE}=={PIN_VERSION} sdist", flush=True)
        # --no-build-isolation: pip must read the sdist's metadata, and an isolated build
        # environment under --no-binary :all: would compile cmake itself from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check",
               f"{PIN_PACKAGE}=={PIN_VERSION}", "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not archive.exists():
            raise SourceError(
                f"could not download the pinned llama.cpp ({' '.join(cmd)}):\n{r.stdout}{r.stderr}\n"
                f"For an offline build set {SOURCE_ENV} to {PIN_ARCHIVE} or its unpacked tree.")
    return archive


def check_archive(archive: Path) -> None:
    digest = sha256_of(archive)
    if digest != PIN_SHA256:
        raise SourceError(f"{archive}: sha256 {digest} does not match the pinned {PIN_SHA256}")


def unpack_pristine(dest: Path, cache: Path) -> None:
    """Writes the unpatched llama.cpp tree to dest (which must not exist)."""
    given = os.environ.get(SOURCE_ENV, "").strip()
    src = Path(given).expanduser() if given else None
    if src is not None and src.is_dir():
        tree = src / "vendor" / "llama.cpp" if (src / "vendor" / "llama.cpp").is_dir() else src
        if not (tree / "ggml" / "include" / "ggml.h").exists():
            raise SourceError(f"{SOURCE_ENV}={src} is not a llama.cpp tree nor an unpacked sdist")
        shutil.copytree(tree, dest, symlinks=True)
    else:
        archive = src if src is not None else download_archive(cache)
        if not archive.exists():
            raise SourceError(f"{SOURCE_ENV}={archive} does not exist")
        check_archive(archive)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDOR_DIR + "/")]
            tar.extractall(tmp, members=members)
            shutil.move(os.path.join(tmp, VENDOR_DIR), dest)
    # The sdist keeps the submodule's `.git` pointer file, which would break git in the tree.
    gitfile = dest / ".git"
    if gitfile.is_file():
        gitfile.unlink()


def git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_AUTHOR_NAME="logquant", GIT_AUTHOR_EMAIL="logquant@localhost",
               GIT_COMMITTER_NAME="logquant", GIT_COMMITTER_EMAIL="logquant@localhost",
               GIT_AUTHOR_DATE="2026-01-01T00:00:00Z", GIT_COMMITTER_DATE="2026-01-01T00:00:00Z")
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SourceError(f"git {' '.join(args)} failed in {cwd}:\n{r.stdout}{r.stderr}")
    return r


def apply_series(tree: Path) -> None:
    # The tree may sit inside another git work tree (our build/ folder does): git apply would then
    # patch relative to that repository and silently skip every path. The ceiling stops git from
    # looking above the tree, so it applies like `patch -p1`.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    for p in patch_files():
        for args in (["--whitespace=nowarn"], ["--check", "--reverse"]):  # apply, then prove it
            r = subprocess.run(["git", "apply", *args, str(p)], cwd=tree, env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SourceError(
                    f"patch {p.name} does not apply to the pinned llama.cpp:\n{r.stderr}")


# What `pack` leaves out: nothing the patches touch nor anything our CMake builds (CPU, CUDA, Metal,
# RPC, the tools) reads.
PACK_SKIP = ("docs", "models", "media", "benches", ".github", "app", "pocs", "skills", "gguf-py",
             "conversion", "tools/ui", "ggml/src/ggml-vulkan", "ggml/src/ggml-sycl", "ggml/src/ggml-opencl",
             "ggml/src/ggml-hexagon", "ggml/src/ggml-et", "ggml/src/ggml-openvino", "ggml/src/ggml-webgpu",
             "ggml/src/ggml-cann", "ggml/src/ggml-virtgpu", "ggml/src/ggml-zdnn", "ggml/src/ggml-zendnn")


def pack(dest: Path, cache: Path) -> None:
    """Writes the pristine tree, less PACK_SKIP, as dest (a .tar.xz of one folder, llama.cpp), once
    the series is proven to apply to it."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "llama.cpp"
        unpack_pristine(tree, cache)
        for rel in PACK_SKIP:
            shutil.rmtree(tree / rel, ignore_errors=True)
        check = Path(tmp) / "check"
        shutil.copytree(tree, check, symlinks=True)
        apply_series(check)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:xz") as tar:
            tar.add(tree, arcname="llama.cpp")
    print(f"packed {dest} ({dest.stat().st_size / 2**20:.1f} MiB): llama.cpp {PIN_VERSION} without "
          f"{', '.join(PACK_SKIP)}")


def materialize(dest: Path, cache: Path) -> None:
    """The build's entry point: dest holds the patched tree, rebuilt only when stale."""
    stamp = dest / ".logquant-series"
    digest = series_digest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh = dest.with_name(dest.name + ".new")
    if fresh.exists():
        shutil.rmtree(fresh)
    unpack_pristine(fresh, cache)
    apply_series(fresh)
    if dest.exists():
        sync_tree(fresh, dest)
        shutil.rmtree(fresh)
    else:
        fresh.rename(dest)
    stamp.write_text(digest)
    print(f"-- logquant: llama.cpp {PIN_VERSION} + {len(patch_files())} patches in {dest}", flush=True)


def sync_tree(src: Path, dest: Path) -> None:
    """Makes dest equal to src, rewriting only the files that differ, so that a patch change
    recompiles what it touches instead of the whole of llama.cpp."""
    want = {p.relative_to(src) for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    have = {p.relative_to(dest) for p in dest.rglob("*") if p.is_file() or p.is_symlink()}
    for rel in have - want:
        if rel.name != ".logquant-series":
            (dest / rel).unlink()
    for rel in want:
        a, b = src / rel, dest / rel
        if b.is_file() and not a.is_symlink() and a.stat().st_size == b.stat().st_size \
                and a.read_bytes() == b.read_bytes():
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        if b.exists() or b.is_symlink():
            b.unlink()
        shutil.copy2(a, b, follow_symlinks=False)


def prepare(dest: Path, cache: Path) -> None:
    """A git checkout of the pinned tree, one commit per patch, to edit and then `export`."""
    if dest.exists():
        raise SourceError(f"{dest} exists; remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    unpack_pristine(dest, cache)
    git("init", "-q", "-b", "work", cwd=dest)
    git("add", "-A", "-f", cwd=dest)
    git("commit", "-q", "-m", f"llama.cpp from {PIN_PACKAGE} {PIN_VERSION}", cwd=dest)
    git("tag", "pinned", cwd=dest)
    for p in patch_files():
        r = git("am", "-q", "--keep-cr", str(p), cwd=dest, check=False)
        if r.returncode != 0:
            git("am", "--abort", cwd=dest, check=False)
            raise SourceError(f"patch {p.name} does not apply:\n{r.stdout}{r.stderr}")
    print(f"prepared {dest}: {len(patch_files())} patches on tag 'pinned'")


def export(src: Path) -> None:
    """Writes the commits after tag 'pinned' back to patches/, replacing the series."""
    with tempfile.TemporaryDirectory() as tmp:
        git("format-patch", "-q", "-N", "--zero-commit", "--no-signature", "--no-stat", "--full-index",
            "-o", tmp, "pinned..HEAD", cwd=src)
        for old in patch_files():
            old.unlink()
        new = sorted(Path(tmp).glob("*.patch"))
        for p in new:
            shutil.copy(p, PATCHES / p.name)
    print(f"exported {len(new)} patches to {PATCHES}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logquant-gguf"
    for name in ("materialize", "prepare", "pack"):
        s = sub.add_parser(name)
        s.add_argument("dest", type=Path)
        s.add_argument("--cache", type=Path, default=default_cache, help="where the sdist is kept")
    s = sub.add_parser("export")
    s.add_argument("src", type=Path)
    sub.add_parser("digest")
    sub.add_parser("describe", help="print the pin")
    a = ap.parse_args()
    try:
        if a.cmd == "materialize":
            materialize(a.dest.resolve(), a.cache)
        elif a.cmd == "prepare":
            prepare(a.dest.resolve(), a.cache)
        elif a.cmd == "pack":
            pack(a.dest.resolve(), a.cache)
        elif a.cmd == "export":
            export(a.src.resolve())
        elif a.cmd == "describe":
            print(f"{PIN_PACKAGE}=={PIN_VERSION}")
        else:
            print(series_digest())
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
