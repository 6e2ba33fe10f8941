"""Real text that ships with the machine and that nobody on this project wrote.

"code": Python standard library sources of the running interpreter; "prose": license texts from
/usr/share/common-licenses. Every use records which files (path, sha256, bytes), because both
differ between machines and Python versions.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .env import sha256_file

# Large, plain modules first: the first file alone gives a long single document.
CODE_FILES = ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "difflib.py",
              "textwrap.py", "functools.py", "pathlib.py", "tarfile.py", "subprocess.py",
              "shutil.py", "calendar.py")
PROSE_DIR = Path("/usr/share/common-licenses")
PROSE_FILES = ("GPL-3", "Apache-2.0", "GPL-2", "LGPL-2.1", "MPL-2.0", "GFDL-1.3", "Artistic",
               "MPL-1.1", "LGPL-3", "CC0-1.0")
KINDS = ("code", "prose")


@dataclass(frozen=True)
class Document:
    path: Path
    text: str

    def record(self) -> dict:
        return {"path": str(self.path), "sha256": sha256_file(str(self.path)),
                "bytes": self.path.stat().st_size}


def _existing(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.is_file()]


def documents(kind: str) -> list[Document]:
    """The documents of one kind, in a fixed order; raises if this machine has none."""
    if kind == "code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        paths = _existing([stdlib / f for f in CODE_FILES])
    elif kind == "prose":
        paths = _existing([PROSE_DIR / f for f in PROSE_FILES])
    else:
        raise ValueError(f"unknown text kind {kind!r}; one of {', '.join(KINDS)}")
    if not paths:
        raise RuntimeError(f"no {kind} text found on this machine")
    return [Document(p, p.read_text(encoding="utf-8", errors="replace")) for p in paths]


def token_stream(tokenize, kind: str, n_tokens: int) -> tuple[list[int], list[dict]]:
    """At least n_tokens tokens of real text (documents joined in order, cut to n_tokens),
    and the records of the documents used. tokenize: str -> list[int] (no BOS)."""
    tokens: list[int] = []
    used: list[dict] = []
    for doc in documents(kind):
        if len(tokens) >= n_tokens:
            break
        tokens += tokenize(doc.text + "\n\n")
        used.append(doc.record())
    if len(tokens) < n_tokens:
        raise RuntimeError(f"only {len(tokens)} tokens of {kind} text on this machine, "
                           f"{n_tokens} wanted")
    return tokens[:n_tokens], used
