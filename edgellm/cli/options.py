"""Options shared by the verbs that load a model or sample from one."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def check_threads(ctx: click.Context | None, param: click.Parameter | None, value: int | None) -> int | None:
    """--threads: a positive count no larger than 4 per logical core (far more crashes llama.cpp)."""
    import os

    if value is None:
        return None
    top = 4 * (os.cpu_count() or 16)
    if not 1 <= value <= top:
        from ..errors import UsageError

        raise UsageError(f"--threads must be between 1 and {top} (4 × this machine's {os.cpu_count()} logical cores)")
    return value


def threads_option(help: str) -> Callable[[F], F]:  # noqa: A002 - click's own name
    return click.option("--threads", type=int, default=None, callback=check_threads, help=help)


def model_options(f: F) -> F:
    for opt in reversed([
        click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size in tokens."),
        threads_option("CPU threads [default: the device's performance cores, or EDGELLM_THREADS]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, metal (gpu)."),
        click.option("--kv-type", default="f16", show_default=True, help="KV-cache type: f16, q8_0, q4_0, f32."),
        click.option("--no-disk-cache", is_flag=True, help="Do not read or write the on-disk KV-cache."),
    ]):
        f = opt(f)
    return f


def sampling_options(f: F) -> F:
    for opt in reversed([
        click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate."),
        click.option("-t", "--temperature", type=float, default=0.7, show_default=True, help="0 = greedy, deterministic."),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="1.0 = off."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling [default: random]."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]):
        f = opt(f)
    return f


def load_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {"n_ctx": kw.pop("n_ctx"), "threads": kw.pop("threads"), "device": kw.pop("device"),
            "kv_type": kw.pop("kv_type"), "disk_cache": not kw.pop("no_disk_cache")}


def sampling_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    from ..runtimes.base import SamplerConfig

    sampler = SamplerConfig(temperature=kw.pop("temperature"), top_k=kw.pop("top_k"), top_p=kw.pop("top_p"),
                            min_p=kw.pop("min_p"), repeat_penalty=kw.pop("repeat_penalty"), seed=kw.pop("seed"))
    return {"sampler": sampler, "max_tokens": kw.pop("max_tokens"), "stop": tuple(kw.pop("stop"))}
