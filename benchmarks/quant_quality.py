"""Quantization quality on SmolLM2-135M: llama.cpp's presets against edgellm's calibrated quantization.

The reference is the F32 model dequantized from the shipped file (cached in the work dir). Each type is
quantized twice from it, by llama.cpp's quantizer without an importance matrix (what llama-quantize gives)
and with the importance matrix edgellm computes from its calibration text, then both are scored against
the reference on the held-out text (never calibrated on). Prints JSON (or a README-ready Markdown table)
with edgellm's KLD as a share of llama.cpp's per type and the issue's size-anchored targets, and writes the
size-vs-KLD chart.

    python benchmarks/quant_quality.py --markdown --out benchmarks/out/quant_quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
TYPES = ("Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# (llama.cpp preset whose file size is the budget, bound on edgellm's mean KLD as a share of that preset's)
ANCHORS = (("Q4_K_M", 0.5), ("IQ4_NL", 0.5))


def _log(msg: str) -> None:
    print(f"[quant_quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def f32_reference(model: Path, workdir: Path) -> Path:
    """The shipped model dequantized to F32, rebuilt only when the source is newer than the cached copy."""
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.gguf_writer import write_gguf

    dest = workdir / f"{model.stem}-f32.gguf"
    if not dest.exists() or dest.stat().st_mtime < model.stat().st_mtime:
        _log(f"writing the F32 reference {dest}")
        write_gguf(read_gguf(model), dest, "F32")  # atomic: an interrupted run leaves no half-written cache
    return dest


def per_type(rows: list[dict]) -> list[dict]:
    """edgellm vs llama.cpp for the same type (≈ the same size: the imatrix can shift llama.cpp's choices a little)."""
    by = {(r["quant"], r["variant"]): r for r in rows}
    out = []
    for q in dict.fromkeys(r["quant"] for r in rows):
        e, ll = by[(q, "edgellm")], by[(q, "llama.cpp")]
        out.append({"quant": q, "bytes_llama_cpp": ll["bytes"], "bytes_edgellm": e["bytes"],
                    "size_ratio": e["bytes"] / ll["bytes"], "kld_llama_cpp": ll["mean_kld"],
                    "kld_edgellm": e["mean_kld"], "kld_ratio": e["mean_kld"] / ll["mean_kld"]})
    return out


def source_type(model: Path) -> str | None:
    """The shipped file's own type (e.g. Q4_1): the F32 reference lies on its grid, which flatters that type."""
    import gguf

    from edgellm.gguf_check import validate_gguf

    ft = validate_gguf(model).metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def _verdict(rows: list[dict], anchor: dict, bound: float, skip: str | None) -> dict:
    """edgellm's best mean KLD among files no larger than `anchor` (a llama.cpp row), as a share of its KLD."""
    fits = [r for r in rows if r["variant"] == "edgellm" and r["bytes"] <= anchor["bytes"] and r["quant"] != skip]
    best = min(fits, key=lambda r: r["mean_kld"], default=None)
    ratio = None if best is None else best["mean_kld"] / anchor["mean_kld"]
    q = anchor["quant"]
    return {"what": f"edgellm mean KLD at ≤ llama.cpp {q} size ({anchor['bytes'] / 1e6:.1f} MB) / llama.cpp {q}"
                    + (f", without {skip} (the source's grid)" if skip else ""),
            "anchor": q, "excluded": skip, "budget_bytes": anchor["bytes"], "edgellm_type": best and best["quant"],
            "value": ratio, "bound": bound, "pass": ratio is not None and ratio <= bound}


def targets(rows: list[dict], exclude: str | None = None) -> list[dict]:
    """The issue's size-anchored targets; where a verdict rests on `exclude` (the source's own type, which
    the reference flatters), a second verdict without it."""
    out = []
    for q, bound in ANCHORS:
        anchor = next((r for r in rows if r["quant"] == q and r["variant"] == "llama.cpp"), None)
        if anchor is None:
            continue
        out.append(_verdict(rows, anchor, bound, None))
        if exclude and out[-1]["edgellm_type"] == exclude:
            out.append(_verdict(rows, anchor, bound, exclude))
    return out


def run(model: Path, workdir: Path, types: list[str], ctx: int, chunks: int, calib_tokens: int,
        threads: int | None) -> dict[str, Any]:
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.sweep import sweep

    t0 = time.perf_counter()
    ref = f32_reference(model, workdir)

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "calibrate" or done == total:
            _log(f"{stage} ({done}/{total})")

    rows = sweep(ref, types, ckpt=read_gguf(ref), calib_tokens=calib_tokens, ctx=ctx, max_chunks=chunks,
                 workdir=workdir / "candidates", threads=threads, progress=progress)
    src = source_type(model)
    return {"model": str(model), "source_type": src, "reference": str(ref),
            "settings": {"ctx": ctx, "max_chunks": chunks, "scored_tokens": chunks * (ctx // 2 - 1),
                         "calib_tokens": calib_tokens, "threads": threads},
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "per_type": per_type(rows), "targets": targets(rows, exclude=src)}


def markdown(r: dict[str, Any]) -> str:
    """README tables: every row, edgellm's KLD share per type, and each target's verdict."""
    from edgellm.converters.sweep import write_table

    s = r["settings"]
    lines = [f"SmolLM2-135M, reference = F32 dequantized from the shipped {r['source_type']} file (its weights lie "
             f"on the {r['source_type']} grid); {s['scored_tokens']} held-out tokens "
             f"scored ({s['max_chunks']} chunks of {s['ctx']}), importance matrix from {s['calib_tokens']} tokens of "
             "the shipped calibration text. \"llama.cpp\" = llama-quantize's preset without an imatrix.",
             "", write_table(r["rows"]), "",
             "| type | size edgellm / llama.cpp | mean KLD edgellm / llama.cpp |", "|---|---:|---:|"]
    lines += [f"| {p['quant']} | {p['size_ratio']:.3f} | {p['kld_ratio']:.2f} |" for p in r["per_type"]]
    lines += ["", "| target | bound | measured | |", "|---|---:|---:|---|"]
    for t in r["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f} ({t['edgellm_type']})"
        lines.append(f"| {t['what']} | ≤ {t['bound']} | {value} | {'pass' if t['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="source GGUF (default: the shipped SmolLM2-135M)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma list (default {','.join(TYPES)})")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk, second half scored (default 512)")
    ap.add_argument("--chunks", type=int, default=4, help="held-out chunks scored (default 4)")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for the imatrix (default 2048)")
    ap.add_argument("--threads", type=int, default=None, help="threads for quantize and eval (default: all)")
    ap.add_argument("--workdir", type=Path, default=OUT / "work", help="cache for the F32 reference and candidates")
    ap.add_argument("--plot", type=Path, default=OUT / "quant_quality.png", help="size-vs-KLD chart (PNG)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    ap.add_argument("--markdown", action="store_true",
                    help="print a README-ready Markdown table instead of the JSON (use --out to keep the JSON)")
    args = ap.parse_args(argv)
    from edgellm import store
    from edgellm.converters.sweep import plot

    model = args.model or store.pull(store.DEFAULT_ALIAS, quiet=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(Path(model), args.workdir, args.types.split(","), args.ctx, args.chunks, args.calib_tokens,
                 args.threads)
    result["plot"] = str(plot(result["rows"], args.plot, title="SmolLM2-135M: size vs KL divergence to F32"))
    _log(f"chart: {result['plot']}")
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(markdown(result) if args.markdown else text)


if __name__ == "__main__":
    main()
