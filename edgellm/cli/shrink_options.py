"""`edgellm convert --prune-to ... --distill`: prune → distill → quantize in one run (options and the glue)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..userfiles import read_text

from .distill import distill_config, distill_options
from .output import err


def shrink_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--prune-to", "prune_to", default=None, metavar="BUDGET",
                     help="Prune first, to this many parameters (100M) or this ratio (0.7); see `edgellm prune`."),
        click.option("--align", type=int, default=None, help="With --prune-to: cut widths to multiples of this (256)."),
        click.option("--axes", default="depth,ffn,heads,hidden", show_default=True,
                     help="With --prune-to: what may be cut."),
        click.option("--distill", "do_distill", is_flag=True,
                     help="After pruning, distill the student from the source (see `edgellm distill`)."),
        click.option("--teacher", default=None, help="With --distill: the teacher [default: the source]."),
    ]):
        f = opt(f)
    return distill_options(f)


def shrink_transform(source: str, opts: dict[str, Any], *, calib_text: str | None, threads: int | None,
                     report: Callable[[str, int, int], None] | None, notes: dict[str, Any]):
    """The checkpoint transform convert() applies after reading, or None when no shrink option was given."""
    from ..errors import UsageError

    prune_to, do_distill = opts.pop("prune_to"), opts.pop("do_distill")
    align, axes, teacher = opts.pop("align"), opts.pop("axes"), opts.pop("teacher")
    dist = {k: opts.pop(k) for k in ("minutes", "train_tokens", "text_file", "loss", "temperature", "lr", "top_k",
                                     "gen_tokens", "work_dir")}
    if opts:  # pragma: no cover - every option above is consumed
        raise UsageError(f"unexpected options {sorted(opts)}")
    if prune_to is None and not do_distill:
        return None
    cfg = distill_config(dist["minutes"], dist["train_tokens"], dist["loss"], dist["temperature"], dist["lr"], threads)
    if do_distill:
        cfg.check()

    def transform(ckpt):
        from edgellm.converters.distill import distill_model
        from edgellm.converters.prune import prune_model

        if prune_to is not None:
            res = prune_model(ckpt, prune_to, align=align, axes=[a.strip() for a in axes.split(",") if a.strip()],
                              calib_text=calib_text, threads=threads, progress=report)
            notes["prune"] = res.explain(ckpt.config)
            ckpt = res.checkpoint
            err.print(f"pruned: {notes['prune']['n_params_before'] / 1e6:.1f}M → {notes['prune']['n_params'] / 1e6:.1f}M"
                      f" parameters ({res.plan.shape.describe()})")
        if do_distill:
            text = read_text(dist["text_file"], "training text") if dist["text_file"] else None
            ckpt, notes["distill"] = distill_model(ckpt, teacher or source, cfg, text=text, work_dir=dist["work_dir"],
                                                   top_k=dist["top_k"], gen_tokens=dist["gen_tokens"],
                                                   progress=report)
            d = notes["distill"]
            err.print(f"distilled: held-out KLD to the teacher {d['before']['mean_kld']:.4f} → "
                      f"{d['after']['mean_kld']:.4f}, PPL {d['before']['perplexity']:.2f} → "
                      f"{d['after']['perplexity']:.2f} (teacher {d['after']['teacher_perplexity']:.2f})")
        return ckpt

    return transform
