"""Terminal output that respects pipes and NO_COLOR: data on stdout, progress and notes on stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # pipes get full lines, not a table squeezed to 80 columns
    out.width = 200
err = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def spinner(message: str):
    """A status spinner on stderr when it is a terminal; silent otherwise."""
    import contextlib

    return err.status(message) if err.is_terminal else contextlib.nullcontext()


def stage_progress(enabled: bool):
    """A rich progress bar per stage on a terminal; a no-op reporter in pipes."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

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
