"""bench peers: our build beside another llama.cpp build's low-bit KV caches, measured the same way.

The peer is any llama.cpp build with its own `llama-perplexity` (the TurboQuant forks, with their
turbo2 / turbo3 / turbo4 cache types, are what it was written for). Its `llama-perplexity`
saves its own f16 baseline with --kl-divergence-base, then scores each of its types with
--kl-divergence: the same model, text, context, chunks, threads and flash attention as our
`bench perplexity` (whose settings it takes from perplexity.json when there is one). Each build
is compared with its own f16, so the two builds' rows can sit in one table.

Each peer type is run once as its users get it (only --peer-env set) and once per
--peer-variant (by default TURBO_AUTO_ASYMMETRIC=0: the forks switch a turbo K cache to q8_0 on
their own for models with a GQA ratio of 6 or more; the variant gives the symmetric type). The
cache types a run really used are read from the peer's `llama_kv_cache: size = ...` log line;
bits per value are those the peer's ggml declares for them (block bytes x 8 / block size, from
its libggml-base; from the log's MiB against its f16 run where the library cannot be read), the
mean of K and V.

Our rows come from perplexity.json when its settings and text match (the rest are run alongside
with our `llama-perplexity`). The peer is never needed by the package or its tests; without
--peer-exe (or $LOGQUANT_PEER_EXE) the part says how to build one and skips.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import corpus, env, peer_speed, perplexity, report
from .core import BenchConfig, PartResult, int_list

NAME = "peers"
HELP = "another llama.cpp build's KV types (e.g. TurboQuant's turbo2/3/4) beside ours, same KLD run"

DEFAULT_PEER_TYPES = "turbo2,turbo3,turbo4"
DEFAULT_VARIANTS = ("TURBO_AUTO_ASYMMETRIC=0",)
PEER_EXE_ENV = "LOGQUANT_PEER_EXE"

HOW_TO_GET_ONE = f"""\
Skipped: no peer build given. Pass `--peer-exe PATH/llama-perplexity` (or set ${PEER_EXE_ENV}).
A TurboQuant llama.cpp fork (KV cache types turbo2 / turbo3 / turbo4), built CPU-only:

    git clone https://github.com/TheTom/llama-cpp-turboquant peer-src
    cmake -B peer-build -S peer-src -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF \\
          -DCMAKE_BUILD_TYPE=Release
    cmake --build peer-build -j --target llama-perplexity llama-bench
    logquant-gguf bench peers --peer-exe peer-build/bin/llama-perplexity

