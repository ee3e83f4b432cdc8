"""edgellm prune: a smaller standard model, cut by calibrated importance to a parameter budget."""
from __future__ import annotations

from pathlib import Path

import click

from ..userfiles import read_text
from .options import threads_option
from .output import emit_json, err, out, stage_progress


@click.command("prune")
@click.argument("source", default="smollm2-135m")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output GGUF file (or directory with --to hf); may be left out with --explain.")
@click.option("--prune-to", "prune_to", required=True, metavar="BUDGET",
              help="Parameters to keep: a count (100M, 1.2B) or a ratio of the source (0.7, 70%).")
@click.option("--align", type=int, default=None,
              help="Cut widths to multiples of this (256 lets llama.cpp's K-quants apply) [default: 64/128 steps].")
@click.option("--axes", default="depth,ffn,heads,hidden", show_default=True,
              help="What may be cut: depth (layers), ffn (neurons), heads (KV groups / query heads), "
                   "hidden (channels).")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text for importance [default: the text shipped with edgellm].")
@click.option("--calib-tokens", type=int, default=2048, show_default=True, help="Tokens that rank the structures.")
@click.option("--score-tokens", type=int, default=512, show_default=True,
              help="Further tokens on which each candidate shape's KL to the source is measured.")
@click.option("--candidates", "max_candidates", type=int, default=12, show_default=True,
              help="Most candidate shapes to score.")
@click.option("--refit/--no-refit", "refit", default=True, show_default=True,
              help="Compensate the cuts: choose neurons/heads/layers by the error left after refitting the "
                   "projections that read them, and refit those by least squares on calibration text.")
@click.option("--refit-tokens", type=int, default=8192, show_default=True,
              help="Calibration tokens the chosen shape is refitted on (candidates are screened on 2,048; never "
                   "the candidate-scoring tokens).")
