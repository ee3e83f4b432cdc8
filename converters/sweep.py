"""Quality sweep: llama.cpp's presets against edgellm's calibrated quantization, type by type.

Every type is quantized twice from the same reference: "llama.cpp" is what llama-quantize gives
without an importance matrix (the obvious alternative users would run by hand), "edgellm" passes
the importance matrix edgellm computes from calibration text. Both are scored against the
reference on held-out text, so the two series on one size-vs-KLD chart show what calibration buys.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgellm.errors import UsageError

from .checkpoint import Checkpoint
from .evaluate import evaluate
from .pipeline import FLOAT_TYPES, Progress, calibration_imatrix, write_quantized
from .quantize import ftype_of, quantize

VARIANTS = ("llama.cpp", "edgellm")


def sweep_types(types: Sequence[str]) -> list[str]:
    """Validated, upper-cased, de-duplicated quantized types (checked before any slow work starts)."""
    out: list[str] = []
    for t in types:
        key = t.strip().upper()
        if not key:
            continue
        ftype_of(key)
        if key in FLOAT_TYPES:
            raise UsageError(f"{key} is not quantized, so it has no calibrated variant; sweep quantized types "
                             "(e.g. Q4_0,IQ4_NL,Q4_K_M,Q5_K_M,Q8_0) against an F32/F16 reference")
        if key not in out:
            out.append(key)
    if not out:
        raise UsageError("--sweep needs at least one quantization type, e.g. Q4_0,Q4_K_M,Q8_0")
    return out


def sweep(reference_f32: Path, types: Sequence[str], *, ckpt: Checkpoint | None = None, calib_text: str | None = None,
          calib_tokens: int = 2048, text: str | None = None, ctx: int = 512, max_chunks: int | None = 4,
          workdir: Path, threads: int | None = None, keep: bool = False,
          progress: Progress | None = None, imatrix: dict | None = None, sizes: Sequence[int] = (),
          sens_tokens: int = 1024) -> list[dict]:
    """Quantize `reference_f32` to each type with and without edgellm's importance matrix and score both.

    The imatrix is computed once (from `calib_text`, default: the shipped calibration text) on `ckpt`
    (default: the checkpoint read from the reference) and reused for every type. Quantized files go to
    `workdir` and are deleted after scoring unless `keep`, so disk use stays at one candidate.
    Returns one row per (type, variant): variant, quant, bytes, bpw, ppl, mean_kld, p99_kld, top1.
    `sizes` (bytes) adds an "edgellm mixed" row per size: --target-size's per-tensor recipe for it.
    """
    from edgellm.texts import heldout_text

    types = sweep_types(types)
    reference_f32 = Path(reference_f32)
    if ckpt is None:
        from .gguf_source import read_gguf
        ckpt = read_gguf(reference_f32)
    text = heldout_text() if text is None else text
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if imatrix is None:
        imatrix, _ = calibration_imatrix(ckpt, reference_f32, calib_text, calib_tokens, progress)
    rows: list[dict] = []
    total = 2 * len(types)
    for quant in types:
        for variant in VARIANTS:
            if progress:
                progress(f"{quant} {variant}", len(rows), total)
            dest = workdir / f"{quant.lower()}-{variant.replace('.', '_')}.gguf"
            q = quantize(reference_f32, dest, quant, threads=threads,
                         imatrix=imatrix if variant == "edgellm" else None)
            try:
                r = evaluate(q.path, reference_f32, text, ctx=ctx, threads=threads, max_chunks=max_chunks)
            finally:
                if not keep:
                    q.path.unlink(missing_ok=True)
            rows.append(score_row(variant, quant, q.bytes, r))
    if sizes:
        options, overhead, n = mixed_options(ckpt, reference_f32, imatrix, calib_text=calib_text,
                                             calib_tokens=calib_tokens, sens_tokens=sens_tokens, workdir=workdir,
                                             threads=threads, progress=progress)
        rows += mixed_rows(reference_f32, sizes, options, overhead, n, imatrix, text=text, ctx=ctx,
                           max_chunks=max_chunks, workdir=workdir, threads=threads)
    if progress:
        progress("done", total, total)
    return rows


def mixed_options(ckpt: Checkpoint, ref: Path, imatrix: dict, *, calib_text: str | None, calib_tokens: int,
                  sens_tokens: int, workdir: Path, threads: int | None = None, cache: Path | None = None,
                  progress: Progress | None = None, grams: dict | None = None):
    """--target-size's per-tensor options (Fisher + one llama.cpp run per type, and GPTQ's with `grams`);
    reused from `cache` if newer."""
    import json

    from .mixed import Option, measure_options
    from .pipeline import calibration_tokens
    from .sensitivity import fisher_diagonals

    digest = _digest(imatrix) + ("+gptq" if grams else "")   # the candidates were made with this calibration
    if cache is not None and cache.exists() and cache.stat().st_mtime > Path(ref).stat().st_mtime:
        data = json.loads(cache.read_text())
        if data.get("imatrix") == digest:
            return {n: [Option(*o) for o in v] for n, v in data["options"].items()}, data["overhead"], data["tokens"]
    tokens = calibration_tokens(ref, calib_text, calib_tokens)[:sens_tokens]
    fisher, n = fisher_diagonals(ckpt, tokens, threads=threads,
                                 progress=None if progress is None else lambda d, t: progress("sensitivity", d, t))
    options, overhead = measure_options(ckpt, ref, fisher, n, imatrix, workdir, threads=threads, progress=progress,
                                        grams=grams)
    for f in workdir.glob("candidate-*.gguf"):
        f.unlink()
    if cache is not None:
        cache.write_text(json.dumps({"options": {k: [[o.type, o.bytes, o.cost, o.rounding] for o in v]
                                                 for k, v in options.items()},
                                     "overhead": overhead, "tokens": n, "imatrix": digest}))
    return options, overhead, n


def _digest(imatrix: dict) -> str:
    import hashlib
    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode())
        h.update(np.ascontiguousarray(imatrix[name], np.float32).tobytes())
    return h.hexdigest()


def mixed_rows(ref: Path, sizes: Sequence[int], options, overhead: int, n_tokens: int, imatrix: dict, *,
               text: str | None = None, ctx: int = 512, max_chunks: int | None = 4, workdir: Path,
               threads: int | None = None, without: str | None = None, ckpt: Checkpoint | None = None,
               grams: dict | None = None, label: str = "edgellm mixed") -> list[dict]:
    """One "edgellm mixed" row per target size: plan, quantize with the per-tensor types, score.

    `without`: leave that type out of every tensor's options (e.g. the grid a reference lies on).
    GPTQ options (when `options` has them) need `ckpt` and `grams` to write their blocks."""
    from edgellm.texts import heldout_text

    from .mixed import plan

    if without:
        options = {n: [o for o in opts if o.type != without] for n, opts in options.items()}
    rows = []
    for size in sizes:
        recipe = plan(options, overhead, size, n_tokens)
        dest = Path(workdir) / f"mixed-{size}.gguf"
        write_quantized(ckpt, ref, dest, recipe.label, Path(workdir), imatrix=imatrix, overrides=recipe.types,
                        grams=grams if recipe.gptq else None, only=set(recipe.gptq), threads=threads)
        try:
            r = evaluate(dest, ref, heldout_text() if text is None else text, ctx=ctx, threads=threads,
                         max_chunks=max_chunks)
        finally:
            dest.unlink(missing_ok=True)
        name = f"mixed {size / 1e6:.1f}MB" + (f" no {without}" if without else "")
        rows.append({**score_row(label, name, r.size_bytes, r),
                     "target_bytes": size, "predicted_kld": recipe.predicted_kld, "types": recipe.histogram()})
    return rows


def score_row(variant: str, quant: str, nbytes: int, r) -> dict:
    """One table row from an EvalResult."""
    return {"variant": variant, "quant": quant, "bytes": nbytes, "bpw": round(r.bits_per_weight, 4),
            "ppl": r.perplexity, "mean_kld": r.mean_kld, "p99_kld": r.p99_kld, "top1": r.top1_agreement}


def kld_ratios(rows: Sequence[dict]) -> dict[str, float]:
    """edgellm mean KLD / llama.cpp mean KLD per type (the same type gives the same size either way)."""
    by = {(r["quant"], r["variant"]): r["mean_kld"] for r in rows}
    return {q: by[(q, "edgellm")] / by[(q, "llama.cpp")] for q, v in by if v == "edgellm"
            and by.get((q, "llama.cpp"), 0) > 0}


def write_table(rows: Sequence[dict]) -> str:
    """A Markdown table, smallest file first; edgellm rows carry their KLD relative to llama.cpp's."""
    ratios = kld_ratios(rows)
    lines = ["| type | variant | size (MB) | bits/weight | PPL | mean KLD | p99 KLD | top-1 | KLD vs llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["bytes"], r["quant"], r["variant"])):
        ratio = f"{ratios[r['quant']]:.2f}×" if r["variant"] == "edgellm" and r["quant"] in ratios else ""
        lines.append(f"| {r['quant']} | {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} "
                     f"| {r['mean_kld']:.5f} | {r['p99_kld']:.4f} | {100 * r['top1']:.2f}% | {ratio} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Size (MB) vs mean KLD (log scale), one labelled series per variant, each point named by its type."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plotting the sweep needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(8, 5), dpi=120)  # a bare Figure on Agg: no pyplot, no global backend switch
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"llama.cpp": ("tab:gray", "s", "llama.cpp presets (llama-quantize, no imatrix)"),
              "edgellm": ("tab:blue", "o", "edgellm (calibrated importance matrix)"),
              "edgellm mixed": ("tab:red", "*", "edgellm --target-size (per-tensor types)"),
              "edgellm+gptq": ("tab:green", "D", "edgellm + GPTQ rounding (same types)"),
              "edgellm mixed+gptq": ("tab:purple", "P", "edgellm --target-size with GPTQ options")}
    for variant in styles:
        pts = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["bytes"])
        if not pts:
            continue
        color, marker, label = styles[variant]
        xs, ys = [r["bytes"] / 1e6 for r in pts], [r["mean_kld"] for r in pts]
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        side = -1 if variant == "llama.cpp" else 1  # edgellm's names right of its points, llama.cpp's left
        span = (max(r["bytes"] for r in rows) - min(r["bytes"] for r in rows)) / 1e6 or 1.0
        stack, prev = 0, None
        for r, x, y in zip(pts, xs, ys):
            # near-equal sizes crowd one spot: shift their names 0, +8, -8, +16 … points vertically
            stack = stack + 1 if prev is not None and x - prev < 0.03 * span else 0
            prev = x
            ax.annotate(r["quant"], (x, y), textcoords="offset points", fontsize=7, color=color,
                        xytext=(6 * side, (-1) ** stack * 8 * ((stack + 1) // 2) - 3),
                        ha="left" if side > 0 else "right")
    ax.set_yscale("log")
    ax.margins(x=0.07)  # room for the outermost names
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence to the reference (log)")
    ax.set_title(title or "Size vs quality: llama.cpp presets and edgellm")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["VARIANTS", "kld_ratios", "mixed_options", "mixed_rows", "plot", "score_row", "sweep", "sweep_types",
           "write_table"]
