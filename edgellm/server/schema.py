"""Request bodies validated as a whole, straight from the raw bytes (pydantic, strict).

pydantic's Rust JSON parser refuses what Python's `json` lets through and later code trips over:
NaN and Infinity, lone surrogates, invalid UTF-8, nesting deeper than it allows. Strict mode refuses
`"stream": "true"`, `"max_tokens": 4.0` and `"stop": {...}`. Fields edgellm does not serve are ignored
(OpenAI clients send extras), except those whose value would change an answer edgellm cannot give,
which are refused by name rather than silently dropped.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..chat_template import ROLES

Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_STOP_CHARS = 512


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    """What chat and text completions share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1 << 20)  # llama-server's extensions, sampled natively
    min_p: Finite | None = Field(None, ge=0, lt=1)
    repeat_penalty: Finite | None = Field(None, gt=0, le=10)
    seed: int | None = None
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(None)
    n: int = Field(1, ge=1, le=1)
    presence_penalty: Finite | None = Field(None, ge=-2, le=2)
    frequency_penalty: Finite | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _served(self) -> _Request:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("'stop' takes at most 4 strings")
        if isinstance(self.stop, str) and not 0 < len(self.stop) <= MAX_STOP_CHARS:
            raise ValueError(f"'stop' strings must be 1 to {MAX_STOP_CHARS} characters")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"'{name}' is not supported (use repeat_penalty)")
        if self.logprobs:
            raise ValueError("'logprobs' is not supported")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class SchemaError(ValueError):
    """A body that does not fit the schema: what is wrong and which parameter."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def parse(kind: type[_Request], raw: bytes) -> Any:
    """The validated request, or SchemaError with a one-line message naming the parameter."""
    try:
        return kind.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise SchemaError(f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})",
                              None, "invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise SchemaError("the request body must be a JSON object", None) from None
        return _raise(first, len(e.errors()))


# For parameters that take one of several shapes, pydantic reports every shape's failure; one sentence
# that names the shapes says it better.
_SHAPES = {"stop": "must be a string or a list of up to 4 strings",
           "prompt": "must be a non-empty string or a list of one string",
           "content": "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


def _raise(error: dict[str, Any], n: int) -> Any:
    # the path without pydantic's union-member tags (('stop', 'str') is about 'stop')
    loc = [p for p in error["loc"] if isinstance(p, int) or p not in _TAGS]
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    msg = error["msg"].removeprefix("Value error, ")
    if not path and msg.startswith("'"):  # a whole-body rule names its parameter itself
        raise SchemaError(msg, msg[1:].split("'", 1)[0])
    last = str(loc[-1]) if loc else ""
    if last in _SHAPES and len(error["loc"]) > len(loc):
        msg, n = _SHAPES[last], 1
    more = f" (and {n - 1} more problem{'s' if n > 2 else ''})" if n > 1 else ""
    raise SchemaError(f"'{path}': {msg}{more}" if path else f"{msg}{more}", str(loc[0]) if loc else None)


_TAGS = {"str", "list[str]", "list[TextPart]", "int", "float", "bool", "function-after[_served()]",
         "list[constrained-str]", "constrained-str", "StreamOptions", "TextPart"}
