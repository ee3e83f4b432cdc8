"""The prebuilt mobile runtimes an app package carries, pinned by npm version and tarball sha256.

Android and iOS apps need onnxruntime, onnxruntime-genai and llama.cpp built for phones; none of
them can be built here (no NDK, no Xcode). The npm registry carries the official binaries:
Microsoft's onnxruntime / onnxruntime-genai Android AARs and iOS xcframeworks (repackaged unchanged
by asus4's Unity packages, with Linux x86-64 builds of the same versions for host tests) and
llamarn's llama.xcframework with the matching llama.cpp source. `npm pack` (the registry's own
client, honouring the user's npm proxy and registry settings) fetches a tarball, its sha256 is
checked against the pin below, and only the members edgellm uses are extracted into the user cache
dir, keyed by version and digest: downloaded once, shared by every package build and CI run.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingToolError, PackagingError

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    sha256: str                 # of the registry tarball `npm pack` writes
    license: str
    members: tuple[str, ...]    # path prefixes inside the tarball that are extracted
    skip: tuple[str, ...] = ()  # path fragments never extracted (debug symbols)
    contains: str = ""          # what runtime versions are inside, for manifests and READMEs

    @property
    def key(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '+')}-{self.version}-{self.sha256[:12]}"


ONNXRUNTIME = NpmPackage(
    "com.github.asus4.onnxruntime", "0.4.9",
    "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d", "MIT",
    ("package/Plugins/Android/onnxruntime.aar", "package/Plugins/Linux/x64/", "package/LICENSE",
     "package/README.md", "package/package.json"),
    contains="onnxruntime 1.29.0")
GENAI = NpmPackage(
    "com.github.asus4.onnxruntime-genai", "0.4.9",
    "80d03d6afe24dbf6bcde5bfcf424b26c9a2a4161a495e2dc71ac2e08288e7af4", "MIT",
    ("package/Plugins/Android/onnxruntime-genai.aar", "package/Plugins/Linux/x64/", "package/LICENSE",
     "package/README.md", "package/package.json"),
    contains="onnxruntime-genai 0.15.2")
LLAMARN = NpmPackage(
    "@novastera-oss/llamarn", "0.10.5",
    "7d3f79118a7f0c0543145202535770b629840d98243200e7c7524db603316064", "Apache-2.0 (llama.cpp: MIT)",
    ("package/cpp/llama.cpp/", "package/cpp/build-info.cpp", "package/ios/libs/llama.xcframework/",
     "package/LICENSE", "package/package.json"),
    skip=("/dSYMs/", "/tools/", "/media/", "/gguf-py/", "/ggml-cuda/", "/ggml-vulkan/",
          "/ggml-sycl/", "/ggml-cann/", "/ggml-musa/", "/ggml-opencl/", "/ggml-hexagon/", "/ggml-webgpu/",
          "/ggml-openvino/", "/ggml-zdnn/", "/ggml-hip/", "/ggml-et/", "/ggml-virtgpu/"),
    contains="llama.cpp b10679 (commit 50f068fff)")
LLAMA_CPP_BUILD = 10679
LLAMA_CPP_COMMIT = "50f068fff"
ORT_VERSION = "1.29.0"
GENAI_VERSION = "0.15.2"
PACKAGES = {p.name: p for p in (ONNXRUNTIME, GENAI, LLAMARN)}


def cache_root() -> Path:
    """Kept outside EDGELLM_HOME (as the deploy cross-build cache) so tests with a throwaway home reuse it."""
    base = os.environ.get("EDGELLM_NATIVES_CACHE")
    if base:
        return Path(base)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgellm")) / "npm"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(pkg: NpmPackage, progress: Progress | None = None) -> Path:
    """The extracted members of `pkg` (the tarball's `package/` folder), fetched and verified once."""
    dest = cache_root() / pkg.key
    stamp = dest / ".edgellm-verified"
    if stamp.is_file():
        return dest / "package"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two packagers never download the same tarball twice
        if stamp.is_file():
            return dest / "package"
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
        try:
            tarball = _npm_pack(pkg, tmp, progress)
            _extract(pkg, tarball, tmp / "out", progress)
            tarball.unlink()
            (tmp / "out" / ".edgellm-verified").write_text(f"{pkg.name}@{pkg.version} sha256 {pkg.sha256}\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp / "out", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "package"


def _npm_pack(pkg: NpmPackage, into: Path, progress: Progress | None) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise MissingToolError(f"fetching {pkg.name}@{pkg.version} needs npm: apt-get install npm "
                               "(or run .ci/setup.sh)")
    if progress:
        progress(f"npm {pkg.name}", 0, 1)
    r = subprocess.run([npm, "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", str(into), "--silent"],
                       check=False, capture_output=True, text=True, cwd=into)
    found = sorted(into.glob("*.tgz"))
    if r.returncode != 0 or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PackagingError(f"npm pack {pkg.name}@{pkg.version} failed: {tail[0]}")
    got = sha256_file(found[0])
    if got != pkg.sha256:
        raise PackagingError(f"{pkg.name}@{pkg.version}: tarball sha256 {got[:16]}… is not the pinned "
                             f"{pkg.sha256[:16]}… (registry content changed): refusing to use it")
    if progress:
        progress(f"npm {pkg.name}", 1, 1)
    return found[0]


def _extract(pkg: NpmPackage, tarball: Path, out: Path, progress: Progress | None) -> None:
    out.mkdir(parents=True)
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(pkg.members)
                   and not any(s in m.name for s in pkg.skip) and (m.isfile() or m.isdir())]
        for i, m in enumerate(members):
            tf.extract(m, out, filter="data")  # no absolute paths, links or device files out of a tarball
            if progress and i % 200 == 0:
                progress(f"extract {pkg.name}", i, len(members))


# ---------------------------------------------------------------- what the packagers use


@dataclass(frozen=True)
class AndroidRuntime:
    """onnxruntime(-genai) for one Android ABI, as shipped in the official AARs."""

    abi: str
    libs: tuple[Path, ...]    # libonnxruntime.so, libonnxruntime-genai.so, libmat.so
    genai_header: Path        # ort_genai_c.h (genai's C API, what the JNI glue calls)
    ort_aar: Path
    genai_aar: Path


def android_runtime(abi: str, work: Path, progress: Progress | None = None) -> AndroidRuntime:
    """Unpack the two AARs' native libraries for `abi` into `work` (the AARs are zips)."""
    import zipfile

    ort_aar = fetch(ONNXRUNTIME, progress) / "Plugins/Android/onnxruntime.aar"
    genai_aar = fetch(GENAI, progress) / "Plugins/Android/onnxruntime-genai.aar"
    libs = []
    work.mkdir(parents=True, exist_ok=True)
    for aar, names in ((ort_aar, ("libonnxruntime.so",)), (genai_aar, ("libonnxruntime-genai.so", "libmat.so"))):
        with zipfile.ZipFile(aar) as z:
            for name in names:
                member = f"jni/{abi}/{name}"
                if member not in z.namelist():
                    raise PackagingError(f"{aar.name} has no {member}: ABI {abi} is not shipped")
                (work / name).write_bytes(z.read(member))
                libs.append(work / name)
            if aar == genai_aar:
                (work / "ort_genai_c.h").write_bytes(z.read("headers/ort_genai_c.h"))
    return AndroidRuntime(abi, tuple(libs), work / "ort_genai_c.h", ort_aar, genai_aar)


@dataclass(frozen=True)
class HostGenai:
    """The Linux x86-64 builds of the same onnxruntime / genai versions (host tests of the JNI glue)."""

    lib_dir: Path       # libonnxruntime.so + libonnxruntime-genai.so side by side
    header: Path


def host_genai(work: Path, progress: Progress | None = None) -> HostGenai:
    ort = fetch(ONNXRUNTIME, progress) / "Plugins/Linux/x64"
    genai = fetch(GENAI, progress) / "Plugins/Linux/x64"
    work.mkdir(parents=True, exist_ok=True)
    for src in [*ort.glob("*.so"), *genai.glob("*.so")]:
        if not (work / src.name).exists():
            os.symlink(src, work / src.name)
    rt = android_runtime("x86_64", work / "android-x86_64", progress)
    return HostGenai(work, rt.genai_header)


def llama_source(progress: Progress | None = None) -> Path:
    """llamarn's llama.cpp source tree (the version its llama.xcframework was built from)."""
    return fetch(LLAMARN, progress) / "cpp/llama.cpp"


def llama_xcframework(progress: Progress | None = None) -> Path:
    return fetch(LLAMARN, progress) / "ios/libs/llama.xcframework"
