"""edgellm deploy rpi: bundle contents, the systemd unit, the wheels' platforms, --tar, refusals.

The bundle is built once per run (deploy_fixtures.pi_bundle); installing and running it on an
emulated board is tests/test_deploy_board.py.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgellm.cli import main
from edgellm.deploy import crossbuild, units, wheels
from edgellm.deploy.bundle import BundleSpec, build_bundle
from edgellm.errors import InsufficientMemoryError, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import N_CTX, SYSTEM_PROMPT  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_has_everything_a_board_needs(pi_bundle):
    root = pi_bundle.path
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    model = pi_bundle.model.name
    for name in ("install.sh", "uninstall.sh", "healthcheck.sh", "common.sh", "README.md", "manifest.json",
                 "bundle.env", "SHA256SUMS", f"model/{model}", "state/system.kv", "systemd/edgellm.service"):
        assert name in files, name
    for script in ("install.sh", "uninstall.sh", "healthcheck.sh"):
        assert (root / script).stat().st_mode & 0o111
        subprocess.run(["bash", "-n", str(root / script)], check=True)
    assert sha256(root / "model" / model) == sha256(pi_bundle.model)
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=root, check=True)
    names = sorted(p.name for p in (root / "wheels").glob("*.whl"))
    assert len(names) == len(list((root / "wheels").iterdir()))
    for prefix in ("edgellm-", "llama_cpp_python-", "pip-", "numpy-", "starlette-", "uvicorn-", "gguf-"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all(wheels.wheel_fits_board(n) for n in names), names
    assert not any(n.lower().startswith(("torch", "transformers", "nvidia")) for n in names)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["board"]["name"] == "pi5-8gb" and manifest["runtime"]["cpu"] == "cortex-a76"
    assert manifest["fit"]["fits"] and manifest["wheels"] == names
    env = (root / "bundle.env").read_text()
    assert f"BUNDLE_ID={manifest['bundle_id']}" in env and "PYTHON_VERSION=3.11" in env
    report = pi_bundle.report
    assert report.bytes == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"\nbundle {report.bytes / 2**20:.1f} MiB, {report.files} files, tar {report.tar_bytes / 2**20:.1f} MiB, "
          f"build seconds {report.seconds}")


def test_runtime_wheel_is_aarch64_for_the_board_and_self_contained(pi_bundle, tmp_path):
    whl = next((pi_bundle.path / "wheels").glob("llama_cpp_python-*.whl"))
    assert whl.name.endswith("-py3-none-linux_aarch64.whl")
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp_path)
    lib = tmp_path / "llama_cpp" / "lib"
    libs = {p.name for p in lib.glob("*.so*")}
    assert {"libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libggml-rpc.so"} <= libs
    for so in lib.glob("*.so*"):
        assert "AArch64" in crossbuild.machine(so), so.name
        for dep in crossbuild.needed(so):  # every library resolves on a bare Raspberry Pi OS
            assert dep in crossbuild.SYSTEM_LIBS or dep in libs, (so.name, dep)
    assert "libgomp.so.1" in libs  # OpenMP is on, and Pi OS Lite need not have libgomp1
    assert "-mcpu=cortex-a76" in (lib / "EDGELLM_BUILD").read_text()


def test_unit_runs_edgellm_serve_with_the_bundle_settings(pi_bundle):
    unit = units.parse_unit((pi_bundle.path / "systemd" / "edgellm.service").read_text())
    argv = units.exec_argv(unit["ExecStart"][0])
    assert argv[:3] == [units.EXE, "serve", f"{units.PREFIX}/models/{pi_bundle.model.name}"]
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert opts["--port"] == str(pi_bundle.spec.port) and opts["--host"] == "127.0.0.1"
    assert opts["--ctx"] == str(N_CTX) and opts["--parallel"] == "4"
    assert opts["--system-state"] == f"{units.PREFIX}/current/state/system.kv"
    assert opts["--system"] == SYSTEM_PROMPT
    assert SYSTEM_PROMPT in (pi_bundle.path / "README.md").read_text()
    assert unit["User"] == ["edgellm"] and unit["Restart"] == ["on-failure"]
    assert unit["WantedBy"] == ["multi-user.target"]
    assert f"EDGELLM_HOME={units.STATE_DIR}" in unit["Environment"]
    assert "EDGELLM_THREADS=4" in unit["Environment"]


def test_tar_holds_the_same_files(pi_bundle, tmp_path):
    tar_path = Path(pi_bundle.report.tar_path)
    assert tar_path == pi_bundle.path.with_name("kiosk.tar.gz")
    with tarfile.open(tar_path) as tar:
        assert all(m.name == "kiosk" or m.name.startswith("kiosk/") for m in tar.getmembers())
        tar.extractall(tmp_path, filter="tar")
    ours = {p.relative_to(pi_bundle.path): sha256(p) for p in pi_bundle.path.rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp_path / "kiosk"): sha256(p) for p in (tmp_path / "kiosk").rglob("*") if p.is_file()}
    assert ours == theirs
    assert (tmp_path / "kiosk" / "install.sh").stat().st_mode & 0o111


def test_refuses_a_board_that_cannot_hold_the_model(default_model_path, tmp_path):
    out = tmp_path / "zero"
    with pytest.raises(InsufficientMemoryError, match=r"does not fit zero2w: needs \d+ MiB but 330 MiB"):
        build_bundle(default_model_path, out, BundleSpec(board="zero2w", n_ctx=8192))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refusal_is_one_line_with_exit_code(default_model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["deploy", "rpi", str(default_model_path), "--board", "zero2w", "--ctx", "8192",
              "-o", str(tmp_path / "b")])
    assert e.value.code == InsufficientMemoryError.exit_code
    msg = capsys.readouterr().err.strip()
    assert msg.count("\n") == 0 and "MiB" in msg and "--ctx" in msg  # the numbers and what would fit
    with pytest.raises(SystemExit) as e:
        main(["deploy", "rpi", str(default_model_path), "--board", "pi9", "-o", str(tmp_path / "b")])
    assert e.value.code == UsageError.exit_code and "unknown board" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["deploy", "rpi", "--rpc-worker", "--system", "x", "-o", str(tmp_path / "b")])
    assert e.value.code == 2
    assert not (tmp_path / "b").exists()


def test_bad_port_is_refused_before_any_work(default_model_path, tmp_path):
    with pytest.raises(UsageError, match="port"):
        build_bundle(default_model_path, tmp_path / "b", BundleSpec(port=70000))


def test_rpc_worker_bundle_carries_the_runtime_and_a_worker_unit(tmp_path):
    out = tmp_path / "worker"
    report = build_bundle(None, out, BundleSpec(board="pi5-8gb", rpc_worker=True, host="0.0.0.0", port=50052))
    assert report.service == "edgellm-rpc-worker" and not (out / "model").exists()
    unit = units.parse_unit((out / "systemd" / "edgellm-rpc-worker.service").read_text())
    argv = units.exec_argv(unit["ExecStart"][0])
    assert argv[:2] == [units.EXE, "rpc-worker"] and argv[argv.index("--port") + 1] == "50052"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "SERVICE_KIND=rpc-worker" in (out / "bundle.env").read_text()
    assert any(p.name.startswith("llama_cpp_python-") for p in (out / "wheels").iterdir())


@pytest.mark.parametrize("name, ok", [
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl", True),
    ("llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl", True),
    ("click-8.5.1-py3-none-any.whl", True),
    ("cryptography-46.0.0-cp39-abi3-manylinux_2_34_aarch64.whl", True),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl", False),
    ("numpy-2.4.6-cp312-cp312-manylinux_2_17_aarch64.whl", False),
    ("foo-1.0-cp312-abi3-manylinux_2_17_aarch64.whl", False),
    ("foo-1.0-cp311-cp311-manylinux_2_39_aarch64.whl", False),  # newer glibc than bookworm's 2.36
    ("foo-1.0-cp311-cp311-musllinux_1_2_aarch64.whl", False),
])
def test_wheel_platform_check(name, ok):
    assert wheels.wheel_fits_board(name) is ok


def test_exec_line_quotes_what_systemd_would_expand():
    args = [units.EXE, "serve", "--system", 'Say "hi" for $5 at 100%\\n', "--port", "8080"]
    line = units.exec_line(args)
    assert "$$5" in line and "100%%" in line
    assert units.exec_argv(line) == args
