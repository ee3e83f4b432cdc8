"""The backend protocol every runtime implements, and the sampler settings they all accept.

The session layer (chat template, prefix/KV cache, stop strings, streaming) is written once above
this protocol; a backend only evaluates tokens into its KV cache and samples natively, so the
per-token loop never copies a logits row into Python unless a caller asks for logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from edgellm.errors import UsageError


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings; temperature 0 means greedy (deterministic)."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be ≥ 0"),
            (self.top_k >= 0, "top_k must be ≥ 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1.0 disables it)"),
            (self.repeat_last_n >= 0, "repeat_last_n must be ≥ 0"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be in [0, 2^32)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplerConfig(temperature=0.0)


@dataclass(frozen=True)
class Capabilities:
    kv_state: bool = True  # save/restore/truncate of the KV cache
    logits: bool = True
    gpu: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What the session layer needs from a runtime.

    Positions: the backend holds one sequence; `n_past` tokens are in its KV cache.
    """

    name: str
    device: str
    fingerprint: str  # identifies model + everything that changes KV state layout
    capabilities: Capabilities

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_past(self) -> int: ...

    def metadata(self, key: str) -> str | None: ...
    def n_params(self) -> int: ...
    def model_size(self) -> int:
        """Bytes of weights the backend reads (file or package size)."""
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]: ...
    def token_bytes(self, token: int, *, special: bool = False) -> bytes: ...
    def add_bos(self) -> bool: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def is_eog(self, token: int) -> bool: ...
    def special_token(self, which: str) -> int | None: ...

    def eval(self, tokens: Sequence[int]) -> None:
        """Append tokens to the KV cache at position n_past (logits kept for the last one)."""

    def sample(self, config: SamplerConfig) -> int:
        """Sample the next token from the last evaluated position, natively."""

    def reset_sampler(self, config: SamplerConfig, history: Sequence[int]) -> None:
        """Start a fresh sampler (seed, penalties) primed with the token history."""

    def logits(self) -> np.ndarray:
        """A copy of the last position's logits (float32, n_vocab)."""

    def eval_all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens and return the logits of every one of them (n, n_vocab): for evaluation."""

    def eval_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """Append a few tokens in one batch and return the logits of every one of them (n, n_vocab), for
        speculative verification: may be a read-only view, valid until the next evaluation."""

    def accept_tokens(self, tokens: Sequence[int]) -> None:
        """Tell the backend's sampler about tokens chosen outside it (its repetition-penalty window)."""

    def truncate(self, n: int) -> None:
        """Drop KV positions ≥ n."""

    def save_state(self) -> bytes: ...
    def load_state(self, data: bytes, n_tokens: int) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class BatchBackend(Protocol):
    """Several sequences in one context, decoded together: what `edgellm serve`'s engine needs on top of
    Backend (llama.cpp has it; a backend without it serves one request at a time through the Session)."""

    @property
    def n_seq(self) -> int:
        """Sequences the context holds, each with its own n_ctx-token KV stream."""

    def decode_batch(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                     outputs: Sequence[bool]) -> None:
        """Evaluate tokens of several sequences in one step (logits kept where `outputs`)."""

    def argmax_at(self, index: int) -> int:
        """Greedy pick from the logits of batch row `index`."""

    def make_sampler(self, config: SamplerConfig, history: Sequence[int] = ()) -> object:
        """A native sampler chain for one sequence (free it with free_sampler)."""

    def free_sampler(self, chain: object) -> None: ...
    def sample_at(self, chain: object, index: int) -> int: ...
    def seq_state(self, seq: int) -> bytes: ...
    def seq_remove(self, seq: int, start: int = 0) -> None: ...
    def seq_restore(self, seq: int, data: bytes, n_tokens: int | None = None) -> None: ...
