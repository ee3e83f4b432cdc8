"""Cross-build llama.cpp for a board's CPU and wrap it as an aarch64 llama-cpp-python wheel.

llama-cpp-python publishes no aarch64 wheels, and a Pi in the field has no compiler, so the shared
libraries are built here with Debian's aarch64 toolchain from the vendored llama.cpp in the
llama-cpp-python sdist (same options as .ci/setup.sh, GGML_NATIVE off, -mcpu for the board) and put
next to the sdist's pure-Python package. The wheel is cached under the user cache dir, keyed by
everything that changes the binaries.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TRIPLET = "aarch64-linux-gnu"
WHEEL_TAG = "py3-none-linux_aarch64"  # ctypes bindings: no CPython ABI; built against glibc 2.36 (bookworm)
RECIPE = "2"  # bump when the build steps below change the output
CMAKE_OPTIONS = [  # as .ci/setup.sh, minus what a wheel build adds on its own
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=ON",
    "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",  # one file per library: libllama.so, not three copies
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
]
TARGETS = ["llama", "ggml", "ggml-base", "ggml-cpu", "ggml-rpc"]
# Libraries every Raspberry Pi OS (and any glibc system with apt) has; anything else a library needs
# is vendored into the wheel, as auditwheel would (done by hand here: auditwheel cannot repair a
# foreign-architecture wheel without that architecture's library search path).
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libstdc++.so.6",
               "libgcc_s.so.1", "ld-linux-aarch64.so.1"}
TOOLCHAIN_PACKAGES = ["gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "cmake"]


@dataclass(frozen=True)
class CrossWheel:
    path: Path
    cpu: str
    key: str
    cached: bool


def cache_root() -> Path:
    """Kept outside EDGELLM_HOME so tests with a throwaway home still reuse the build."""
    base = os.environ.get("EDGELLM_CROSS_CACHE")
    if base:
        return Path(base)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgellm")) / "cross"


def _run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def toolchain_version() -> str:
    for tool in (f"{TRIPLET}-gcc", f"{TRIPLET}-g++", "cmake"):
        if shutil.which(tool) is None:
            raise BackendError(f"cross-building for the Pi needs {tool}: apt-get install --no-install-recommends "
                               f"{' '.join(TOOLCHAIN_PACKAGES)} (or run .ci/setup.sh)")
    gcc = _run([f"{TRIPLET}-gcc", "--version"]).splitlines()[0]
    cmake = _run(["cmake", "--version"]).splitlines()[0]
    return f"{gcc}|{cmake}"


def build_key(cpu_flags: Sequence[str], version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    src = "|".join([version, " ".join(cpu_flags), " ".join(CMAKE_OPTIONS), ",".join(TARGETS),
                    toolchain_version(), RECIPE])
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def cross_wheel(cpu: str, cpu_flags: Sequence[str], *, version: str = LLAMA_CPP_PYTHON_VERSION,
                progress=None) -> CrossWheel:
    """The aarch64 llama-cpp-python wheel for a CPU (cpu_flags: the board's CMake flags, e.g.
    -DCMAKE_C_FLAGS=-mcpu=cortex-a76), built once and cached.

    progress(fraction, message) is called during a build. Concurrent builds of the same key are
    serialised with a lock file, so two deploys never build (or publish) the same wheel twice.
    """
    import fcntl

    key = build_key(cpu_flags, version)
    dest = cache_root() / f"llama-cpp-python-{version}-{cpu}-{key}"
    found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if found:
        return CrossWheel(found[0], cpu, key, cached=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
        if found:
            return CrossWheel(found[0], cpu, key, cached=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
        try:
            wheel = _build(cpu, tuple(cpu_flags), version, tmp, progress or (lambda f, m: None))
            os.replace(tmp / "out", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CrossWheel(dest / wheel.name, cpu, key, cached=False)


def sdist(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama-cpp-python source distribution (pip honours the user's index and proxy settings)."""
    d = cache_root() / "sdist"
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (d / name).is_file():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
            if r.returncode != 0 or not (Path(tmp) / name).is_file():
                raise BackendError(f"could not download the llama-cpp-python {version} sdist: "
                                   f"{(r.stderr.strip().splitlines() or ['no file'])[-1]}")
            os.replace(Path(tmp) / name, d / name)
    return d / name


def _toolchain_file(path: Path) -> Path:
    path.write_text(f"""set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER {TRIPLET}-gcc)
set(CMAKE_CXX_COMPILER {TRIPLET}-g++)
set(CMAKE_FIND_ROOT_PATH /usr/{TRIPLET})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
""")
    return path


