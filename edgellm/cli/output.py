"""Terminal output that respects pipes and NO_COLOR: data on stdout, progress and notes on stderr."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from rich.console import Console

from ..sizes import human_bytes  # noqa: F401 - the verbs' import of it

out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # pipes get full lines, not a table squeezed to 80 columns
    out.width = 200
err = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def spinner(message: str):
    """A status spinner on stderr when it is a terminal; silent otherwise."""
    import contextlib

    return err.status(message) if err.is_terminal else contextlib.nullcontext()


def stage_progress(enabled: bool):
    """A rich progress bar per stage on a terminal; a no-op reporter in pipes."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                   console=err, transient=True)
    tasks: dict[str, int] = {}

    @contextlib.contextmanager
    def run():
        with bar:
            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)
            yield report

    return run()


@contextlib.contextmanager
def training_bar(enabled: bool):
    """Stage bars plus a training bar showing loss, tokens/s and the ETA; no-ops in pipes."""
    if not enabled:
        yield None, None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), console=err, transient=True)
    tasks: dict[str, int] = {}

    def stage(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total, info="")
        bar.update(tasks[name], completed=done, total=total)

    def step(s: dict) -> None:
        if "train" not in tasks:
            tasks["train"] = bar.add_task("distill", total=1000, info="")
        m, sec = divmod(int(s["eta_s"]), 60)
        bar.update(tasks["train"], completed=int(1000 * s["frac"]),
                   info=f"step {s['step']} loss {s['loss']:.4f} {s['tok_s']:.0f} tok/s ETA {m}:{sec:02d}")
    with bar:
        yield stage, step
