"""edgellm cache-prompt: precompute a system prompt's KV state to ship with an app."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .options import load_kwargs, model_options
from .output import emit_json, err, human_bytes


@click.command("cache-prompt")
@click.argument("model", required=False)
@click.option("--system", required=True, help="The system prompt to precompute.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the state file.")
@click.option("--json", "as_json", is_flag=True)
@model_options
def command(model: str | None, system: str, output: Path, as_json: bool, **kw) -> None:
    """Precompute the KV-cache state of a system prompt, so a deployed app answers its first
    question without re-reading it.

    \b
    Example:
      edgellm cache-prompt --system "You are a kiosk assistant." -o kiosk.kv
      edgellm chat --system "You are a kiosk assistant." --prompt-state kiosk.kv
    The file is tied to the model and runtime settings (KV type); another model ignores it.
    """
    import edgellm

    lk = load_kwargs(kw)
    lk["disk_cache"] = False
    t0 = time.perf_counter()
    with edgellm.load(model, **lk) as llm:
        n = llm.cache_prompt(system, output)
    info = {"path": str(output), "tokens": n, "bytes": output.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        emit_json(info)
    else:
        err.print(f"wrote {output}: {n} tokens, {human_bytes(info['bytes'])}")
