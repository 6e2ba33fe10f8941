"""`logquant-gguf serve`: llama-cpp-python's OpenAI-compatible server, around our Llama.

The upstream app (`llama_cpp.server.app`) keeps one module-level model proxy that loads models
itself with `llama_cpp.Llama`. We build the FastAPI app from upstream's router but hand that
proxy an already-loaded `logquant_gguf.Llama`, so `kv_type` and our patched library apply to every
request. Around it we add:

- `RequestGate`, an ASGI middleware in front of the API: API key check, malformed JSON, invalid
  bodies, unknown model names and requests upstream cannot serve (an empty prompt, several
  prompts, logprobs, embeddings from a model loaded without them, a prompt over the context) get
  OpenAI-style 4xx errors. (Upstream answers them with a 500 or 422 of another shape, an empty
  200 for a stream, or silently serves the default model for any name.)
- `GET /logquant/stats`: the KV cache statistics of `Llama.kv_stats()`, live.
- the chat page at `/` (plain files in `logquant_gguf/web/`).

Upstream keeps its state in module globals, so there is one app per process.
"""

from __future__ import annotations

import argparse
import ctypes
import hmac
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

from . import __version__, models
from ._args import add_model_args, model_kwargs
from .chat_format import chat_formatter
from .llama import Llama

try:  # the `server` extra; without it the CLI still lists `serve`, which then says what to install
    import anyio
    import anyio.to_thread
    import llama_cpp
    import uvicorn
    from fastapi import Depends, FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from llama_cpp.server import app as upstream
    from llama_cpp.server.settings import ServerSettings
    from llama_cpp.server.types import (
        CreateChatCompletionRequest,
        CreateCompletionRequest,
        CreateEmbeddingRequest,
    )
    from pydantic import ValidationError
except ImportError as e:  # pragma: no cover - depends on the environment
    _MISSING_EXTRA: ImportError | None = e
else:
    _MISSING_EXTRA = None

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "LOGQUANT_API_KEY"

# Paths behind the API key. The page itself (/ and /web/) is public: it asks for the key.
PROTECTED_PREFIXES = ("/v1/", "/extras/", "/logquant/")
# Bodies we validate before upstream sees them (upstream also serves completions at the
# copilot-codex path).
VALIDATED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                   "/v1/engines/copilot-codex/completions")
MAX_BODY_BYTES = 16 * 1024 * 1024
# The message roles upstream's request schema knows.
ROLES = ("system", "user", "assistant", "tool", "function")
DESCRIPTION = ("Serve a model over llama-cpp-python's OpenAI-compatible API (/v1/models, "
               "/v1/completions, /v1/chat/completions), with a chat page at / and KV cache "
               "statistics at /logquant/stats.")


class LoadedModel:
    """Stands in for upstream's LlamaProxy: one model, loaded once, never swapped.

    Upstream calls `proxy(model_name)` per request and iterates the proxy for /v1/models.
    """

    def __init__(self, llm: Llama, alias: str):
        self.llm = llm
        self.alias = alias
        self.started = time.time()
        self.last_stats: dict[str, Any] = {}
        self.last_stats_time: float | None = None
        self.longest_piece = _longest_piece(llm)
        self.chat_formatter = chat_formatter(llm)

    def names(self) -> set[str]:
        """Model names a request may use: the alias and the file it was loaded from."""
        return {self.alias, str(self.llm.model_path), Path(self.llm.model_path).name}

    def __call__(self, model: str | None = None) -> Llama:
        return self.llm  # RequestGate has already refused unknown names

    def __iter__(self) -> Iterator[str]:
        yield self.alias

    def __getitem__(self, model: str) -> dict[str, Any]:
        return {"model": str(self.llm.model_path), "model_alias": self.alias}

    def free(self) -> None:
        self.llm.close()


