"""`edgellm convert --format coreml`: the Core ML branch of the convert verb (kept apart from the GGUF options)."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .output import emit_json, err, human_bytes, out, stage_progress


def convert_coreml_cli(ctx: click.Context, source: str, output: Path, quant: str, context: int | None,
                       calib: Path | None, calib_tokens: int, no_imatrix: bool, force: bool, as_json: bool) -> None:
    """Convert `source` to the Core ML package `output` and print the summary (JSON with --json)."""
    from edgellm.converters.coreml_export import DEFAULT_CTX, convert_to_coreml

    if ctx.get_parameter_source("quant") is click.core.ParameterSource.DEFAULT:
        quant = "auto"  # --quant's GGUF default means nothing to Core ML
    text = read_text(calib, "calibration text") if calib else None
    with stage_progress(enabled=err.is_terminal and not as_json) as report:
        res = convert_to_coreml(source, output, quant=quant, ctx=context, calib_text=text, calib_tokens=calib_tokens,
                                imatrix=not no_imatrix, force=force, progress=report)
    settings = {"format": "coreml", "quant": res.quant, "ctx": res.ctx, "imatrix": not no_imatrix,
                "rounding": res.rounding, "calib": str(calib) if calib else "built-in", "calib_tokens": calib_tokens,
                "default_ctx": DEFAULT_CTX}
    if as_json:
        emit_json({**res.to_dict(), "settings": settings})
        return
    sdpa = res.op_types.get("scaled_dot_product_attention", 0)
    err.print(f"{source} → {res.output}: {human_bytes(res.bytes)}, {res.quant}, {res.ctx}-token KV state "
              f"{res.states.get('keyCache')}, {sdpa} fused attention ops, {res.seconds:.1f} s")
    err.print(f"[dim]beside it: {', '.join(res.side_files)} (what swift-transformers reads)[/dim]")
    err.print("[dim]settings: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "default_ctx")
              + f" (used {res.imatrix_tokens} calibration tokens)[/dim]")
    out.print(res.output)
