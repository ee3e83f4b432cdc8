"""What an xcframework holds, read on Linux with LLVM's Mach-O tools (llvm-objdump, llvm-nm): each
slice's architectures, platform and minimum OS, and the C symbols it exports, checked against what
edgellm's C engine calls. This is the link step Xcode would fail at, done before anyone opens Xcode.
"""
from __future__ import annotations

import plistlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PackagingError
from . import jnibuild, tools


@dataclass(frozen=True)
class Slice:
    identifier: str          # 'ios-arm64', 'ios-arm64_x86_64-simulator'
    binary: Path
    archs: tuple[str, ...]   # from the Mach-O headers, not from the plist
    platform: str            # LC_BUILD_VERSION platform: 'ios', 'iossim', ...
    minos: str
    plist_archs: tuple[str, ...] = ()
    exports: frozenset[str] = field(default_factory=frozenset)


def slices(xcframework: Path) -> list[Slice]:
    """Every library of the xcframework, with its Mach-O facts (raises on an unreadable one)."""
    try:
        info = plistlib.loads((xcframework / "Info.plist").read_bytes())
    except (OSError, plistlib.InvalidFileException) as e:
        raise PackagingError(f"{xcframework}: unreadable Info.plist ({e})") from None
    out = []
    for lib in info.get("AvailableLibraries", []):
        binary = xcframework / lib["LibraryIdentifier"] / lib["BinaryPath"]
        archs, platform, minos = _headers(binary)
        out.append(Slice(lib["LibraryIdentifier"], binary, archs, platform, minos,
                         tuple(lib.get("SupportedArchitectures", ())), _exports(binary)))
    return out


def _headers(binary: Path) -> tuple[tuple[str, ...], str, str]:
    objdump = tools.need("llvm-objdump-14")
    text = tools.run([objdump, "--macho", "--private-headers", "--arch=all", str(binary)], f"llvm-objdump {binary}")
    archs = re.findall(r"^\s*MH_MAGIC_64\s+(\S+)", text, re.M)
    platform = re.search(r"cmd LC_BUILD_VERSION\n(?:.*\n)*?\s*platform (\S+)", text)
    minos = re.search(r"cmd LC_BUILD_VERSION\n(?:.*\n)*?\s*minos (\S+)", text)
    names = {"ARM64": "arm64", "X86_64": "x86_64"}
    return (tuple(sorted(names.get(a, a.lower()) for a in archs)), platform.group(1) if platform else "unknown",
            minos.group(1) if minos else "unknown")


def _exports(binary: Path) -> frozenset[str]:
    nm = tools.need("llvm-nm-14")
    text = tools.run([nm, "-g", "--defined-only", "--arch=all", "--format=just-symbols", str(binary)],
                     f"llvm-nm {binary}")
    return frozenset(s[1:] if s.startswith("_") else s for s in text.split())  # Mach-O C symbols carry a '_'


def engine_imports(framework_dir: Path, work: Path) -> frozenset[str]:
    """The llama.cpp / ggml symbols edgellm's C engine calls, from compiling it for arm64 iOS against the
    framework's own headers (no iOS SDK here: libc comes from edgellm's declarations, as for Android)."""
    clang = tools.need("clang-14")
    resource_dir = tools.run([clang, "-print-resource-dir"], "clang -print-resource-dir").strip()
    src = jnibuild.native_dir()
    obj = work / "engine_llama.ios.o"
    work.mkdir(parents=True, exist_ok=True)
    tools.run([clang, "--target=arm64-apple-ios16.4", "-ffreestanding", "-nostdinc", "-isystem",
               f"{resource_dir}/include", "-isystem", str(src / "shim"), "-F", str(framework_dir), "-I", str(src),
               "-O2", "-c", str(src / "engine_llama.c"), "-o", str(obj)], "compiling engine_llama.c for iOS")
    nm = tools.need("llvm-nm-14")
    undefined = tools.run([nm, "-u", "--format=just-symbols", str(obj)], "llvm-nm").split()
    return frozenset(s[1:] for s in undefined if s.startswith(("_llama_", "_ggml_", "_gguf_")))


def check_llama_xcframework(xcframework: Path, work: Path, minos: str = "16.4") -> list[str]:
    """Problems with the xcframework for the engine (empty when it is right): an arm64 iOS device slice
    with the expected minimum, and every llama.cpp symbol the engine calls exported by every slice."""
    problems = []
    found = slices(xcframework)
    device = [s for s in found if s.platform == "ios" and "arm64" in s.archs]
    if not device:
        problems.append("no arm64 iOS device slice")
    for s in found:
        if s.plist_archs and set(s.plist_archs) != set(s.archs):
            problems.append(f"{s.identifier}: Info.plist says {s.plist_archs}, the binary holds {s.archs}")
        if s.platform == "ios" and s.minos != minos:
            problems.append(f"{s.identifier}: minimum iOS {s.minos}, expected {minos}")
    needed = engine_imports(device[0].binary.parent.parent if device else xcframework, work) if device else set()
    for s in found:
        missing = sorted(needed - s.exports)
        if missing:
            problems.append(f"{s.identifier} does not export {', '.join(missing)}")
    return problems
