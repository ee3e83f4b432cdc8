"""Mobile packaging figures (docs/mobile.md): APK size against the model, `package android --apk` time,
and the shipped system-prompt state's time to first token against a cold start, on the default model.

    python benchmarks/mobile_bench.py [--onnx DIR] [--runs 5] [--threads 2]

Prints JSON. The TTFT figures run the app's own C engine (edgellm/package/native/engine_llama.c) on a
host build of the llama.cpp version the app ships; TTFT = putting the system prompt in the KV cache
(restoring the shipped state, or evaluating it) + evaluating the question + one decode step.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402

SYSTEM = ("You are the guide of a small science museum. Visitors ask about the exhibits: the Foucault pendulum, "
          "the Tesla coil, the meteorite collection and the planetarium. Answer in one or two friendly sentences, "
          "say when you do not know, and never invent opening hours or ticket prices; point visitors to the front "
          "desk for those. Keep every answer suitable for children.")
QUESTION = "What is the capital of France?"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def apk_figures(onnx: Path, work: Path) -> dict:
    from edgellm.package import package_android

    out = {}
    for label, compress in (("stored_libs", False), ("compressed_libs", True)):
        t0 = time.perf_counter()
        pkg = package_android(onnx, work / f"app-{label}", apk=True, system=SYSTEM, compress_libs=compress)
        seconds = time.perf_counter() - t0
        out[label] = {"apk_bytes": pkg.apk.bytes, "model_bytes": pkg.apk.model_bytes,
                      "overhead_mib": round((pkg.apk.bytes - pkg.apk.model_bytes) / 2**20, 1),
                      "package_seconds": round(seconds, 1), "apk_build_seconds": round(pkg.apk.seconds, 1)}
        _log(f"{label}: {out[label]}")
    return out


def ttft_figures(work: Path, runs: int, threads: int) -> dict:
    from edgellm.package import package_android
    from edgellm.package.manifest import ChatPieces
    from edgellm.package.state import measure_ttft

    pkg = package_android("smollm2-135m", work / "llama-app", system=SYSTEM)
    m = pkg.manifest
    model_dir = pkg.out / "app/src/main/assets/edgellm/model"
    state = m["system_state"]
    result = measure_ttft(model_dir / m["files"][0], ChatPieces(**m["chat"]), model_dir / state["file"],
                          state["tokens"], QUESTION, threads=threads, runs=runs)
    return {**result, "state_bytes": state["bytes"], "llama_cpp": m["runtime"]["version"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, help="an edgellm ONNX export of the default model [default: export one]")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("mobile_bench"))
    args = ap.parse_args()
    benchmeta.start()
    with tempfile.TemporaryDirectory(prefix="mobile-bench-") as t:
        work = Path(t)
        onnx = args.onnx
        if onnx is None:
            from edgellm.converters.onnx_export import convert_to_onnx

            _log("exporting the default model to ONNX (int4) ...")
            onnx = Path(convert_to_onnx("smollm2-135m", work / "onnx").output)
        result = {"apk": apk_figures(onnx, work), "shipped_state": ttft_figures(work, args.runs, args.threads)}
    print(benchmeta.save(result, args.out, "mobile_bench.py"))


if __name__ == "__main__":
    main()
