"""edgellm plan: will a model fit a board (or this device) at a context size and KV type?"""
from __future__ import annotations

import click

from .output import emit_json, out


@click.command("plan")
@click.argument("model", required=False)
@click.option("--board", "boards", multiple=True,
              help="Board to check (repeatable): zero2w, pi4-2gb, pi4-4gb, pi4-8gb, pi5-4gb, pi5-8gb, pi5-16gb, "
                   "this-device [default: every Pi board and this device].")
@click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size in tokens.")
@click.option("--kv-type", default="f16", show_default=True, help="KV-cache type: f16, q8_0, q4_0, f32.")
@click.option("--parallel", type=int, default=1, show_default=True, help="Server slots, each with a --ctx KV cache.")
@click.option("--server", is_flag=True, help="Add the HTTP server's share (edgellm serve).")
@click.option("--strict", is_flag=True, help="Exit with the out-of-memory code (6) if a board does not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate and the fit per board as JSON.")
def command(model: str | None, boards: tuple[str, ...], n_ctx: int, kv_type: str, parallel: int, server: bool,
            strict: bool, as_json: bool) -> None:
    """Estimate the RAM MODEL needs — weights (mmap'd), KV cache, compute buffers, KV snapshots kept for
    reuse, runtime — and compare it with Raspberry Pi boards or this device. Nothing is loaded: only the
    GGUF header is read. MODEL defaults to the embedded SmolLM2-135M.

    \b
    Examples:
      edgellm plan --board pi4-2gb --ctx 4096
      edgellm plan model.gguf --board zero2w --ctx 8192 --strict
      edgellm plan --json
    """
    from .. import memplan, store

    path = store.resolve(model).path
    est = memplan.estimate(path, n_ctx, kv_type, n_seq=parallel, server=server)
    names = boards or (*memplan.BOARDS, "this-device")
    reports = [memplan.check_fit(est, memplan.board(b)) for b in names]
    if as_json:
        emit_json({"estimate": est.to_dict(), "parts_bytes": est.parts(), "fits": [r.to_dict() for r in reports]})
    else:
        _table(est, reports)
    if strict:
        for r in reports:
            if not r.fits:
                memplan.require_fit(est, memplan.board(r.board))


def _table(est, reports) -> None:
    from rich.table import Table

    from .output import human_bytes

    out.print(f"{est.model} ({est.quant or '?'}, {est.n_params / 1e6:.0f}M params)  ctx {est.n_ctx}  "
              f"KV {est.kv_type}  flash-attn {'on' if est.flash_attn else 'off'}  parallel {est.n_seq}")
    parts = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in ("part", "bytes"):
        parts.add_column(name, justify="right" if name == "bytes" else "left")
    for name, n in est.parts().items():
        parts.add_row(name, human_bytes(n))
    parts.add_row("[bold]total[/bold]", f"[bold]{human_bytes(est.total_bytes)}[/bold]")
    out.print(parts)
    fit = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in ("board", "usable", "needed", "headroom", "fits", "suggestion"):
        fit.add_column(name, justify="right" if name in ("usable", "needed", "headroom") else "left")
    for r in reports:
        fit.add_row(r.board, human_bytes(r.usable_bytes), human_bytes(r.needed_bytes), human_bytes(r.headroom_bytes),
                    "yes" if r.fits else "[red]no[/red]", "; ".join(r.suggestions))
    out.print(fit)