def _longest_piece(llm: Llama) -> int | None:
    """Bytes of text the longest token of llm's vocabulary stands for (special tokens included).

    A text of B bytes then has at least B / longest tokens, which bounds a prompt without
    tokenizing it. Only for byte-level BPE and SPM, whose tokens stand for their own text; WPM and
    UGM may make one unknown token of a whole word (None: no bound).
    """
    vocab = llm._model.vocab
    if llama_cpp.llama_vocab_type(vocab) not in (llama_cpp.LLAMA_VOCAB_TYPE_SPM,
                                                 llama_cpp.LLAMA_VOCAB_TYPE_BPE):
        return None
    buf = ctypes.create_string_buffer(256)
    # A negative result is the length of a piece that does not fit the buffer.
    return max(1, max(abs(llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True))
                      for t in range(llama_cpp.llama_vocab_n_tokens(vocab))))


def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, which the official clients turn into typed exceptions."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _bearer_token(scope: dict) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def _text_of(body: dict) -> list[str]:
    """The prompt or message texts of a completion request body, without any template."""
    if "messages" in body:
        texts = []
        for m in body["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content
                          if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return texts
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt if isinstance(p, str)] if isinstance(prompt, list) else []


def _validation_error(e: ValidationError) -> JSONResponse:
    # A message fails every type of the schema's union of message types; the type of its role
    # says what is wrong, the others only that the role is not theirs.
    errors = [x for x in e.errors() if x["type"] != "literal_error"] or e.errors()
    # Drop the names of those types (ChatCompletionRequestToolMessage, ...) from the location.
    loc = [p for p in errors[0]["loc"] if not (isinstance(p, str) and p[:1].isupper())]
    param = ".".join(str(p) for p in loc) or None
    return _error(400, f"Invalid request: {param}: {errors[0]['msg']}", param=param,
                  code="invalid_request")


def _check_roles(messages: Any) -> JSONResponse | None:
    """An unknown role, named (the schema would say only that the role should be 'system')."""
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(m, dict) and "role" in m and m["role"] not in ROLES:
            return _error(400, f"messages.{i}.role: unknown role {m['role']!r}; a message's role "
                          f"is one of {', '.join(ROLES)}.", param=f"messages.{i}.role",
                          code="invalid_request")
    return None


def _count_tokens(kind: str, request: Any, model: LoadedModel) -> int:
    """The prompt's tokens as upstream makes them: the chat template's text of the messages, or
    the prompt with the model's BOS (and EOS) tokens."""
    llm = model.llm
    if kind == "completion":
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        return len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
    if model.chat_formatter is None:  # the texts without their template: a lower bound
        return sum(len(llm.tokenize(t.encode(), add_bos=False))
                   for t in _text_of(request.model_dump(include={"messages"})))
    result = model.chat_formatter(**request.model_dump(
        include={"messages", "functions", "function_call", "tools", "tool_choice"}))
    return len(llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True))


def _check_length(kind: str, body: dict, request: Any, model: LoadedModel) -> JSONResponse | None:
    """A prompt over the context, for every request: upstream refuses one with a 400 only when
    the reply is not streamed (a stream has begun with a 200 by then, and ends empty), and only
    once the model is free."""
    n_ctx = model.llm.n_ctx()
    param = "messages" if kind == "chat" else "prompt"
    # Bounded by the text's size first: tokenizing a huge prompt takes a core for seconds (for
    # minutes with a vocabulary of few merges), to find what its size already says.
    n_bytes = sum(len(t.encode()) for t in _text_of(body))
    if model.longest_piece is not None and n_bytes >= n_ctx * model.longest_piece:
        n_prompt = f"at least {-(-n_bytes // model.longest_piece)}"
    else:
        try:
            count = _count_tokens(kind, request, model)
        except Exception as e:  # the chat template refuses the messages (raise_exception, ...)
            return _error(400, f"The model's chat template cannot format these messages: {e}",
                          param="messages", code="invalid_request")
        if count < n_ctx:
            return None
        n_prompt = str(count)
    template = " with the chat template" if kind == "chat" and model.chat_formatter else ""
    return _error(400, f"This model's maximum context length is {n_ctx} tokens, but the {param} "
                  f"take {n_prompt} tokens{template}. Please shorten them.", param=param,
                  code="context_length_exceeded")


