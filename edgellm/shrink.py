"""`edgellm.prune` and `edgellm.distill`: the Python API of the `prune` and `distill` verbs.

Model specs in, files out (as the CLI does), with the converters' own result objects back, so a script
can read the same figures the CLI prints. torch and transformers come with the `convert` extra.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Progress = Callable[[str, int, int], None]


def prune(source: str | os.PathLike[str], prune_to: int | str, output: str | os.PathLike[str] | None = None, *,
          align: int | None = None, axes: Sequence[str] = ("depth", "ffn", "heads", "hidden"),
          calib_text: str | None = None, to: str = "gguf", out_type: str = "F16", threads: int | None = None,
          progress: Progress | None = None, refit: bool = True) -> Any:
    """Structured pruning of `source` (store alias, GGUF or HF directory) to `prune_to` parameters ('100M',
    0.7, 70%); writes `output` (GGUF, or a HF directory with to='hf') when given. Returns the PruneResult
    (`.checkpoint`, `.plan`, `.explain(config)`). `refit`: compensate the cuts in closed form (converters/refit.py)."""
    from . import store
    from .converters.pipeline import read_checkpoint, write_checkpoint
    from .converters.prune import prune_model

    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    res = prune_model(ckpt, prune_to, align=align, axes=list(axes), calib_text=calib_text, threads=threads,
                      progress=progress, refit=refit)
    if output is not None:
        write_checkpoint(res.checkpoint, Path(output), to, out_type, progress)
    return res


def distill(student: str | os.PathLike[str], output: str | os.PathLike[str], *, teacher: str = "smollm2-135m",
            minutes: float | None = None, tokens: int | None = None, text: str | None = None, loss: str = "fkl",
            to: str = "gguf", out_type: str = "F16", threads: int | None = None, progress: Progress | None = None,
            **options: Any) -> dict[str, Any]:
    """Train `student` to match `teacher`'s next-token distribution (45 minutes unless minutes/tokens say
    otherwise), write it to `output`, and return the report (training figures, held-out PPL and KLD to the
    teacher before and after). `options` go to DistillConfig (temperature, lr, ...)."""
    from . import store
    from .converters.distill import DistillConfig, distill_model
    from .converters.pipeline import read_checkpoint, write_checkpoint

    cfg = DistillConfig(minutes=45.0 if minutes is None and tokens is None else minutes, tokens=tokens, loss=loss,
                        threads=threads, **options)
    cfg.check()
    ref = store.resolve(student)
    trained, report = distill_model(read_checkpoint(ref.path, ref.kind), teacher, cfg, text=text, progress=progress)
    write_checkpoint(trained, Path(output), to, out_type)
    return report
