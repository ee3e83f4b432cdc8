"""Session._run's token loop with prompt-lookup drafting (edgellm.speculate), for one sequence.

Yields the tokens of the answer one at a time, like the plain loop, so stop strings, EOG tokens and
max_tokens are applied by the caller token by token; the caller stops consuming where the answer
ends and trims the KV cache back to what plain decoding would leave. Between yields the backend's KV
cache and `session.tokens` agree: a verification batch of k drafts is truncated back over the
rejected ones before any accepted token is handed out.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .runtimes.base import SamplerConfig
from .speculate import SpeculationConfig, Speculator

GUARD = 2.0  # a greedy pick read from a batch row must lead by this × the measured batch noise (a gap moves ≤ 2×)


def supported(backend: Any) -> bool:
    """Whether the backend can verify drafts: a batch with every row's logits, and KV truncation."""
    return (callable(getattr(backend, "eval_rows", None)) and callable(getattr(backend, "accept_tokens", None))
            and backend.capabilities.kv_state)


# AUTO drafts only where verification batches stay this close to single steps (max |delta logit|, measured once
# per session after the first token): a float32 graph measures ~2e-5, the transcoded int8 graph ~1.1
EXACT_NOISE = 1e-3


def batch_noise(session: Any, limit: int) -> float:
    """How far (max |Δ logit|) a verification batch of 2..limit tokens strays from token-by-token
    evaluation of the same tokens: measured once per session on its own context, then undone.

    Kernels change with the batch size: llama.cpp on this project's AVX-512 x86 machine gives rows up to
    0.56 apart (SmolLM2-135M Q4_1; identical for some sizes and contexts, not others); onnxruntime's
    MatMulNBits int4 graph up to 0.9, its f32 graph ~2e-5. Greedy verification guards against it.
    """
    memo = session.__dict__.setdefault("_batch_noise", {})
    if limit in memo:
        return memo[limit]
    be = session.backend
    base, probe = be.n_past, list(session.tokens[-limit:])
    if len(probe) < limit or base + limit > be.n_ctx:
        return float("inf")
    noise = 0.0
    try:
        singles = []
        for t in probe:
            be.eval([t])
            singles.append(be.logits())
        be.truncate(base)
        for n in range(2, limit + 1):
            noise = max(noise, float(np.abs(be.eval_rows(probe[:n]) - np.stack(singles[:n])).max()))
            be.truncate(base)
    finally:
        if be.n_past > base:
            be.truncate(base)
    memo[limit] = noise
    return noise


def tokens(session: Any, config: SamplerConfig, settings: SpeculationConfig, max_tokens: int,
           stats: Any) -> Iterator[int]:
    """The answer's tokens; `stats.drafted` / `stats.accepted` count the verified draft tokens.

    Greedy: a draft token or the token after the draft is taken from a batch row only where the row's
    best logit leads by GUARD × the measured batch noise; closer calls are left to a single step, as
    plain decoding makes them. (The KV entries a batch wrote carry the same noise, so a later near tie
    can still go the other way: greedy identity is exact only where the backend's batches are.)
    """
    be = session.backend
    penalties = config.repeat_penalty != 1.0 and config.repeat_last_n > 0
    tok = be.sample(config)
    yield tok  # the first token comes before the n-gram index is built, so it costs TTFT nothing
    noise = batch_noise(session, settings.max_draft + 1) if config.greedy or settings.auto else 0.0
    guard = GUARD * noise if config.greedy else 0.0
    spec = Speculator(settings, be.name, session.tokens, config)
    control = spec.control
    index, emitted = spec.index, 1
    index.extend((tok,))
    # no probe was possible (greedy), or AUTO on a graph whose batches are not exact: decode plainly
    plain = guard == float("inf") or (settings.auto and noise > EXACT_NOISE)
    single = False  # the last verification left a close call to a single step
    while True:  # here `tok` is the last emitted token: in the index, not yet in the KV cache
        budget = max_tokens - emitted - 1  # the token after the accepted drafts is emitted too
        draft = spec.draft(budget) if budget > 0 and not plain and not single else []
        single = False
        m, nxt = 0, None
        if draft:
            base = be.n_past
            session.tokens.append(tok)
            session.tokens.extend(draft)
            try:
                t0 = time.perf_counter()
                rows = be.eval_rows([tok, *draft])
                m, nxt = spec.verify(rows, draft, guard)
                keep = base + m + (nxt is not None)  # without its next token, d_m is evaluated again
                be.truncate(keep)
                del session.tokens[keep:]
                control.observe_batch(len(draft), time.perf_counter() - t0)
            except BaseException:
                session._sync()
                raise
            stats.drafted += len(draft)
            stats.accepted += m
            if penalties:  # the backend sampler's repetition window sees every emitted token
                be.accept_tokens([*draft[:m], *([] if nxt is None else [nxt])])
        if not draft or (m == 0 and nxt is None):  # a plain step
            t0 = time.perf_counter()
            session._eval((tok,))
            tok = be.sample(config)
            control.observe_step(time.perf_counter() - t0)
            spec.plain(tok)
            emitted += 1
            index.extend((tok,))
            yield tok
            continue
        for t in draft[:m]:
            emitted += 1
            index.extend((t,))
            yield t
        if nxt is None:
            tok, single = draft[m - 1], True
            continue
        tok = nxt
        emitted += 1
        index.extend((tok,))
        yield tok
