"""More than one machine: llama.cpp's RPC backend.

`logquant-gguf rpc-server` runs the `ggml-rpc-server` this package ships (ggml's CPU, or the GPU
it was built for, served over TCP). `Llama(..., rpc_servers="host:port,...", n_gpu_layers=-1)`
registers each server's devices with ggml before the model loads, as llama.cpp's `--rpc` does
(`add_rpc_devices` in common/arg.cpp), so llama.cpp places layers and their KV cache on them.

Two things differ from `--rpc`, both for a library that may hold several models:
- the devices are registered only while that `Llama` loads (`Devices` below): a later `Llama`
  without `rpc_servers` stays local, and a server that has gone away breaks only the models that
  use it (ggml aborts the process when it cannot reach a registered server);
- each server is checked from Python first (TCP connect and the RPC handshake), so an endpoint
  that is malformed, unreachable, busy, or speaks another protocol version is a `ValueError`
  instead of ggml's abort.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ._runtime import BIN_DIR, LIB_DIR

SERVER_NAME = "ggml-rpc-server" + (".exe" if sys.platform == "win32" else "")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052  # ggml-rpc-server's own default

# The RPC protocol versions a server may answer the handshake with (ggml-rpc.h). Ours: the pinned
# llama.cpp's major.minor, and the patch number RPC_PROTO_PATCH_LOGQUANT of a server built with the
# LogQuant ops (tests/test_rpc.py holds this to the packaged server). The pinned llama.cpp's own
# server numbers every other op as we do, so it is accepted too: it serves every kv type but
# logquant, which the cache refuses on a server without its ops. Anything else (upstream bumps the
# patch number when ggml's op list changes) would compute other ops than we send, or abort on them.
PROTOCOL = (7, 0, 0x4C)
STOCK_PROTOCOL = (7, 0, 0)
PROBE_TIMEOUT_S = 10.0

_RPC_CMD_HELLO = 14  # fixed across protocol versions (a static_assert in ggml-rpc.cpp)
_CONN_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE (transport.h); all zero: plain TCP, no RDMA

_lock = threading.RLock()
_connected: set[str] = set()  # endpoints ggml has connected to in this process


class ServerMissingError(FileNotFoundError):
    """This installation has no rpc-server binary."""


def server_path() -> Path:
    path = BIN_DIR / SERVER_NAME
    if not path.is_file():
        raise ServerMissingError(
            f"the RPC server is not in this installation ({path} is missing). It is built with the "
            "package: reinstall it from a checkout with `pip install .`.")
    return path


def server_command(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, threads: int | None = None,
                   devices: Sequence[str] = (), cache: bool = False) -> list[str]:
    """The command line of the packaged rpc-server (ValueError for arguments it would refuse)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"the RPC server binds an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0), "
                         f"not {host!r}") from None
    _check_port(port)
    cmd = [str(server_path()), "--host", host, "--port", str(port)]
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        cmd += ["--threads", str(threads)]
    if devices:
        cmd += ["--device", ",".join(devices)]
    if cache:
        cmd.append("--cache")
    return cmd


