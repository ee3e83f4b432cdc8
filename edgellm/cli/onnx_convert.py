"""`edgellm convert --format onnx`: the ONNX branch of the convert verb (kept apart from the GGUF options)."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .output import emit_json, err, human_bytes, out, stage_progress


def convert_onnx_cli(ctx: click.Context, source: str, output: Path, quant: str, flavour: str, calib: Path | None,
                     calib_tokens: int, no_imatrix: bool, force: bool, as_json: bool) -> None:
    from edgellm.converters.onnx_export import convert_to_onnx

    from ..errors import UsageError

    if ctx.get_parameter_source("quant") is click.core.ParameterSource.DEFAULT:
        quant = "auto"  # --quant's GGUF default means nothing to ONNX
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    text = read_text(calib, "calibration text") if calib else None
    with stage_progress(enabled=err.is_terminal and not as_json) as report:
        res = convert_to_onnx(source, output, flavour=flavour, quant=quant, calib_text=text,
                              calib_tokens=calib_tokens, imatrix=not no_imatrix, progress=report)
    settings = {"format": "onnx", "flavour": res.flavour, "quant": res.quant, "imatrix": not no_imatrix,
                "sensitivity": res.sensitivity, "rounding": res.rounding, "calib": str(calib) if calib else "built-in",
                "calib_tokens": calib_tokens}
    if as_json:
        emit_json({**res.to_dict(), "settings": settings})
        return
    eight = sum(1 for b in res.bits.values() if b == 8)
    mix = f", {eight} of {len(res.bits)} matrices 8-bit" if res.bits and res.quant == "int4-mixed" else ""
    err.print(f"{source} → {res.output}: {human_bytes(res.bytes)}, {res.flavour} graph of {res.nodes} nodes, "
              f"{res.quant}{mix}, {res.seconds:.1f} s")
    err.print("[dim]settings: " + " ".join(f"{k}={v}" for k, v in settings.items())
              + f" (used {res.imatrix_tokens} calibration tokens)[/dim]")
    out.print(res.output)
