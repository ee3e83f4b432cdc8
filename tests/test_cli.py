"""The CLI as a user meets it: exit codes, one-line errors, JSON output, atomic conversion, chat in a terminal."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGELLM = [sys.executable, "-m", "edgellm.cli"]


def run(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, input=input, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_reads_like_a_manual():
    r = run("--help")
    assert r.returncode == 0
    for verb in ("pull", "models", "inspect", "devices", "convert", "run", "chat", "cache-prompt", "bench"):
        assert verb in r.stdout
    r = run("run", "--help")
    assert "Example" in r.stdout and "[default: 256]" in r.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (("run", "no-such-model", "hi"), 3, "no model 'no-such-model'"),
    (("run", "hi", "--temperature", "-1"), 2, "temperature"),
    (("convert", "-o", "x.gguf", "--quant", "Q9_9"), 2, "unknown quantization type"),
    (("pull", "nope"), 3, "unknown model alias"),
])
def test_user_errors_are_one_line_with_distinct_codes(args, code, fragment, default_model_path):
    r = run(*args)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:") and fragment in lines[0]
    assert "Traceback" not in r.stderr


def test_invalid_file_is_rejected_before_native_code(tmp_path, default_model_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(default_model_path.read_bytes()[:4096])
    bad.write_bytes(bytes(data))  # truncated: the tensor data is missing
    r = run("run", str(bad), "hi")
    assert r.returncode == 4 and "edgellm: error:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("inspect", str(bad), "--json")
    assert r.returncode == 4 and json.loads(r.stdout)["valid"] is False


def test_pull_models_inspect_devices_json(default_model_path):
    pulled = json.loads(run("pull", "--json").stdout)
    assert pulled["size"] == 98_362_432 and Path(pulled["path"]) == default_model_path
    models = json.loads(run("models", "--json").stdout)
    entry = next(m for m in models if m["name"] == "smollm2-135m")
    assert entry["architecture"] == "llama" and entry["quantization"] == "Q4_1" and entry["size"] == 98_362_432
    info = json.loads(run("inspect", "smollm2-135m", "--json").stdout)
    assert info["valid"] and info["parameters"] == 134_515_008 and info["hparams"]["block_count"] == 30
    assert info["tensor_types"]["Q4_1"]["count"] == 210
    dev = json.loads(run("devices", "--json").stdout)
    assert dev["device"]["logical_cores"] == os.cpu_count()
    assert dev["plan"]["backend"] == "llama.cpp" and dev["plan"]["reasons"]
    assert dev["llama_cpp"]["available"] is True


def test_run_json_and_stdin(default_model_path):
    r = run("run", "-t", "0", "-n", "12", "--json", "--no-disk-cache", "What is 2+2?")
    out = json.loads(r.stdout)
    assert out["text"] and out["stats"]["generated_tokens"] <= 12
    assert out["plan"]["threads"] == int(os.environ["EDGELLM_THREADS"])   # conftest's, honoured by the CLI
    piped = run("run", "-t", "0", "-n", "12", "--no-disk-cache", "-", input="What is 2+2?")
    assert piped.returncode == 0 and piped.stdout.strip() == out["text"].strip()


def test_convert_is_atomic_and_a_kill_leaves_nothing(tmp_path, default_model_path):
    dest = tmp_path / "out.gguf"
    proc = subprocess.Popen([*EDGELLM, "convert", "smollm2-135m", "-o", str(dest), "--quant", "F32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.gguf.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dest.exists() and list(tmp_path.glob(".out.gguf.partial-*"))   # only a hidden leftover
    r = run("convert", "smollm2-135m", "-o", str(dest), "--quant", "Q4_0", "--json")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".out.gguf.partial-*"))   # the next write to the same file swept it
    summary = json.loads(r.stdout)
    assert dest.exists() and summary["bytes"] == dest.stat().st_size and summary["quant"] == "Q4_0"
    assert 4.0 < summary["bits_per_weight"] < 6.0
    assert oct(dest.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's
    again = run("run", str(dest), "-t", "0", "-n", "8", "--no-disk-cache", "Hello")
    assert again.returncode == 0 and again.stdout.strip()


def test_chat_in_a_pseudo_terminal(tmp_path, default_model_path):
    import pexpect
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    # SIGINT at its default in the chat, however the test run itself was started (a background job of a
    # non-interactive shell inherits it ignored)
    child = pexpect.spawn(EDGELLM[0], [*EDGELLM[1:], "chat", "-t", "0", "-n", "1500", "--no-disk-cache"],
                          env=env, encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(">>> ")
    child.sendline("Name a fruit.")
    child.expect(r"tok/s")
    child.expect(">>> ")
    child.sendline("And a vegetable?")
    child.expect(r"reused from context")  # the second turn reuses the first turn's KV cache
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"context: \d+/\d+ tokens")
    child.expect(">>> ")
    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect("saved 4 messages")
    child.expect(">>> ")
    child.sendline('"""Write a long story')
    child.sendline('about a dragon."""')
    child.expect('dragon."""\r\n')  # the terminal's echo of the input …
    child.expect(r"\w+ \w+ \w+")  # … then the answer starts streaming (1500 tokens: far longer than a Ctrl-C takes) …
    child.sendintr()  # … and Ctrl-C stops it
    child.expect("interrupted")
    child.expect(">>> ")
    child.sendline("/save " + str(tmp_path / "after.json"))
    child.expect("saved 4 messages")  # the interrupted turn did not touch the history
    child.expect(">>> ")
    child.sendintr()  # Ctrl-C at the prompt abandons the line, it does not quit
    child.expect("Ctrl-D to quit")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads(saved.read_text())["messages"][0]["content"] == "Name a fruit."
