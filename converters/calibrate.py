"""Activation statistics on calibration text, from the one reference forward pass."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .checkpoint import Checkpoint, ModelConfig
from .reference import Dims, ImatrixCollector, embed, head, layer


def dims_of(config: ModelConfig) -> Dims:
    return Dims(n_layer=config.num_hidden_layers, n_embd=config.hidden_size, n_head=config.num_attention_heads,
                n_head_kv=config.num_key_value_heads, head_dim=config.head_dim, eps=config.rms_norm_eps,
                rope_theta=config.rope_theta, tied=config.tie_word_embeddings)


def weight_getter(ckpt: Checkpoint) -> Callable[[str], np.ndarray | None]:
    """float32 weights by HF name, loaded once (the forward pass reads every layer per chunk)."""
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray | None:
        if name not in ckpt.tensors.shapes:
            return None
        if name not in cache:
            cache[name] = np.ascontiguousarray(ckpt.tensors.load(name), dtype=np.float32)
        return cache[name]

    return get


def compute_imatrix(ckpt: Checkpoint, tokens: Sequence[int], *, chunk: int = 512,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Mean squared input of every linear layer over `tokens`, keyed by GGUF tensor name.

    Layer-major: every chunk passes through layer i before layer i+1 loads, so only one layer's
    weights (plus the chunks' hidden states) are in memory, whatever the model's size.
    """
    dims = dims_of(ckpt.config)
    collector = ImatrixCollector()
    starts = list(range(0, max(len(tokens) - 1, 1), chunk))
    table = weight_getter(ckpt)      # the embedding is read once for every chunk, then dropped
    states = [embed(table, tokens[s:s + chunk]) for s in starts]
    del table
    for i in range(dims.n_layer):
        get = weight_getter(ckpt)     # a fresh cache per layer: the previous layer's weights are freed
        states = [layer(dims, get, i, h, collector) for h in states]
        if progress:
            progress(i + 1, dims.n_layer + 1)
    get = weight_getter(ckpt)
    for h in states:
        head(dims, get, h, collector, logits=False)
    if progress:
        progress(dims.n_layer + 1, dims.n_layer + 1)
    return collector.means()
