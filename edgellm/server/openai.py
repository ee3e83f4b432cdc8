"""The OpenAI wire format: requests turned into prompt tokens (validated by edgellm.server.schema) and
response bodies (chat, completions, errors).

Hand-written because it is small and edgellm needs only the fields it serves; the official `openai`
client is the compatibility check (tests/test_serve.py).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..errors import EdgeLLMError
from ..runtimes.base import SamplerConfig
from ..session import Session
from .config import ServeConfig


class APIError(EdgeLLMError):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Prepared:
    """A validated request, ready for the engine: prompt tokens and how to answer."""

    tokens: list[int]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stops: tuple[str, ...]
    sampler: SamplerConfig


def prepare(session: Session, config: ServeConfig, raw: bytes, *, chat: bool) -> Prepared:
    """Validate a request body as a whole (edgellm.server.schema) and tokenize its prompt.

    Runs off the event loop (rendering and tokenizing a large prompt takes a while). Message text is
    tokenized with special tokens kept to the template's own markup (Session.chat_tokens); a text
    completion's prompt is the caller's raw text, special tokens included, as in llama-server.
    """
    from . import schema

    try:
        body = schema.parse(schema.ChatRequest if chat else schema.CompletionRequest, raw)
    except schema.SchemaError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    if body.model not in (None, config.model_id):
        raise APIError(404, f"the model {body.model!r} does not exist; this server has {config.model_id!r}",
                       code="model_not_found", param="model")
    sampler = _sampler(body, session.default_sampler)
    param = "messages" if chat else "prompt"
    try:
        if chat:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            if config.system is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": config.system})
            tokens = session.chat_tokens(messages)
        else:
            tokens = session.tokenize(body.text())
    except EdgeLLMError as e:  # a template that fails or runs out of time, text that is not valid Unicode
        raise APIError(400, str(e), param=param) from None
    return Prepared(tokens, body.stream, bool(body.stream_options and body.stream_options.include_usage),
                    body.limit, body.stops, sampler)


def _sampler(body: Any, default: SamplerConfig) -> SamplerConfig:
    overrides: dict[str, Any] = {k: v for k in ("temperature", "top_k", "min_p", "repeat_penalty")
                                 if (v := getattr(body, k)) is not None}
    if body.top_p is not None:
        overrides["top_p"] = max(body.top_p, 1e-6)
    if body.seed is not None:
        overrides["seed"] = body.seed % 2**32
    try:
        return replace(default, **overrides) if overrides else default
    except EdgeLLMError as e:
        raise APIError(400, str(e)) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, reused: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reused}}


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def chat_response(rid: str, model: str, text: str, reason: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish(reason), "logprobs": None}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None,
               use: dict | None = None, choices: bool = True) -> dict[str, Any]:
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": reason and finish(reason),
                        "logprobs": None}] if choices else []}
    if use is not None:
        out["usage"] = use
    return out


def text_response(rid: str, model: str, text: str, reason: str | None, use: dict | None) -> dict[str, Any]:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": reason and finish(reason), "logprobs": None}]}
    if use is not None:
        out["usage"] = use
    return out
