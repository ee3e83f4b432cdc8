"""What the server bounds before a request reaches the model: connection count, header and body time,
body size. A local server is exposed to whatever its network sends.

uvicorn caps connections (`limit_concurrency`: 503 beyond it) and closes keep-alive connections idle after
a response, but a connection that never completes its first request's headers stays open for ever (100
idle sockets stayed open indefinitely). GuardedH11Protocol closes any connection whose request headers
have not arrived within the header timeout, on the first request and every later one. The body is read
by `read_body` with a size limit (413) and a deadline (408), in chunks, so a 20 MB body is refused as soon
as its Content-Length (or its 8 MiB-th byte) says so, without ever being held whole.
"""
from __future__ import annotations

import asyncio

from starlette.requests import Request as HTTPRequest
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai import APIError

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
BUSY_BODY = (b'{"error": {"message": "too many open connections; retry later", "type": "server_error", '
             b'"param": null, "code": "too_many_connections"}}')


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none for a new connection)
    and a cap on open connections, answered with a JSON 503 like every other error."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(BUSY % (len(BUSY_BODY), BUSY_BODY))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


async def read_body(request: HTTPRequest, limit: int, timeout_s: float) -> bytes:
    """The request body, at most `limit` bytes, arrived within `timeout_s`; APIError 413/408/400 otherwise."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise APIError(400, "the Content-Length header is not a number", code="bad_request")
        if int(length) > limit:
            raise APIError(413, f"the request body is {int(length):,} bytes; this server takes at most {limit:,} "
                           "(edgellm serve --max-body)", code="body_too_large")
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit:,} bytes (edgellm serve --max-body)",
                               code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from None
    return b"".join(chunks)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Host header values a server bound to `bind_host` answers: for a loopback address only loopback names
    (a web page elsewhere can point its own domain at 127.0.0.1 — DNS rebinding — and drive a key-less local
    server from the user's browser: it then sends its own domain as Host); None (any) for other addresses."""
    if bind_host.strip("[]") in LOOPBACK:
        return (*LOOPBACK, *extra)
    return None


def host_of(header: bytes) -> str:
    """'localhost:8080' -> 'localhost', '[::1]:8080' -> '::1'."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class HostCheck:
    """ASGI middleware: a request whose Host header is not an allowed name gets a JSON 421 (see allowed_hosts)."""

    def __init__(self, app, allowed: tuple[str, ...] | None) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if self.allowed is not None and scope["type"] == "http":
            host = host_of(dict(scope["headers"]).get(b"host", b""))
            if host not in self.allowed:
                from starlette.responses import JSONResponse

                err = APIError(421, f"this server answers requests addressed to {', '.join(self.allowed)}, not "
                               f"{host[:80]!r} (serve --allow-host NAME to add one)", code="host_not_allowed")
                await JSONResponse(err.body(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)
