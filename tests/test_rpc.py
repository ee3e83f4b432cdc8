"""Several devices: llama.cpp RPC workers (`edgellm rpc-worker`) on loopback hold the model's layers and
the answers equal a single-process run; plus endpoint parsing, an unreachable worker and the systemd unit."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import edgellm
from edgellm.deploy.units import worker_unit
from edgellm.errors import BackendError, UsageError
from edgellm.gguf_check import validate_gguf
from edgellm.runtimes.rpc import parse_endpoints

Q = [{"role": "user", "content": "List three fruits."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers():
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "edgellm.cli", "rpc-worker", "--port", str(p), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in ports]
    try:
        for port, proc in zip(ports, procs):
            end = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < end, proc.stderr.read().decode()
                    time.sleep(0.05)
        yield [f"127.0.0.1:{p}" for p in ports], [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_model_spread_over_two_workers_answers_like_one_process(workers, default_model_path, llm):
    endpoints, pids = workers
    local = llm.chat(Q, max_tokens=24)
    before = [rss_bytes(pid) for pid in pids]
    with edgellm.load(default_model_path, n_ctx=2048, disk_cache=False, sampler=edgellm.GREEDY,
                      rpc=",".join(endpoints)) as spread:
        # the workers really hold the layers: llama.cpp sent each one its share of the weights (a silently
        # ignored rpc= would leave them as they were). The input embeddings stay on the serving process.
        grown = [rss_bytes(pid) - b for pid, b in zip(pids, before)]
        layers = sum(t.n_bytes for t in validate_gguf(default_model_path).tensors if t.name.startswith("blk."))
        print(f"\nworkers grew by {[round(g / 2**20, 1) for g in grown]} MiB; the layers hold {layers / 2**20:.1f} MiB")
        assert all(g >= 0.2 * layers for g in grown), (grown, layers)
        assert sum(grown) >= 0.8 * layers, (grown, layers)
        remote = spread.chat(Q, max_tokens=24)
        follow = spread.chat(Q + [{"role": "assistant", "content": remote.text},
                                  {"role": "user", "content": "And three vegetables?"}], max_tokens=12)
        assert follow.stats.cache_source == "context"  # KV reuse works with the cache on the workers
    assert remote.tokens == local.tokens and remote.text == local.text
    expected = llm.chat(Q + [{"role": "assistant", "content": local.text},
                             {"role": "user", "content": "And three vegetables?"}], max_tokens=12)
    assert follow.text == expected.text


def test_endpoints_are_validated_and_an_absent_worker_is_a_clear_error(default_model_path):
    assert parse_endpoints("a:1, b:50052") == ("a:1", "b:50052")
    assert parse_endpoints(["10.0.0.2:50052"]) == ("10.0.0.2:50052",)
    for bad in ("host", "host:port", ":50052", "h:0", "h:70000", ""):
        with pytest.raises(UsageError):
            parse_endpoints(bad)
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:\d+ is not reachable.*rpc-worker"):
        edgellm.load(default_model_path, n_ctx=512, disk_cache=False, rpc=f"127.0.0.1:{free_port()}")


def test_worker_unit_runs_the_worker_verb():
    unit = worker_unit(host="0.0.0.0", port=50053, threads=4)
    assert "ExecStart=/opt/edgellm/venv/bin/edgellm rpc-worker --host 0.0.0.0 --port 50053 --threads 4" in unit
    assert "[Install]" in unit and "WantedBy=multi-user.target" in unit and "Restart=on-failure" in unit
    assert "CacheDirectory=edgellm/rpc" in unit
