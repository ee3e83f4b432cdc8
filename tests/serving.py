"""Helpers for the tests that talk to a real `edgellm serve` on loopback (in process or as the CLI)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import edgellm
from edgellm.server import EdgeServer, ServeConfig

MODEL = "smollm2-135m"


@contextmanager
def running(path, *, n_ctx: int = 2048, **config):
    """An in-process server on an ephemeral loopback port; always shut down."""
    session = edgellm.load(path, n_ctx=n_ctx, disk_cache=False, sampler=edgellm.GREEDY,
                           parallel=config.get("parallel", 4))
    server = EdgeServer(session, ServeConfig(model_id=MODEL, **config), port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.uvicorn.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(30)
        session.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cli_server(*args: str, env: dict | None = None, start_timeout: float = 90):
    """`edgellm serve ARGS --port P` as a subprocess; yields (base url, process); killed if still running."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", *args, "--port", str(port)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, proc.stderr.read().decode()
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def post(url: str, body: bytes | dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """POST JSON; (status, parsed JSON body) for 2xx and errors alike (a non-JSON body fails the test)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

def wait_health(url: str, cond, timeout: float = 60) -> None:
    """Poll GET /health until `cond(health)` holds; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/health") as h:
            if cond(json.loads(h.read())):
                return
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)
