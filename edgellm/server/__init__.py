"""`edgellm serve`: an OpenAI-compatible HTTP server on the unified runtime.

    engine.py  batched (default) or exact decode over llama.cpp sequences, KV reuse, bounded queue
    schema.py  request bodies validated as a whole (pydantic, strict) straight from the raw bytes
    openai.py  validated requests turned into prompt tokens; OpenAI-shaped response bodies
    limits.py  connection, header-time, body-size and body-time limits
    config.py  ServeConfig
    app.py     Starlette routes, API key, SSE streaming, uvicorn with graceful shutdown
    system.py  the default system prompt and its pinned KV state (shipped or computed at start-up)
"""
from __future__ import annotations

from .app import EdgeServer, create_app
from .config import ServeConfig
from .engine import Engine, QueueFullError, Request

__all__ = ["EdgeServer", "Engine", "QueueFullError", "Request", "ServeConfig", "create_app"]