@click.option("--type", "out_type", default="F16", show_default=True, help="Weights: F32, F16 or BF16.")
@click.option("--to", "to", type=click.Choice(["gguf", "hf"]), default="gguf", show_default=True)
@click.option("--explain", is_flag=True, help="Print the importance ranking, every candidate and the chosen cuts.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@threads_option("torch threads [default: torch's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(source: str, output: Path | None, prune_to: str, align: int | None, axes: str, calib: Path | None,
            calib_tokens: int, score_tokens: int, max_candidates: int, out_type: str, to: str, explain: bool,
            force: bool, threads: int | None, as_json: bool, refit: bool = True, refit_tokens: int = 8192) -> None:
    """Structured pruning: remove whole layers, FFN neurons, attention head groups (query heads go with
    their KV group) and hidden channels. By default each cut is compensated in closed form: neurons and
    heads are chosen by the error left after refitting the projection that reads them (down_proj, o_proj),
    those are refitted by least squares to the source's outputs on calibration text, and the layers whose
    update a fitted linear replacement reproduces best go (--no-refit: importance ranking, sliced weights).
    Several shapes that meet the budget are pruned and scored by KL divergence to the source; the closest
    one is kept.
    The result is a standard (uniform) Llama-family checkpoint: every exporter and runtime loads it.
    Recover quality afterwards with `edgellm distill`.

    \b
    Examples:
      edgellm prune smollm2-135m --prune-to 100M --align 256 -o smollm2-100m.gguf
      edgellm prune smollm2-135m --prune-to 0.75 --axes depth --explain
      edgellm prune ./my-hf-model --prune-to 70% --to hf -o pruned-hf/
    """
    from edgellm.converters.pipeline import read_checkpoint, write_checkpoint
    from edgellm.converters.prune import prune_model

    from .. import store
    from ..errors import UsageError

    if output is None and not explain:
        raise UsageError("missing -o/--output (or pass --explain to only see the plan)")
    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    text = read_text(calib, "calibration text") if calib else None
    with stage_progress(enabled=err.is_terminal and not as_json) as report:
        res = prune_model(ckpt, prune_to, align=align, axes=[a.strip() for a in axes.split(",") if a.strip()],
                          calib_text=text, calib_tokens=calib_tokens, score_tokens=score_tokens,
                          max_candidates=max_candidates, threads=threads, progress=report, refit=refit,
                          refit_tokens=refit_tokens)
        if output is not None:
            write_checkpoint(res.checkpoint, output, to, out_type, report)
    summary = {**res.explain(ckpt.config), "source": str(ref.path), "output": str(output) if output else None,
               "settings": {"prune_to": prune_to, "align": align, "axes": axes, "calib": str(calib or "built-in"),
                            "calib_tokens": calib_tokens, "score_tokens": score_tokens, "type": out_type, "to": to,
                            "refit": refit, "refit_tokens": refit_tokens}}
    if as_json:
        emit_json(summary)
        return
    if explain:
        print_explain(summary)
    s = summary
    err.print(f"{s['n_params_before'] / 1e6:.1f}M → {s['n_params'] / 1e6:.1f}M parameters: "
              f"{res.plan.shape.describe()}; removed layers {s['removed_layers'] or 'none'}")
    err.print(f"[dim]settings: prune_to={prune_to} align={align} axes={axes} calib={calib or 'built-in'} "
              f"calib_tokens={calib_tokens} score_tokens={score_tokens} refit={refit} refit_tokens={refit_tokens} "
              f"type={out_type} to={to}[/dim]")
    if output is not None:
        out.print(str(output))


def print_explain(s: dict) -> None:
    """The ranking and the choice, readable: least influential layers first, candidates best first."""
    infl = s["layer_influence"]
    out.print("[bold]layers[/bold] by block influence (1 - cos(in, out); least important first):")
    out.print("  " + ", ".join(f"{i}: {v:.4f}" for i, v in infl.items()))
    out.print(f"[bold]removed layers[/bold]: {s['removed_layers'] or 'none'}")
    out.print("[bold]KV groups[/bold] per layer (score of each group, summed over its query heads):")
    for i, row in enumerate(s["kv_group_scores"]):
        out.print(f"  layer {i:2d}: " + "  ".join(f"{v:9.3f}" for v in row))
    out.print(f"[bold]FFN[/bold]: kept neurons hold {100 * s['ffn_kept_score_share']:.1f}% of the FFN importance")
    out.print(f"[bold]hidden[/bold]: kept channels hold {100 * s['hidden_kept_score_share']:.1f}% of the channel "
              f"importance; least important channels {s['hidden_least_important']}")
    if s.get("layer_replacement"):
        out.print("[bold]layers[/bold] by what deleting them drops from the stream, plain → after a fitted linear "
                  "replacement (least first):")
        out.print("  " + ", ".join(f"{i}: {a:.4f}→{b:.4f}" for i, (a, b) in s["layer_replacement"].items()))
    if s.get("refit_errors"):
        out.print("[bold]refit[/bold]: relative output error of each refitted projection on calibration tokens, "
                  "plain cut → refitted:")
        by_layer: dict[int, list[str]] = {}
        for f in s["refit_errors"]:
            by_layer.setdefault(f["layer"], []).append(f"{f['what']} {f['before']:.4f}→{f['after']:.4f}")
        for layer, parts in by_layer.items():
            out.print(f"  layer {layer:2d}: " + "  ".join(parts))
        out.print("  mean: " + "  ".join(f"{w} {a:.4f}→{b:.4f}" for w, (a, b) in s["refit_mean_error"].items()))
    if s["candidates"]:
        out.print("[bold]candidates[/bold] (KL to the source on calibration tokens, best first):")
        for c in sorted(s["candidates"], key=lambda c: c["kld"]):
            mark = "→" if c["chosen"] else " "
            out.print(f"  {mark} {c['shape']:<46} {c['n_params'] / 1e6:6.1f}M  KL {c['kld']:.4f}  "
                      f"top-1 {100 * c['top1']:.1f}%")
