"""edgellm bench: how fast a model runs here, next to raw llama-cpp-python measured in the same run."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from .options import threads_option
from .output import emit_json, err, out


@click.command("bench")
@click.argument("model", required=False)
@threads_option("CPU threads [default: the device's performance cores, or EDGELLM_THREADS].")
@click.option("--prompt", "n_prompt", type=click.IntRange(1), default=512, show_default=True,
              help="Prompt tokens evaluated in one batch (pp).")
@click.option("--gen", "n_gen", type=click.IntRange(2), default=128, show_default=True,
              help="Tokens decoded greedily (tg).")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True, help="Repetitions; medians are reported.")
@click.option("--history", "history_tokens", type=click.IntRange(16), default=1000, show_default=True,
              help="Tokens of chat history for the time-to-first-token figures.")
@click.option("--no-anchor", is_flag=True, help="Skip the raw llama-cpp-python comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure, with per-rep samples, as JSON.")
def command(model: str | None, threads: int | None, n_prompt: int, n_gen: int, reps: int, history_tokens: int,
            no_anchor: bool, as_json: bool) -> None:
    """Benchmark a model on this device: prompt processing and decode speed (like llama.cpp's
    llama-bench pp512/tg128), time to first token cold, warm, after a restart and with a shipped
    system-prompt state, peak memory, and decode speed as a share of the memory-bandwidth ceiling.
    MODEL defaults to the embedded SmolLM2-135M.

    \b
    Raw llama-cpp-python (llama_cpp.Llama, its generate() loop) runs interleaved with edgellm,
    rep by rep, on the same model and threads; ratios are medians of the per-rep ratios.
    Progress goes to stderr when it is a terminal; results go to stdout.

    \b
    Examples:
      edgellm bench                              defaults: --prompt 512 --gen 128 --reps 3 --history 1000
      edgellm bench smollm2-135m --threads 4 --json > bench.json
      edgellm bench model.gguf --reps 5 --no-anchor
    """
    from ..bench import run_bench

    with _progress() as progress:
        result = run_bench(model, threads=threads, n_prompt=n_prompt, n_gen=n_gen, repetitions=reps,
                           history_tokens=history_tokens, anchor=not no_anchor, progress=progress)
    if as_json:
        emit_json(result)
    else:
        _table(result)


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar on stderr for a terminal; nothing at all in a pipe."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("benchmarking", total=1)

        def update(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, description=message)

        yield update


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _table(r: dict[str, Any]) -> None:
    from rich.table import Table

    a, ratio, t = r.get("anchor") or {}, r["ratios"], r["ttft"]
    table = Table(title=f"edgellm bench · {r['device']} · {r['threads']} threads", title_justify="left")
    for col, justify in (("measure", "left"), ("edgellm", "right"), ("llama-cpp-python", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    s = r["settings"]
    table.add_row(f"prompt pp{s['n_prompt']} (tok/s)", _fmt(r["pp_tps"]), _fmt(a.get("pp_tps")),
                  _fmt(ratio.get("pp_vs_anchor"), ".2f", "×"))
    table.add_row(f"decode tg{s['n_gen']} (tok/s)", _fmt(r["tg_tps"]), _fmt(a.get("tg_tps")),
                  _fmt(ratio.get("tg_vs_anchor"), ".2f", "×"))
    table.add_row("decode, chat session (tok/s)", _fmt(r["session_decode_tps"]), "",
                  _fmt(ratio.get("session_decode_vs_anchor"), ".2f", "×"))
    table.add_section()
    table.add_row(f"TTFT cold, {t['cold_prompt_tokens']:.0f}-token chat", _fmt(t["cold_s"] * 1000, ".0f", " ms"),
                  "", "1.00")
    table.add_row("TTFT warm, in process", _fmt(t["warm_s"] * 1000, ".0f", " ms"), "",
                  _fmt(t["warm_vs_cold"], ".1%", " of cold"))
    table.add_row("TTFT after restart (disk cache)", _fmt(t["restart_s"] * 1000, ".0f", " ms"), "",
                  _fmt(t["restart_vs_cold"], ".1%", " of cold"))
    table.add_row(f"TTFT {t['system_prompt_tokens']}-token system prompt, no state",
                  _fmt(t["without_state_s"] * 1000, ".0f", " ms"), "", "1.00")
    table.add_row("TTFT with its shipped state", _fmt(t["shipped_state_s"] * 1000, ".0f", " ms"), "",
                  _fmt(t["shipped_vs_without"], ".1%", " of none"))
    table.add_section()
    table.add_row("peak RSS (bench / restarted process)",
                  f"{r['peak_rss_mb']:.0f} / {t['restart_peak_rss_mb']:.0f} MB", "", "")
    table.add_row("memory read bandwidth (numpy)", _fmt(r["bandwidth_gbs"], ".1f", " GB/s"), "", "")
    table.add_row("decode ceiling (bandwidth / bytes per token)", _fmt(r["ceiling_tps"], ".0f", " tok/s"), "",
                  _fmt(r["pct_of_ceiling"], ".0f", "% reached"))
    out.print(table)
    err.print(f"[dim]model {r['model']} · --prompt {s['n_prompt']} --gen {s['n_gen']} --reps {s['repetitions']} "
              f"--history {s['history_tokens']} --threads {r['threads']} · medians[/dim]", soft_wrap=True)
