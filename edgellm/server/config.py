"""`edgellm serve`'s settings, in one place (the CLI fills them, the app, engine and page read them)."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass
class ServeConfig:
    model_id: str
    parallel: int = 4
    batch: bool = True  # one llama_decode for all requests; False: exact (bit-identical to single runs, slower)
    max_queue: int = 16
    timeout_s: float = 300.0  # per request, queueing included
    default_max_tokens: int = 512  # when a request gives none (OpenAI: "up to the context")
    api_key: str | None = None
    drain_s: float = 10.0  # graceful shutdown: how long in-flight requests may still run
    system: str | None = None  # system message for chat requests that bring none
    system_state: str | None = None  # its KV state from `cache-prompt` (else computed at start-up)
    # limits on what a client may send (edgellm.server.limits)
    max_body_bytes: int = 8 * MiB  # a request body beyond this is refused with 413 before it is parsed
    body_timeout_s: float = 30.0  # the whole body must arrive within this, or 408
    header_timeout_s: float = 10.0  # a connection must complete its request headers within this, or it is closed
    max_connections: int = 64  # open connections; requests beyond get 503 and idle ones time out
    # Host header names answered (None: any): set by EdgeServer from the address it binds (limits.allowed_hosts)
    allowed_hosts: tuple[str, ...] | None = None
    extra_hosts: tuple[str, ...] = ()  # --allow-host names added to the loopback ones
