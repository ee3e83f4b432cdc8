"""Host builds of what the apps ship, so edgellm can run the app's own C on this machine.

- llama.cpp from llamarn's source tree: the same llama.cpp version as the llama.xcframework the iOS
  package ships and the source the Android project builds, compiled for this CPU (x86-64 AVX2 or
  the host's Arm, GGML_NATIVE off so a cached build runs on any CI machine of the same ISA). The
  shipped system-prompt state is computed with it: llama.cpp refuses a state from another version.
- edgellm's engine (native/engine_*.c) as a host shared library over that llama.cpp, or over the
  host onnxruntime-genai, for ctypes (edgellm.package.engine) and, with the JNI bridge, for a JVM.
Each is cached under the user cache dir, keyed by everything that changes the binaries.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PackagingError
from . import jnibuild, natives, tools

Progress = Callable[[str, int, int], None]
RECIPE = "2"   # bump when the build steps below change the output
# Static, position-independent libraries linked into the engine's one shared library with their symbols
# hidden: llama-cpp-python loads libllama.so.0 / libggml-base.so.0 of *another* llama.cpp version under the
# same sonames, and two shared builds in one process would bind to each other's symbols.
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
                 "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
                 "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_OPENSSL=OFF"]
# x86-64 CI machines have had AVX2/FMA/F16C for a decade; AMX/AVX-512 stay off (GGML_NATIVE picks AMX
# on hosts that have it, and ggml's AMX kernels crashed in a VM here)
X86_FLAGS = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]


def cache_root() -> Path:
    base = os.environ.get("EDGELLM_HOSTBUILD_CACHE")
    if base:
        return Path(base)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgellm")) / "hostbuild"


@dataclass(frozen=True)
class HostLlama:
    lib_dir: Path        # libllama.a, libggml*.a (static, PIC)
    include: Path        # llama.h
    ggml_include: Path   # ggml.h
    build: str           # 'b10679-50f068fff'


def _locked_build(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run build(tmp) once per dest: a lock serialises concurrent builders, a rename publishes."""
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _compiler_id() -> str:
    cc = tools.need("cc")
    cmake = tools.need("cmake")
    return "|".join(subprocess.run([c, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
                    for c in (cc, cmake))


def host_llama(progress: Progress | None = None) -> HostLlama:
    """llamarn's llama.cpp built for this machine (minutes, once)."""
    src = natives.llama_source(progress)
    flags = CMAKE_OPTIONS + (X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else [])
    key = hashlib.sha256("|".join([natives.LLAMARN.key, *flags, _compiler_id(), platform.machine(), RECIPE])
                         .encode()).hexdigest()[:16]
    build_name = f"b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}"

    def build(tmp: Path) -> None:
        if progress:
            progress("build llama.cpp", 0, 1)
        jobs = str(os.cpu_count() or 2)
        for cmd, what in (([tools.need("cmake"), "-S", str(src), "-B", str(tmp / "build"), *flags],
                           "cmake configure (llama.cpp)"),
                          ([tools.need("cmake"), "--build", str(tmp / "build"), "-j", jobs,
                            "--target", "llama", "ggml", "ggml-base", "ggml-cpu"], "cmake build (llama.cpp)")):
            r = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
            if r.returncode:
                tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
                raise PackagingError(f"{what} failed: {tail}")
        (tmp / "lib").mkdir()
        for lib in (tmp / "build").rglob("lib*.a"):
            shutil.copy2(lib, tmp / "lib" / lib.name)
        shutil.rmtree(tmp / "build")
        if progress:
            progress("build llama.cpp", 1, 1)

    dest = _locked_build(cache_root() / f"llama-{build_name}-{key}", build)
    return HostLlama(dest / "lib", src / "include", src / "ggml" / "include", build_name)


def engine_library(kind: str, *, jni: bool = False, progress: Progress | None = None) -> Path:
    """edgellm's engine for the host: kind 'llama' (over host_llama) or 'genai' (over the host's
    onnxruntime-genai Python package, the one edgellm's tests compare against)."""
    if kind == "llama":
        llama = host_llama(progress)
        lib_dir, header = llama.lib_dir, llama.include
        extra = ["-I", str(llama.ggml_include), f'-DEL_LLAMA_BUILD="{llama.build}"']
        libs = ["-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic", "-lllama", "-lggml", "-lggml-cpu", "-lggml-base",
                "-lstdc++", "-lm", "-lpthread"]
        base = llama.lib_dir.parent.name
    elif kind == "genai":
        lib_dir = pip_genai_dir()
        header = natives.host_genai(cache_root() / "genai-headers", progress).header.parent
        extra, libs, base = [], ["-lonnxruntime-genai"], f"pip-genai-{_pip_genai_version()}"
    else:
        raise PackagingError(f"unknown engine kind {kind!r}")
    key = hashlib.sha256(f"{base}|{jnibuild.sources_digest(kind)}|{jni}|{_compiler_id()}".encode()).hexdigest()[:16]
    name = "libedgellm_jni.so" if jni else f"libedgellm_{kind}.so"

    def build(tmp: Path) -> None:
        jnibuild.build_host(kind, lib_dir, header, tmp / name, jni=jni, extra_flags=extra, libs=libs)

    return _locked_build(cache_root() / f"engine-{kind}-{'jni-' if jni else ''}{key}", build) / name


def _pip_genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        raise PackagingError("the host onnxruntime-genai is not installed: pip install 'edgellm[bench]'") from None


def pip_genai_dir() -> Path:
    """libonnxruntime-genai.so of the onnxruntime-genai Python package, with the onnxruntime library it
    loads (by dlopen, from its own directory) linked beside it in a cache folder."""
    import importlib.util

    genai_spec = importlib.util.find_spec("onnxruntime_genai")
    ort_spec = importlib.util.find_spec("onnxruntime")
    if genai_spec is None or ort_spec is None or not genai_spec.origin or not ort_spec.origin:
        raise PackagingError("the host onnxruntime-genai is not installed: pip install 'edgellm[bench]'")
    genai_lib = Path(genai_spec.origin).parent / "libonnxruntime-genai.so"
    ort_libs = sorted((Path(ort_spec.origin).parent / "capi").glob("libonnxruntime.so*"))
    if not genai_lib.is_file() or not ort_libs:
        raise PackagingError("the host onnxruntime-genai package has no libonnxruntime-genai.so (Linux wheels do)")
    out = cache_root() / f"pip-genai-{_pip_genai_version()}"
    out.mkdir(parents=True, exist_ok=True)
    for name, target in (("libonnxruntime-genai.so", genai_lib), ("libonnxruntime.so", ort_libs[-1]),
                         ("libonnxruntime.so.1", ort_libs[-1])):
        link = out / name
        if not link.exists() or os.path.realpath(link) != str(target):
            link.unlink(missing_ok=True)
            os.symlink(target, link)
    return out
