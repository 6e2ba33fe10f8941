"""Layers on llama.cpp RPC servers: two packaged `ggml-rpc-server`s on loopback, started with
`logquant-gguf rpc-server`, and `Llama(rpc_servers=..., n_gpu_layers=-1)` against the same model
run locally on the CPU."""

from __future__ import annotations

import contextlib
import gc
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving import HOST, free_port, package_env
from tiny_model import write_tiny_llama

from logquant_gguf import Llama, cli, rpc

N_LAYER = 4
PROMPT = 80  # tokens evaluated as one batch; with W = 4 most of them end in the 2-bit tier
STEPS = 6  # then fed one at a time
TOL = 1e-4  # the servers run the same CPU kernels: float rounding at most


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("rpc-model") / "tiny.gguf", n_layer=N_LAYER,
                            qk_scale=0.1, seed=11)


@contextlib.contextmanager
def running_servers(n: int, workdir: Path) -> Iterator[str]:
    """n rpc-servers, one thread each: "127.0.0.1:P1,..."; stopped afterwards.

    Every Llama using them must be gone by then: ggml aborts the process when a model frees its
    buffers on a server that has stopped."""
    procs: list[subprocess.Popen] = []
    endpoints, logs = [], []
    try:
        for i in range(n):
            port = free_port()
            logs.append(workdir / f"server{i}-{port}.log")
            with logs[-1].open("w") as log:
                # cwd outside the checkout: the package is package_env()'s (see serving.py)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "logquant_gguf", "rpc-server", "--host", HOST,
                     "--port", str(port), "--threads", "1"],
                    cwd=workdir, env=package_env(), stdout=log, stderr=subprocess.STDOUT))
            endpoints.append(f"{HOST}:{port}")
        for proc, endpoint, log in zip(procs, endpoints, logs):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rpc-server exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    rpc.probe(endpoint, timeout=5)
                    break
                except ValueError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rpc-server did not start:\n{log.read_text()}") from None
                    time.sleep(0.1)
        yield ",".join(endpoints)
    finally:
        gc.collect()  # a Llama a failed test left behind frees its remote buffers now
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[str]:
    with running_servers(2, tmp_path_factory.mktemp("rpc-servers")) as s:
        yield s


def tokens() -> list[int]:
    rng = np.random.default_rng(5)
    return [1] + rng.integers(3, 259, PROMPT + STEPS - 1).tolist()  # BOS, then byte tokens


def logits(llm: Llama) -> np.ndarray:
    """Every row of a prompt evaluated as one batch, then STEPS tokens one at a time."""
    toks = tokens()
    llm.eval(toks[:PROMPT])
    for t in toks[PROMPT:]:
        llm.eval([t])
    return np.array(llm.scores[:PROMPT + STEPS])


def load(model: Path, **kw) -> Llama:
    # (a Llama whose __init__ fails frees what it made at once: nothing is left holding buffers
    # on the servers after they stop)
    return Llama(str(model), **{"n_ctx": 256, "n_batch": 128, "n_threads": 1,
                                "logits_all": True, "verbose": False, **kw})


def check_split_run(model: Path, servers: str, capfd, **kw) -> dict:
    """The run split over the servers against the local one (max abs logit difference within
    TOL); checks that every server holds layers and that the registry is left as it was.
    Returns the split run's kv_stats()."""
    with contextlib.closing(load(model, **kw)) as local:
        want = logits(local)
    capfd.readouterr()
    with contextlib.closing(load(model, n_gpu_layers=-1, rpc_servers=servers,
                                 **{**kw, "verbose": True})) as llm:
        log = capfd.readouterr().err
        assert rpc.registered_devices() == []  # a later Llama stays local
        for endpoint in servers.split(","):
            # llama.cpp's load log: "RPC0[127.0.0.1:P] model buffer size = ..."
            assert re.search(rf"RPC\d+\[{re.escape(endpoint)}\] model buffer size", log), log
        assert f"offloaded {N_LAYER + 1}/{N_LAYER + 1} layers" in log, log
        got = logits(llm)
        stats = llm.kv_stats()
    diff = float(np.abs(got - want).max())
    print(f"max abs logit diff, {kw}: {diff:.3g}")
    assert np.isfinite(got).all()
    assert diff <= TOL
    return stats


def test_f16_split_over_two_servers_matches_local(model, servers, capfd):
    check_split_run(model, servers, capfd, kv_type="f16")


def test_q8_0_split_over_two_servers_matches_local(model, servers, capfd):
    check_split_run(model, servers, capfd, kv_type="q8_0")