See docs/bench.md ("Side by side with the TurboQuant forks").
"""

# "llama_kv_cache: size =   24.00 MiB (  2048 cells,  24 layers,  1/1 seqs), K (f16):   12.00 MiB,
#  V (f16):   12.00 MiB" (a model with sliding-window layers prints one line per cache)
_KV_LINE_RE = re.compile(r"llama_kv_cache(?:_\w+)?:\s+size =\s*[0-9.]+ MiB.*?"
                         r"K \(([\w.]+)\):\s*([0-9.]+) MiB, V \(([\w.]+)\):\s*([0-9.]+) MiB")
_VERSION_RE = re.compile(r"version:\s*(\d+)\s*\(([0-9a-fA-F]+|unknown)\)")
_BUILT_RE = re.compile(r"^built with (.+)$", re.MULTILINE)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_assignments(s: str) -> dict[str, str]:
    """argparse type: "A=1,B=2" -> {"A": "1", "B": "2"}; "" or "none" -> {}."""
    out: dict[str, str] = {}
    if s.strip().lower() in ("", "none"):
        return out
    for item in s.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or not _ENV_NAME_RE.fullmatch(name):
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE], got {s!r}")
        out[name] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer-exe", type=Path, default=None,
                   help=f"the peer build's llama-perplexity (default: ${PEER_EXE_ENV}); "
                        "without one the part explains how to build one and skips")
    p.add_argument("--peer-types", default=DEFAULT_PEER_TYPES,
                   help="comma-separated cache types of the peer, each as -ctk/-ctv "
                        "(default: %(default)s)")
    p.add_argument("--peer-env", type=env_assignments, action="append", default=[],
                   metavar="NAME=VALUE", help="environment for every peer run (repeatable)")
    p.add_argument("--peer-variant", type=env_assignments, action="append", default=None,
                   metavar="NAME=VALUE[,...]",
                   help="a second row per peer type run with this environment (repeatable; "
                        "default: TURBO_AUTO_ASYMMETRIC=0, the forks' symmetric types; "
                        "'none': only the default rows)")
    p.add_argument("--ours", choices=("auto", "run", "none"), default="auto",
                   help="our rows: from perplexity.json where its settings and text match, the "
                        "rest run alongside (auto); all run alongside (run); none")
    p.add_argument("--ctx", type=int, default=None,
                   help="llama-perplexity -c (default: perplexity.json's, else 512)")
    p.add_argument("--chunks", type=int, default=None,
                   help="chunks scored (default: perplexity.json's, else 8; --quick 2)")
    p.add_argument("--text", choices=corpus.KINDS, default=None,
                   help="real text kind (default: perplexity.json's, else code)")
    p.add_argument("--speed-depths", type=int_list, default=None, metavar="DEPTHS",
                   help="also both builds' llama-bench at these context depths, interleaved "
                        "(the peer's is the llama-bench beside its llama-perplexity)")
    p.add_argument("--speed-pp", type=int, default=32, help="llama-bench -p (default: %(default)s)")
    p.add_argument("--speed-tg", type=int, default=16, help="llama-bench -n (default: %(default)s)")
    p.add_argument("--speed-reps", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    p.add_argument("--skip-quality", action="store_true",
                   help="only the speed part (use with --tag to keep the quality files)")


# -- the peer build ------------------------------------------------------------------------------
def peer_version(exe: Path) -> dict:
    """The peer's `--version` (build number, commit, compiler and target) and its file's sha256."""
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False,
                       timeout=60)
    out = (p.stdout + p.stderr).strip()
    m, built = _VERSION_RE.search(out), _BUILT_RE.search(out)
    return {"exe": str(exe), "sha256": env.sha256_file(str(exe)), "version_output": out[-1000:],
            "build_number": int(m.group(1)) if m else None, "commit": m.group(2) if m else None,
            "built_with": built.group(1).strip() if built else None}


def kv_cache_types(output: str) -> dict | None:
    """The cache a llama.cpp run really made, from its `llama_kv_cache: size = ...` lines:
    {"type_k", "type_v", "k_mib", "v_mib"} (MiB summed over the lines), None without one."""
    lines = _KV_LINE_RE.findall(output)
    if not lines:
        return None
    return {"type_k": lines[0][0], "type_v": lines[0][2],
            "k_mib": round(sum(float(x[1]) for x in lines), 4),
            "v_mib": round(sum(float(x[3]) for x in lines), 4)}


# ggml exports no type count and does not check the id it is given: the ids are walked up to the
# first entry that is no text, one line per type printed as it goes (a child process, so
# that reading past the table harms nothing and what was printed before stays).
_TYPE_SIZES_SCRIPT = """
import ctypes, re, sys
lib = ctypes.CDLL(sys.argv[1])
lib.ggml_type_name.restype = ctypes.c_void_p
lib.ggml_type_name.argtypes = [ctypes.c_int]
lib.ggml_blck_size.restype = ctypes.c_int64
lib.ggml_blck_size.argtypes = [ctypes.c_int]
lib.ggml_type_size.restype = ctypes.c_size_t
lib.ggml_type_size.argtypes = [ctypes.c_int]
for t in range(256):
    ptr = lib.ggml_type_name(t)
    name = ctypes.string_at(ptr, 64).split(b"\\0")[0] if ptr else b"removed"
    if not re.fullmatch(rb"[ -~]{1,63}", name):
        break  # past the table
    if not re.fullmatch(rb"[A-Za-z0-9_]+", name):
        continue  # a removed type ("TYPE_Q4_0_4_4 REMOVED, use ...")
    blck, size = lib.ggml_blck_size(t), lib.ggml_type_size(t)
    if 0 < blck <= 4096 and 0 < size <= 65536:
        print(name.decode(), 8.0 * size / blck, flush=True)
