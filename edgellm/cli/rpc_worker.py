"""edgellm rpc-worker: lend this machine's CPU and RAM to a model served elsewhere (llama.cpp RPC)."""
from __future__ import annotations

import click

from .options import threads_option


@click.command("rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; use the board's LAN address to accept other machines.")
@click.option("--port", type=int, default=50052, show_default=True)
@threads_option("CPU threads [default: all cores].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Keep received tensors here so a restart of the server does not resend them.")
def command(host: str, port: int, threads: int | None, cache_dir: str | None) -> None:
    """Run a llama.cpp RPC worker until stopped (Ctrl-C / SIGTERM). A server started with
    `edgellm serve MODEL --rpc HOST:PORT[,HOST:PORT...]` puts the model's layers on its workers.

    The RPC protocol has no authentication or encryption: listen on a private network only.

    \b
    Examples:
      edgellm rpc-worker --host 0.0.0.0 --port 50052        (on each board)
      edgellm serve --rpc 192.168.1.21:50052,192.168.1.22:50052
    """
    from ..runtimes.rpc import serve_worker

    click.echo(f"edgellm rpc-worker: starting on {host}:{port} (Ctrl-C to stop)", err=True)
    serve_worker(host, port, threads, cache_dir)
