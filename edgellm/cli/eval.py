"""edgellm eval: how much quality a converted model lost against its reference."""
from __future__ import annotations

from pathlib import Path

import click

from .output import emit_json, err, out


@click.command("eval")
@click.argument("model")
@click.option("--ref", "reference", required=True, help="Reference model (e.g. the F32 or F16 GGUF).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out text [default: the held-out text shipped with edgellm].")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (the second half is scored).")
@click.option("--chunks", type=int, default=None, help="Score at most this many chunks [default: all].")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
def command(model: str, reference: str, text_file: Path | None, ctx: int, chunks: int | None,
            threads: int | None, as_json: bool) -> None:
    """Perplexity, mean and p99 KL divergence to a reference, top-1 agreement, size and bits per
    weight. Use text the model was not calibrated on.

    \b
    Example:
      edgellm eval smollm2-q4_0.gguf --ref smollm2-f32.gguf
    """
    from edgellm.converters.evaluate import evaluate

    from .. import store
    from ..texts import heldout_text

    text = text_file.read_text(encoding="utf-8") if text_file else heldout_text()
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
