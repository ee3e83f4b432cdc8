"""edgellm chat: streaming terminal chat with KV-cache reuse between turns."""
from __future__ import annotations

import sys

import click
from rich.markup import escape

from .options import (
    announce_optimize,
    load_kwargs,
    model_options,
    optimize_kwargs,
    optimize_options,
    sampling_kwargs,
    sampling_options,
)
from .output import err, out

HELP = """commands: /reset (forget history), /save FILE, /load FILE, /stats, /help, /exit
multi-line input: end a line with \\ to continue it, or wrap a block in triple quotes (\"\"\")"""


@click.command("chat")
@click.argument("model", required=False)
@click.option("--system", default=None, help="System prompt.")
@click.option("--prompt-state", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A state file from `edgellm cache-prompt` (skips re-reading the system prompt).")
@click.option("--truncate", is_flag=True, help="When the history outgrows the context, drop the oldest turns.")
@click.option("--web", is_flag=True,
              help="Chat in the browser instead: serve the chat page on 127.0.0.1 and open it.")
@click.option("--port", type=int, default=8080, show_default=True,
              help="With --web: the port (the page keeps conversations per address, so keep it fixed; 0 = any free).")
@click.option("--no-browser", is_flag=True, help="With --web: print the page's address, do not open a browser.")
@model_options
@optimize_options
@sampling_options
def command(model: str | None, system: str | None, prompt_state: str | None, truncate: bool, web: bool, port: int,
            no_browser: bool, **kw) -> None:
    """Chat with a model in the terminal (default: the embedded SmolLM2-135M).

    Answers stream as they are generated, using the model's own chat template (rendered in a
    sandbox). Each turn only evaluates the new tokens: the KV cache of the conversation so far is
    reused, in memory and on disk (so a restarted chat picks up where it was). Ctrl-C stops an
    answer and returns to the prompt with the history intact; Ctrl-D or /exit quits.

    With --web the same model answers in a chat page in your browser (edgellm serve's page, on
    127.0.0.1 only): several conversations kept in the browser, a stop button, per-answer speed and
    KV-cache figures, the device plan. Ctrl-C stops the server.

    \b
    Examples:
      edgellm chat --system "You are a concise assistant." -t 0
      edgellm chat --web                       opens http://127.0.0.1:8080/
    """
    import edgellm
    from edgellm.errors import EdgeLLMError

    lk, sk = {**load_kwargs(kw), **optimize_kwargs(kw)}, sampling_kwargs(kw)
    if web:  # two slots: only llama.cpp batches them, so nothing is measured (load keeps the GGUF on llama.cpp)
        return _web(model, system, prompt_state, truncate, port, not no_browser, lk, sk)
    announce_optimize(model, lk)
    with err.status("loading model …") if err.is_terminal else _null():
        llm = edgellm.load(model, prompt_state=prompt_state, **lk)
    conv = llm.conversation(system=system, **sk)
    conv.overflow = "truncate" if truncate else "error"
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"[dim]{llm.model_path.name} · {llm.plan.backend} on {llm.plan.device}, {llm.plan.threads} threads · "
                  f"/help for commands[/dim]")
        if llm.optimized is not None:
            err.print(f"[dim]{escape(llm.optimized.reason())}[/dim]")
    last = None
    while True:
        text = _read(interactive)
        if text is None or text.strip() in ("/exit", "/quit"):
            break
        cmd, _, arg = text.strip().partition(" ")
        try:
            if cmd == "/help":
                err.print(escape(HELP))
            elif cmd == "/reset":
                conv.reset()
                err.print("[dim]history cleared[/dim]")
            elif cmd == "/save":
                conv.save(arg.strip() or "chat.json")
                err.print(f"[dim]saved {len(conv.messages)} messages to {escape(arg.strip() or 'chat.json')}[/dim]")
            elif cmd == "/load":
                conv.load(arg.strip())
                err.print(f"[dim]loaded {len(conv.messages)} messages[/dim]")
            elif cmd == "/stats":
                err.print(_stats_line(last) if last else "no answer yet")
                err.print(f"context: {len(llm.tokens)}/{llm.n_ctx} tokens in KV; "
                          f"memory cache: {len(llm.memory_cache)} states, {llm.memory_cache.bytes >> 20} MiB")
            elif cmd.startswith("/") and cmd[1:].isalpha():
                err.print(f"unknown command {escape(cmd)}; {escape(HELP)}")
            elif text.strip():
                last = _answer(conv, text)
        except EdgeLLMError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}")
        except OSError as e:  # a chat command's file trouble must not end the conversation
            err.print(f"[red]error:[/red] {escape(e.strerror or str(e))}")
        except KeyboardInterrupt:
            err.print("[dim](interrupted)[/dim]")
    llm.close()


