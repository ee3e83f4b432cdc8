"""Build a Raspberry Pi bundle: everything a board needs to run a model as a service, offline.

Layout (paths relative to the bundle directory):
    install.sh uninstall.sh healthcheck.sh common.sh README.md bundle.env manifest.json SHA256SUMS
    model/MODEL.gguf            the model (absent for an RPC worker: the client sends the layers)
    state/system.kv             the system prompt's KV state (with --system)
    wheels/*.whl                edgellm, llama-cpp-python cross-built for the board's CPU, the deps, pip
    systemd/SERVICE.service     the unit install.sh puts in /etc/systemd/system
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from ..atomic import atomic_path
from ..errors import UsageError
from ..store import _sha256
from . import crossbuild, units, wheels

Progress = Callable[[str, float, str], None]  # (step, fraction of the step, detail)
SCRIPTS = ("install.sh", "uninstall.sh", "healthcheck.sh", "common.sh")
STATE_NAME = "system.kv"


@dataclass(frozen=True)
class BundleSpec:
    board: str = "pi5-8gb"
    n_ctx: int = 2048
    kv_type: str = "f16"
    system_prompt: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4  # edgellm serve's default: requests decoded together, sharing the n_ctx KV pool
    rpc_worker: bool = False
    tar: bool = False


@dataclass
class BundleReport:
    path: str
    board: str
    service: str
    bytes: int
    files: int
    tar_path: str | None = None
    tar_bytes: int | None = None
    fit: dict | None = None
    runtime_cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_bundle(model: str | os.PathLike[str] | None, out: Path, spec: BundleSpec,
                 progress: Progress | None = None) -> BundleReport:
    """Check the fit, then write the bundle to `out` atomically (and `out`.tar.gz with spec.tar)."""
    from .. import memplan, store
    from ..gguf_check import validate_gguf

    say = progress or (lambda step, frac, detail: None)
    board = memplan.board(spec.board)
    if board.name not in memplan.BOARDS:
        raise UsageError(f"deploy rpi needs a Raspberry Pi board ({', '.join(memplan.BOARDS)}), not {spec.board!r}")
    _check_port(spec.port)
    times: dict[str, float] = {}
    t = time.perf_counter()
    model_path = fit = None
    if model is not None or not spec.rpc_worker:
        model_path = store.resolve(model).path
        kv = memplan.kv_cache_bytes(validate_gguf(model_path), spec.n_ctx, spec.kv_type)
        est = memplan.estimate(model_path, spec.n_ctx, spec.kv_type, server=True, n_seq=spec.parallel,
                               state_cache_bytes=min(kv, 512 << 20))  # as edgellm.load sizes it
        if spec.rpc_worker:  # a worker holds only its share of the layers; report, do not refuse
            fit = memplan.check_fit(est, board).to_dict()
        else:
            fit = memplan.require_fit(est, board).to_dict()  # refuses with the numbers
        fit["estimate"] = est.to_dict()
    times["fit_check"] = time.perf_counter() - t

    with atomic_path(Path(out), directory=True) as tmp:
        t = time.perf_counter()
        cross = crossbuild.cross_wheel(board.cpu, board.llama_cpu_flags,
                                       progress=lambda f, m: say("runtime", f, m))
        times["runtime_build"] = time.perf_counter() - t
        t = time.perf_counter()
        say("wheels", 0.0, "building edgellm's wheel")
        (tmp / "wheels").mkdir()
        own = wheels.edgellm_wheel(tmp / "wheels")
        say("wheels", 0.3, "downloading aarch64 wheels for Python 3.11")
        found = wheels.download(own, [cross.path.parent], tmp / "wheels")
        times["wheels"] = time.perf_counter() - t
        env = {"BUNDLE_ID": "", "PYTHON_VERSION": wheels.PYTHON_VERSION,
               "REQUIREMENT": f"edgellm[{wheels.EXTRA}]=={_version(own)}", "SERVICE_USER": units.USER}
        if model_path is not None and not spec.rpc_worker:
            t = time.perf_counter()
            say("model", 0.0, f"copying {model_path.name}")
            (tmp / "model").mkdir()
            shutil.copy2(model_path, tmp / "model" / model_path.name)
            env |= {"MODEL_FILE": f"model/{model_path.name}", "MODEL_SHA256": _sha256(model_path)}
            if spec.system_prompt:
                say("state", 0.0, "precomputing the system prompt's KV state")
                (tmp / "state").mkdir()
                _prompt_state(model_path, spec, tmp / "state" / STATE_NAME)
                env["STATE_FILE"] = f"state/{STATE_NAME}"
            times["model_and_state"] = time.perf_counter() - t
        service = _write_unit(tmp, spec, board, model_path, env)
        for name in SCRIPTS:
            dest = tmp / name
            dest.write_bytes(resources.files(__package__).joinpath("templates", name).read_bytes())
            dest.chmod(0o755)
        manifest = _manifest(spec, board, cross, found, model_path, fit)
        (tmp / "README.md").write_text(_readme(spec, board, service, manifest))
        env["BUNDLE_ID"] = _bundle_id(tmp)  # content hash: a changed bundle is a new release
        (tmp / "bundle.env").write_text(units.env_file(env))
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "bundle_id": env["BUNDLE_ID"]}, indent=2) + "\n")
        _write_sums(tmp)
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    report = BundleReport(str(out), board.name, service, sum(p.stat().st_size for p in files), len(files),
                          fit=fit, runtime_cached=cross.cached, seconds=times)
    if spec.tar:
        t = time.perf_counter()
        say("tar", 0.0, f"writing {Path(out).name}.tar.gz")
        report.tar_path = str(make_tar(Path(out)))
        report.tar_bytes = Path(report.tar_path).stat().st_size
        times["tar"] = time.perf_counter() - t
    report.seconds = {k: round(v, 2) for k, v in times.items()}
    return report


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"port must be 1-65535, got {port}")


def _version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _prompt_state(model_path: Path, spec: BundleSpec, dest: Path) -> int:
    """The system prompt's KV state, computed here with the same llama.cpp version as the board's.

    The state file's fingerprint covers the model's content, the llama.cpp version, the KV type,
    flash attention and the device class (cpu) — not the CPU architecture. The f16 KV bytes have one
    layout on x86-64 and aarch64 (both little-endian), so the board accepts the file; the values come
    from x86 kernels and may differ from a NEON prefill in the last bits (the emulated-board test
    checks the board's answer with the shipped state against the host's).
    """
    import edgellm

    with edgellm.load(model_path, n_ctx=spec.n_ctx, kv_type=spec.kv_type, disk_cache=False,
                      check_memory=False) as llm:
        return llm.cache_prompt(spec.system_prompt or "", dest)


def _write_unit(tmp: Path, spec: BundleSpec, board, model_path: Path | None, env: dict) -> str:
    (tmp / "systemd").mkdir()
    if spec.rpc_worker:
        from .units import worker_unit

        service = "edgellm-rpc-worker"
        text = worker_unit(host=spec.host, port=spec.port, threads=board.cores, exec_start=units.EXE,
                           user=units.USER)
        env |= {"SERVICE": service, "SERVICE_KIND": "rpc-worker", "PORT": spec.port}
    else:
        assert model_path is not None
        service = "edgellm"
        text = units.server_unit(model_path.name, host=spec.host, port=spec.port, n_ctx=spec.n_ctx,
                                 kv_type=spec.kv_type, threads=board.cores, parallel=spec.parallel,
                                 prompt_state=STATE_NAME if spec.system_prompt else None,
                                 system=spec.system_prompt)
        env |= {"SERVICE": service, "SERVICE_KIND": "server", "PORT": spec.port}
    (tmp / "systemd" / f"{service}.service").write_text(text)
    return service


def _manifest(spec: BundleSpec, board, cross: crossbuild.CrossWheel, found: list[Path],
              model_path: Path | None, fit: dict | None) -> dict:
    return {
        "format": 1,
        "board": board.to_dict(),
        "spec": asdict(spec),
        "model": ({"file": model_path.name, "bytes": model_path.stat().st_size}
                  if model_path and not spec.rpc_worker else None),
        "runtime": {"llama_cpp_python": crossbuild.LLAMA_CPP_PYTHON_VERSION, "cpu": cross.cpu,
                    "cmake": [*crossbuild.CMAKE_OPTIONS, *board.llama_cpu_flags], "build_key": cross.key,
                    "toolchain": crossbuild.toolchain_version()},
        "python": wheels.PYTHON_VERSION,
        "wheels": [w.name for w in found],
        "fit": {k: v for k, v in (fit or {}).items() if k != "estimate"} or None,
        "built_on": f"{platform.system()} {platform.machine()}",
    }


def _bundle_id(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}\0{_sha256(p)}\0".encode())
    return h.hexdigest()[:16]


def _write_sums(root: Path) -> None:
    lines = [f"{_sha256(p)}  {p.relative_to(root)}\n" for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != "SHA256SUMS"]
    (root / "SHA256SUMS").write_text("".join(lines))


def make_tar(bundle: Path) -> Path:
    """bundle.tar.gz beside the bundle, with the directory as its single top-level entry."""
    dest = bundle.with_name(bundle.name + ".tar.gz")
    with atomic_path(dest) as tmp:
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
            tar.add(bundle, arcname=bundle.name)
    return dest


def _readme(spec: BundleSpec, board, service: str, manifest: dict) -> str:
    from .readme import bundle_readme

    return bundle_readme(spec, board, service, manifest)
