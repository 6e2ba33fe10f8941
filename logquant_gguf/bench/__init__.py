"""`logquant-gguf bench <part>`: memory, speed, capacity and quality of every KV type, side by side.

One module per part, each with NAME, HELP, add_arguments(parser) and run(cfg, args) -> PartResult.
Outputs go to <out>/<device>/<model>/<part>.{json,md,png} (with --tag T, to .../<model>/T/, beside
the untagged run): the JSON holds every raw figure and where it came from (machine, build, model
sha256, command line, texts used).

    logquant-gguf bench memory --model gemma-3-270m --kv-types f16,q8_0
    python -m logquant_gguf.bench all --quick
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from . import (
    capacity,
    chat,
    completion,
    layers,
    levers,
    memory,
    passkey,
    peers,
    perplexity,
    quality,
    speed,
    summary,
)
from .core import BenchConfig, run_part
from .env import resolve_model, select_kv_types

# The order `all` runs them in (capacity reads memory's results).
PARTS = {m.NAME: m for m in (memory, quality, speed, capacity, perplexity, passkey, completion,
                              chat, levers, layers, peers)}
# peers needs another llama.cpp build, layers is a tuning run of one model, chat a chat model (not
# a base one such as Gemma 3 270M): by name only
ALL = [n for n in PARTS if n not in (peers.NAME, layers.NAME, chat.NAME)]
DEFAULT_OUT = Path("bench") / "results"


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a known model name (qwen2.5-coder-0.5b, gemma-3-270m) or a GGUF path "
                        "(default: qwen2.5-coder-0.5b)")
    p.add_argument("--kv-types", default=None,
                   help="comma-separated kv_types (default: every type this build offers)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results root; files go to OUT/DEVICE/MODEL/ (default: %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="device tag recorded and used in the output path; anything but 'cpu' "
                        "offloads every layer (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    p.add_argument("--tag", type=_tag, default=None,
                   help="name of a run with other settings (e.g. more kv_types at fewer depths): "
                        "its files go to OUT/DEVICE/MODEL/TAG/, beside the untagged run's")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: minutes, not tens")
    size.add_argument("--full", action="store_true", help="the optional larger sizes too")


def _tag(s: str) -> str:
    """argparse type: a folder name, nothing that leaves the model's folder."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s):
        raise argparse.ArgumentTypeError(f"--tag must be letters, digits, '.', '_' or '-', got {s!r}")
    return s


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `bench` (with one sub-command per part, and `all`) to a CLI's sub-commands."""
    bench = subparsers.add_parser("bench", help="benchmark the KV types: " + ", ".join(PARTS),
                                  description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = bench.add_subparsers(dest="part", required=True)
    for name, mod in PARTS.items():
        p = parts.add_parser(name, help=mod.HELP, description=mod.__doc__)
        _common_arguments(p)
        mod.add_arguments(p)
    p = parts.add_parser("all", help="every part in turn, with each part's defaults")
    _common_arguments(p)
    p = parts.add_parser(summary.NAME, help=summary.HELP, description=summary.__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (%(default)s)")
    p.add_argument("--device", default="cpu", help="device tag (default: %(default)s)")
    bench.set_defaults(func=run)
    return bench


def config_from_args(a: argparse.Namespace, argv: Sequence[str]) -> BenchConfig:
    return BenchConfig(model=resolve_model(a.model), kv_types=select_kv_types(a.kv_types),
                       out_root=a.out, device=a.device, quick=a.quick, full=a.full,
                       threads=a.threads, argv=list(argv), tag=a.tag or "")


def _defaults(mod, a: argparse.Namespace) -> argparse.Namespace:
    """a, plus each of mod's own options at its default (for `all`)."""
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    merged = vars(p.parse_args([]))
    merged.update(vars(a))
    return argparse.Namespace(**merged)


def _argv_from_sys() -> list[str]:
    """What followed `bench` on this process's command line."""
    args = sys.argv[1:]
    return args[args.index("bench") + 1:] if "bench" in args else args


def run(a: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Runs the part(s) selected in a; prints where the outputs went. argv is recorded in the
    results (default: this process's command line after `bench`)."""
    if a.part == summary.NAME:
        path = summary.write_summary(a.out / a.device, list(PARTS))
        print(f"bench summary: {path}", file=sys.stderr)
        return 0
    cfg = config_from_args(a, _argv_from_sys() if argv is None else argv)
    names = ALL if a.part == "all" else [a.part]
    for name in names:
        mod = PARTS[name]
        run_part(cfg, name, mod.run, _defaults(mod, a))
        print(f"bench {name}: {cfg.out_dir / name}.json, .md", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m logquant_gguf.bench <part> ...` (the same as `logquant-gguf bench <part> ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="logquant-gguf")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(["bench", *argv])
    try:
        return run(a, argv)
    except ValueError as e:
        print(f"logquant-gguf bench: error: {e}", file=sys.stderr)
        return 2
