"""The OpenAI wire format: request validation and response bodies (chat, completions, errors).

Hand-written because it is small and edgellm needs only the fields it serves; the official `openai`
client is the compatibility check (tests/test_serve.py).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeLLMError
from ..runtimes.base import SamplerConfig


class APIError(EdgeLLMError):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """What a chat or completion request asks for, validated."""

    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stops: tuple[str, ...]
    sampler: SamplerConfig


def _num(body: dict, key: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise APIError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", param=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key)
    return kind(v)


def parse_params(body: Any, default: SamplerConfig) -> Params:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    max_tokens = _num(body, "max_completion_tokens", int, 1) or _num(body, "max_tokens", int, 1)
    temperature = _num(body, "temperature", float, 0, 2)
    top_p = _num(body, "top_p", float, 0, 1)
    seed = _num(body, "seed", int)
    sampler = default
    overrides: dict[str, Any] = {}
    if temperature is not None:
        overrides["temperature"] = temperature
    if top_p is not None:
        overrides.update(top_p=max(top_p, 1e-6))
    if seed is not None:
        overrides["seed"] = seed % 2**32
    if overrides:
        sampler = SamplerConfig(**{**default.__dict__, **overrides})
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    opts = body.get("stream_options") or {}
    return Params(model=model, stream=bool(body.get("stream", False)),
                  include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
                  max_tokens=max_tokens, stops=stops, sampler=sampler)


def chat_messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a 'role' and a 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{'type': 'text', 'text': ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    return prompt


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
