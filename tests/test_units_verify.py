"""The Raspberry Pi bundle's systemd units pass `systemd-analyze verify`.

The emulated board runs under proot, where systemd does not run, so the units' hardening (User=,
ProtectSystem=strict, NoNewPrivileges) is never exercised there (docs/deploy.md says so). What can be checked
here is that systemd itself accepts every line: verify parses the units against a scratch root holding the
host's systemd unit directory and the executables ExecStart names (a copy of this venv's `edgellm`: verify
checks that the command exists and is executable, not its architecture). verify exits 0 even when it ignores
a line it cannot parse, so any message at all fails the test.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.deploy import units

SYSTEMD_UNITS = Path("/usr/lib/systemd/system")


def verify(tmp: Path, files: dict[str, str]) -> str:
    """systemd-analyze verify of unit `files` (name -> text) in a scratch root; its messages."""
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: apt-get install systemd (it is part of every systemd distribution)"
    root = tmp / "root"
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    edgellm = Path(sys.executable).with_name("edgellm")
    edgellm = edgellm if edgellm.is_file() else Path(shutil.which("edgellm") or "edgellm")
    for name, text in files.items():
        (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/system" / name).write_text(text)
        command = units.exec_argv(units.parse_unit(text)["ExecStart"][0])[0]
        dest = root / command.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(edgellm, dest)
    proc = subprocess.run([exe, f"--root={root}", "verify", *(f"/etc/systemd/system/{n}" for n in files)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (proc.stdout + proc.stderr).strip()


def test_server_and_worker_units_pass_verify(tmp_path):
    server = units.server_unit("smollm2-135m.gguf", host="0.0.0.0", port=8080, n_ctx=2048, kv_type="q8_0", threads=4,
                               parallel=4, prompt_state="system.kv",
                               system='Answer in 100% plain words; never print $HOME, "quotes" or \\ backslashes.')
    worker = units.worker_unit(host="0.0.0.0", port=50052, threads=4, exec_start=units.EXE)
    assert verify(tmp_path, {"edgellm.service": server, "edgellm-rpc-worker.service": worker}) == ""


def test_verify_complains_about_a_broken_unit(tmp_path):
    """The check can fail: a misspelt hardening key is ignored by systemd, with a message."""
    broken = units.server_unit("m.gguf", host="127.0.0.1", port=8080, n_ctx=512, kv_type="f16", threads=2,
                               parallel=1).replace("ProtectSystem=strict", "ProtectSytem=strict")
    assert "Unknown key" in verify(tmp_path, {"edgellm.service": broken})


@pytest.mark.slow
def test_the_bundles_own_unit_files_pass_verify(pi_bundle, tmp_path):
    files = {p.name: p.read_text() for p in (pi_bundle.path / "systemd").glob("*.service")}
    assert "edgellm.service" in files
    assert verify(tmp_path, files) == ""
