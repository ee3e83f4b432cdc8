"""The bare greedy decode loop, timed: what llama-bench's tg measures, for any backend (bench and optimize)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def greedy_decode_tps(session: Any, n: int, first: int, context: Sequence[int] = ()) -> float:
    """tok/s of n greedy steps (eval one token, sample) after one untimed step from `first`: the decode loop with
    nothing around it, as llama-bench's tg times llama.cpp's. `context`: tokens evaluated before `first` (decode
    at that KV depth, as llama-bench's -d); a session that holds exactly them already keeps them (optimize has
    just timed their prefill)."""
    from . import GREEDY

    be = session.backend
    if not context or session.tokens != list(context):
        session.reset()
        if context:
            session.prefill(list(context))
    be.reset_sampler(GREEDY, ())
    be.eval([first])
    tok = be.sample(GREEDY)
    t0 = time.perf_counter()
    for _ in range(n):
        be.eval([tok])
        tok = be.sample(GREEDY)
    dt = time.perf_counter() - t0
    be.truncate(len(context))  # the backend holds what the session thinks it holds again
    return n / dt