"""


def ggml_base_library(exe: Path) -> Path | None:
    """The libggml-base a llama.cpp tool was built with: beside it (a CMake build's bin/) or in
    ../lib; None for a static build."""
    name = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}.get(sys.platform,
                                                                          "libggml-base.so")
    for d in (exe.parent, exe.parent.parent / "lib", exe.parent.parent / "lib64"):
        if (d / name).is_file():
            return d / name
    return None


def declared_bits(library: Path) -> dict[str, float]:
    """{ggml type name: bits per value} as that ggml declares them (block bytes x 8 / block size).
    Read in a child process: the peer's ggml must not meet ours in this one."""
    p = subprocess.run([sys.executable, "-c", _TYPE_SIZES_SCRIPT, str(library)],
                       capture_output=True, text=True, check=False, timeout=60)
    out: dict[str, float] = {}
    for line in p.stdout.splitlines():
        name, _, bits = line.partition(" ")
        try:
            out[name] = float(bits)
        except ValueError:
            break
    return out


def _bits(type_name: str, mib: float | None, base: dict | None, side: str,
          declared: dict[str, float]) -> tuple[float | None, str]:
    """Bits per value of one side (k or v) of a cache, and where the figure came from."""
    if type_name in declared:
        return declared[type_name], "ggml type size"
    if mib is not None and base and base.get(f"{side}_mib") and base.get(f"type_{side}") == "f16":
        return round(16.0 * mib / base[f"{side}_mib"], 3), "log MiB vs f16"
    return None, "unknown"


def _peer_command(cfg: BenchConfig, exe: Path, kv: str, text: Path, base: Path, ctx: int,
                  chunks: int, score: bool) -> list[str]:
    """The peer's llama-perplexity with exactly the flags our `bench perplexity` gives ours."""
    cmd = [str(exe), "-m", str(cfg.model.path), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(cfg.threads), "-fa", "on", "-ctk", kv, "-ctv", kv,
           "-ngl", "0" if cfg.device == "cpu" else "99", "--kl-divergence-base", str(base)]
    return cmd + (["--kl-divergence"] if score else ["-f", str(text)])


def _tool_run(cmd: list[str], expect: str, extra_env: dict[str, str], tries: int = 8) -> dict:
    """As perplexity._run (rerun until the summary line `expect` is there: llama.cpp's
    asynchronous logger may lose the last lines at exit), plus the cache the run made."""
    for attempt in range(1, tries + 1):
        p = env.run_tool(cmd, extra_env)
        out = p.stdout + p.stderr
        entry = {"command": cmd, "returncode": p.returncode, "stats": perplexity.parse_stats(out),
                 "attempts": attempt, "cache": kv_cache_types(out)}
        if p.returncode != 0 or expect in entry["stats"]:
            break
    if p.returncode != 0 or expect not in entry["stats"]:
        entry["output_tail"] = out[-3000:]
    return entry


def measure_peer(cfg: BenchConfig, exe: Path, text: str, ctx: int, chunks: int,
                 types: list[str], common_env: dict[str, str],
                 variants: list[dict[str, str]]) -> dict:
    """The peer's f16 baseline, then each type with common_env and with each variant on top.
    {"_base": run, "<type>": run, "<type> NAME=VALUE": run, ...}; each run has its env."""
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="lq-bench-peer-") as tmp:
        text_file, base = Path(tmp) / "text.txt", Path(tmp) / "base.kld"
        text_file.write_text(text, encoding="utf-8")
        runs["_base"] = _tool_run(_peer_command(cfg, exe, "f16", text_file, base, ctx, chunks,
                                                False), "Final PPL", common_env)
        runs["_base"].update(type="f16", env=common_env)
        if runs["_base"]["returncode"] != 0:
            return runs
        for t in types:
            for variant in [{}, *variants]:
                e = {**common_env, **variant}
                label = " ".join([t, *(f"{k}={v}" for k, v in variant.items())])
                print(f"bench peers: peer {label}", file=sys.stderr)
                runs[label] = _tool_run(_peer_command(cfg, exe, t, text_file, base, ctx, chunks,
                                                      True), "Mean KLD", e)
                runs[label].update(type=t, env=e, variant=variant)
    return runs