WEB_SLOTS = 2  # answers in flight at once (a second tab); each slot also keeps one conversation's KV


def _web(model: str | None, system: str | None, prompt_state: str | None, truncate: bool, port: int,
         browser: bool, lk: dict, sk: dict) -> None:
    """The chat page on loopback, through the library's server (edgellm.server), not the serve verb."""
    import edgellm
    from edgellm.errors import UsageError

    from ..server import EdgeServer, ServeConfig
    from ..server.introspect import model_id
    from ..server.web import open_when_ready

    if truncate or sk["stop"]:
        raise UsageError("--truncate and --stop are terminal-chat options; the page sets its own per conversation")
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be 0-65535, got {port}")
    lk["disk_cache"] = False  # the server keeps states in memory (per-request disk writes would stall decoding)
    with err.status("loading model …") if err.is_terminal else _null():
        session = edgellm.load(model, parallel=WEB_SLOTS, sampler=sk["sampler"], **lk)
    name = model_id(model, session.model_path)
    config = ServeConfig(model_id=name, parallel=WEB_SLOTS, default_max_tokens=sk["max_tokens"], system=system,
                         system_state=prompt_state)
    try:
        server = EdgeServer(session, config, host="127.0.0.1", port=port)
        err.print(f"edgellm chat --web: {name} ({session.plan.backend} on {session.plan.device}, "
                  f"{WEB_SLOTS} slots of {session.n_ctx} tokens, max tokens {sk['max_tokens']}, "
                  f"temperature {sk['sampler'].temperature:g}) — Ctrl-C to stop", soft_wrap=True, markup=False)
        open_when_ready(lambda: server.uvicorn.started, lambda: f"http://127.0.0.1:{server.port}/", browser=browser,
                        say=lambda m: err.print(m, soft_wrap=True, markup=False))
        server.run()
    finally:
        session.close()


def _answer(conv, text: str):
    stream = None
    try:
        stream = conv.stream(text)
        for piece in stream:
            out.print(piece, end="", markup=False, highlight=False)  # model text is not rich markup
            sys.stdout.flush()
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        out.print()
        err.print("[dim](interrupted — history unchanged)[/dim]")
        return None
    out.print()
    done = stream.completion
    err.print(f"[dim]{_stats_line(done.stats)}[/dim]")
    return done.stats


def _stats_line(s) -> str:
    reuse = f", {s.reused_tokens} reused from {s.cache_source}" if s.reused_tokens else ""
    return (f"TTFT {s.ttft_s * 1000:.0f} ms ({s.prompt_tokens} prompt tokens{reuse}) · "
            f"{s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s")


def _read(interactive: bool) -> str | None:
    """One user turn; supports trailing-backslash continuation and triple-quoted blocks."""
    lines: list[str] = []
    block = False
    while True:
        try:
            line = input(("... " if lines else ">>> ") if interactive else "")
        except EOFError:
            return "\n".join(lines) if lines else None
        except UnicodeDecodeError:  # bytes that are not text: say so and read on
            err.print("[red]error:[/red] that input is not valid UTF-8; line ignored")
            continue
        except KeyboardInterrupt:  # like a shell: Ctrl-C abandons the line, Ctrl-D quits
            if not interactive:
                return None
            err.print("^C [dim](/exit or Ctrl-D to quit)[/dim]")
            lines, block = [], False
            continue
        if not lines and line.strip().startswith('"""'):
            block = True
            line = line.strip()[3:]
            if line.endswith('"""') and len(line) >= 3:
                return line[:-3]
        elif block and line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines)
        if block:
            lines.append(line)
            continue
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def _null():
    import contextlib

    return contextlib.nullcontext()
