"""edgellm eval: how much quality a converted model lost against its reference."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .options import threads_option
from .output import emit_json, err, out


@click.command("eval")
@click.argument("model")
@click.option("--ref", "reference", default=None,
              help="Reference model (e.g. the F32 or F16 GGUF); required unless --sweep.")
@click.option("--sweep", "sweep_types", default=None, metavar="TYPES",
              help="Comma list of types (e.g. Q4_0,IQ4_NL,Q4_K_M,Q5_K_M,Q8_0): quantize MODEL, the F32/F16 "
                   "reference, to each with llama.cpp's presets and with edgellm's calibration, and score both.")
@click.option("--sizes", default=None, metavar="SIZES",
              help="With --sweep: also edgellm's --target-size mixed precision at these file sizes "
                   "(e.g. 92MB,105MB), on the same table and chart.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --sweep: write a size-vs-KLD chart (PNG; needs matplotlib).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --sweep: also write the rows as JSON to this file.")
@click.option("--calib", "calib_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --sweep: calibration text [default: the calibration text shipped with edgellm].")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out text [default: the held-out text shipped with edgellm].")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (the second half is scored).")
@click.option("--chunks", type=int, default=None, help="Score at most this many chunks [default: all].")
@threads_option("CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True)
def command(model: str, reference: str | None, sweep_types: str | None, sizes: str | None, plot_file: Path | None,
            out_file: Path | None, calib_file: Path | None, text_file: Path | None, ctx: int,
            chunks: int | None, threads: int | None, as_json: bool) -> None:
    """Perplexity, mean and p99 KL divergence to a reference, top-1 agreement, size and bits per
    weight. Use text the model was not calibrated on.

    \b
    Examples:
      edgellm eval smollm2-q4_0.gguf --ref smollm2-f32.gguf
      edgellm eval smollm2-f32.gguf --sweep Q4_0,IQ4_NL,Q4_K_M,Q5_K_M,Q8_0 --plot sweep.png --chunks 4
      edgellm eval smollm2-f32.gguf --sweep IQ4_NL,Q4_K_M --sizes 92MB,105MB --plot sweep.png
    """
    from edgellm.converters.evaluate import evaluate

    from .. import store
    from ..errors import UsageError
    from ..texts import heldout_text

    if sweep_types is not None:
        if reference:
            raise UsageError("--ref is not used with --sweep: MODEL itself is the reference (an F32 or F16 GGUF)")
        _sweep(model, sweep_types, sizes, plot_file, out_file, calib_file, text_file, ctx, chunks, threads, as_json)
        return
    if reference is None:
        raise UsageError("missing --ref REF: the reference model to compare against (e.g. the F32 GGUF), "
                         "or use --sweep TYPES to quantize MODEL and compare")
    for flag, value in (("--plot", plot_file), ("--out", out_file), ("--calib", calib_file), ("--sizes", sizes)):
        if value is not None:
            raise UsageError(f"{flag} goes with --sweep")
    text = read_text(text_file, "text") if text_file else heldout_text()
    m, r = store.resolve(model).path, store.resolve(reference).path
    progress = None
    if err.is_terminal and not as_json:
        def progress(done: int, total: int) -> None:
            err.print(f"\rchunk {done}/{total}", end="")
    res = evaluate(m, r, text, ctx=ctx, threads=threads, max_chunks=chunks, progress=progress)
    if as_json:
        emit_json(res.to_dict())
        return
    err.print()
    out.print(f"model      {res.model}\nreference  {res.reference}\n"
              f"size       {res.size_bytes / 2**20:.1f} MiB, {res.bits_per_weight:.2f} bits/weight\n"
              f"PPL        {res.perplexity:.3f} (reference {res.ref_perplexity:.3f})\n"
              f"KLD        mean {res.mean_kld:.5f}, p99 {res.p99_kld:.5f}\n"
              f"top-1      {100 * res.top1_agreement:.2f}% agreement over {res.tokens_scored} tokens")


def _sweep(model: str, types: str, sizes: str | None, plot_file: Path | None, out_file: Path | None,
           calib_file: Path | None,
           text_file: Path | None, ctx: int, chunks: int | None, threads: int | None, as_json: bool) -> None:
    """`eval --sweep`: the candidates are quantized into a temporary folder that is removed afterwards."""
    import json
    import tempfile

    from edgellm.converters.mixed import parse_size
    from edgellm.converters.sweep import plot, sweep, sweep_types, write_table

    from .. import store

    kinds = sweep_types(types.split(","))  # a typo fails now, not after calibration
    targets = [parse_size(x) for x in sizes.split(",") if x.strip()] if sizes else []
    if plot_file is not None:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            from ..errors import UsageError
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    ref = store.resolve(model).path
    calib = read_text(calib_file, "calibration text") if calib_file else None
    text = read_text(text_file, "text") if text_file else None
    progress = None
    if err.is_terminal:
        def progress(stage: str, done: int, total: int) -> None:
            err.print(f"\r\x1b[K{stage} {done}/{total}", end="")
    with tempfile.TemporaryDirectory(prefix="edgellm-sweep-") as work:
        rows = sweep(ref, kinds, calib_text=calib, text=text, ctx=ctx, max_chunks=chunks, workdir=Path(work),
                     threads=threads, progress=progress, sizes=targets)
    if progress:
        err.print()
    if out_file:
        out_file.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if plot_file:
        err.print(f"plot: {plot(rows, plot_file, title=f'{Path(ref).name}: size vs KL divergence')}")
    if as_json:
        emit_json(rows)
    else:
        out.print(write_table(rows))
