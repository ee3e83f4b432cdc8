"""edgellm run: one prompt in, one answer out — pipe-friendly."""
from __future__ import annotations

import sys

import click

from .options import (
    announce_optimize,
    load_kwargs,
    model_options,
    optimize_kwargs,
    optimize_options,
    sampling_kwargs,
    sampling_options,
)
from .output import emit_json, err


@click.command("run")
@click.argument("args", nargs=-1)
@click.option("--system", default=None, help="System prompt.")
@click.option("--raw", is_flag=True, help="Complete the text as is, without the chat template.")
@click.option("--prompt-state", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A state file from `edgellm cache-prompt` to reuse.")
@click.option("--json", "as_json", is_flag=True, help="Print text and statistics as JSON instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Print TTFT and tok/s on stderr.")
@model_options
@optimize_options
@sampling_options
def command(args: tuple[str, ...], system: str | None, raw: bool, prompt_state: str | None, as_json: bool,
            show_stats: bool, **kw) -> None:
    """Answer one prompt and exit. ARGS is [MODEL] PROMPT; the prompt is read from stdin when
    it is omitted or '-'. The model defaults to the embedded SmolLM2-135M (EDGELLM_MODEL overrides).

    \b
    Examples:
      edgellm run "Name three uses of a Raspberry Pi."
      edgellm run smollm2-135m "Hello" -t 0 --json
      echo "Summarise: ..." | edgellm run model.gguf -
    """
    import edgellm

    from ..userfiles import TEXT_LIMIT, decode_text

    model, prompt = _split_args(args)
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise edgellm.errors.UsageError("no prompt: pass one as an argument or on stdin")
        data = sys.stdin.buffer.read(TEXT_LIMIT + 1)
        if len(data) > TEXT_LIMIT:
            raise edgellm.errors.UsageError(f"the prompt on stdin is larger than {TEXT_LIMIT:,} bytes")
        prompt = decode_text(data, "prompt on stdin")
    if not prompt.strip():
        raise edgellm.errors.UsageError("the prompt is empty")
    lk, sk = {**load_kwargs(kw), **optimize_kwargs(kw)}, sampling_kwargs(kw)
    announce_optimize(model, lk)
    with edgellm.load(model, prompt_state=prompt_state, **lk) as llm:
        if raw:
            stream = llm.stream(prompt, **sk)
        else:
            messages = (([{"role": "system", "content": system}] if system else [])
                        + [{"role": "user", "content": prompt}])
            stream = llm.chat_stream(messages, **sk)
        if as_json:
            done = stream.completion
            emit_json({"text": done.text, "model": str(llm.model_path), "plan": llm.plan.to_dict(),
                       "stats": done.stats.to_dict()})
            return
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        done = stream.completion
        if show_stats:
            s = done.stats
            err.print(f"[dim]{s.prompt_tokens} prompt tokens ({s.reused_tokens} reused), "
                      f"TTFT {s.ttft_s * 1000:.0f} ms, {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s, "
                      f"stop: {s.stop_reason}[/dim]")


def _split_args(args: tuple[str, ...]) -> tuple[str | None, str | None]:
    from ..errors import UsageError

    if len(args) == 0:
        return None, None
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise UsageError("expected [MODEL] PROMPT (quote the prompt)")
