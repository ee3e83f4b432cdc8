"""edgellm convert: turn a model into a smaller file for a device."""
from __future__ import annotations

from pathlib import Path

import click

from .output import emit_json, err, human_bytes, out, spinner


@click.command("convert")
@click.argument("source", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output GGUF file (written atomically: nothing appears there until it is complete).")
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="Quantization type: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_0 Q5_1 Q4_K_M Q4_0 Q4_1 IQ4_NL IQ4_XS ...")
@click.option("--threads", type=int, default=None, help="Quantizer threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(source: str, output: Path, quant: str, threads: int | None, as_json: bool) -> None:
    """Quantize a GGUF model (a store alias or a .gguf path) with llama.cpp's own quantizer.

    \b
    Example:
      edgellm convert smollm2-135m -o smollm2-q4_0.gguf --quant Q4_0
    The input is validated before llama.cpp reads it; the summary prints size, bits per weight,
    time and every setting used, so the run can be repeated.
    """
    from edgellm.converters.quantize import ftype_of, quantize

    from .. import store
    from ..errors import UnsupportedModelError

    ftype_of(quant)  # reject a bad type before any work
    ref = store.resolve(source)
    if ref.kind != "gguf":
        raise UnsupportedModelError(f"{ref.path} is a {ref.kind} model; this version converts GGUF sources only")
    src_size = ref.path.stat().st_size
    with spinner(f"quantizing {ref.path.name} → {quant.upper()} …"):
        res = quantize(ref.path, output, quant, threads=threads)
    summary = {"source": str(ref.path), "output": str(res.path), "quant": res.quant, "bytes": res.bytes,
               "source_bytes": src_size, "bits_per_weight": round(res.bits_per_weight, 3),
               "parameters": res.n_params, "seconds": round(res.seconds, 2), "threads": threads or "all"}
    if as_json:
        emit_json(summary)
        return
    err.print(f"{ref.path.name} ({human_bytes(src_size)}) → {res.path} ({human_bytes(res.bytes)}, "
              f"{res.bits_per_weight:.2f} bits/weight, {res.quant}) in {res.seconds:.1f} s")
    out.print(str(res.path))
