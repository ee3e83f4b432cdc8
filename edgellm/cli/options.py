"""Options shared by the verbs that load a model or sample from one."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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


def optimize_options(f: F) -> F:
    """--backend / --quality / --no-optimize: run a GGUF the way `edgellm optimize` measured fastest."""
    for opt in reversed([
        click.option("--backend", type=click.Choice(["auto", "llama.cpp", "onnx"]), default="auto", show_default=True,
                     help="auto: the backend `edgellm optimize` measured fastest here (measured on first use); "
                          "or pin one."),
        click.option("--quality", type=click.Choice(["balanced", "lossless"]), default="balanced", show_default=True,
                     help="How close to the source file an optimized form must stay (mean KLD ≤ 0.05 / 0.005)."),
        click.option("--no-optimize", is_flag=True,
                     help="Run the model as given (also EDGELLM_OPTIMIZE=0)."),
    ]):
        f = opt(f)
    return f


def optimize_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    from ..optimize import wanted

    backend, quality, off = kw.pop("backend"), kw.pop("quality"), kw.pop("no_optimize")
    return {"optimize": backend == "auto" and not off and wanted(), "quality": quality,
            "backend": None if backend == "auto" else backend}


def announce_optimize(model: str | None, lk: dict[str, Any]) -> None:
    """Say so before a first use measures (a minute or so, once per model, device and library versions)."""
    if not lk.get("optimize"):
        return
    from ..errors import EdgeLLMError
    from ..optimize import cached, onnx_available
    from .output import err

    try:
        first = onnx_available() and cached(model, lk["quality"]) is None
    except EdgeLLMError:
        return  # load() reports it
    if first:
        err.print("[dim]measuring the fastest way to run this model on this device (once; --no-optimize or "
                  "EDGELLM_OPTIMIZE=0 skips) …[/dim]")


def sampling_options(f: F) -> F:
    for opt in reversed([
        click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate."),
        click.option("-t", "--temperature", type=float, default=0.7, show_default=True,
                     help="0 = greedy, deterministic."),
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


def distill_options(f):
    """Training options shared with `edgellm convert --distill`."""
    for opt in reversed([
        click.option("--minutes", type=float, default=None, help="Training time budget [default: 45 unless --tokens]."),
        click.option("--tokens", "train_tokens", type=int, default=None, help="Training token budget."),
        click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Training text [default: calibration text + teacher generations]."),
        click.option("--loss", type=click.Choice(["fkl", "rkl", "skl"]), default="fkl", show_default=True,
                     help="Forward KL, reverse KL or skew KL."),
        click.option("--temperature", type=float, default=1.0, show_default=True),
        click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate (AdamW)."),
        click.option("--top-k", "top_k", type=int, default=32, show_default=True,
                     help="Teacher logits kept per position."),
        click.option("--gen-tokens", type=int, default=16384, show_default=True,
                     help="Tokens the teacher generates for sequence-level KD when no --text is given."),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where the resumable state lives [default: one per student/teacher/data in EDGELLM_HOME]."),
        click.option("--device", default="auto", show_default=True,
                     help="Where to train: auto (a CUDA GPU in bf16 when torch sees one, else the CPU), cpu, cuda:N."),
    ]):
        f = opt(f)
    return f


def distill_config(minutes, train_tokens, loss, temperature, lr, threads, device: str = "auto"):
    from edgellm.converters.distill import DistillConfig

    if minutes is None and train_tokens is None:
        minutes = 45.0
    return DistillConfig(minutes=minutes, tokens=train_tokens, loss=loss, temperature=temperature, lr=lr,
                         threads=threads, device=device)


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


def shrink_plan(source: str, opts: dict[str, Any], threads: int | None):
    """The ShrinkPlan (edgellm.converters.shrink) that convert's --prune-to/--distill options ask for;
    consumes those options from `opts`."""
    from edgellm.converters.shrink import ShrinkPlan

    from ..errors import UsageError
    from ..userfiles import read_text

    prune_to, do_distill = opts.pop("prune_to"), opts.pop("do_distill")
    align, axes, teacher = opts.pop("align"), opts.pop("axes"), opts.pop("teacher")
    dist = {k: opts.pop(k) for k in ("minutes", "train_tokens", "text_file", "loss", "temperature", "lr", "top_k",
                                     "gen_tokens", "work_dir", "device")}
    if opts:  # pragma: no cover - every option above is consumed
        raise UsageError(f"unexpected options {sorted(opts)}")
    cfg = None
    if do_distill:
        cfg = distill_config(dist["minutes"], dist["train_tokens"], dist["loss"], dist["temperature"], dist["lr"],
                             threads, dist["device"])
        cfg.check()
    return ShrinkPlan(prune_to=prune_to, align=align, axes=tuple(a.strip() for a in axes.split(",") if a.strip()),
                      distill=cfg, teacher=teacher, work_dir=dist["work_dir"], top_k=dist["top_k"],
                      gen_tokens=dist["gen_tokens"],
                      text=read_text(dist["text_file"], "training text") if dist["text_file"] else None)