# -- our build -----------------------------------------------------------------------------------
def our_bits(kv: str) -> float:
    """Bits per value of one of our kv_types as it declares them: KV_TYPES' figure, or for a
    lever variant the mean of its K and V code bits + 0.5 (the f16 scale and minimum per 64)."""
    from ..kv_types import parse_variant

    info = env.kv_type_info([kv])[kv]
    _, levers = parse_variant(kv)
    kb, vb = levers.get("logquant_key_bits"), levers.get("logquant_value_bits")
    if kb is None and vb is None:
        return info["bits_per_value"]
    return ((kb or 2) + 0.5 + (vb or 2) + 0.5) / 2


def _perplexity_doc(cfg: BenchConfig) -> dict | None:
    """Our perplexity.json for this model: the tagged run's folder, then the untagged one."""
    for d in (cfg.out_dir, cfg.out_root / cfg.device / cfg.model.slug):
        path = d / "perplexity.json"
        if path.is_file():
            return report.read_json(path)
    return None


def _same_text(a: list[dict], b: list[dict]) -> bool:
    return [t.get("sha256") for t in a] == [t.get("sha256") for t in b]


def ours_from_json(doc: dict | None, settings: dict, texts: list[dict],
                   kv_types: list[str], device: str) -> dict:
    """The runs of perplexity.json for kv_types, when it scored the same text with the same
    context and chunks (threads may differ: the figures do not depend on them)."""
    if not doc or doc.get("device") != device:
        return {}
    s = doc.get("settings", {})
    if (s.get("ctx"), s.get("chunks"), s.get("text")) != (settings["ctx"], settings["chunks"],
                                                          settings["text"]):
        return {}
    if not _same_text(doc.get("texts", []), texts):
        return {}
    runs = doc.get("results", {}).get("runs", {})
    return {kv: {**runs[kv], "source": "perplexity.json", "created_utc": doc.get("created_utc")}
            for kv in kv_types if kv in runs and runs[kv].get("returncode") == 0}


def measure_ours(cfg: BenchConfig, exe: Path, text: str, ctx: int, chunks: int,
                 kv_types: list[str]) -> dict:
    """Our f16 baseline and kv_types, as `bench perplexity` runs them."""
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="lq-bench-peer-ours-") as tmp:
        text_file, base = Path(tmp) / "text.txt", Path(tmp) / "base.kld"
        text_file.write_text(text, encoding="utf-8")
        runs["_base"] = perplexity._run(perplexity._command(cfg, exe, "f16", text_file, base, ctx,
                                                            chunks, False), "Final PPL",
                                        env.tool_env("f16"))
        for kv in kv_types:
            print(f"bench peers: ours {kv}", file=sys.stderr)
            runs[kv] = perplexity._run(perplexity._command(cfg, exe, kv, text_file, base, ctx,
                                                           chunks, True), "Mean KLD",
                                       env.tool_env(kv))
            runs[kv]["source"] = "run alongside"
    return runs


# -- the table and the plot ----------------------------------------------------------------------
def rows(ours: dict, peer_runs: dict, declared: dict[str, float], peer_name: str) -> list[dict]:
    """One row per run of either build: build, name, cache K/V types, bits per value, KLD..."""
    out = []
    for kv, r in ours.items():
        if kv.startswith("_"):
            continue
        info = env.kv_type_info([kv])[kv]
        out.append(_row("ours", kv, info["type_k"], info["type_v"], our_bits(kv), "KV_TYPES", r))
    base_cache = peer_runs.get("_base", {}).get("cache")
    for label, r in peer_runs.items():
        if label.startswith("_"):
            continue
        cache = r.get("cache") or {}
        tk, tv = cache.get("type_k", r["type"]), cache.get("type_v", r["type"])
        bk, src = _bits(tk, cache.get("k_mib"), base_cache, "k", declared)
        bv, _ = _bits(tv, cache.get("v_mib"), base_cache, "v", declared)
        bits = (bk + bv) / 2 if bk is not None and bv is not None else None
        out.append(_row(peer_name, label, tk, tv, bits, src, r))
    return out


def _row(build: str, name: str, tk: str, tv: str, bits: float | None, bits_source: str,
         r: dict) -> dict:
    s = r.get("stats", {})
    return {"build": build, "name": name, "type_k": tk, "type_v": tv, "bits_per_value": bits,
            "bits_source": bits_source, "kld_mean": s.get("Mean KLD"), "kld_p99": s.get("99.0% KLD"),
            "same_top_p": s.get("Same top p"), "ppl": s.get("Mean PPL(Q)"),
            "ppl_ratio": s.get("Mean PPL(Q)/PPL(base)"),
            "ok": r.get("returncode") == 0 and s.get("Mean KLD") is not None}


