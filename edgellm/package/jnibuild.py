"""Compile edgellm's chat engine + JNI bridge into libedgellm_jni.so: for Android without an NDK, and
for the host (tests drive the same C from a JVM or through ctypes).

Android: clang/lld target `<arch>-linux-android24` directly. With no NDK sysroot there are no libc
headers or libraries, so the build declares the dozen libc functions the engine calls
(native/shim/*.h, standard C signatures) and links against a stub libc.so generated from the objects'
own undefined symbols; the real bionic libc resolves them when the app loads. Every undefined symbol
must be one bionic exports (BIONIC) or one onnxruntime-genai exports, otherwise the build stops: a
symbol the phone cannot resolve would only show up as a crash on the phone. The library is linked
with 16 KB segment alignment (Android 15's 16 KB pages).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingToolError, PackagingError
from . import elfinfo, tools

MIN_SDK = 24
TRIPLES = {"arm64-v8a": "aarch64-linux-android", "x86_64": "x86_64-linux-android"}
GENAI_SOURCES = ("engine_genai.c", "jni_bridge.c")
LLAMA_SOURCES = ("engine_llama.c", "jni_bridge.c")
# libc functions bionic's libc.so exports (API >= 21) that the engine and bridge may call
BIONIC = frozenset({"malloc", "calloc", "realloc", "free", "memcpy", "memmove", "memset", "memcmp", "strlen",
                    "strcmp", "snprintf", "vsnprintf", "fopen", "fread", "fseek", "ftell", "fclose", "clock_gettime",
                    "__stack_chk_fail", "__stack_chk_guard"})


def native_dir() -> Path:
    """edgellm's C sources (package data of edgellm.package)."""
    return Path(__file__).parent / "native"


def jdk_include() -> Path:
    """The JDK's include dir (jni.h; the JNI ABI is the same on Android)."""
    home = os.environ.get("JAVA_HOME")
    candidates = [Path(home)] if home else []
    javac = shutil.which("javac") or shutil.which("java")
    if javac:
        candidates.append(Path(os.path.realpath(javac)).parent.parent)
    for c in candidates:
        if (c / "include" / "jni.h").is_file():
            return c / "include"
    raise MissingToolError("jni.h not found (a JDK provides it): apt-get install openjdk-17-jdk-headless "
                           "(or set JAVA_HOME)")


@dataclass(frozen=True)
class JniLib:
    path: Path
    abi: str
    undefined: tuple[str, ...]   # what the phone's libc and onnxruntime-genai must provide
    exports: tuple[str, ...]     # the Java_ai_edgellm_EdgeLLMNative_* symbols