def _check_generation(kind: str, body: dict, request: Any,
                      model: LoadedModel) -> JSONResponse | None:
    """What upstream would fail on with a 500 of an empty or internal message."""
    if kind == "completion":
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) > 1:  # upstream asserts a list of at most one
                return _error(400, f"This server completes one prompt per request, not "
                              f"{len(prompt)}.", param="prompt", code="invalid_request")
            prompt = prompt[0] if prompt else ""
        if not prompt:  # a model without BOS has no token to start from: upstream asserts
            return _error(400, "The prompt is empty.", param="prompt", code="invalid_request")
        wants_logprobs = request.logprobs is not None
    else:
        if not request.messages:  # a chat template reads messages[0]
            return _error(400, "`messages` is empty: send at least one message.",
                          param="messages", code="invalid_request")
        # Without top_logprobs upstream silently returns none.
        wants_logprobs = bool(request.logprobs)
    if wants_logprobs and not model.llm._logits_all:
        return _error(400, "This server does not return logprobs: its model was loaded without "
                      "logits_all=True.", param="logprobs", code="invalid_request")
    return _check_length(kind, body, request, model)


def check_body(path: str, raw: bytes, model: LoadedModel) -> JSONResponse | bytes:
    """The 4xx answer for a request body, or the body for upstream to serve.

    The body passed on names the model by its alias: upstream's responses echo the request's
    `model`, and the path of the model file when it has none. Runs in a worker thread: parsing
    and tokenizing a long prompt takes a while.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return _error(400, f"The request body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", code="invalid_json")
    kind = ("embedding" if path == "/v1/embeddings" else "chat" if "chat" in path
            else "completion")
    if kind == "chat" and (refusal := _check_roles(body.get("messages"))) is not None:
        return refusal
    schema = {"chat": CreateChatCompletionRequest, "completion": CreateCompletionRequest,
              "embedding": CreateEmbeddingRequest}[kind]
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        return _validation_error(e)
    name = body.get("model")
    if name is not None and name not in model.names():
        return _error(404, f"The model `{name}` does not exist; this server serves "
                      f"`{model.alias}`.", param="model", code="model_not_found")
    if kind == "embedding":
        if not model.llm.context_params.embeddings:  # upstream: a 500 from a RuntimeError
            return _error(400, f"This server does not compute embeddings: `{model.alias}` was "
                          "loaded without embedding=True.", code="invalid_request")
    elif (refusal := _check_generation(kind, body, request, model)) is not None:
        return refusal
    body["model"] = model.alias
    return json.dumps(body).encode()


class RequestGate:
    """ASGI middleware: API key, then the body of completion and embedding requests, before
    upstream runs."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, api_key: str | None,
                 model: LoadedModel):
        self.app = app
        self.api_key = api_key
        self.model = model

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":  # CORS preflight carries no credentials
            return await self.app(scope, receive, send)
        if self.api_key is not None:
            token = _bearer_token(scope)
            if token is None or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _error(401, "Invalid or missing API key (send "
                                    "`Authorization: Bearer KEY`).",
                                    code="invalid_api_key")(scope, receive, send)
        if scope["method"] != "POST" or path not in VALIDATED_PATHS:
            return await self.app(scope, receive, send)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return await _error(413, "Request body too large.")(scope, receive, send)
            if not message.get("more_body", False):
                break
        # Off the event loop, which would stall every other client meanwhile.
        checked = await anyio.to_thread.run_sync(check_body, path, b"".join(chunks), self.model)
        if isinstance(checked, JSONResponse):
            return await checked(scope, receive, send)
        raw = checked

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as upstream expects

        await self.app(scope, replay, send)