def _markdown(cfg: BenchConfig, table_rows: list[dict], peer: dict, settings: dict,
              peer_runs: dict, ours: dict) -> str:
    t = report.table(
        ["build", "kv type", "cache K / V", "bits/value", "KLD mean", "KLD p99", "same top p %",
         "PPL", "PPL / f16", "run"],
        [[r["build"], r["name"], f"{r['type_k']} / {r['type_v']}", r["bits_per_value"],
          r["kld_mean"], r["kld_p99"], r["same_top_p"], r["ppl"], r["ppl_ratio"],
          "ok" if r["ok"] else "FAILED"] for r in table_rows])
    base = peer_runs.get("_base", {})
    failed = [f"- {label}: exit {r['returncode']}, `{' '.join(r['command'][-8:])}`\n\n"
              f"```\n{r.get('output_tail', '')[-1200:]}\n```"
              for label, r in peer_runs.items() if r.get("returncode") != 0]
    return (f"Peer: `{peer['exe']}`, build {peer.get('build_number')}, commit "
            f"{peer.get('commit')}, built with {peer.get('built_with')} (its `--version`).\n\n"
            f"Both builds' `llama-perplexity --kl-divergence`, each against its own f16 cache: "
            f"-c {settings['ctx']}, {settings['chunks']} chunks of {settings['text']} text "
            f"(the same file), -fa on, {cfg.threads} threads, scored on the second half of each "
            f"chunk. Peer f16 PPL {base.get('stats', {}).get('Final PPL')}. Peer rows named "
            f"`TYPE NAME=VALUE` ran with that environment; `cache K / V` is what the run's "
            f"log says it made. bits/value: as each type declares it, the mean of K and V. "
            f"{_sources(ours)}\n\n{t}\n" + ("\nFailed peer runs:\n\n" + "\n".join(failed) + "\n" if failed else ""))


def _sources(ours: dict) -> str:
    by: dict[str, list[str]] = {}
    for kv, r in ours.items():
        if not kv.startswith("_"):
            src = r.get("source", "?")
            if src == "perplexity.json" and r.get("created_utc"):
                src += f" of {r['created_utc'][:10]}"
            by.setdefault(src, []).append(kv)
    return " ".join(f"Ours from {src}: {', '.join(kvs)}." for src, kvs in by.items())


