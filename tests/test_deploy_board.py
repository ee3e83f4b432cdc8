"""The Raspberry Pi bundle on an emulated board: Debian 12 arm64 (Pi OS-like: python3, no compiler,
no libgomp) under qemu-user. Copy the .tar.gz in, install twice, start the service exactly as its
systemd unit would, ask the real default model a question over HTTP, compare with the same request
to an x86 server here, health-check, and uninstall twice.

One run per test session (the board is a module-scoped fixture); emulated speed is not a benchmark.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import emulated_board as eb  # noqa: E402
from deploy_fixtures import QUESTION, SYSTEM_PROMPT, free_port  # noqa: E402

from edgellm.deploy import units  # noqa: E402
from edgellm.gguf_check import validate_gguf  # noqa: E402

HOME = "/home/pi"
MAX_TOKENS = 16


def _http(port: int, path: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:   # the server's JSON error says what went wrong
        raise AssertionError(f"{path}: HTTP {e.code}: {e.read()[:2000]!r}") from None


def _wait_health(port: int, proc: subprocess.Popen, deadline_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"service exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            _http(port, "/health", timeout=2)
            return time.monotonic() - t0
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no /health within {deadline_s:.0f} s")


def _wait_port(port: int, proc: subprocess.Popen, deadline_s: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"nothing listens on {port} after {deadline_s:.0f} s")


def _chat(port: int, timeout: float) -> dict:
    model = _http(port, "/v1/models")["data"][0]["id"]
    body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]}
    return _http(port, "/v1/chat/completions", body, timeout=timeout)


def _ask(port: int, timeout: float) -> str:
    return _chat(port, timeout)["choices"][0]["message"]["content"]


def _group_rss(pgid: int) -> int:
    """Resident bytes of every process in a process group (proot, qemu-aarch64 and the emulated worker)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:         # the fields after the command: state, ppid, pgrp, ..., rss (22nd)
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _service_command(root: Path, unit_path: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart and Environment of the installed unit (systemd itself does not run in the root)."""
    unit = units.parse_unit((root / unit_path.lstrip("/")).read_text())
    env = dict(e.split("=", 1) for e in unit.get("Environment", []))
    return units.exec_argv(unit["ExecStart"][0]), env


@pytest.fixture(scope="module")
def board(pi_bundle, module_tmp):
    """A fresh copy of the cached arm64 root with the bundle's .tar.gz unpacked in /home/pi."""
    missing = eb.missing_tools()
    assert not missing, f"apt-get install {' '.join(missing)} (.ci/setup.sh does)"
    root = module_tmp / "board" / "root"
    root.parent.mkdir()
    subprocess.run(["cp", "-a", str(eb.arm64_root()), str(root)], check=True)
    eb.prepare_board(root)
    assert not list(root.glob("usr/lib/aarch64-linux-gnu/libgomp*")), "the board must not have libgomp"
    assert not any((root / "usr/bin" / cc).exists() for cc in ("cc", "gcc", "aarch64-linux-gnu-gcc"))
    (root / HOME.lstrip("/")).mkdir(parents=True, exist_ok=True)
    with tarfile.open(pi_bundle.report.tar_path) as tar:
        tar.extractall(root / HOME.lstrip("/"), filter="tar")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_bundle_installs_serves_and_answers_on_an_emulated_pi(board, pi_bundle):
    root, spec = board, pi_bundle.spec
    bundle = f"{HOME}/kiosk"
    t0 = time.monotonic()
    first = eb.run(root, ["/bin/bash", f"{bundle}/install.sh"], timeout=600)
    install_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    assert "systemd is not running here" in first.stdout
    installed = {p: p.stat().st_mtime_ns for p in (root / "opt/edgellm").rglob("*") if p.is_file()}
    t0 = time.monotonic()
    again = eb.run(root, ["/bin/bash", f"{bundle}/install.sh"], timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is already installed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "opt/edgellm").rglob("*") if p.is_file()} == installed
    reinstall_s = time.monotonic() - t0
    assert "edgellm:" in (root / "etc/passwd").read_text()  # the service's own user

    argv, env = _service_command(root, "/etc/systemd/system/edgellm.service")
    assert env["EDGELLM_THREADS"] == "4"  # the Pi 5's cores; this host has 2, and emulated
    env["EDGELLM_THREADS"] = str(min(4, os.cpu_count() or 2))  # spinning threads on shared cores crawl
    host_port = free_port()
    host_argv = [sys.executable, "-m", "edgellm.cli", "serve", str(pi_bundle.model), "--host", "127.0.0.1",
                 "--port", str(host_port), "--ctx", str(spec.n_ctx), "--kv-type", spec.kv_type,
                 "--parallel", str(spec.parallel), "--system-state", str(pi_bundle.path / "state" / "system.kv")]
    host = subprocess.Popen(host_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "EDGELLM_HOME": str(root.parent / "x86")})
    try:
        _wait_health(host_port, host, 120)
        expected = _ask(host_port, 120)
    finally:
        _stop(host)
    service = subprocess.Popen(eb.command(root, argv, env=env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        startup_s = _wait_health(spec.port, service, 300)
        t0 = time.monotonic()
        reply = _chat(spec.port, 300)
        answer_s = time.monotonic() - t0
        answer = reply["choices"][0]["message"]["content"]
        shipped = _http(spec.port, "/health")["system_state_tokens"]
        health = eb.run(root, ["/bin/bash", f"{bundle}/healthcheck.sh", "30"], timeout=120)
    finally:
        _stop(service)
    print(f"\nemulated board: install {install_s:.0f} s, install again {reinstall_s:.0f} s, "
          f"service up in {startup_s:.0f} s, answer in {answer_s:.0f} s: {answer!r} (x86: {expected!r})")
    assert answer.strip() and answer == expected
    assert "Paris" in answer
    # the shipped system-prompt state was restored, not evaluated, on the board
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == shipped > 0
    assert health.returncode == 0 and "ok" in health.stdout, health.stdout + health.stderr

    # The worker side of multi-device RPC (what `deploy rpi --rpc-worker` installs) on the board, driven by an
    # x86 `edgellm serve --rpc`: the layers run on the emulated aarch64 worker and the answer must not change.
    from edgellm.deploy.units import worker_unit

    worker_port = free_port()
    (root / "var/cache/edgellm/rpc").mkdir(parents=True, exist_ok=True)
    unit = units.parse_unit(worker_unit(host="127.0.0.1", port=worker_port, threads=2, exec_start=units.EXE))
    log = open(root.parent / "worker.log", "w+")  # it logs every connection: a pipe could fill and block it
    worker = subprocess.Popen(eb.command(root, units.exec_argv(unit["ExecStart"][0])), stdout=log,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client_port = free_port()
    client = None
    try:
        _wait_port(worker_port, worker, 120)
        idle_rss = _group_rss(worker.pid)
        client = subprocess.Popen([*host_argv[:host_argv.index("--port")], "--port", str(client_port), "--ctx",
                                   str(spec.n_ctx), "--parallel", "1", "--rpc", f"127.0.0.1:{worker_port}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _wait_health(client_port, client, 300)
        # the emulated worker really holds the layers (a silently ignored --rpc would leave it idle): llama.cpp
        # sent it every blk.* tensor, so its processes grew by at least that much
        layers = sum(t.n_bytes for t in validate_gguf(pi_bundle.model).tensors if t.name.startswith("blk."))
        grown = _group_rss(worker.pid) - idle_rss
        print(f"emulated RPC worker grew by {grown / 2**20:.1f} MiB (layers: {layers / 2**20:.1f} MiB)")
        assert grown >= 0.9 * layers, (grown, layers)
        t0 = time.monotonic()
        assert _ask(client_port, 400) == expected
        print(f"x86 server + emulated aarch64 RPC worker: same answer in {time.monotonic() - t0:.0f} s")
    finally:
        for proc in (client, worker):
            if proc is not None:
                _stop(proc)
        log.close()

    # The check can fail: without the vendored libgomp the runtime does not load on this board.
    lib = next((root / "opt/edgellm/current/venv/lib").glob("python3*/site-packages/llama_cpp/lib"))
    (lib / "libgomp.so.1").rename(lib / "libgomp.so.1.hidden")
    try:
        broken = eb.run(root, ["/opt/edgellm/current/venv/bin/python", "-c", "import llama_cpp"], timeout=300)
    finally:
        (lib / "libgomp.so.1.hidden").rename(lib / "libgomp.so.1")
    assert broken.returncode != 0 and "libgomp.so.1" in broken.stderr

    for _ in range(2):  # uninstall is idempotent too
        gone = eb.run(root, ["/bin/bash", f"{bundle}/uninstall.sh", "--purge"], timeout=120)
        assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (root / "opt/edgellm").exists() and not (root / "etc/systemd/system/edgellm.service").exists()
    assert "edgellm:" not in (root / "etc/passwd").read_text()
