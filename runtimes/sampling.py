"""Token sampling over a logits row in numpy, for backends without a native sampler chain (onnxruntime).

Hand-written to follow llama.cpp's chain order and semantics, so a SamplerConfig means the same on
every backend: repetition penalty over the last `repeat_last_n` tokens, then top-k, top-p, min-p,
temperature, and a seeded draw. Greedy without penalties is a plain argmax (ties to the lowest id).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from .base import SamplerConfig


class NumpySampler:
    """One sampler state: the seeded generator and the penalty window of accepted tokens."""

    def __init__(self, config: SamplerConfig, history: Sequence[int] = ()) -> None:
        self.config = config
        seed = config.seed if config.seed is not None else None
        self.rng = np.random.default_rng(seed)
        n = config.repeat_last_n
        self.window: deque[int] = deque(list(history)[-n:] if n else [], maxlen=n or None)

    def accept(self, token: int) -> None:
        if self.config.repeat_last_n:
            self.window.append(token)

    def sample(self, logits: np.ndarray) -> int:
        c = self.config
        x = np.asarray(logits, dtype=np.float32)
        if c.repeat_penalty != 1.0 and self.window:
            x = x.copy()
            ids = np.fromiter(set(self.window), dtype=np.int64)
            v = x[ids]
            x[ids] = np.where(v > 0, v / c.repeat_penalty, v * c.repeat_penalty)
        if c.greedy:
            tok = int(x.argmax())
        else:
            tok = self._draw(x)
        self.accept(tok)
        return tok

    def _draw(self, x: np.ndarray) -> int:
        c = self.config
        k = c.top_k if 0 < c.top_k < x.size else x.size
        ids = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        z = x[ids].astype(np.float64)
        p = np.exp(z - z[0])
        p /= p.sum()
        if c.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            ids, z, p = ids[:keep], z[:keep], p[:keep] / p[:keep].sum()
        if c.min_p > 0.0:
            keep = max(1, int((p >= c.min_p * p[0]).sum()))
            ids, z = ids[:keep], z[:keep]
        z = z / max(c.temperature, 1e-6)
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])
