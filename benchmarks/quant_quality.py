"""Quantization quality on SmolLM2-135M: llama.cpp's presets against edgellm's calibrated quantization.

Two references: "on-grid" is the F32 model dequantized from the shipped file (its weights lie on the
shipped Q4_1 grid, which flatters Q4_1-like choices); "rotated" is that model after a random orthogonal
rotation of the residual stream merged into the weights (same function, off every grid). For each, every
type is quantized by llama.cpp's quantizer without an importance matrix (what llama-quantize gives) and
with edgellm's importance matrix, and edgellm's --target-size mixed precision is run at the size of each
anchor preset (Q4_K_M, IQ4_NL); all are scored against the reference on held-out text (never calibrated
on). Prints JSON (or README-ready Markdown) with the issue's targets per reference and writes one
size-vs-KLD chart per reference. Sensitivity and per-type errors are cached in the work dir.

llama.cpp is also run the way an expert runs it ("llama.cpp+imatrix", benchmarks/llama_imatrix.py):
llama-imatrix on the same calibration text and token count, then llama-quantize --imatrix, both built from
the vendored llama.cpp; every target is reported against both llama.cpp anchors (--no-llama-imatrix skips it).

With --gptq, every type is also written with GPTQ rounding patched into llama.cpp's file ("edgellm+gptq":
per tensor, the lower measured output error wins), and --target-size runs again with the GPTQ variants as
options ("edgellm mixed+gptq"), at the anchors' sizes and at each of --sizes (default 95MB: the issue's
bound of mean KLD ≤ 0.12 there on the rotated reference). GPTQ's own seconds are reported.

    python benchmarks/quant_quality.py --markdown --out benchmarks/out/quant_quality.json
    python benchmarks/quant_quality.py --references rotated --types Q4_0,IQ4_NL,Q4_K_M --gptq \
        --out benchmarks/out/quant_quality_gptq.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
TYPES = ("Q4_0", "Q4_1", "IQ4_NL", "Q4_K_M", "Q5_K_M", "Q8_0")
# (llama.cpp preset whose file size is the budget, bound on edgellm's mean KLD as a share of that preset's)
ANCHORS = (("Q4_K_M", 0.5), ("IQ4_NL", 0.5))
ANCHOR_VARIANTS = ("llama.cpp", "llama.cpp+imatrix")   # the second: llama-imatrix + llama-quantize --imatrix


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
    fits = [r for r in rows if r["variant"].startswith("edgellm") and r["bytes"] <= anchor["bytes"]
            and r["quant"] != skip and not (skip and r.get("types", {}).get(skip))]
    best = min(fits, key=lambda r: r["mean_kld"], default=None)
    ratio = None if best is None else best["mean_kld"] / anchor["mean_kld"]
    q, by = anchor["quant"], anchor["variant"]
    return {"what": f"edgellm mean KLD at ≤ {by} {q} size ({anchor['bytes'] / 1e6:.1f} MB) / {by} {q}"
                    + (f", without {skip} (the source's grid)" if skip else ""),
            "anchor": q, "excluded": skip, "budget_bytes": anchor["bytes"], "edgellm_type": best and best["quant"],
            "value": ratio, "bound": bound, "pass": ratio is not None and ratio <= bound}


def targets(rows: list[dict], exclude: str | None = None) -> list[dict]:
    """The issue's size-anchored targets; with `exclude` (the source's own type, which the reference
    flatters), a second verdict per anchor without any file that uses it."""
    out = []
    for q, bound in ANCHORS:
        for variant in ANCHOR_VARIANTS:   # llama-quantize's preset, and llama.cpp's own imatrix route
            anchor = next((r for r in rows if r["quant"] == q and r["variant"] == variant), None)
            if anchor is None:
                continue
            out.append(_verdict(rows, anchor, bound, None))
            if exclude:   # also without the source's own type anywhere (the reference flatters it)
                out.append(_verdict(rows, anchor, bound, exclude))
    return out


def rotated_reference(model: Path, workdir: Path) -> Path:
    """The F32 reference after a seeded random rotation of the residual stream (off-grid, same function)."""
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.gguf_writer import write_gguf
    from edgellm.converters.rotate import rotate

    dest = workdir / f"{model.stem}-rotated-f32.gguf"
    if not dest.exists() or dest.stat().st_mtime < model.stat().st_mtime:
        _log(f"writing the rotated F32 reference {dest}")
        write_gguf(rotate(read_gguf(model), seed=0), dest, "F32")
    return dest


GPTQ_BOUND = (95_000_000, 0.12)    # the GGUF target on the rotated reference: ≤ 95 MB, mean KLD ≤ 0.12


def gptq_rows(ckpt, ref: Path, types: list[str], imatrix, grams, workdir: Path, ctx: int, chunks: int,
              threads: int | None) -> list[dict]:
    """Each type quantized by llama.cpp with the imatrix, then GPTQ patched in where it lowers the output error."""
    from edgellm.converters.evaluate import evaluate
    from edgellm.converters.pipeline import write_quantized
    from edgellm.converters.sweep import score_row
    from edgellm.texts import heldout_text

    rows = []
    for quant in types:
        dest = workdir / f"{quant.lower()}-gptq.gguf"
        _, rep = write_quantized(ckpt, ref, dest, quant, workdir, imatrix=imatrix, grams=grams, threads=threads)
        try:
            r = evaluate(dest, ref, heldout_text(), ctx=ctx, threads=threads, max_chunks=chunks)
        finally:
            dest.unlink(missing_ok=True)
        rows.append({**score_row("edgellm+gptq", quant, r.size_bytes, r), "gptq": rep.to_dict()})
        _log(f"{quant} + GPTQ: KLD {r.mean_kld:.5f}; {rep.to_dict()}")
    return rows


def run_reference(name: str, ref: Path, workdir: Path, types: list[str], ctx: int, chunks: int, calib_tokens: int,
                  sens_tokens: int, threads: int | None, exclude: str | None, gptq: bool = False,
                  extra_sizes: tuple[int, ...] = (), llama_imatrix: bool = True) -> dict[str, Any]:
    from edgellm.converters.calibrate import input_statistics
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.pipeline import calibration_tokens
    from edgellm.converters.sweep import mixed_options, mixed_rows, sweep

    t0 = time.perf_counter()
    ckpt = read_gguf(ref)
    imatrix, grams = input_statistics(ckpt, calibration_tokens(ref, None, calib_tokens), gram=gptq)

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "calibrate" or done == total:
            _log(f"{name}: {stage} ({done}/{total})")

    rows = sweep(ref, types, ckpt=ckpt, calib_tokens=calib_tokens, ctx=ctx, max_chunks=chunks,
                 workdir=workdir / "candidates", threads=threads, progress=progress, imatrix=imatrix)
    imatrix_route = None
    if llama_imatrix:   # llama.cpp's own route: llama-imatrix, then llama-quantize --imatrix
        from llama_imatrix import imatrix_rows

        more, imatrix_route = imatrix_rows(ref, types, workdir / "llama-imatrix", calib_tokens=calib_tokens, ctx=ctx,
                                           chunks=chunks, threads=threads)
        rows += more
    work = workdir / "candidates"
    options, overhead, n = mixed_options(ckpt, ref, imatrix, calib_text=None, calib_tokens=calib_tokens,
                                         sens_tokens=sens_tokens, workdir=work, threads=threads,
                                         cache=workdir / f"{ref.stem}-options-{calib_tokens}-{sens_tokens}.json",
                                         progress=progress)
    # mixed precision at each anchor's size, for both llama.cpp routes (llama-quantize picks other types for a few
    # tensors when it has an imatrix, so those files can be a little smaller than the preset's)
    anchors = [r for q, _ in ANCHORS for r in rows if r["quant"] == q and r["variant"] in ("llama.cpp",
                                                                                           "llama.cpp+imatrix")]
    sizes: list[int] = []
    for size in sorted({a["bytes"] for a in anchors}):  # one run serves budgets within 0.1 % of each other
        if not sizes or size > sizes[-1] * 1.001:
            sizes.append(size)
    extra = mixed_rows(ref, sizes, options, overhead, n, imatrix, ctx=ctx, max_chunks=chunks, workdir=work,
                       threads=threads, without=exclude) if exclude else []
    for row in mixed_rows(ref, sizes, options, overhead, n, imatrix, ctx=ctx, max_chunks=chunks, workdir=work,
                          threads=threads) + extra:
        rows.append(row)
        _log(f"{name}: mixed at {row['target_bytes'] / 1e6:.1f} MB: KLD {row['mean_kld']:.5f} "
             f"(predicted {row['predicted_kld']:.5f})")
    timing: dict[str, float] = {}
    if gptq:
        t = time.perf_counter()
        rows += gptq_rows(ckpt, ref, types, imatrix, grams, work, ctx, chunks, threads)
        timing["gptq_per_type_rows_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        g_options, g_overhead, g_n = mixed_options(
            ckpt, ref, imatrix, calib_text=None, calib_tokens=calib_tokens, sens_tokens=sens_tokens, workdir=work,
            threads=threads, cache=workdir / f"{ref.stem}-options-gptq-{calib_tokens}-{sens_tokens}.json",
            progress=progress, grams=grams)
        timing["gptq_options_s"] = round(time.perf_counter() - t, 1)
        for row in mixed_rows(ref, sorted(set(sizes) | set(extra_sizes)), g_options, g_overhead, g_n, imatrix,
                              ctx=ctx, max_chunks=chunks, workdir=work, threads=threads, ckpt=ckpt, grams=grams,
                              label="edgellm mixed+gptq", without=exclude):
            rows.append(row)
            _log(f"{name}: mixed+gptq at {row['target_bytes'] / 1e6:.1f} MB: KLD {row['mean_kld']:.5f} "
                 f"(predicted {row['predicted_kld']:.5f})")
    out = {"reference": str(ref), "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
           "per_type": per_type([r for r in rows if r["variant"] in ("edgellm", "llama.cpp")]),
           "targets": targets(rows, exclude=exclude), "timing": timing, "llama_imatrix": imatrix_route}
    if gptq and exclude is None:
        size, bound = GPTQ_BOUND
        fits = [r for r in rows if r["variant"].startswith("edgellm") and r["bytes"] <= size]
        best = min(fits, key=lambda r: r["mean_kld"], default=None)
        out["targets"].append({"what": f"edgellm mean KLD at ≤ {size / 1e6:.0f} MB", "anchor": None, "excluded": None,
                               "budget_bytes": size, "edgellm_type": best and best["quant"],
                               "value": best and best["mean_kld"], "bound": bound,
                               "pass": best is not None and best["mean_kld"] <= bound})
    return out


def run(model: Path, workdir: Path, types: list[str], ctx: int, chunks: int, calib_tokens: int, sens_tokens: int,
        threads: int | None, which: list[str], gptq: bool = False, sizes: tuple[int, ...] = (),
        llama_imatrix: bool = True) -> dict[str, Any]:
    src = source_type(model)
    refs = {"on-grid": lambda: f32_reference(model, workdir), "rotated": lambda: rotated_reference(model, workdir)}
    out: dict[str, Any] = {"model": str(model), "source_type": src,
                           "settings": {"ctx": ctx, "max_chunks": chunks, "scored_tokens": chunks * (ctx // 2 - 1),
                                        "calib_tokens": calib_tokens, "sensitivity_tokens": sens_tokens,
                                        "threads": threads}, "references": {}}
    for name in which:
        out["references"][name] = run_reference(name, refs[name](), workdir, types, ctx, chunks, calib_tokens,
                                                sens_tokens, threads, src if name == "on-grid" else None,
                                                gptq=gptq, extra_sizes=sizes, llama_imatrix=llama_imatrix)
    return out


def markdown(r: dict[str, Any]) -> str:
    """README tables per reference: every row, edgellm's KLD share per type, and each target's verdict."""
    from edgellm.converters.sweep import write_table

    s = r["settings"]
    lines = [f"SmolLM2-135M; {s['scored_tokens']} held-out tokens scored ({s['max_chunks']} chunks of {s['ctx']}); "
             f"importance matrix from {s['calib_tokens']} tokens of the shipped calibration text, sensitivity from "
             f"{s['sensitivity_tokens']}. \"llama.cpp\" = llama-quantize's preset without an imatrix; \"edgellm\" = "
             "the same type with edgellm's imatrix; \"edgellm mixed\" = --target-size at that preset's file size."]
    for name, ref in r["references"].items():
        what = (f"F32 dequantized from the shipped {r['source_type']} file (on its grid)" if name == "on-grid"
                else "the same model with its residual stream randomly rotated (same function, off-grid; "
                     "untied output, hence larger files)")
        lines += ["", f"**Reference {name}**: {what}.", "", write_table(ref["rows"]), "",
                  "| target | bound | measured | |", "|---|---:|---:|---|"]
        for t in ref["targets"]:
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
    ap.add_argument("--sensitivity-tokens", type=int, default=1024,
                    help="calibration tokens for the Fisher (default 1024)")
    ap.add_argument("--references", default="on-grid,rotated", help="on-grid, rotated or both (default)")
    ap.add_argument("--threads", type=int, default=None, help="threads for quantize and eval (default: all)")
    ap.add_argument("--workdir", type=Path, default=OUT / "work", help="cache for the F32 reference and candidates")
    ap.add_argument("--plot", type=Path, default=OUT / "quant_quality.png", help="size-vs-KLD chart (PNG)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON here (default benchmarks/out/quant_quality.json, _gptq.json with --gptq)")
    ap.add_argument("--gptq", action="store_true",
                    help="also GPTQ-rounded types and --target-size with GPTQ options (and at --sizes)")
    ap.add_argument("--sizes", default="95MB", help="extra --target-size budgets with --gptq (default 95MB)")
    ap.add_argument("--no-llama-imatrix", action="store_true",
                    help="skip llama.cpp's own imatrix route (llama-imatrix + llama-quantize --imatrix)")
    ap.add_argument("--markdown", action="store_true",
                    help="print a README-ready Markdown table instead of the JSON (use --out to keep the JSON)")
    args = ap.parse_args(argv)
    from edgellm import store
    from edgellm.converters.sweep import plot

    model = args.model or store.pull(store.DEFAULT_ALIAS, quiet=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from edgellm.converters.mixed import parse_size

    sizes = tuple(parse_size(x) for x in args.sizes.split(",") if x.strip()) if args.gptq else ()
    load = os.getloadavg()
    benchmeta.start()
    result = run(Path(model), args.workdir, args.types.split(","), args.ctx, args.chunks, args.calib_tokens,
                 args.sensitivity_tokens, args.threads, args.references.split(","), gptq=args.gptq, sizes=sizes,
                 llama_imatrix=not args.no_llama_imatrix)
    result["load_average"] = {"start": load, "end": os.getloadavg()}
    for name, ref in result["references"].items():
        png = args.plot.with_name(f"{args.plot.stem}-{name}.png")
        ref["plot"] = str(plot(ref["rows"], png, title=f"SmolLM2-135M, {name} F32 reference: size vs KL divergence"))
        _log(f"chart: {ref['plot']}")
    out = args.out or benchmeta.out_path("quant_quality_gptq" if args.gptq else "quant_quality")
    text = benchmeta.save(result, out, "quant_quality.py", argv)
    print(markdown(result) if args.markdown else text)


if __name__ == "__main__":
    main()