def _plot(cfg: BenchConfig, table_rows: list[dict]) -> list:
    """KLD against bits per value, one marker per build, each point labelled (f16, at KLD 0 by
    definition, is left out of the log scale)."""
    plotted = [r for r in table_rows if r["ok"] and r["bits_per_value"] is not None
               and r["kld_mean"] > 0]
    if not plotted or not report.plots_available():
        return []
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    for build, marker in zip(dict.fromkeys(r["build"] for r in plotted), "os^Dv"):
        pts = [r for r in plotted if r["build"] == build]
        ax.scatter([r["bits_per_value"] for r in pts], [r["kld_mean"] for r in pts],
                   marker=marker, label=build)
        for r in pts:
            ax.annotate(r["name"].replace("TURBO_AUTO_ASYMMETRIC=0", "sym"),
                        (r["bits_per_value"], r["kld_mean"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set(title=f"{cfg.model.slug}: llama-perplexity KLD, each build against its own f16",
           xlabel="bits per value (mean of K and V)", ylabel="mean KLD (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = cfg.out_dir / "peers.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


# -- the part ------------------------------------------------------------------------------------
def _settings(cfg: BenchConfig, args: argparse.Namespace, doc: dict | None) -> dict:
    s = (doc or {}).get("settings", {})
    return {"ctx": args.ctx or s.get("ctx") or 512,
            "chunks": args.chunks or s.get("chunks") or cfg.pick(2, 8),
            "text": args.text or s.get("text") or "code"}


def run(cfg: BenchConfig, args: argparse.Namespace) -> PartResult:
    exe = args.peer_exe or (Path(os.environ[PEER_EXE_ENV]) if os.environ.get(PEER_EXE_ENV) else None)
    doc = _perplexity_doc(cfg)
    settings = _settings(cfg, args, doc)
    variants = ([env_assignments(v) for v in DEFAULT_VARIANTS] if args.peer_variant is None
                else [v for v in args.peer_variant if v])
    common_env = {k: v for d in args.peer_env for k, v in d.items()}
    types = [t.strip() for t in args.peer_types.split(",") if t.strip()]
    settings.update(peer_types=types, peer_env=common_env, peer_variants=variants, ours=args.ours)
    if exe is None:
        print(HOW_TO_GET_ONE, file=sys.stderr)
        return PartResult(settings, {"skipped": "no --peer-exe"}, HOW_TO_GET_ONE)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise ValueError(f"--peer-exe {exe}: not an executable file")
    peer = peer_version(exe)
    lib = ggml_base_library(exe)
    declared = declared_bits(lib) if lib else {}
    peer.update(ggml_base=str(lib) if lib else None, declared_bits=declared)
    peer_name = "peer" + (f" b{peer['build_number']}" if peer.get("build_number") else "")

    ctx, chunks = settings["ctx"], settings["chunks"]
    tok = cfg.tokenizer()
    try:
        # llama-perplexity wants 2 x ctx tokens at least, of the file as IT tokenizes it: a
        # margin past what is scored (the first chunks x ctx tokens are ours' text's)
        tokens, texts = corpus.token_stream(tok.tokenize, settings["text"],
                                            ctx * chunks + ctx + 64)
        text = tok.detokenize(tokens)
    finally:
        tok.close()
    settings["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()

    speed = _speed(cfg, args, exe, types, common_env, variants) if args.speed_depths else None
    if args.skip_quality:
        md = peer_speed.markdown(speed["summary"], args.speed_pp, args.speed_tg, args.speed_reps, cfg.threads) \
            if speed and "summary" in speed else str(speed)
        return PartResult(settings, {"peer": peer, "speed": speed}, f"Peer: `{peer['exe']}`, build "
                          f"{peer.get('build_number')}, commit {peer.get('commit')}.\n\n" + md)
    ours: dict = {}
    if args.ours != "none":
        if args.ours == "auto":
            ours = ours_from_json(doc, settings, texts, cfg.kv_types, cfg.device)
        missing = [kv for kv in cfg.kv_types if kv not in ours]
        our_exe = env.tool_path("llama-perplexity")
        if missing and our_exe is not None:
            ours.update(measure_ours(cfg, our_exe, text, ctx, chunks, missing))
    peer_runs = measure_peer(cfg, exe, text, ctx, chunks, types, common_env, variants)
    table_rows = rows(ours, peer_runs, declared, peer_name)
    md = _markdown(cfg, table_rows, peer, settings, peer_runs, ours)
    if speed and "summary" in speed:
        md += "\n## Speed\n\n" + peer_speed.markdown(speed["summary"], args.speed_pp, args.speed_tg,
                                                      args.speed_reps, cfg.threads)
    return PartResult(settings, {"peer": peer, "peer_runs": peer_runs, "ours": ours,
                                 "rows": table_rows, "speed": speed},
                      md, figures=_plot(cfg, table_rows), texts=texts)


def _speed(cfg: BenchConfig, args: argparse.Namespace, exe: Path, types: list[str],
           common_env: dict[str, str], variants: list[dict[str, str]]) -> dict:
    peer_bench = exe.parent / "llama-bench"
    our_bench = env.tool_path("llama-bench")
    if not (peer_bench.is_file() and os.access(peer_bench, os.X_OK)):
        return {"skipped": f"no llama-bench beside {exe} (build the peer's llama-bench target)"}
    if our_bench is None:
        return {"skipped": "this build has no llama-bench (LOGQUANT_BUILD_TOOLS=ON)"}
    runs = peer_speed.entries(cfg.kv_types, types, common_env, variants)
    measured = peer_speed.measure(cfg.model.path, our_bench, peer_bench, runs, args.speed_depths,
                                  args.speed_pp, args.speed_tg, args.speed_reps, cfg.threads)
    return {"depths": args.speed_depths, "pp": args.speed_pp, "tg": args.speed_tg, "reps": args.speed_reps,
            "rows": measured, "summary": peer_speed.summarize(measured)}
