"""llama.cpp's own command-line tools — `llama-imatrix`, `llama-quantize`, `llama-server` — built from the
llama.cpp that the installed llama-cpp-python vendors, cached like llama-bench (benchmarks/llama_bench.py).

They are the anchors an expert would reach for: llama.cpp's importance-matrix route (`llama-imatrix` on the
calibration text, then `llama-quantize --imatrix`) for quantization quality, and `llama-server` for serving.
Like llama-bench they run on the wheel's own libllama/libggml (LD_LIBRARY_PATH), so a comparison isolates
what the tool does from how the kernels were compiled. The build keeps llama_bench's AMX guard
(`-mno-amx-int8` on CPUs with AMX: llama.cpp's AMX int8 matmul segfaults on this VM kind).

    python benchmarks/llama_tools.py                # builds if needed, prints the binaries as JSON
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_bench import (  # noqa: E402
    CMAKE_FLAGS,
    JOBS,
    _compiler,
    _cpu_flags,
    _download_sdist,
    _extract_llama_cpp,
    _lib_env,
    _log,
    _quiet,
    installed_version,
)

TOOLS = ("llama-imatrix", "llama-quantize", "llama-server")
# llama-bench's flags with the server on; its web UI is neither built (npm) nor downloaded (no network here):
# the server then embeds an empty asset table, which the API does not need.
TOOL_FLAGS = tuple(f for f in CMAKE_FLAGS if not f.startswith("-DLLAMA_BUILD_SERVER")) + (
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")


def cache_key(version: str) -> str:
    """Everything that changes the binaries: a different key means a rebuild."""
    parts = [version, " ".join(TOOL_FLAGS), " ".join(TOOLS), _compiler(), _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def tools_dir() -> Path:
    from edgellm import store

    return store.home() / "llama-tools" / cache_key(installed_version())


def _local_sdist(version: str) -> Path | None:
    """The sdist `edgellm deploy` already downloaded for its cross build, if any (saves a download)."""
    from edgellm import store

    for base in (store.home() / "cross" / "sdist", Path.home() / ".cache" / "edgellm" / "cross" / "sdist"):
        hit = base / f"llama_cpp_python-{version}.tar.gz"
        if hit.is_file():
            return hit
    return None


def ensure_llama_tools(sdist: Path | None = None) -> dict[str, Path]:
    """Paths of the cached tools for the installed llama-cpp-python; builds all of them on first use."""
    version = installed_version()
    target = tools_dir()
    found = {t: target / t for t in TOOLS}
    if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
        return found
    if not shutil.which("cmake"):
        raise RuntimeError("cmake is needed to build llama.cpp's tools")
    with tempfile.TemporaryDirectory(prefix="edgellm-llama-tools-") as tmp:
        work = Path(tmp)
        src = _extract_llama_cpp(sdist or _local_sdist(version) or _download_sdist(version, work / "sdist"),
                                 work / "src")
        build = work / "build"
        _log(f"configuring llama.cpp from llama-cpp-python {version} for {', '.join(TOOLS)}")
        _quiet(["cmake", "-S", str(src), "-B", str(build), *TOOL_FLAGS])
        _log(f"building {', '.join(TOOLS)} with -j{JOBS} (several minutes, once)")
        _quiet(["cmake", "--build", str(build), "--target", *TOOLS, f"-j{JOBS}"])
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for tool in TOOLS:
            built = next((p for p in build.rglob(tool) if p.is_file() and os.access(p, os.X_OK)), None)
            if built is None:
                raise RuntimeError(f"the build finished but produced no {tool}")
            shutil.copy2(built, staging / tool)
        for lib in build.rglob("lib*.so*"):   # helper libraries the wheel does not ship (common, mtmd, ...)
            if lib.is_file() and not lib.is_symlink():
                shutil.copy2(lib, staging / lib.name)
        for link in build.rglob("lib*.so*"):
            if link.is_symlink() and not (staging / link.name).exists():
                (staging / link.name).symlink_to(os.readlink(link))
        (staging / "build.json").write_text(json.dumps(
            {"version": version, "cmake_flags": list(TOOL_FLAGS), "compiler": _compiler(), "tools": list(TOOLS)},
            indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)   # atomic: a half-built tool set is never cached
    return found


def tool_env(exe: Path) -> dict[str, str]:
    """The environment a tool runs in: the wheel's libllama/libggml first (the kernels edgellm uses)."""
    return _lib_env(exe)


def run_tool(exe: Path, args: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run one tool to completion; its output is shown only when it fails."""
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, check=False, env=tool_env(exe),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{exe.name} failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return proc


def main() -> None:
    tools = ensure_llama_tools(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(json.dumps({k: str(v) for k, v in tools.items()}, indent=2))


if __name__ == "__main__":
    main()
