"""Mobile packaging end to end on the embedded default model: an Android app (with a signed APK built offline)
and an iOS Swift package with a demo app, both answering with a museum-guide system prompt.

    .venv/bin/python examples/package_mobile.py [OUT_DIR]

Needs the tools .ci/setup.sh installs (aapt2, apksigner, smali, clang-14/lld-14, a JDK, npm, cmake). The first
run fetches the pinned mobile runtimes from npm and builds llama.cpp for this machine (cached afterwards).
Then: `adb install -r OUT_DIR/android/edgellm-chat-debug.apk`, or open OUT_DIR/ios/EdgeLLMDemo in Xcode on a Mac.
"""
from __future__ import annotations

import sys
from pathlib import Path

from edgellm.converters.onnx_export import convert_to_onnx
from edgellm.package import package_android, package_ios

SYSTEM = "You are the guide of a small science museum. Answer visitors in one or two friendly sentences."


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "mobile-demo")
    out.mkdir(exist_ok=True)
    onnx = out / "smol-onnx"
    if not onnx.exists():
        print("exporting the default model to ONNX (int4, about a minute) ...")
        convert_to_onnx("smollm2-135m", onnx)
    android = package_android(onnx, out / "android", apk=True, system=SYSTEM, force=True)
    apk = android.apk
    extra = (apk.bytes - apk.model_bytes) / 2**20
    print(f"Android: {android.out} — APK {apk.bytes / 2**20:.1f} MiB (model + {extra:.1f} MiB), built in "
          f"{apk.seconds:.1f} s; provider {android.manifest['runtime']['provider']}")
    for w in android.warnings:
        print("  warning:", w)
    ios = package_ios("smollm2-135m", out / "ios", system=SYSTEM, force=True)
    state = ios.manifest["system_state"]
    print(f"iOS: {ios.out} — llama.cpp {state['llama_cpp']}, shipped system-prompt state of {state['n_tokens']} "
          f"tokens ({state['bytes'] / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
