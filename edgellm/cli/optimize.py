"""edgellm optimize: measure the fastest way to run a model on this device within a quality bound."""
from __future__ import annotations

import click

from .options import threads_option
from .output import emit_json, err, out


@click.command("optimize")
@click.argument("model", required=False)
@click.option("--quality", type=click.Choice(["balanced", "lossless"]), default="balanced", show_default=True,
              help="balanced: mean KLD to the source ≤ 0.05 on held-out text; lossless: ≤ 0.005.")
@click.option("--force", is_flag=True, help="Measure again even if a decision for this device is stored.")
@threads_option("CPU threads [default: the device's performance cores, or EDGELLM_THREADS].")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def command(model: str | None, quality: str, force: bool, threads: int | None, as_json: bool) -> None:
    """Build the ways MODEL (a GGUF; default: the embedded SmolLM2-135M) can run here — the file on
    llama.cpp (on a CPU with and without its flash attention), its blocks carried into a fused ONNX graph
    without re-rounding, and (balanced) edgellm's calibrated int4 ONNX export — keep those whose KL divergence
    to the source on held-out text is within the bound, time a shallow and a deep chat turn (time to first
    token, decode) and a long prefill on this device, and store the one that answers whole turns fastest.
    `chat`, `run` and `serve` then use it (--backend pins one; --no-optimize or EDGELLM_OPTIMIZE=0 skips it).

    \b
    Examples:
      edgellm optimize                          # the embedded model, balanced
      edgellm optimize model.gguf --quality lossless --json
    """
    from edgellm.optimize import DEEP_TOKENS, TURN_TOKENS, optimize

    say = (lambda m: err.print(f"[dim]{m}[/dim]")) if err.is_terminal and not as_json else None
    decision = optimize(model, quality=quality, threads=threads, force=force, progress=say)
    if as_json:
        emit_json(decision.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"{decision.source} — quality {decision.quality} (KLD ≤ {decision.kld_bound})")
    for col in ("candidate", "size", "KLD to source", "decode tok/s", f"after {DEEP_TOKENS} tok", "prefill tok/s",
                "TTFT", f"{TURN_TOKENS}-tok turn", "whole turns tok/s", "status"):
        table.add_column(col, justify="left" if col in ("candidate", "status") else "right")

    def fig(v: float | None, f: str) -> str:
        return "—" if v is None else f.format(v)

    for c in decision.candidates:
        table.add_row(c.name, f"{c.size_bytes / 1e6:.1f} MB", fig(c.mean_kld, "{:.4f}"), fig(c.decode_tps, "{:.1f}"),
                      fig(c.deep_decode_tps, "{:.1f}"), fig(c.prefill_tps, "{:.1f}"),
                      fig(c.ttft_s and 1000 * c.ttft_s, "{:.0f} ms"),
                      fig(c.turn_prefill_s and 1000 * c.turn_prefill_s, "{:.0f} ms"),
                      fig(c.conversation_tps or None, "{:.1f}"),
                      "[bold]chosen[/bold]" if c.name == decision.winner else (c.excluded or ""))
    out.print(table)
    err.print(f"[dim]{decision.reason()}; stored for this device and library versions ({decision.seconds:.0f} s)[/dim]")
