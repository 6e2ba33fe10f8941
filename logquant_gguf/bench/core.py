"""What every part shares: its configuration, and the one way its outputs are written."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import corpus, env, report
from .session import Session

SCHEMA_VERSION = 1


def int_list(s: str) -> list[int]:
    """argparse type: "0,4096,16384" -> [0, 4096, 16384]."""
    return [int(x) for x in s.split(",") if x.strip()]


@dataclass
class BenchConfig:
    model: env.ModelRef
    kv_types: list[str]
    out_root: Path
    device: str = "cpu"
    quick: bool = False
    full: bool = False
    threads: int = 2
    argv: Sequence[str] = ()
    tag: str = ""  # a second run of a part with other settings: kept in <model>/<tag>/

    @property
    def out_dir(self) -> Path:
        """bench/results/<device>/<model>/, or .../<model>/<tag>/"""
        d = self.out_root / self.device / self.model.slug
        return d / self.tag if self.tag else d

    @property
    def baseline(self) -> str:
        """The KV type ratios and divergences are taken against: f16 when selected."""
        return "f16" if "f16" in self.kv_types else self.kv_types[0]

    def session(self, kv_type: str, n_ctx: int, **kwargs: Any) -> Session:
        return Session(str(self.model.path), kv_type, n_ctx, threads=self.threads,
                       device=self.device, **kwargs)

    def tokenizer(self) -> Session:
        """A vocabulary-only Session: tokenize / detokenize without a context."""
        return self.session(self.baseline, 64, vocab_only=True)

    def real_tokens(self, kind: str, n: int) -> tuple[list[int], list[dict]]:
        """BOS (where the model wants one) + n tokens of real text; and the documents used."""
        tok = self.tokenizer()
        try:
            tokens, texts = corpus.token_stream(tok.tokenize, kind, n)
            return tok.bos + tokens, texts
        finally:
            tok.close()

    def rows_per_type(self, n_ctx: int, items: Sequence[Any], row: Callable[[Session, int, Any], dict],
                      desc: str, unit: str) -> dict[str, list[dict]]:
        """{kv_type: [row(session, i, item) for each item]}: one session of n_ctx cells per
        kv_type, the baseline's first (so later rows can be compared with it), with a progress bar."""
        outputs: dict[str, list[dict]] = {}
        order = [self.baseline] + [kv for kv in self.kv_types if kv != self.baseline]
        bar = tqdm(total=len(order) * len(items), desc=desc, unit=unit)
        for kv in order:
            s = self.session(kv, n_ctx)
            try:
                rows = []
                for i, item in enumerate(items):
                    rows.append(row(s, i, item))
                    bar.update()
                outputs[kv] = rows
            finally:
                s.close()
        bar.close()
        return outputs

    def pick(self, quick: Any, default: Any, full: Any = None) -> Any:
        """The setting for this run's size (--quick / default / --full)."""
        if self.quick:
            return quick
        return full if (self.full and full is not None) else default


@dataclass
class PartResult:
    """What a part measured: settings, raw results, a markdown body, figures, texts used."""

    settings: dict
    results: dict
    markdown: str
    figures: list[Path] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)


def envelope(cfg: BenchConfig, part: str, res: PartResult, elapsed_s: float,
             machine: dict | None = None) -> dict:
    """The JSON document: provenance, settings, raw results. machine: as taken at the start
    (its load average then); the load average at the end is added."""
    machine = dict(machine or env.machine_info())
    machine["load_avg_1m_end"] = env.machine_info()["load_avg_1m"]
    return {
        "part": part,
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 2),
        "command": ["logquant-gguf", "bench", *cfg.argv],
        "device": cfg.device,
        "threads": cfg.threads,
        "machine": machine,
        "build": env.build_block(),
        "model": cfg.model.info(),
        "kv_types": env.kv_type_info(cfg.kv_types),
        "baseline": cfg.baseline,
        "settings": res.settings,
        "texts": res.texts,
        "results": res.results,
    }


def _markdown(doc: dict, res: PartResult, out_dir: Path) -> str:
    m, b = doc["machine"], doc["build"]
    head = [
        f"# bench {doc['part']}: {doc['model']['file']} on {doc['device']}",
        "",
        f"- command: `{' '.join(doc['command'])}`",
        (f"- machine: {m['cpu_model']}, {m['cores_usable']} usable cores, "
         f"threads {doc['threads']}, {m['platform']}"),
        (f"- build: llama.cpp {b.get('llama_cpp_pin', '?')} + patches "
         f"{', '.join(b.get('patches', [])) or 'none'}; "
         f"backends {', '.join(b.get('backends', []))}"),
        f"- model sha256 {doc['model']['sha256'][:16]}..., {doc['model']['size_bytes']} bytes",
        (f"- {doc['created_utc']}, {doc['elapsed_s']} s; load average "
         f"{m['load_avg_1m']:.1f} at the start, {m['load_avg_1m_end']:.1f} at the end"),
        "",
        res.markdown.strip(),
        "",
    ]
    head += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in res.figures]
    return "\n".join(head) + "\n"


def write_part(cfg: BenchConfig, part: str, res: PartResult, elapsed_s: float,
               machine: dict | None = None) -> dict:
    """Writes <out>/<device>/<model>/<part>.json and .md; returns the JSON document."""
    doc = envelope(cfg, part, res, elapsed_s, machine)
    out = cfg.out_dir
    report.write_json(out / f"{part}.json", doc)
    (out / f"{part}.md").write_text(_markdown(doc, res, out), encoding="utf-8")
    return doc


def run_part(cfg: BenchConfig, part: str, fn, args: Any) -> dict:
    """Runs one part (fn(cfg, args) -> PartResult), writes its outputs, returns the JSON doc."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    machine = env.machine_info()
    t0 = time.perf_counter()
    res = fn(cfg, args)
    return write_part(cfg, part, res, time.perf_counter() - t0, machine)
