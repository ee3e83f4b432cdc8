"""edgellm serve: an OpenAI-compatible HTTP server for a model (loopback by default)."""
from __future__ import annotations

import os

import click

from .options import announce_optimize, model_options, optimize_kwargs, optimize_options
from .output import err


@click.command("serve")
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: set an API key).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None,
              help="Require 'Authorization: Bearer KEY' [default: EDGELLM_API_KEY, else none].")
@click.option("--parallel", type=int, default=4, show_default=True,
              help="Requests in flight at once, each with its own --ctx KV cache; 1 serves one at a time.")
@click.option("--batch/--exact", default=True, show_default=True,
              help="--batch decodes all requests in one llama.cpp batch, like llama-server: more tokens/s "
                   "with many clients, but a greedy answer may differ from a single-client run where two "
                   "tokens are nearly tied. --exact decodes each request on its own and evaluates prompts in "
                   "64-token aligned chunks: a greedy answer is bit-identical to a cold single-client run "
                   "whatever the cache holds, at the cost of re-evaluating up to 63 prompt tokens and the "
                   "previous answer per turn, and slower with many clients. Requests never see each "
                   "other's tokens in either mode.")
@click.option("--queue", "max_queue", type=int, default=16, show_default=True,
              help="Requests that may wait for a slot; more get HTTP 503.")
@click.option("--timeout", "timeout_s", type=float, default=300, show_default=True,
              help="Seconds a request may take, queueing included (then HTTP 504).")
@click.option("--max-tokens", "default_max_tokens", type=int, default=512, show_default=True,
              help="Answer length when a request gives no max_tokens.")
