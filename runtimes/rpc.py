"""Several machines, one model: llama.cpp's RPC backend (ggml-rpc), driven through ctypes.

The wheel is built with GGML_RPC=ON, so libggml-rpc exports both halves: `ggml_backend_rpc_add_server`
(the client: each worker becomes a device that llama.cpp splits layers over) and
`ggml_backend_rpc_start_server` (the worker loop that llama.cpp's `rpc-server` tool wraps). We call them
directly instead of building that tool; the wire protocol, the layer split and the tensor transfer are
all llama.cpp's own.

The worker protocol has no authentication or encryption: bind workers to a private network only.
The systemd unit that runs a worker on a board is edgellm.deploy.units.worker_unit.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from edgellm.errors import BackendError, UsageError

from .llama_lib import init_native_logging

DEFAULT_PORT = 50052


def parse_endpoints(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'h1:50052,h2:50052' or a list of 'host:port' -> validated endpoints."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"bad RPC worker {raw!r}: expected host:port, e.g. 192.168.1.20:{DEFAULT_PORT}")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise UsageError("no RPC workers given: expected host:port[,host:port...]")
    return tuple(out)


@cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (device registry, with ggml-base's symbols) and libggml-rpc from llama-cpp-python's
    wheel: the same copies llama.cpp already loaded, so devices registered here are the ones it sees."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    suffix = ".dylib" if sys.platform == "darwin" else ".dll" if os.name == "nt" else ".so"
    try:
        base = ctypes.CDLL(str(libdir / f"libggml-base{suffix}"))
        ggml = ctypes.CDLL(str(libdir / f"libggml{suffix}"))
        rpc = ctypes.CDLL(str(libdir / f"libggml-rpc{suffix}"))
    except OSError as e:
        raise BackendError(f"llama.cpp's RPC backend is not in this llama-cpp-python build ({e}); "
                           "rebuild it with CMAKE_ARGS=-DGGML_RPC=ON (see .ci/setup.sh)") from None
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    rpc.ggml_backend_rpc_start_server.restype = None
    base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    base.ggml_backend_dev_by_type = ggml.ggml_backend_dev_by_type
    return base, rpc


def _reachable(endpoint: str, timeout: float = 3.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        # ggml-rpc aborts the whole process on a failed connect, so find out first, politely.
        raise BackendError(f"RPC worker {endpoint} is not reachable ({e.strerror or e}): "
                           f"start it with `edgellm rpc-worker --host HOST --port {port}`") from None


def rpc_devices(endpoints: Sequence[str]) -> ctypes.Array:
    """One llama.cpp device per worker, as the NULL-terminated array llama_model_params.devices takes."""
    init_native_logging()  # llama_backend_init before ggml is used
    base, rpc = _libs()
    devices: list[int] = []
    for ep in parse_endpoints(endpoints):
        _reachable(ep)
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise BackendError(f"RPC worker {ep} reports no devices")
        devices += [base.ggml_backend_reg_dev_get(reg, i) for i in range(base.ggml_backend_reg_dev_count(reg))]
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None)


def serve_worker(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Run a worker (this machine's CPU) until the process is stopped; blocks.

    The native loop never returns, so it runs in a daemon thread and the main thread waits for
    Ctrl-C / SIGTERM, which then ends the process cleanly.
    """
    init_native_logging()
    base, rpc = _libs()
    cpu = base.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu:
        raise BackendError("llama.cpp found no CPU device to serve")
    _bindable(host, port)
    devs = (ctypes.c_void_p * 1)(cpu)
    n_threads = threads or max(1, (os.cpu_count() or 2))
    cache = str(cache_dir).encode() if cache_dir else None
    worker = threading.Thread(target=rpc.ggml_backend_rpc_start_server, daemon=True, name="ggml-rpc",
                              args=(f"{host}:{port}".encode(), cache, n_threads, 1, devs))
    worker.start()
    worker.join()  # returns only if the native loop gave up (it printed why)
    raise BackendError(f"the RPC worker on {host}:{port} stopped (see the message above)")


def _bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
