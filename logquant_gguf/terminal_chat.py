"""`logquant-gguf chat`: a conversation in the terminal, streamed token by token.

Commands start with "/": /reset, /save FILE, /stats, /help, /quit. End of input (Ctrl-D) quits;
Ctrl-C stops the reply being written and keeps what was said so far.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .chat_format import FALLBACK_NOTE, uses_fallback_format

HELP = """\
commands:
  /reset        forget the conversation (keeps the system prompt)
  /save FILE    write the conversation to FILE as JSON
  /stats        show the KV cache statistics
  /help         show this help
  /quit         leave (so does Ctrl-D)
Ctrl-C stops a reply early."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_stats(stats: dict[str, Any]) -> str:
    """kv_stats() as a few readable lines."""
    lines = [
        f"kv_type {stats.get('kv_type')}: {stats.get('tokens')} of {stats.get('n_ctx')} tokens, "
        + f"{_fmt_bytes(stats.get('bytes_total', 0))} "
        + f"({_fmt_bytes(stats.get('bytes_per_token', 0))} per token)"
    ]
    for name, tier in (stats.get("tiers") or {}).items():
        lines.append(f"  tier {name}: {tier}")
    return "\n".join(lines)


class _Chat:
    def __init__(self, llm: Any, system_prompt: str | None, max_tokens: int,
                 temperature: float, out: TextIO):
        self.llm = llm
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages: list[dict[str, str]] = list(self.system)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.out = out

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.messages = list(self.system)
            self.say("(conversation reset)")
        elif name == "/stats":
            self.say(format_stats(self.llm.kv_stats()))
        elif name == "/save":
            if not arg:
                self.say("usage: /save FILE")
            else:
                self.save(Path(arg).expanduser())
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def save(self, path: Path) -> None:
        doc = {
            "model": str(getattr(self.llm, "model_path", "")),
            "kv_type": getattr(self.llm, "kv_type", None),
            "messages": self.messages,
        }
        try:
            path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            self.say(f"could not save: {e}")
            return
        self.say(f"(saved {len(self.messages)} messages to {path})")

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        start = time.perf_counter()
        first: float | None = None
        n = 0
        try:
            stream = self.llm.create_chat_completion(
                self.messages, max_tokens=self.max_tokens, temperature=self.temperature,
                stream=True)
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if not piece:
                    continue
                first = first or time.perf_counter()
                n += 1
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        except ValueError as e:  # llama-cpp-python's "Requested tokens ... exceed context window"
            self.messages.pop()
            self.say(f"error: {e}\n(/reset starts a new conversation)")
            return
        self.say()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if first is not None and n > 1:
            rate = (n - 1) / max(time.perf_counter() - first, 1e-9)
            self.say(f"[{n} tokens, {rate:.1f} tok/s, first after "
                     f"{(first - start) * 1000:.0f} ms]")


def run_chat(llm: Any, system_prompt: str | None = None, max_tokens: int = 512,
             temperature: float = 0.7, stream_out: TextIO = sys.stdout,
             stdin: TextIO = sys.stdin) -> list[dict[str, str]]:
    """Chats with llm (a logquant_gguf.Llama) on stdin/stream_out until /quit or end of input.

    Returns the conversation: [{"role": ..., "content": ...}, ...], system prompt first if any.
    """
    chat = _Chat(llm, system_prompt, max_tokens, temperature, stream_out)
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    name = Path(str(getattr(llm, "model_path", "the model"))).name
    chat.say(f"chatting with {name} (kv_type {getattr(llm, 'kv_type', '?')}); /help for commands, "
             "Ctrl-D to quit")
    if uses_fallback_format(llm):
        chat.say(f"note: {name} {FALLBACK_NOTE}")
    while True:
        stream_out.write("you> ")
        stream_out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            chat.say()
            continue
        if not line:  # end of input
            chat.say()
            break
        line = line.strip()
        if not interactive and line:
            chat.say(line)  # echo scripted input so a transcript reads like a session
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        stream_out.write("assistant> ")
        stream_out.flush()
        chat.reply(line)
    return chat.messages
