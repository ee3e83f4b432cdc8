"""`edgellm serve`: an OpenAI-compatible HTTP server on the unified runtime.

    engine.py  batched (default) or exact decode over llama.cpp sequences, KV reuse, bounded queue
    openai.py  request validation and OpenAI-shaped response bodies
    app.py     Starlette routes, API key, SSE streaming, uvicorn with graceful shutdown
    system.py  the default system prompt and its pinned KV state (shipped or computed at start-up)
"""
from __future__ import annotations

from .app import EdgeServer, ServeConfig, create_app
from .engine import Engine, QueueFullError, Request

__all__ = ["EdgeServer", "Engine", "QueueFullError", "Request", "ServeConfig", "create_app"]
