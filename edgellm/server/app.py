"""The HTTP side of `edgellm serve`: Starlette routes in front of the batching engine.

Starlette (routing, streaming, lifespan) and uvicorn (HTTP, graceful shutdown on SIGTERM) do the
serving; this module only validates requests, hands them to the engine and writes OpenAI-shaped
bodies. Server-sent events are written with Starlette's StreamingResponse: the format is three lines of
text, and unlike sse-starlette it does not cut streams off when shutdown starts, so in-flight answers
can finish during the graceful period.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ContextOverflowError, EdgeLLMError
from ..session import Session
from . import openai as oa
from . import web
from .config import ServeConfig
from .engine import Engine, QueueFullError, Request
from .introspect import request_stats, server_info
from .limits import HostCheck, allowed_hosts, guarded_protocol, read_body
from .system import pinned_state


def _error(e: oa.APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _APIKey:
    """Bearer-token check for /v1/* (constant-time compare); /health stays open for probes."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                err = oa.APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                  type="invalid_request_error", code="invalid_api_key")
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """Routes bound to one session and its engine."""

    def __init__(self, session: Session, config: ServeConfig) -> None:
        self.session, self.config = session, config
        state = pinned_state(session, config.system, config.system_state,
                             lambda m: print(f"edgellm serve: {m}", file=sys.stderr))
        self.system_tokens = len(state.tokens) if state is not None else 0
        self.engine = Engine(session, parallel=config.parallel, max_queue=config.max_queue, batch=config.batch,
                             pinned=(state,) if state is not None else ())
        self.started = time.time()
        self.inflight: dict[str, Request] = {}  # answer id -> request, for POST /v1/edgellm/cancel/{id}

    # -- plumbing ----------------------------------------------------------------------------
    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            self.engine.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.engine.close, self.config.drain_s)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            # edgellm's additions: the chat page (web.py), server info, cancelling an answer by its id
            Route("/v1/edgellm/info", self.info, methods=["GET"]),
            Route("/v1/edgellm/cancel/{rid}", self.cancel, methods=["POST"]),
            *web.page_routes(),
        ]
        return Starlette(routes=routes, lifespan=lifespan,
                         middleware=[Middleware(HostCheck, allowed=self.config.allowed_hosts),
                                     Middleware(_APIKey, key=self.config.api_key)],
                         exception_handlers={404: self._not_found, 405: self._not_allowed,
                                             HTTPException: self._http_error, Exception: self._internal})

    async def _not_found(self, request: HTTPRequest, exc: Exception) -> Response:
        return _error(oa.APIError(404, f"no route {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: HTTPRequest, exc: Exception) -> Response:
        return _error(oa.APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def _http_error(self, request: HTTPRequest, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 400)
        return _error(oa.APIError(status, str(getattr(exc, "detail", "")) or "bad request",
                                  type="invalid_request_error" if status < 500 else "server_error"))

    async def _internal(self, request: HTTPRequest, exc: Exception) -> Response:
        """A bug, not the client's fault: still one JSON line back (Starlette logs the traceback)."""
        return _error(oa.APIError(500, f"internal error ({type(exc).__name__}); the server is still running",
                                  type="server_error", code="internal_error"))

    # -- routes --------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "model": self.config.model_id, "busy": e.busy,
                             "queued": len(e.queue), "slots": len(e.slots), "context": e.pool,
                             "mode": "batch" if e.batch else "exact", "system_state_tokens": self.system_tokens,
                             "api_key_required": bool(self.config.api_key),
                             "uptime_s": round(time.time() - self.started, 1), **e.stats})

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_id, "object": "model", "created": int(self.started), "owned_by": "edgellm"}]})

    async def info(self, request: HTTPRequest) -> Response:
        return JSONResponse(server_info(self.session, self.engine, self.config, self.system_tokens))

    async def cancel(self, request: HTTPRequest) -> Response:
        """Stop an answer by its id (the stream then ends normally, its stats saying 'cancelled'); for
        clients whose disconnects a proxy hides, and for stopping an answer from another connection."""
        rid = request.path_params["rid"]
        req = self.inflight.get(rid)
        if req is None:
            return _error(oa.APIError(404, f"no answer {rid[:64]!r} is in progress", code="not_found"))
        req.asked = True
        self.engine.cancel(req)
        return JSONResponse({"id": rid, "object": "edgellm.cancel", "cancelled": True})

    def _track(self, rid: str, req: Request) -> None:
        """Keep `req` findable by its answer id until the engine is done with it."""
        self.inflight[rid] = req
        emit = req.emit

        def tracked(kind: str, value: Any) -> None:
            if kind != "piece":
                self.inflight.pop(rid, None)
            emit(kind, value)

        req.emit = tracked
        if req.finish_reason:  # finished before the wrapper was in place
            self.inflight.pop(rid, None)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: HTTPRequest, *, chat: bool) -> Response:
        try:
            raw = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
            # parsing, template rendering and tokenizing can take a while on a big body: not on the event loop
            params = await asyncio.to_thread(oa.prepare, self.session, self.config, raw, chat=chat)
            req = self._request(params)
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            req.emit = lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            try:
                self.engine.submit(req)
            except QueueFullError as e:
                raise oa.APIError(503, str(e), type="server_error", code="queue_full") from None
            except ContextOverflowError as e:
                raise oa.APIError(400, str(e), code="context_length_exceeded", param="messages") from None
        except oa.APIError as e:
            return _error(e)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        self._track(rid, req)
        if params.stream:
            return StreamingResponse(self._sse(req, queue, rid, chat, params.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, req, queue, rid, chat)

    def _request(self, params: oa.Prepared) -> Request:
        pool, tokens = self.engine.pool, params.tokens
        max_tokens = params.max_tokens or max(1, min(self.config.default_max_tokens, pool - len(tokens)))
        if len(tokens) + max_tokens > pool:
            raise oa.APIError(400, f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: "
                              f"{len(tokens) + max_tokens} tokens do not fit the {pool}-token context",
                              code="context_length_exceeded", param="messages")
        return Request(tokens, max_tokens, params.sampler, emit=lambda *_: None, stops=params.stops,
                       deadline=time.monotonic() + self.config.timeout_s)

    def _usage(self, req: Request) -> dict:
        return oa.usage(len(req.prompt), len(req.out), req.reused_tokens)

    def _failure(self, kind: str, value: Any) -> oa.APIError | None:
        if kind == "error":
            return oa.APIError(500, str(value), type="server_error", code="inference_failed")
        if value.finish_reason == "timeout":
            return oa.APIError(504, f"the request did not finish within {self.config.timeout_s:g} s",
                               type="server_error", code="timeout")
        if value.finish_reason == "cancelled" and not value.asked:
            return oa.APIError(503, "the server is shutting down", type="server_error", code="cancelled")
        return None

    async def _whole(self, request: HTTPRequest, req: Request, queue: asyncio.Queue, rid: str,
                     chat: bool) -> Response:
        pieces = []
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.engine.cancel(req)
                continue
            if kind == "piece":
                pieces.append(value)
                continue
            err = self._failure(kind, value)
            if err is not None:
                return _error(err)
            text, model = "".join(pieces), self.config.model_id
            body = (oa.chat_response(rid, model, text, req.finish_reason, self._usage(req)) if chat
                    else oa.text_response(rid, model, text, req.finish_reason, self._usage(req)))
            return JSONResponse({**body, "stats": request_stats(req)})

    async def _sse(self, req: Request, queue: asyncio.Queue, rid: str, chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        model = self.config.model_id
        try:
            if chat:
                yield _event(oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield _event(oa.chat_chunk(rid, model, {"content": value}) if chat
                                 else oa.text_response(rid, model, value, None, None))
                    continue
                err = self._failure(kind, value)
                if err is not None:
                    yield _event(err.body())
                elif chat:
                    yield _event({**oa.chat_chunk(rid, model, {}, req.finish_reason), "stats": request_stats(req)})
                    if include_usage:
                        yield _event(oa.chat_chunk(rid, model, {}, use=self._usage(req), choices=False))
                else:
                    yield _event({**oa.text_response(rid, model, "", req.finish_reason,
                                                     self._usage(req) if include_usage else None),
                                  "stats": request_stats(req)})
                yield "data: [DONE]\n\n"
                return
        finally:
            if not req.finish_reason:  # the client went away (or the server is stopping)
                self.engine.cancel(req)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(session: Session, config: ServeConfig) -> Starlette:
    """An ASGI app serving `session` (its engine starts and stops with the app's lifespan)."""
    return Server(session, config).app()


class EdgeServer:
    """uvicorn around the app; `run()` blocks and handles SIGINT/SIGTERM with a graceful drain."""

    def __init__(self, session: Session, config: ServeConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
        import uvicorn

        self.config = config
        if config.allowed_hosts is None:
            config.allowed_hosts = allowed_hosts(host, config.extra_hosts)
        self.server = Server(session, config)
        self.system_tokens = self.server.system_tokens  # the pinned system prompt's length (0: none)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.server.app(), host=host, port=port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=max(1, int(config.drain_s)), lifespan="on",
            http=guarded_protocol(config.header_timeout_s, config.max_connections), timeout_keep_alive=5))

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (or stop()); returns after the graceful drain."""
        import signal

        previous = {}
        if threading.current_thread() is threading.main_thread():
            # uvicorn drains on these signals and then re-raises them into the handlers it found:
            # no-op ones let run() return normally, so the caller closes the model and exits 0.
            previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.uvicorn.run()
        except SystemExit as e:  # uvicorn exits when it cannot bind
            raise EdgeLLMError(f"the server could not start (port in use or not allowed?): exit {e.code}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def port(self) -> int:
        servers = getattr(self.uvicorn, "servers", [])
        for s in servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.uvicorn.config.port

    def stop(self) -> None:
        self.uvicorn.should_exit = True
