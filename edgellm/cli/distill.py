"""edgellm distill: a (pruned) student learns a teacher's next-token distribution, on the CPU with torch."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .options import distill_config, distill_options, threads_option
from .output import emit_json, err, out, training_bar


@click.command("distill")
@click.argument("student")
@click.option("--teacher", default="smollm2-135m", show_default=True, help="The model to learn from (same tokenizer).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output GGUF file (or directory with --to hf).")
@distill_options
@click.option("--type", "out_type", default="F16", show_default=True, help="Weights: F32, F16 or BF16.")
@click.option("--to", "to", type=click.Choice(["gguf", "hf"]), default="gguf", show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the held-out evaluation before and after.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@threads_option("torch and llama.cpp threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(student: str, teacher: str, output: Path, minutes: float | None, train_tokens: int | None,
            text_file: Path | None, loss: str, temperature: float, lr: float, top_k: int, gen_tokens: int,
            work_dir: Path | None, device: str, out_type: str, to: str, no_eval: bool, force: bool,
            threads: int | None, as_json: bool) -> None:
    """Distillation: STUDENT (e.g. from `edgellm prune`) is trained (on a CUDA GPU in bf16 when torch sees
    one, else on the CPU; --device) to match the TEACHER's
    next-token distribution (forward KL with temperature; --loss rkl/skl for reverse or skew KL). The
    teacher's top-k logits are computed once, in float32 with torch, and cached. Without --text, the training
    text is the calibration text plus --gen-tokens of continuations the teacher samples (sequence-level KD);
    the held-out evaluation text is never trained on. One sequence in 20 (at most 8) is held back and the
    weights where its loss was lowest are the ones written. Interrupted runs resume from the last saved step
    when the same command is run again. Perplexity and KL to the teacher on held-out text are reported
    before and after.

    \b
    Examples:
      edgellm prune smollm2-135m --prune-to 100M -o s.gguf && edgellm distill s.gguf -o s-kd.gguf --minutes 40
      edgellm distill s.gguf -o s-kd.gguf --text my-corpus.txt --tokens 500000 --loss skl
    """
    from edgellm.converters.distill import distill_model
    from edgellm.converters.pipeline import read_checkpoint, write_checkpoint

    from .. import store
    from ..errors import UsageError

    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    cfg = distill_config(minutes, train_tokens, loss, temperature, lr, threads, device)
    cfg.check()
    ref = store.resolve(student)
    ckpt = read_checkpoint(ref.path, ref.kind)
    text = read_text(text_file, "training text") if text_file else None
    with training_bar(err.is_terminal and not as_json) as (stage, step):
        trained, report = distill_model(ckpt, teacher, cfg, text=text, work_dir=work_dir, top_k=top_k,
                                        gen_tokens=gen_tokens, evaluate=not no_eval, progress=stage, on_step=step)
        write_checkpoint(trained, output, to, out_type)
    report = {**report, "student": str(ref.path), "output": str(output),
              "settings": {"minutes": cfg.minutes, "tokens": cfg.tokens, "loss": loss, "temperature": temperature,
                           "lr": lr, "top_k": top_k, "gen_tokens": gen_tokens, "text": str(text_file or "default"),
                           "type": out_type, "to": to, "device": report["training"]["device"]}}
    if as_json:
        emit_json(report)
        return
    tr = report["training"]
    err.print(f"trained {tr['steps']} steps, {tr['tokens']} tokens in {tr['seconds'] / 60:.1f} min "
              f"(loss {tr['first_loss']:.4f} → {tr['last_loss']:.4f}; resumed from step {tr['resumed_from_step']})")
    if tr.get("best_step") is not None:
        curve = tr["val_curve"]
        best = min(v for _, v in curve)
        err.print(f"held-back loss {curve[0][1]:.4f} → {best:.4f}, lowest at step {tr['best_step']} of {tr['steps']}: "
                  "those weights are written")
    for when in ("before", "after"):
        if when in report:
            r = report[when]
            err.print(f"{when:<6} held-out PPL {r['perplexity']:.3f} (teacher {r['teacher_perplexity']:.3f}), "
                      f"KLD to teacher {r['mean_kld']:.4f}, top-1 {100 * r['top1_agreement']:.1f}%")
    err.print(f"[dim]settings: {' '.join(f'{k}={v}' for k, v in report['settings'].items())}[/dim]")
    out.print(str(output))