def _build(cpu: str, cpu_flags: tuple[str, ...], version: str, work: Path, progress) -> Path:
    progress(0.0, "unpacking the llama-cpp-python sdist")
    with tarfile.open(sdist(version)) as tar:
        tar.extractall(work / "src", filter="data")
    src = work / "src" / f"llama_cpp_python-{version}"
    build = work / "build"
    progress(0.02, f"configuring llama.cpp for aarch64 {cpu}")
    configure = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build),
                 f"-DCMAKE_TOOLCHAIN_FILE={_toolchain_file(work / 'aarch64.cmake')}", *CMAKE_OPTIONS, *cpu_flags]
    r = subprocess.run(configure, capture_output=True, text=True)
    if r.returncode != 0:
        raise BackendError(f"cmake configure failed for aarch64: {_last_error(r.stdout + r.stderr)}")
    _compile(build, progress)
    libs = _collect_libs(build / "bin", work / "libs")
    progress(0.97, "assembling the wheel")
    return _assemble_wheel(src, libs, version, cpu_flags, work / "out")


def _compile(build: Path, progress) -> None:
    cmd = ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TARGETS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        m = re.match(r"\[\s*(\d+)%\]", line) or re.match(r"\[(\d+)/(\d+)\]", line)
        if m:
            frac = int(m.group(1)) / 100 if m.lastindex == 1 else int(m.group(1)) / int(m.group(2))
            progress(0.05 + 0.9 * frac, line.split("]", 1)[1].strip()[:70])
    if proc.wait() != 0:
        raise BackendError(f"cross-compiling llama.cpp failed: {_last_error(chr(10).join(tail))}")


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or ["no output"]
    return lines[-1].strip()[:300]


def needed(lib: Path) -> list[str]:
    """DT_NEEDED entries of an ELF shared library (binutils' readelf reads any architecture)."""
    out = _run(["readelf", "-d", str(lib)])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def machine(lib: Path) -> str:
    return _run(["readelf", "-h", str(lib)]).split("Machine:", 1)[1].splitlines()[0].strip()


def _collect_libs(bindir: Path, out: Path) -> list[Path]:
    """The built libraries plus every non-system library they need, copied from the cross sysroot."""
    out.mkdir(parents=True)
    for name in TARGETS:
        shutil.copy2(bindir / f"lib{name}.so", out / f"lib{name}.so")
    pending = sorted(out.iterdir())
    while pending:
        lib = pending.pop()
        for dep in needed(lib):
            if dep in SYSTEM_LIBS or (out / dep).exists():
                continue
            found = Path(_run([f"{TRIPLET}-gcc", f"-print-file-name={dep}"]).strip())
            if not found.is_absolute() or not found.is_file():
                raise BackendError(f"{lib.name} needs {dep}, which the aarch64 toolchain does not have")
            shutil.copy2(found.resolve(), out / dep)
            pending.append(out / dep)
    for lib in out.iterdir():
        if "AArch64" not in machine(lib):
            raise BackendError(f"{lib.name} is not an aarch64 library ({machine(lib)})")
    return sorted(out.iterdir())


def _assemble_wheel(src: Path, libs: list[Path], version: str, cpu_flags: tuple[str, ...], out: Path) -> Path:
    """The sdist's pure-Python package + the aarch64 libraries, packed with `wheel pack`."""
    tree = out.parent / "wheeltree"
    pkg = tree / "llama_cpp"
    shutil.copytree(src / "llama_cpp", pkg, ignore=shutil.ignore_patterns("lib", "__pycache__", "*.so"))
    (pkg / "lib").mkdir()
    for lib in libs:
        shutil.copy2(lib, pkg / "lib" / lib.name)
    info = tree / f"llama_cpp_python-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text((src / "PKG-INFO").read_text())
    shutil.copy2(src / "LICENSE.md", info / "LICENSE.md")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nGenerator: edgellm.deploy.crossbuild\n"
                                f"Root-Is-Purelib: false\nTag: {WHEEL_TAG}\n")
    # The CMake flags travel with the libraries (what CPU they need, readable on the board).
    (pkg / "lib" / "EDGELLM_BUILD").write_text(" ".join([*CMAKE_OPTIONS, *cpu_flags]) + "\n")
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "wheel", "pack", str(tree), "-d", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BackendError(f"packing the aarch64 wheel failed: {_last_error(r.stdout + r.stderr)}")
    return next(out.glob("*.whl"))
