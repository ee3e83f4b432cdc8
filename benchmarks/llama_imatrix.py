"""llama.cpp's own importance-matrix route, as an expert runs it: `llama-imatrix` on the calibration text,
then `llama-quantize --imatrix` — the anchor edgellm's calibrated quantization is measured against, beside
llama-quantize's presets without an importance matrix.

Both tools are built from the llama.cpp that llama-cpp-python vendors (benchmarks/llama_tools.py) and run
on the wheel's own libraries. The calibration text is the same one edgellm calibrates on (the shipped
calibration text), cut to the same number of tokens: `-c 512 --chunks N` takes its first N × 512 tokens.
llama-imatrix runs with its defaults otherwise (blk.* tensors; `--process-output` is not on by default).

    python benchmarks/llama_imatrix.py REF.gguf --types Q4_0,Q4_K_M     # rows as JSON, scored on held-out text
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_tools import ensure_llama_tools, run_tool  # noqa: E402

VARIANT = "llama.cpp+imatrix"
CHUNK = 512


def _log(msg: str) -> None:
    print(f"[llama-imatrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_imatrix(ref: Path, workdir: Path, calib_tokens: int, threads: int | None = None,
                  calib_text: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run llama-imatrix on `ref` over the first `calib_tokens` tokens of the calibration text (cached per
    reference file and token count); returns the imatrix file and what the run did."""
    from edgellm.texts import calibration_text

    tools = ensure_llama_tools()
    workdir.mkdir(parents=True, exist_ok=True)
    chunks = max(1, calib_tokens // CHUNK)
    dest = workdir / f"{ref.stem}-llama-imatrix-{chunks * CHUNK}.gguf"
    text_file = workdir / "calibration.txt"
    text_file.write_text(calib_text if calib_text is not None else calibration_text(), encoding="utf-8")
    info = {"tool": str(tools["llama-imatrix"]), "chunks": chunks, "ctx": CHUNK, "tokens": chunks * CHUNK,
            "args": ["-c", str(CHUNK), "--chunks", str(chunks), "--no-ppl"]}
    if dest.exists() and dest.stat().st_mtime >= ref.stat().st_mtime:
        return dest, {**info, "cached": True}
    _log(f"llama-imatrix on {ref.name}: {chunks} chunks of {CHUNK} tokens")
    t0 = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}.gguf")
    run_tool(tools["llama-imatrix"], ["-m", str(ref), "-f", str(text_file), "-o", str(tmp), *info["args"],
                                      "-t", str(threads or os.cpu_count() or 1), "-ngl", "0"])
    os.replace(tmp, dest)
    return dest, {**info, "seconds": round(time.perf_counter() - t0, 1), "cached": False}


def llama_quantize(ref: Path, dest: Path, quant: str, imatrix: Path, threads: int | None = None) -> Path:
    """`llama-quantize --imatrix IMATRIX REF DEST TYPE THREADS`."""
    tools = ensure_llama_tools()
    run_tool(tools["llama-quantize"], ["--imatrix", str(imatrix), str(ref), str(dest), quant,
                                       str(threads or os.cpu_count() or 1)])
    return dest


def imatrix_rows(ref: Path, types: list[str], workdir: Path, *, calib_tokens: int, ctx: int, chunks: int,
                 threads: int | None = None) -> tuple[list[dict], dict[str, Any]]:
    """One scored row per type: llama.cpp's imatrix route, the same held-out protocol as converters.sweep."""
    from edgellm.converters.evaluate import evaluate
    from edgellm.converters.sweep import score_row
    from edgellm.texts import heldout_text

    imatrix, info = llama_imatrix(ref, workdir, calib_tokens, threads)
    rows = []
    for quant in types:
        dest = workdir / f"{ref.stem}-{quant.lower()}-llama-imatrix.gguf"
        llama_quantize(ref, dest, quant, imatrix, threads)
        try:
            r = evaluate(dest, ref, heldout_text(), ctx=ctx, threads=threads, max_chunks=chunks)
        finally:
            dest.unlink(missing_ok=True)
        rows.append(score_row(VARIANT, quant, r.size_bytes, r))
        _log(f"{quant} via llama-imatrix + llama-quantize: KLD {r.mean_kld:.5f}, {r.size_bytes / 1e6:.1f} MB")
    return rows, info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path, help="the F32 reference GGUF")
    ap.add_argument("--types", default="Q4_0,IQ4_NL,Q4_K_M")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "work" / "llama-imatrix")
    args = ap.parse_args(argv)
    rows, info = imatrix_rows(args.reference, args.types.split(","), args.workdir, calib_tokens=args.calib_tokens,
                              ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    print(json.dumps({"imatrix": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
