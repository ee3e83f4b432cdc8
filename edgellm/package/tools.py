"""The host tools app packaging runs, each found on PATH or named with the package that provides it.

Debian/Ubuntu carry everything the offline APK build needs (the Android SDK's own build tools are
not downloadable here): aapt2, apksigner, smali, dexdump, clang and lld for Android's ABIs, a JDK for
apksigner and keytool. .ci/setup.sh installs them.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import MissingToolError

# tool -> (the apt package that provides it, what edgellm uses it for)
APT = {
    "aapt2": ("aapt", "compile and link the APK's manifest and resources"),
    "aapt": ("aapt", "read the APK back (dump badging)"),
    "apksigner": ("apksigner", "sign and verify the APK (v2/v3 signatures)"),
    "smali": ("libsmali-java", "assemble the app's Java side into classes.dex"),
    "dexdump": ("dexdump", "read classes.dex back"),
    "clang-14": ("clang-14", "compile the JNI glue for Android"),
    "ld.lld-14": ("lld-14", "link the JNI glue for Android"),
    "llvm-nm-14": ("llvm-14", "read the xcframework's Mach-O symbols"),
    "llvm-objdump-14": ("llvm-14", "read the xcframework's Mach-O headers"),
    "keytool": ("openjdk-17-jdk-headless", "create the debug signing key"),
    "java": ("openjdk-17-jre-headless", "run apksigner and smali"),
    "cmake": ("cmake", "build llama.cpp for the host (the shipped system-prompt state)"),
    "cc": ("gcc", "compile edgellm's engine for the host"),
    "npm": ("npm", "fetch the pinned onnxruntime / llama.cpp mobile binaries"),
}
FRAMEWORK_RES = Path("/usr/share/android-framework-res/framework-res.apk")


def need(tool: str, why: str | None = None) -> str:
    """The path of `tool`, or MissingToolError naming the apt package to install."""
    path = shutil.which(tool)
    if path:
        return path
    pkg, what = APT.get(tool, (tool, why or "this step"))
    raise MissingToolError(f"{tool} is missing ({why or what}): apt-get install {pkg} (or run .ci/setup.sh)")


def framework_res() -> Path:
    """Android's framework resources (API 29), what aapt2 links the manifest and theme against."""
    if not FRAMEWORK_RES.is_file():
        raise MissingToolError(f"{FRAMEWORK_RES} is missing (aapt2 links against it): "
                               "apt-get install android-framework-res (or run .ci/setup.sh)")
    return FRAMEWORK_RES


def run(cmd: list[str], what: str, **kw) -> str:
    """Run a tool; a failure becomes a PackagingError with the tool's last lines of output."""
    from ..errors import PackagingError

    r = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:]) or f"exit status {r.returncode}"
        raise PackagingError(f"{what} failed: {tail}")
    return r.stdout