def test_same_servers_twice_share_their_devices(model, servers):
    """Registering the servers again (a second Llama while the first is alive) adds no device,
    and both models compute."""
    with rpc.connect(servers) as names:
        assert len(names) == 2 and rpc.registered_devices() == names
        with rpc.connect(servers) as again:
            assert again == names and rpc.registered_devices() == names
    assert rpc.registered_devices() == []
    with contextlib.closing(load(model, n_gpu_layers=-1, rpc_servers=servers)) as a, \
            contextlib.closing(load(model, n_gpu_layers=-1, rpc_servers=servers)) as b:
        np.testing.assert_array_equal(logits(a), logits(b))


def test_protocol_is_the_packaged_servers(servers):
    """rpc.PROTOCOL (a server with the LogQuant ops) is what the server this build ships answers."""
    for endpoint in servers.split(","):
        assert rpc.probe(endpoint) == rpc.PROTOCOL


def test_a_stopped_server_breaks_only_its_own_models(model, tmp_path):
    """The servers are registered for their Llama's load only: after one stops, other models
    load (llama.cpp would query every registered device, and abort on the stopped one), and
    asking for it again is a ValueError."""
    with running_servers(1, tmp_path) as endpoint:
        with contextlib.closing(load(model, n_gpu_layers=-1, rpc_servers=endpoint)) as llm:
            logits(llm)
    with contextlib.closing(load(model, n_gpu_layers=-1)) as local:
        logits(local)
    with pytest.raises(ValueError, match="cannot reach RPC server"):
        load(model, n_gpu_layers=-1, rpc_servers=endpoint)


def _serve_once(reply: bytes | None) -> tuple[str, threading.Thread]:
    """A loopback listener that reads one handshake and answers `reply` (None: closes at once)."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(1)

    def serve() -> None:
        with sock:
            conn, _ = sock.accept()
            with conn:
                if reply is not None:
                    conn.recv(1 + 8 + 24, socket.MSG_WAITALL)
                    conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"{HOST}:{sock.getsockname()[1]}", t


@pytest.mark.parametrize("servers", ["", "127.0.0.1", "127.0.0.1:", ":50052", "127.0.0.1:0",
                                     "127.0.0.1:70000", "127.0.0.1:5x", "127.0.0.1:50052,",
                                     "::1:50052"])
def test_malformed_servers_are_value_errors(model, servers):
    with pytest.raises(ValueError, match="bad RPC server|port must be"):
        load(model, n_gpu_layers=-1, rpc_servers=servers)


def test_unreachable_server_is_a_value_error(model):
    with pytest.raises(ValueError, match="cannot reach RPC server"):
        load(model, n_gpu_layers=-1, rpc_servers=f"{HOST}:{free_port()}")
    with pytest.raises(ValueError, match="cannot reach RPC server"):
        load(model, n_gpu_layers=-1, rpc_servers="no-such-host.invalid:50052")


def hello_reply(major: int, minor: int, patch: int) -> bytes:
    return struct.pack("<Q", 4 + 24) + bytes([major, minor, patch, 0]) + bytes(24)


def test_server_that_is_not_ours_is_a_value_error(model):
    """Another protocol version (a build with another op list) or not an rpc-server at all; the
    pinned llama.cpp's own server passes the check."""
    endpoint, t = _serve_once(hello_reply(*rpc.STOCK_PROTOCOL))
    rpc.check_server(endpoint)
    t.join(5)
    endpoint, t = _serve_once(hello_reply(7, 0, 99))
    with pytest.raises(ValueError, match=r"speaks protocol 7\.0\.99"):
        load(model, n_gpu_layers=-1, rpc_servers=endpoint)
    t.join(5)
    endpoint, t = _serve_once(None)
    with pytest.raises(ValueError, match="cannot reach RPC server"):
        load(model, n_gpu_layers=-1, rpc_servers=endpoint)
    t.join(5)
    endpoint, t = _serve_once(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ValueError, match="not an RPC server"):
        load(model, n_gpu_layers=-1, rpc_servers=endpoint)
    t.join(5)


def test_cli_refuses_what_the_server_would(tmp_path, monkeypatch, capsys):
    assert cli.main(["rpc-server", "--host", "localhost"]) == 2
    assert "IPv4 address" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        assert cli.main(["rpc-server", "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on" in capsys.readouterr().err
    monkeypatch.setattr(rpc, "BIN_DIR", tmp_path)
    assert cli.main(["rpc-server", "--port", str(free_port())]) == 2
    assert "RPC server is not in this installation" in capsys.readouterr().err


def test_logquant_split_over_two_servers_matches_local(model, servers, capfd):
    """The LogQuant ops run on the servers' CPUs (W = 4: the f16 tier holds at most 12 tokens).
    Last in this file: a build whose LogQuant ops are not ggml ops cannot run them there."""
    stats = check_split_run(model, servers, capfd, kv_type="logquant", logquant_window=4)
    assert stats["tiers"]["q2"]["tokens"] >= PROMPT + STEPS - 3 * 4
