"""Prune, then distill: the shrinking chain `edgellm convert --prune-to ... --distill` runs before quantizing.

A library function so the Python API can call the same chain the CLI does; `notes` collects what each
step reports (the prune explanation, the distillation before/after figures) for the convert summary.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distill import DistillConfig


@dataclass(frozen=True)
class ShrinkPlan:
    """What to do: prune to `prune_to` (a count like '100M' or a ratio), then optionally distill."""

    prune_to: str | None = None
    align: int | None = None
    axes: Sequence[str] = ("depth", "ffn", "heads", "hidden")
    distill: DistillConfig | None = None
    teacher: str | None = None          # default: the source itself
    text: str | None = None             # distillation text (default: calibration text + teacher generations)
    work_dir: Path | None = None
    top_k: int = 32
    gen_tokens: int = 16384

    @property
    def active(self) -> bool:
        return self.prune_to is not None or self.distill is not None


def shrink(ckpt, source: str, plan: ShrinkPlan, *, calib_text: str | None = None, threads: int | None = None,
           progress: Callable[[str, int, int], None] | None = None, notes: dict[str, Any] | None = None,
           say: Callable[[str], None] = lambda _m: None):
    """The checkpoint after pruning and/or distillation (unchanged when the plan does nothing)."""
    from .distill import distill_model
    from .prune import prune_model

    notes = notes if notes is not None else {}
    if plan.prune_to is not None:
        res = prune_model(ckpt, plan.prune_to, align=plan.align, axes=list(plan.axes), calib_text=calib_text,
                          threads=threads, progress=progress)
        notes["prune"] = res.explain(ckpt.config)
        ckpt = res.checkpoint
        say(f"pruned: {notes['prune']['n_params_before'] / 1e6:.1f}M → {notes['prune']['n_params'] / 1e6:.1f}M "
            f"parameters ({res.plan.shape.describe()})")
    if plan.distill is not None:
        ckpt, notes["distill"] = distill_model(ckpt, plan.teacher or source, plan.distill, text=plan.text,
                                               work_dir=plan.work_dir, top_k=plan.top_k,
                                               gen_tokens=plan.gen_tokens, progress=progress)
        d = notes["distill"]
        say(f"distilled: held-out KLD to the teacher {d['before']['mean_kld']:.4f} → {d['after']['mean_kld']:.4f}, "
            f"PPL {d['before']['perplexity']:.2f} → {d['after']['perplexity']:.2f} "
            f"(teacher {d['after']['teacher_perplexity']:.2f})")
    return ckpt
