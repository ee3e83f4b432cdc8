"""edgellm convert: turn a model into a smaller file for a device."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .options import shrink_options, shrink_plan, threads_option
from .output import emit_json, err, human_bytes, out, stage_progress


@click.command("convert")
@click.argument("source", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output GGUF file (or directory with --to hf); nothing appears there until it is complete.")
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_0 Q5_1 Q4_K_M Q4_0 Q4_1 IQ4_NL IQ4_XS (and Q4_K_S Q5_K_S Q3_K_M "
                   "Q3_K_S Q2_K), or auto with --target-size/--target-bpw.")
@click.option("--target-size", default=None, metavar="SIZE",
              help="Mixed precision: the best type per tensor (by measured sensitivity) for a file of at most SIZE "
                   "(e.g. 90MB, 92.5MiB); the recipe is saved as OUTPUT.recipe.json.")
@click.option("--target-bpw", type=float, default=None, metavar="BITS",
              help="Mixed precision for an average of BITS bits per weight (e.g. 4.6).")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reapply a saved *.recipe.json (same model) instead of measuring again.")
@click.option("--eval", "do_eval", is_flag=True,
              help="Score the result against its source on held-out text (mean/p99 KLD, PPL, top-1).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx", "coreml"]), default="gguf", show_default=True,
              help="gguf (llama.cpp), or onnx: a directory for onnxruntime (--quant int4 int4-mixed int8 f16 f32 "
                   "auto), or coreml: a stateful OUT.mlpackage for Apple devices (--quant int4 int8 f16 palette4 "
                   "auto).")
@click.option("--ctx", "context", type=int, default=None,
              help="Core ML: tokens the package's KV state holds [default: 2048, or the model's context if shorter].")
@click.option("--flavour", type=click.Choice(["fused", "portable"]), default="fused", show_default=True,
              help="ONNX graph: fused (onnxruntime contrib ops; CPU/XNNPACK) or portable (standard ops; NNAPI).")
@click.option("--to", "to", type=click.Choice(["gguf", "hf"]), default="gguf", show_default=True,
              help="Output format: a GGUF file, or a Hugging Face directory (safetensors + tokenizer.json).")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text for the importance matrix [default: the text shipped with edgellm].")
@click.option("--calib-tokens", type=int, default=None,
              help="Calibration tokens to use [default: 2048 for GGUF, 4096 for ONNX].")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix (like plain llama-quantize).")
@click.option("--gptq/--no-gptq", "gptq", default=None,
              help="GGUF: also round blocks with GPTQ from the calibration Gram matrices and keep, per tensor, the "
                   "lower measured output error [default: on with --target-size/--target-bpw/--recipe, off for a "
                   "preset].")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@threads_option("Quantizer threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@shrink_options
def command(source: str, output: Path, quant: str, target_size: str | None, target_bpw: float | None,
            recipe: Path | None, do_eval: bool, fmt: str, context: int | None, flavour: str, to: str,
            calib: Path | None,
            calib_tokens: int | None,
            no_imatrix: bool, force: bool, threads: int | None, as_json: bool, gptq: bool | None = None,
            **shrink) -> None:
    """Convert a model — a Hugging Face directory (Llama, SmolLM2, Qwen2, Mistral) or a GGUF file
    (dequantized, then requantized) — into a quantized GGUF, or a GGUF back into a HF directory.

    Quantized types are made by llama.cpp's own quantizer, guided by an importance matrix that
    edgellm computes on calibration text with its reference forward pass.

    \b
    Examples:
      edgellm convert smollm2-135m -o smollm2-q4km.gguf              # defaults: Q4_K_M, imatrix on
      edgellm convert ./my-hf-model -o model-q8.gguf --quant Q8_0
      edgellm convert smollm2-135m --to hf -o smollm2-hf/            # GGUF → HF (F32 safetensors)
      edgellm convert smollm2-135m -o small.gguf --target-size 92MB --eval   # mixed precision under 92 MB
      edgellm convert smollm2-135m --format onnx -o smollm2-onnx/     # fused graph, calibrated int4
      edgellm convert smollm2-135m --format onnx --flavour portable -o smollm2-nnapi/   # NNAPI-ready, f16
      edgellm convert smollm2-135m --format coreml -o smollm2.mlpackage  # stateful Core ML, calibrated int4
      edgellm convert smollm2-135m -o s.gguf --prune-to 100M --align 256 --distill --minutes 40   # prune+distill+Q4_K_M
    """
    if fmt != "gguf" and (shrink["prune_to"] or shrink["do_distill"]):
        from ..errors import UsageError
        raise UsageError("--prune-to/--distill currently go with --format gguf")
    if context is not None and fmt != "coreml":
        from ..errors import UsageError
        raise UsageError("--ctx goes with --format coreml (a GGUF or ONNX model takes its context at load time)")
    if fmt == "coreml":
        from .coreml_convert import convert_coreml_cli
        return convert_coreml_cli(click.get_current_context(), source, output, quant, context, calib,
                                  calib_tokens or 4096, no_imatrix, force, as_json)
    if fmt == "onnx":
        from .onnx_convert import convert_onnx_cli
        return convert_onnx_cli(click.get_current_context(), source, output, quant, flavour, calib,
                                calib_tokens or 4096, no_imatrix, force, as_json)
    from edgellm.converters.mixed import parse_size, recipe_path
    from edgellm.converters.pipeline import convert
    from edgellm.texts import heldout_text

    from ..errors import UsageError

    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    calib_tokens = calib_tokens or 2048
    text = read_text(calib, "calibration text") if calib else None
    with stage_progress(enabled=err.is_terminal and not as_json) as report:
        notes: dict = {}
        plan = shrink_plan(source, shrink, threads)
        transform = None
        if plan.active:
            from edgellm.converters.shrink import shrink as shrink_checkpoint

            def transform(ckpt):
                return shrink_checkpoint(ckpt, source, plan, calib_text=text, threads=threads, progress=report,
                                         notes=notes, say=err.print)
        res = convert(source, output, quant=quant, to=to, calib_text=text, imatrix=not no_imatrix,
                      calib_tokens=calib_tokens, threads=threads, progress=report,
                      target_size=parse_size(target_size) if target_size else None, target_bpw=target_bpw,
                      recipe=recipe, eval_text=heldout_text() if do_eval else None, transform=transform, gptq=gptq)
    summary = {**res.to_dict(), **notes, "settings": {"quant": quant.upper(), "to": to, "imatrix": not no_imatrix,
                                             "calib": str(calib) if calib else "built-in", "calib_tokens": calib_tokens,
                                             "threads": threads or "all",
                                             "gptq": "auto" if gptq is None else gptq}}
    if as_json:
        emit_json(summary)
        return
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.stages.items())
    err.print(f"{Path(res.source).name} → {res.output}: {human_bytes(res.bytes)}, {res.bits_per_weight:.2f} bits/weight"
              f"{', ' + res.quant if res.quant else ''}, {res.seconds:.1f} s ({stages})")
    err.print(f"[dim]settings: quant={quant.upper()} to={to} imatrix={not no_imatrix} "
              f"calib={calib or 'built-in'} calib_tokens={calib_tokens} (used {res.imatrix_tokens})[/dim]")
    if res.gptq:
        g = res.gptq
        err.print(f"GPTQ: {g['tensors_gptq']} tensors rounded by edgellm, {g['tensors_llama_cpp']} kept llama.cpp's "
                  f"blocks; summed output error {g['error_ratio']:.2f}× llama.cpp's ({g['seconds']:.1f} s)")
    if res.fallbacks:
        n = sum(res.fallbacks.values())
        err.print(f"[yellow]note:[/yellow] {n} tensors have rows that are not a multiple of 256, so {res.quant}'s "
                  "K-quant blocks do not fit them; llama.cpp used " + ", ".join(f"{t} ×{k}" for t, k in
                                                                              res.fallbacks.items()) + " instead")
    if res.recipe:
        err.print("[dim]types per tensor: " + ", ".join(f"{t} ×{n}" for t, n in res.recipe.items())
                  + f" (recipe: {recipe_path(output)})[/dim]")
    if res.evaluation:
        e = res.evaluation
        err.print(f"eval vs source on held-out text ({e['tokens_scored']} tokens): mean KLD {e['mean_kld']:.5f}, "
                  f"p99 KLD {e['p99_kld']:.4f}, top-1 {100 * e['top1_agreement']:.1f}%, PPL {e['perplexity']:.3f} "
                  f"(source {e['ref_perplexity']:.3f})")
    out.print(res.output)