def _jsonable(value: Any) -> Any:
    """kv_stats() may hold numpy scalars or arrays; JSON wants plain numbers and lists."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))


def read_stats(model: LoadedModel) -> dict[str, Any]:
    """kv_stats() when the model is idle, else the last snapshot marked busy.

    A generation holds upstream's inner lock while it runs in a worker thread; reading the cache
    from C at the same time would race it, so we take the lock without waiting or not at all.
    """
    busy = True
    try:
        upstream.llama_inner_lock.acquire_nowait()
    except anyio.WouldBlock:
        pass
    else:
        try:
            model.last_stats = _jsonable(model.llm.kv_stats())
            model.last_stats_time = time.time()
            busy = False
        finally:
            upstream.llama_inner_lock.release()
    return {
        # Known without reading the cache, so present even before the first snapshot.
        "kv_type": model.llm.kv_type,
        "n_ctx": model.llm.n_ctx(),
        **model.last_stats,
        "model": model.alias,
        "busy": busy,
        # Python's count of the tokens evaluated in the context: safe to read at any time, so it
        # moves while a reply is generated even when the C-side figures are a snapshot.
        "live_tokens": int(model.llm.n_tokens),
        "stats_time": model.last_stats_time,
        "uptime_s": round(time.time() - model.started, 1),
    }


def _require_server_extra() -> None:
    if _MISSING_EXTRA is not None:
        raise ImportError(f"the server needs the `server` extra ({_MISSING_EXTRA.name} is "
                          "missing): pip install 'logquant-gguf[server]'") from _MISSING_EXTRA


def create_app(llm: Llama, *, model_alias: str | None = None, api_key: str | None = None,
               cors_origins: Sequence[str] = (), interrupt_requests: bool = False) -> FastAPI:
    """The server app for a loaded Llama. One per process (upstream's state is global).

    interrupt_requests: upstream's option to cut a streaming reply short when another request
    arrives. Off by default: concurrent requests queue and each gets its whole answer.
    """
    _require_server_extra()
    alias = model_alias or Path(llm.model_path).stem
    model = LoadedModel(llm, alias)
    # Every field explicitly: ServerSettings is a pydantic BaseSettings and would otherwise read
    # stray environment variables such as API_KEY.
    upstream.set_server_settings(ServerSettings(
        api_key=api_key, interrupt_requests=interrupt_requests, disable_ping_events=False,
        host=DEFAULT_HOST, port=DEFAULT_PORT, root_path="", ssl_keyfile=None, ssl_certfile=None))
    upstream._llama_proxy = model  # upstream's proxy slot; set_llama_proxy() would load a model

    app = FastAPI(title="logquant-gguf", version=__version__,
                  description=f"OpenAI-compatible API for {alias} (kv_type {llm.kv_type})")
    app.state.model = model
    app.include_router(upstream.router)

    @app.get("/logquant/stats", tags=["logquant"], dependencies=[Depends(upstream.authenticate)])
    async def stats() -> dict[str, Any]:
        """KV cache statistics (kv_type, n_ctx, tokens, bytes, tiers) and whether it is busy."""
        return read_stats(model)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    # Order: the last added runs first. CORS must answer preflights before the gate sees them.
    app.add_middleware(RequestGate, api_key=api_key, model=model)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


def check_address(host: str, port: int) -> None:
    """Raises OSError when the server could not listen on host:port (the port in use, an address
    this machine does not have), so that `serve` says so before it spends time loading the model.

    Binds each address of host as asyncio's create_server, which uvicorn uses, will.
    """
    for family, type_, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE):
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--model-alias", default=None,
                   help="model name clients use (default: the file name without .gguf)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; "
                   "the variable keeps the key out of the process list)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; default: none)")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `serve` to a CLI's subparsers; the parsed namespace runs with `args.func(args)`."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible API server with a chat page",
                              description=DESCRIPTION)
    add_serve_arguments(p)
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    """Loads the model and runs the server until interrupted."""
    try:
        _require_server_extra()
    except ImportError as e:
        print(f"logquant-gguf serve: error: {e}", file=sys.stderr)
        return 2
    try:
        check_address(args.host, args.port)
    except OSError as e:
        print(f"logquant-gguf serve: error: cannot listen on {args.host} port {args.port}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    path = args.model or str(models.default_model_path())
    llm = Llama(path, kv_type=args.kv_type, n_ctx=args.n_ctx, verbose=args.verbose,
                **model_kwargs(args))
    app = create_app(llm, model_alias=args.model_alias, api_key=args.api_key or None,
                     cors_origins=args.cors_origin)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not args.api_key:
        print(f"logquant-gguf serve: warning: listening on {args.host} without --api-key; "
              "anyone who can reach this port can use the model", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"logquant-gguf: serving {app.state.model.alias} (kv_type {args.kv_type}, "
          f"n_ctx {args.n_ctx}) at http://{shown}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logquant-gguf serve", description=DESCRIPTION)
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, models.ModelNotInstalledError) as e:
        print(f"logquant-gguf serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
