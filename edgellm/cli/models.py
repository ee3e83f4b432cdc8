"""edgellm models: list what is in the store."""
from __future__ import annotations

import click

from .output import emit_json, human_bytes, out


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def command(as_json: bool) -> None:
    """List local models with size, type, architecture and quantization.

    \b
    Example:
      edgellm models --json
    """
    from rich.table import Table

    from .. import store

    models = store.list_models()
    if as_json:
        emit_json([{"name": m.name, "path": str(m.path), "size": m.size, "type": m.kind, "architecture": m.architecture,
                    "quantization": m.quant, "parameters": m.n_params, "problem": m.problem} for m in models])
        return
    if not models:
        out.print(f"no models in {store.models_dir()} — try: edgellm pull {store.DEFAULT_ALIAS}")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "SIZE", "TYPE", "ARCH", "QUANT", "PARAMS", "PATH"):
        table.add_column(col)
    for m in models:
        params = f"{m.n_params / 1e6:.1f}M" if m.n_params else "-"
        table.add_row(m.name, human_bytes(m.size), m.kind, m.architecture or "-", m.quant or (m.problem or "-"),
                      params, str(m.path))
    out.print(table)
