"""Runs `logquant-gguf serve` in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import logquant_gguf

HOST = "127.0.0.1"


def package_env() -> dict[str, str]:
    """The environment for a subprocess that runs the logquant_gguf this test process imported
    (the source tree under `python -m pytest`, with the library built into it; else the installed
    package), not whichever one its working directory would give it."""
    env = dict(os.environ)
    root = str(Path(logquant_gguf.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Server:
    url: str
    api_key: str | None
    model: str  # the model id the server reports

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                api_key: str | None = "default", timeout: float = 60) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one request; never raises for HTTP errors."""
        key = self.api_key if api_key == "default" else api_key
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, workdir: Path, *, kv_type: str = "f16", n_ctx: int = 256,
                   api_key: str | None = None, startup_s: float = 90) -> Iterator[Server]:
    """Starts the server, waits until it answers, yields it, stops it."""
    port = free_port()
    env = package_env()
    env.pop("LOGQUANT_API_KEY", None)
    if api_key:
        env["LOGQUANT_API_KEY"] = api_key  # also tests that the key can come from the environment
    log = (workdir / "server.log").open("w")
    # cwd=workdir: `python -m` puts the cwd first on sys.path; the package is package_env()'s.
    proc = subprocess.Popen(
        [sys.executable, "-m", "logquant_gguf.server", "--model", str(model), "--host", HOST,
         "--port", str(port), "--kv-type", kv_type, "--n-ctx", str(n_ctx), "--threads", "1"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://{HOST}:{port}", api_key, model="")
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                   + (workdir / "server.log").read_text())
            try:
                status, body = server.request("GET", "/v1/models", timeout=5)
                if status == 200:
                    server.model = body["data"][0]["id"]
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + (workdir / "server.log").read_text())
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