def check_address(host: str, port: int) -> None:
    """OSError if the server could not listen on host:port (ggml-rpc-server would print an error
    and exit with status 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        s.bind((host, port))


def run_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, threads: int | None = None,
               devices: Sequence[str] = (), cache: bool = False) -> int:
    """Replaces this process with the rpc-server (on Windows, runs it and returns its status)."""
    cmd = server_command(host, port, threads=threads, devices=devices, cache=cache)
    try:
        check_address(host, port)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "nt":
        import subprocess

        return subprocess.call(cmd)
    os.execv(cmd[0], cmd)
    raise AssertionError("unreachable")


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port!r}")


def parse_servers(servers: str) -> list[str]:
    """"host:port,host:port" -> the endpoints, as ggml reads them (IPv4 hosts or names), without
    repeats."""
    if not isinstance(servers, str):
        raise ValueError(f"rpc_servers must be a string 'host:port,host:port', got {servers!r}")
    out: list[str] = []
    for part in servers.split(","):
        item = part.strip()
        host, sep, port_s = item.partition(":")
        if not item or not sep or not host or not (port_s.isascii() and port_s.isdigit()):
            raise ValueError(f"bad RPC server {item!r} in rpc_servers={servers!r}: give host:port "
                             "(an IPv4 address or a host name, e.g. 192.168.1.7:50052)")
        port = int(port_s)
        _check_port(port)
        endpoint = f"{host}:{port}"
        if endpoint not in out:
            out.append(endpoint)
    return out


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """The RPC protocol version the server at endpoint answers the handshake with (ValueError if
    it cannot be reached or does not answer as an rpc-server)."""
    host, _, port = endpoint.partition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((host, int(port)))
            # | cmd (1 byte) | request size (u64) | hello request: connection caps |
            s.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(s, 8))
            if size != 4 + _CONN_CAPS_SIZE:  # major, minor, patch, padding, caps
                raise ValueError(f"{endpoint} is not an RPC server of this protocol (its handshake "
                                 f"reply has {size} bytes)")
            major, minor, patch = _recv_exact(s, size)[:3]
    except socket.timeout:
        raise ValueError(f"RPC server {endpoint} did not answer within {timeout:g} s (an "
                         "rpc-server serves one client at a time: is another process using it?)") from None
    except (OSError, ConnectionError) as e:
        raise ValueError(f"cannot reach RPC server {endpoint}: {e.strerror or e} (start one there "
                         "with `logquant-gguf rpc-server --host ADDRESS --port PORT`)") from None
    return major, minor, patch


def check_server(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """ValueError unless endpoint is an rpc-server of our build's protocol (or the pinned
    llama.cpp's).

    ggml keeps one connection per endpoint while a model uses it, and a server serves one client
    at a time, queueing one or two more: an endpoint ggml has connected to before gets a TCP
    connect only, where a timeout means a full queue (busy, most likely with this process) and
    only a refusal (nothing listens there now) is an error."""
    if endpoint in _connected:
        host, _, port = endpoint.partition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=min(timeout, 1.0)):
                return
        except socket.timeout:
            return
        except OSError as e:
            raise ValueError(f"cannot reach RPC server {endpoint}: {e.strerror or e}") from None
    version = probe(endpoint, timeout)
    if version not in (PROTOCOL, STOCK_PROTOCOL):
        raise ValueError(
            f"RPC server {endpoint} speaks protocol {'.'.join(map(str, version))}, this package "
            f"{'.'.join(map(str, PROTOCOL))}: run the rpc-server of this same package there "
            "(`logquant-gguf rpc-server`); another llama.cpp build numbers ggml's ops otherwise")


def _lib_name() -> str:
    return {"darwin": "libggml.dylib", "win32": "ggml.dll"}.get(sys.platform, "libggml.so")


_ggml_lib: ctypes.CDLL | None = None


def _loaded_ggml() -> ctypes.CDLL:
    """The libggml that libllama loaded, not another copy of it: an installed wheel holds
    libggml.so, libggml.so.0 and libggml.so.0.x as separate files (wheels have no symlinks), and
    a second copy would be a second, empty backend registry that model loads never see. On Linux
    libllama's NEEDED entry is the soname, so that name finds the loaded object."""
    if sys.platform.startswith("linux"):
        try:
            return ctypes.CDLL("libggml.so.0", mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        except OSError:
            pass
        if (LIB_DIR / "libggml.so.0").exists():
            return ctypes.CDLL(str(LIB_DIR / "libggml.so.0"))
    return ctypes.CDLL(str(LIB_DIR / _lib_name()))


def _ggml() -> ctypes.CDLL:
    """ggml's backend registry, from the libggml our libllama uses (the same loaded copy)."""
    global _ggml_lib
    if _ggml_lib is None:
        lib = _loaded_ggml()
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, res, args in (
                ("ggml_backend_reg_by_name", vp, [ctypes.c_char_p]),
                ("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
                ("ggml_backend_reg_dev_count", sz, [vp]),
                ("ggml_backend_reg_dev_get", vp, [vp, sz]),
                ("ggml_backend_register", None, [vp]),
                ("ggml_backend_unload", None, [vp]),
                ("ggml_backend_device_register", None, [vp]),
                ("ggml_backend_dev_count", sz, []),
                ("ggml_backend_dev_get", vp, [sz]),
                ("ggml_backend_dev_backend_reg", vp, [vp]),
                ("ggml_backend_dev_name", ctypes.c_char_p, [vp])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _ggml_lib = lib
    return _ggml_lib


def _rpc_reg(g: ctypes.CDLL) -> int:
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise ValueError("this build of logquant_gguf has no RPC backend (it is built with GGML_RPC=ON; "
                         "reinstall the package)")
    return reg


def registered_devices() -> list[str]:
    """Names of the RPC devices in ggml's device registry now (those a model load would use)."""
    g = _ggml()
    rpc = _rpc_reg(g)
    return [g.ggml_backend_dev_name(d).decode() for d in _rpc_devices(g, rpc)]


def _rpc_devices(g: ctypes.CDLL, rpc: int) -> list[int]:
    devs = (g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count()))
    return [d for d in devs if g.ggml_backend_dev_backend_reg(d) == rpc]


class Devices:
    """The devices of some RPC servers, connected; `with` registers them with ggml for its body
    (a model loaded there puts layers on them with n_gpu_layers) and restores the registry after:
    the loaded model keeps its devices, later loads do not see them. Nothing is registered twice:
    ggml keeps one set of devices per endpoint, and its registry ignores a device it holds."""

    def __init__(self, endpoints: list[str], handles: list[int], names: list[str]):
        self.endpoints = endpoints
        self.names = names  # RPC0, RPC1, ...: each a CPU or GPU of a server
        self._handles = handles
        self._before: list[int] = []

    def __enter__(self) -> list[str]:
        if self._handles:
            _lock.acquire()
            try:
                g = _ggml()
                self._before = _rpc_devices(g, _rpc_reg(g))
                for dev in self._handles:
                    g.ggml_backend_device_register(dev)
            except BaseException:
                _lock.release()
                raise
        return self.names

    def __exit__(self, *exc) -> None:
        if self._handles:
            try:
                g = _ggml()
                rpc = _rpc_reg(g)
                # ggml cannot unregister one device: unloading the RPC backend drops all of its
                # devices (and the backend's entry, which holds no library); then restore the rest.
                g.ggml_backend_unload(rpc)
                g.ggml_backend_register(rpc)
                for dev in self._before:
                    g.ggml_backend_device_register(dev)
            finally:
                _lock.release()


def connect(servers: str | None) -> Devices:
    """Checks the servers of "host:port,..." and connects ggml to them (ValueError for a bad,
    unreachable or incompatible server); registers nothing yet."""
    if servers is None:
        return Devices([], [], [])
    endpoints = parse_servers(servers)
    for endpoint in endpoints:
        check_server(endpoint)
    with _lock:
        g = _ggml()
        addr = g.ggml_backend_reg_get_proc_address(_rpc_reg(g), b"ggml_backend_rpc_add_server")
        if not addr:
            raise ValueError("this build's RPC backend has no ggml_backend_rpc_add_server")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
        handles, names = [], []
        for endpoint in endpoints:
            reg = add_server(endpoint.encode())  # asks the server for its devices, once per process
            _connected.add(endpoint)
            if not reg:
                raise ValueError(f"RPC server {endpoint} has no devices")
            for i in range(g.ggml_backend_reg_dev_count(reg)):
                dev = g.ggml_backend_reg_dev_get(reg, i)
                handles.append(dev)
                names.append(g.ggml_backend_dev_name(dev).decode())
    return Devices(endpoints, handles, names)
