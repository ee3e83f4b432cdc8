"""The bundle's Python side: edgellm as a wheel plus every runtime dependency as aarch64 wheels.

pip resolves and downloads for the board (`--platform ... --python-version 3.11 --only-binary=:all:`),
so the board installs with `--no-index` and never needs a compiler or the network.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import parse_wheel_filename

from ..errors import BackendError, UsageError

PYTHON_VERSION = "3.11"  # Raspberry Pi OS 12 (bookworm)
GLIBC_MINOR = 36  # bookworm's glibc 2.36: manylinux wheels up to 2_36 run there
PLATFORMS = ("linux_aarch64", "manylinux2014_aarch64",
             *(f"manylinux_2_{m}_aarch64" for m in range(17, GLIBC_MINOR + 1)))
EXTRA = "serve"  # the runtime deps plus the HTTP server; never torch (that is the `convert` extra)
FORBIDDEN = ("torch", "nvidia", "triton", "transformers")


def project_root() -> Path:
    """The edgellm source tree this package was installed from (editable install or checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "edgellm" / "__init__.py").is_file():
        raise UsageError("edgellm deploy packs edgellm itself as a wheel and needs its source tree "
                         f"(pyproject.toml next to the package); none at {root}")
    return root


def edgellm_wheel(out: Path) -> Path:
    """Build edgellm's own wheel (pure Python) from a clean copy of its sources, offline."""
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="edgellm-wheel-") as tmp:
        src = Path(tmp) / "src"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
        for name in ("edgellm", "converters", "runtimes", "android"):   # every folder pyproject's package-dir maps
            shutil.copytree(root / name, src / name, ignore=skip)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(src), "-w", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BackendError(f"building the edgellm wheel failed: {_last(r.stderr)}")
    found = sorted(out.glob("edgellm-*.whl"))
    if not found:
        raise BackendError("building the edgellm wheel produced no wheel")
    return found[0]


def extras_of(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Provides-Extra:")}


def download(edgellm_whl: Path, find_links: Sequence[Path], dest: Path) -> list[Path]:
    """Resolve edgellm[serve] for aarch64 / CPython 3.11 and download every wheel into dest.

    find_links holds the wheels made here (the cross-built llama-cpp-python); the rest comes from
    the user's package index. pip itself is added so the board can bootstrap a venv without ensurepip.
    """
    if EXTRA not in extras_of(edgellm_whl):
        raise BackendError(f"this edgellm has no '{EXTRA}' extra (the HTTP server's dependencies); "
                           "the board's service cannot run without it")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version",
           PYTHON_VERSION, "--implementation", "cp", "--abi", f"cp{PYTHON_VERSION.replace('.', '')}",
           *(f"--platform={p}" for p in PLATFORMS), "--disable-pip-version-check", "-d", str(dest),
           *(f"--find-links={d}" for d in find_links), f"{edgellm_whl}[{EXTRA}]", "pip"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BackendError(f"could not download aarch64 wheels for the board: {_last(r.stderr)}")
    wheels = sorted(dest.glob("*.whl"))
    check_wheels(wheels)
    return wheels


def check_wheels(wheels: Sequence[Path]) -> None:
    """Every wheel must install on the board: pure Python or aarch64, CPython 3.11, no torch."""
    bad = [w.name for w in wheels if not wheel_fits_board(w.name)]
    if bad:
        raise BackendError(f"wheels that would not install on the board: {', '.join(bad)}")
    heavy = [w.name for w in wheels if w.name.lower().startswith(FORBIDDEN)]
    if heavy:
        raise BackendError(f"the bundle would carry training-only packages: {', '.join(heavy)}")


def wheel_fits_board(filename: str) -> bool:
    _, _, _, tags = parse_wheel_filename(filename)
    nodot = PYTHON_VERSION.replace(".", "")
    cp = f"cp{nodot}"

    def python_ok(t) -> bool:
        if t.abi == "abi3":  # the stable ABI: built for this CPython or an older one
            return t.interpreter.startswith("cp3") and int(t.interpreter[3:] or 99) <= int(nodot[1:])
        return t.interpreter in ("py3", f"py{nodot}", cp) and t.abi in ("none", cp)

    return any(t.platform in ("any", *PLATFORMS) and python_ok(t) for t in tags)


def _last(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]
