"""What the server says about itself and about each answer (edgellm's additions to the OpenAI API).

- `request_stats(req)`: the `stats` field of every chat/completion response (the last chunk of a stream):
  time to first token, decode speed, how many prompt tokens came from the KV cache. llama-server sends
  a similar `timings` object; edgellm's numbers are the engine's own clock (time.monotonic on the
  inference thread), so they exclude the HTTP hop, which is what the page's own clock adds.
- `server_info(...)`: `GET /v1/edgellm/info` — the model, the device plan with its reasons, and the KV cache
  state (slots, in-memory snapshots, the pinned system prompt). The chat page shows it in its info panel.

Both read engine state from the event loop while the engine thread runs: they only take lengths and flags
(atomic reads in CPython), never iterate a structure the engine thread changes.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for type hints only: app.py imports this module
    from ..session import Session
    from .config import ServeConfig
    from .engine import Engine, Request


def model_id(spec: str | None, path: Path) -> str:
    """The id clients send as `model`: the store alias, else the file name without .gguf."""
    from .. import store

    if spec is None:
        return store.DEFAULT_ALIAS
    return spec if not os.path.exists(spec) else Path(path).name.removesuffix(".gguf")


def request_stats(req: Request) -> dict[str, Any]:
    """Per-answer figures. ttft_ms counts from submission (queueing and prefill included) to the first
    sampled token; decode_tps is over the tokens after the first; prefill_tokens = prompt - reused."""
    n_out = len(req.out)
    ttft = (req.t_first - req.t_submit) if req.t_first else None
    decode_s = (req.t_done - req.t_first) if req.t_first and req.t_done else 0.0
    return {
        "prompt_tokens": len(req.prompt),
        "reused_tokens": req.reused_tokens,
        "cache_source": req.cache_source,  # 'slot' | 'memory' | 'system' | ... | None (cold)
        "prefill_tokens": len(req.prompt) - req.reused_tokens,
        "completion_tokens": n_out,
        "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
        "decode_tps": round((n_out - 1) / decode_s, 2) if n_out > 1 and decode_s > 0 else None,
        "total_ms": round((req.t_done - req.t_submit) * 1000, 1) if req.t_done else None,
        "finish_reason": req.finish_reason or None,  # 'stop' | 'length' | 'cancelled' | 'timeout'
    }


def server_info(session: Session, engine: Engine, config: ServeConfig, system_tokens: int) -> dict[str, Any]:
    """The body of GET /v1/edgellm/info."""
    from .. import __version__

    plan = session.plan
    cache = session.memory_cache
    sampler = session.default_sampler
    path = session.model_path
    return {
        "object": "edgellm.info",
        "version": __version__,
        "model": config.model_id,
        "file": path.name,
        "file_bytes": path.stat().st_size if path.is_file() else None,
        "backend": getattr(plan, "backend", session.backend.name),
        "device": getattr(plan, "device", None),
        "plan": plan.to_dict() if hasattr(plan, "to_dict") else None,  # threads, simd, memory, reasons, warnings
        "context_tokens": engine.pool,  # per slot
        "mode": "batch" if engine.batch else "exact",
        "slots": [{"slot": s.seq, "busy": s.req is not None, "cached_tokens": len(s.tokens)} for s in engine.slots],
        "queued": len(engine.queue),
        "kv_cache": {
            "memory_states": len(cache),
            "memory_bytes": cache.bytes,
            "memory_max_bytes": cache.max_bytes,
            "pinned": [{"tokens": len(p.tokens), "source": p.source} for p in engine.pinned],
        },
        "system_prompt_tokens": system_tokens,
        "defaults": {"max_tokens": config.default_max_tokens, "timeout_s": config.timeout_s,
                     "sampler": asdict(sampler) if sampler is not None else None},
        "api_key_required": bool(config.api_key),
    }
