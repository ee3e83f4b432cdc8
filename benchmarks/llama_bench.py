"""llama.cpp's own C++ `llama-bench`, built from the llama.cpp that the installed llama-cpp-python vendors.

It is the anchor edgellm's decode and prompt speeds are judged against: same kernels, no Python in
the loop. The binary is built once per (version, cmake flags, compiler, CPU features) and cached under
the user cache dir, so later runs start immediately.

    python benchmarks/llama_bench.py [MODEL] [--threads 2]    # builds if needed, prints JSON
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # Shared, like the wheel: at run time llama-bench loads the very libllama/libggml that edgellm uses
    # (LD_LIBRARY_PATH below), so the comparison isolates the driver loop from build differences.
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
)
if "amx_int8" in Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else False:
    # as .ci/setup.sh: llama.cpp's AMX int8 matmul segfaults on this VM kind; keep the tools' own ggml like the wheel's
    CMAKE_FLAGS += ("-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8")
JOBS = 2


def _log(msg: str) -> None:
    print(f"[llama-bench] {msg}", file=sys.stderr, flush=True)


def installed_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or clang++) to build llama-bench")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    return f"{cxx}: {out.splitlines()[0] if out else '?'}"


def _cpu_flags() -> str:
    from edgellm.device import probe

    p = probe()
    return f"{p.arch}|{p.cpu_model}|{' '.join(sorted(p.features))}"


def cache_key(version: str) -> str:
    """Everything that changes the binary: a different key means a rebuild."""
    parts = [version, " ".join(CMAKE_FLAGS), _compiler(), _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    from edgellm import store

    return store.home() / "llama-bench"


def _download_sdist(version: str, dest: Path) -> Path:
    _log(f"downloading the llama-cpp-python {version} source package")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(dest), "-q"], check=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz")) + sorted(dest.glob("llama-cpp-python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip did not leave a llama-cpp-python sdist in {dest}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract the sdist (refusing members that escape `dest`) and return its vendor/llama.cpp."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    hits = [p for p in dest.glob("*/vendor/llama.cpp") if (p / "CMakeLists.txt").is_file()]
    if not hits:
        raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp")
    return hits[0]


def _quiet(cmd: list[str]) -> None:
    """Run a build step; its (very long) compiler output is shown only when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def ensure_llama_bench(sdist: Path | None = None) -> Path:
    """Path to a cached llama-bench for the installed llama-cpp-python; builds it on first use."""
    version = installed_version()
    target = cache_dir() / cache_key(version) / "llama-bench"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    for tool in ("cmake",):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is needed to build llama-bench")
    with tempfile.TemporaryDirectory(prefix="edgellm-llama-bench-") as tmp:
        work = Path(tmp)
        src = _extract_llama_cpp(sdist or _download_sdist(version, work / "sdist"), work / "src")
        build = work / "build"
        _log(f"configuring llama.cpp from llama-cpp-python {version} (cmake)")
        _quiet(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS])
        _log(f"building llama-bench with -j{JOBS} (a few minutes, once)")
        _quiet(["cmake", "--build", str(build), "--target", "llama-bench", f"-j{JOBS}"])
        built = next((p for p in build.rglob("llama-bench") if p.is_file() and os.access(p, os.X_OK)), None)
        if built is None:
            raise RuntimeError("the build finished but produced no llama-bench binary")
        target.parent.mkdir(parents=True, exist_ok=True)
        for lib in build.rglob("lib*.so*"):  # helper libraries the wheel may not ship (e.g. common)
            if lib.is_file() and not lib.is_symlink():
                shutil.copy2(lib, target.parent / lib.name)
        for link in build.rglob("lib*.so*"):
            if link.is_symlink() and not (target.parent / link.name).exists():
                (target.parent / link.name).symlink_to(os.readlink(link))
        tmp_target = target.with_suffix(".tmp")
        shutil.copy2(built, tmp_target)
        os.replace(tmp_target, target)  # atomic: a half-copied binary is never cached
    (target.parent / "build.json").write_text(json.dumps(
        {"version": version, "cmake_flags": list(CMAKE_FLAGS), "compiler": _compiler()}, indent=1))
    return target


def wheel_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _lib_env(exe: Path) -> dict[str, str]:
    """The wheel's libllama/libggml first, then the helper libraries cached beside the binary."""
    paths = [str(wheel_lib_dir()), str(exe.parent), os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in paths if p)}


def run_llama_bench(model: str | os.PathLike[str], threads: int, n_prompt: int = 512, n_gen: int = 128,
                    reps: int = 3, binary: Path | None = None, flash_attn: bool | None = None,
                    depth: int = 0) -> dict[str, Any]:
    """Run llama-bench (pp n_prompt, tg n_gen, -r reps) and return median tok/s and the raw samples.

    flash_attn: None keeps llama-bench's default (auto); pass the setting of what you compare it to.
    """
    exe = binary or ensure_llama_bench()
    cmd = [str(exe), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    if flash_attn is not None:
        cmd += ["-fa", "on" if flash_attn else "off"]
    if depth:
        cmd += ["-d", str(depth)]   # both tests run after `depth` tokens are in the KV cache
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_lib_env(exe))
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    rows = json.loads(proc.stdout)
    pp = [s for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 for s in r["samples_ts"]]
    tg = [s for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0 for s in r["samples_ts"]]
    first = rows[0] if rows else {}
    return {
        "pp_tps": statistics.median(pp) if pp else None,
        "tg_tps": statistics.median(tg) if tg else None,
        "pp_samples": pp, "tg_samples": tg,
        "build_commit": first.get("build_commit"), "flash_attn": first.get("flash_attn"),
        "n_batch": first.get("n_batch"), "n_ubatch": first.get("n_ubatch"), "binary": str(exe),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF file [default: the embedded SmolLM2-135M]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sdist", type=Path, default=None, help="use this llama-cpp-python sdist instead of downloading")
    args = ap.parse_args(argv)
    from edgellm import store

    model = args.model or store.pull(quiet=True)
    exe = ensure_llama_bench(args.sdist)
    print(json.dumps(run_llama_bench(model, args.threads, args.prompt, args.gen, args.reps, exe), indent=2))


if __name__ == "__main__":
    main()