@click.option("--drain", "drain_s", type=float, default=10, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds in-flight requests may still finish.")
@click.option("--rpc", default=None, help="llama.cpp RPC workers holding the layers: host:port[,host:port...].")
@click.option("--system", default=None,
              help="System message for chat requests that send none; its KV state is computed once at "
                   "start-up (or taken from --system-state) and never evaluated again.")
@click.option("--system-state", "prompt_state", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The system prompt's KV state from `edgellm cache-prompt` (saves that prefill at start-up; "
                   "used for requests starting with that system prompt; with --system, made for it).")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Default when a request gives none.")
@click.option("--max-body", "max_body", default="8MiB", show_default=True, metavar="SIZE",
              help="Largest request body; larger ones get HTTP 413 before they are read.")
@click.option("--max-connections", type=int, default=64, show_default=True,
              help="Open connections at once; requests beyond get HTTP 503.")
@click.option("--header-timeout", "header_timeout_s", type=float, default=10, show_default=True,
              help="Seconds a connection may take to send a request's headers before it is closed.")
@click.option("--allow-host", "allow_host", multiple=True, metavar="NAME",
              help="On a loopback address only requests for localhost/127.0.0.1/[::1] are answered (a web page "
                   "cannot reach the server by pointing its own domain at 127.0.0.1); add another Host name.")
@model_options
@optimize_options
def command(model: str | None, host: str, port: int, api_key: str | None, parallel: int, batch: bool, max_queue: int,
            timeout_s: float, default_max_tokens: int, drain_s: float, rpc: str | None, system: str | None,
            prompt_state: str | None, temperature: float, max_body: str, max_connections: int,
            header_timeout_s: float, allow_host: tuple[str, ...], **kw) -> None:
    """Serve MODEL (default: the embedded SmolLM2-135M) over HTTP with the OpenAI API:
    /v1/chat/completions (streaming and not), /v1/completions, /v1/models, /health; a chat page at /
    (docs/web-chat.md), and /v1/edgellm/info, /v1/edgellm/cancel/ID.

    Requests in flight advance together token by token (a new one starts at once, not after the others);
    each conversation reuses the KV cache of its earlier turns, and the system prompt's state (--system,
    --system-state) is restored rather than evaluated. Each of the --parallel slots has a
    --ctx-token KV cache, so memory grows with both (checked before loading; see
    `edgellm plan --server --parallel N`).

    \b
    Examples:
      edgellm serve                                    http://127.0.0.1:8080/v1
      edgellm serve model.gguf --ctx 8192 --parallel 8 --api-key secret
      edgellm serve --system "You are a museum guide." --system-state guide.kv
      edgellm serve --rpc 192.168.1.21:50052,192.168.1.22:50052
    \b
    With the openai client:
      OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="secret").chat.completions.create(
          model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}])
    """
    import edgellm
    from edgellm.errors import UsageError

    from ..runtimes.base import SamplerConfig

    try:
        from ..server import (
            EdgeServer,
            ServeConfig,
            schema,  # noqa: F401 - imported now so a missing dependency fails here, not per request
        )
    except ModuleNotFoundError as e:
        raise UsageError(f"edgellm serve needs the {e.name} package: pip install 'edgellm[serve]'") from None
    from .options import load_kwargs

    if parallel < 1 or max_queue < 0 or timeout_s <= 0 or default_max_tokens < 1:
        raise UsageError("--parallel and --max-tokens must be ≥ 1, --queue ≥ 0 and --timeout > 0")
    if max_connections < parallel or header_timeout_s <= 0 or drain_s < 0:
        raise UsageError("--max-connections must be ≥ --parallel, --header-timeout > 0 and --drain ≥ 0")
    body_bytes = parse_bytes(max_body, "--max-body")
    key = api_key or os.environ.get("EDGELLM_API_KEY") or None
    lk = {**load_kwargs(kw), **optimize_kwargs(kw)}
    lk["disk_cache"] = False  # the server keeps states in memory; per-request disk writes would stall decoding
    if lk["backend"] == "onnx" and parallel > 1:
        err.print("edgellm serve: the onnx backend runs one sequence: requests are served one at a time (--parallel 1)")
        parallel = 1
    # with several slots only llama.cpp can batch them: the optimized choice applies with --parallel 1
    if parallel == 1:
        announce_optimize(model, lk)
    session = edgellm.load(model, parallel=parallel, rpc=rpc, sampler=SamplerConfig(temperature=temperature), **lk)
    parallel = min(parallel, getattr(session.backend, "n_seq", parallel))
    model_id = model_name(model, session.model_path)
    config = ServeConfig(model_id=model_id, parallel=parallel, batch=batch, max_queue=max_queue, timeout_s=timeout_s,
                         default_max_tokens=default_max_tokens, api_key=key, drain_s=drain_s, system=system,
                         system_state=prompt_state, max_body_bytes=body_bytes, max_connections=max_connections,
                         header_timeout_s=header_timeout_s, extra_hosts=tuple(h.lower() for h in allow_host))
    server = EdgeServer(session, config, host=host, port=port)
    pinned = server.system_tokens
    err.print(f"edgellm serve: {model_id} on http://{host}:{port}/v1  ({session.plan.backend}, {parallel} slot"
              f"{'s' if parallel > 1 else ''} of {session.n_ctx} "
              f"tokens, {'--batch' if batch else '--exact'}, queue {max_queue}, timeout {timeout_s:g} s, "
              f"API key {'required' if key else 'off'}{', RPC ' + rpc if rpc else ''}"
              f"{f', system prompt of {pinned} tokens cached' if pinned else ''}) — Ctrl-C to stop")
    try:
        server.run()
    finally:
        session.close()


def model_name(spec: str | None, path) -> str:
    """The id clients send as `model`: the store alias, else the file name without .gguf."""
    from .. import store

    if spec is None:
        return store.DEFAULT_ALIAS
    return spec if not os.path.exists(spec) else os.path.basename(str(path)).removesuffix(".gguf")


def parse_bytes(text: str, flag: str) -> int:
    """'8MiB', '512KB', '1000000' -> bytes (at least 1 KiB)."""
    from ..errors import UsageError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGIB")
    try:
        n = int(float(number) * units[t[len(number):]])
    except (KeyError, ValueError):
        raise UsageError(f"{flag} must be a size like 8MiB or 500KB, not {text!r}") from None
    if n < 1024:
        raise UsageError(f"{flag} must be at least 1 KiB")
    return n