def build_android(abi: str, genai_lib: Path, genai_header: Path, work: Path) -> JniLib:
    """libedgellm_jni.so for `abi` over onnxruntime-genai (the APK's engine)."""
    if abi not in TRIPLES:
        raise PackagingError(f"unknown Android ABI {abi!r}: choose {', '.join(TRIPLES)}")
    clang = tools.need("clang-14")
    tools.need("ld.lld-14")
    target = f"--target={TRIPLES[abi]}{MIN_SDK}"
    resource_dir = tools.run([clang, "-print-resource-dir"], "clang -print-resource-dir").strip()
    src = native_dir()
    work.mkdir(parents=True, exist_ok=True)
    flags = [target, "-fPIC", "-O2", "-ffreestanding", "-nostdinc", "-isystem", f"{resource_dir}/include",
             "-isystem", str(src / "shim"), "-I", str(jdk_include()), "-I", str(jdk_include() / "linux"),
             "-I", str(genai_header.parent), "-I", str(src), "-Wall", "-Werror=implicit-function-declaration"]
    objects = []
    for name in GENAI_SOURCES:
        obj = work / f"{name}.{abi}.o"
        tools.run([clang, *flags, "-c", str(src / name), "-o", str(obj)], f"compiling {name} for {abi}")
        objects.append(obj)
    infos = [elfinfo.read(o) for o in objects]
    undefined = sorted({s for i in infos for s in i.undefined} - {s for i in infos for s in i.exports})
    genai_exports = elfinfo.read(genai_lib).exports
    unknown = [s for s in undefined if s not in genai_exports and s not in BIONIC]
    if unknown:
        raise PackagingError(f"the JNI glue needs symbols neither bionic nor onnxruntime-genai provides: "
                             f"{', '.join(unknown)}")
    libc = _stub_libc(clang, target, [s for s in undefined if s in BIONIC], work / f"stub-{abi}")
    out = work / abi / "libedgellm_jni.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(genai_lib, work / f"stub-{abi}" / genai_lib.name)
    tools.run([clang, target, "-shared", "-nostdlib", "-fuse-ld=lld", "-Wl,-soname,libedgellm_jni.so",
               "-Wl,-z,max-page-size=16384", "-Wl,-z,common-page-size=16384", "-Wl,--hash-style=both",
               "-Wl,--build-id=sha1", "-Wl,-z,noexecstack", "-Wl,--no-undefined", "-Wl,-z,relro", "-Wl,-z,now",
               *map(str, objects), "-L", str(libc.parent), "-lonnxruntime-genai", "-lc", "-o", str(out)],
              f"linking libedgellm_jni.so for {abi}")
    exports = tuple(sorted(s for s in elfinfo.read(out).exports if s.startswith("Java_")))
    return JniLib(out, abi, tuple(undefined), exports)


def _stub_libc(clang: str, target: str, symbols: list[str], work: Path) -> Path:
    """A libc.so that only names `symbols`: enough for lld to record them, never shipped."""
    work.mkdir(parents=True, exist_ok=True)
    c = work / "libc_stub.c"
    data = {"__stack_chk_guard"}
    c.write_text("".join(f"long {s};\n" if s in data else f"void {s}(void) {{}}\n" for s in symbols)
                 or "void __edgellm_empty(void) {}\n")
    out = work / "libc.so"
    tools.run([clang, target, "-shared", "-nostdlib", "-fuse-ld=lld", "-fPIC", "-fno-builtin",
               "-Wl,-soname,libc.so", str(c), "-o", str(out)], "linking the stub libc.so")
    return out


# ---------------------------------------------------------------- host builds (tests, packaging)


def build_host(kind: str, lib_dir: Path, header_dir: Path, out: Path, *, jni: bool,
               extra_flags: list[str] | None = None, libs: list[str] | None = None) -> Path:
    """The engine (kind 'genai' or 'llama') as a host shared library, with the JNI bridge when `jni`.

    lib_dir: where libonnxruntime-genai.so or libllama.so live (recorded as the rpath);
    header_dir: ort_genai_c.h, or llama.h with ggml's headers (extra_flags adds more -I)."""
    cc = tools.need("cc")
    src = native_dir()
    names = ["engine_genai.c" if kind == "genai" else "engine_llama.c"] + (["jni_bridge.c"] if jni else [])
    inc = ["-I", str(src), "-I", str(header_dir)]
    if jni:
        inc += ["-I", str(jdk_include()), "-I", str(jdk_include() / "linux")]
    link = libs or (["-lonnxruntime-genai"] if kind == "genai" else ["-lllama"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tools.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror=implicit-function-declaration", *inc,
               *(extra_flags or []), *(str(src / n) for n in names), "-L", str(lib_dir), *link,
               f"-Wl,-rpath,{lib_dir}", "-o", str(out)], f"compiling the {kind} engine for the host")
    return out


def sources_digest(kind: str) -> str:
    """Changes when the engine's C does (host build caches key on it)."""
    h = hashlib.sha256()
    src = native_dir()
    for name in sorted(["edgellm_engine.h", "jni_bridge.c", "engine_genai.c" if kind == "genai" else "engine_llama.c"]):
        h.update((src / name).read_bytes())
    return h.hexdigest()[:16]
