"""The `logquant-gguf` command: generate, chat, serve, info, bench, rpc-server."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import highlevel, kv_types, models
from ._args import add_model_args, model_kwargs
from ._capi import build_info
from ._runtime import library_path


def _load(a: argparse.Namespace):
    extra = model_kwargs(a)
    return highlevel.load(a.model, kv_type=a.kv_type, n_ctx=a.n_ctx, verbose=a.verbose, **extra)


def cmd_generate(a: argparse.Namespace) -> int:
    # Before loading: a model without a BOS token gets no token at all from "", and
    # llama-cpp-python then fails an assert deep inside sampling.
    if not a.prompt:
        raise ValueError("the prompt is empty: give the text to continue")
    llm = _load(a)
    for piece in highlevel.generate(a.prompt, llm=llm, max_tokens=a.max_tokens,
                                    temperature=a.temperature, seed=a.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .terminal_chat import run_chat

    llm = _load(a)
    run_chat(llm, system_prompt=a.system, max_tokens=a.max_tokens, temperature=a.temperature)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    info = {
        "library": str(library_path()),
        "build": build_info(),
        "kv_types": {name: {"type_k": t.type_k, "type_v": t.type_v,
                            "bits_per_value": t.bits_per_value, "description": t.description}
                     for name, t in kv_types.KV_TYPES.items()},
    }
    if a.model:
        from .llama import Llama

        llm = Llama(a.model, vocab_only=True, verbose=False)
        info["model"] = {"path": a.model, "metadata": llm.metadata}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"library:   {info['library']}")
    b = info["build"]
    print(f"llama.cpp: {b['llama_cpp_pin']} + patches: {', '.join(b['patches']) or 'none'}")
    print(f"backends:  {', '.join(b['backends'])}")
    print(f"system:    {b['system_info']}")
    print("kv types:")
    for name, t in kv_types.KV_TYPES.items():
        print(f"  {name:10s} {t.bits_per_value:5.2f} bits/value  {t.description}")
    if "model" in info:
        print(f"model:     {a.model}")
        for k, v in sorted(info["model"]["metadata"].items()):
            if not k.startswith("tokenizer.") or k == "tokenizer.ggml.model":
                print(f"  {k} = {v}")
    return 0


def cmd_rpc_server(a: argparse.Namespace) -> int:
    from . import rpc

    try:
        return rpc.run_server(a.host, a.port, threads=a.threads, devices=a.device or (),
                              cache=a.cache)
    except rpc.ServerMissingError as e:
        print(f"logquant-gguf: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="logquant-gguf", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="complete a prompt, streaming")
    g.add_argument("prompt")
    add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/help for commands)")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    c.set_defaults(func=cmd_chat)

    from .server import add_serve_parser

    add_serve_parser(sub)  # works without the server extra: `serve` then says what to install

    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)  # logquant-gguf bench <part> ...: see docs/bench.md

    r = sub.add_parser("rpc-server", help="serve this machine's CPU (or GPU) to Llama(rpc_servers=...) "
                       "elsewhere: llama.cpp's RPC server")
    r.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address to listen on (default: %(default)s, this machine only; the "
                   "protocol has no authentication: use 0.0.0.0 on a trusted network only)")
    r.add_argument("--port", type=int, default=50052, help="default: %(default)s")
    r.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads for the computation (default: half the cores)")
    r.add_argument("--device", "-d", action="append", default=None, metavar="DEV",
                   help="serve this ggml device (e.g. CUDA0; repeatable; default: the GPUs, else the CPU)")
    r.add_argument("--cache", action="store_true",
                   help="keep received tensors in a local file cache ($LLAMA_CACHE/rpc): repeated "
                   "loads of the same model skip the transfer")
    r.set_defaults(func=cmd_rpc_server)

    i = sub.add_parser("info", help="library path, build, kv types, model metadata")
    i.add_argument("--model", "-m", help="also show this GGUF file's metadata")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, models.ModelNotInstalledError) as e:
        print(f"logquant-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
