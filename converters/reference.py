"""The one reference forward pass (numpy, float32) for Llama-family checkpoints.

Calibration statistics (the importance matrix for quantization, and later pruning scores) all
come from here, so there is a single implementation to trust. It follows the Hugging Face
modelling code (rotate-half RoPE, grouped-query attention, SwiGLU MLP, RMSNorm) and is checked
against llama.cpp's logits in the tests. Hand-written: no light library runs a HF checkpoint
without torch, and the runtime must stay torch-free.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

Hook = Callable[[str, np.ndarray], None]  # (GGUF tensor name of a linear layer, its input rows)


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_theta: float
    tied: bool


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """x: (n, heads, head_dim); HF's rotate-half convention."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def forward(dims: Dims, weight: Callable[[str], np.ndarray | None], tokens: Iterable[int], *,
            hook: Hook | None = None, logits: bool = True) -> np.ndarray:
    """Run tokens (one sequence, from position 0) and return logits (n, vocab) or the final hidden state.

    `weight(hf_name)` returns a float32 array (None for an absent bias). `hook` sees the input of
    every linear layer under its GGUF name, which is what llama.cpp's quantizer keys imatrix data by.
    """
    h = embed(weight, tokens)
    for i in range(dims.n_layer):
        h = layer(dims, weight, i, h, hook)
    return head(dims, weight, h, hook, logits)


def embed(weight: Callable[[str], np.ndarray | None], tokens: Iterable[int]) -> np.ndarray:
    toks = np.asarray(list(tokens), dtype=np.int64)
    return weight("model.embed_tokens.weight")[toks].astype(np.float32)


def layer(dims: Dims, weight: Callable[[str], np.ndarray | None], i: int, h: np.ndarray,
          hook: Hook | None = None) -> np.ndarray:
    """Decoder layer `i` on the hidden states `h` of one sequence starting at position 0."""
    p = f"model.layers.{i}"
    h = h + linear(attend(dims, weight, i, h, hook), weight, f"{p}.self_attn.o_proj", f"blk.{i}.attn_output.weight",
                   hook)
    return h + linear(mlp_act(dims, weight, i, h, hook), weight, f"{p}.mlp.down_proj", f"blk.{i}.ffn_down.weight",
                      hook)


def linear(x: np.ndarray, weight: Callable[[str], np.ndarray | None], hf: str, gguf_name: str,
           hook: Hook | None = None) -> np.ndarray:
    if hook is not None:
        hook(gguf_name, x)
    y = x @ weight(f"{hf}.weight").T
    b = weight(f"{hf}.bias")
    return y + b if b is not None else y


def attend(dims: Dims, weight: Callable[[str], np.ndarray | None], i: int, h: np.ndarray,
           hook: Hook | None = None) -> np.ndarray:
    """Layer `i`'s attention up to o_proj's input (n, n_head * head_dim): the stages are separate so that
    pruning's refit (converters/refit.py) can refit o_proj and down_proj between them."""
    n = len(h)
    pos = np.arange(n)
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    group = dims.n_head // dims.n_head_kv
    p = f"model.layers.{i}"
    x = _rmsnorm(h, weight(f"{p}.input_layernorm.weight"), dims.eps)
    q = linear(x, weight, f"{p}.self_attn.q_proj", f"blk.{i}.attn_q.weight", hook)
    q = q.reshape(n, dims.n_head, dims.head_dim)
    k = linear(x, weight, f"{p}.self_attn.k_proj", f"blk.{i}.attn_k.weight", hook).reshape(n, dims.n_head_kv,
                                                                                            dims.head_dim)
    v = linear(x, weight, f"{p}.self_attn.v_proj", f"blk.{i}.attn_v.weight", hook).reshape(n, dims.n_head_kv,
                                                                                            dims.head_dim)
    q, k = _rope(q, pos, dims.rope_theta), _rope(k, pos, dims.rope_theta)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    qh, kh, vh = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (heads, n, d): BLAS matmuls
    scores = qh @ kh.transpose(0, 2, 1) * np.float32(1 / np.sqrt(dims.head_dim)) + mask
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ vh).transpose(1, 0, 2).reshape(n, dims.n_head * dims.head_dim)


def mlp_act(dims: Dims, weight: Callable[[str], np.ndarray | None], i: int, h: np.ndarray,
            hook: Hook | None = None) -> np.ndarray:
    """Layer `i`'s SwiGLU activations (down_proj's input) from the residual stream after attention."""
    p = f"model.layers.{i}"
    x = _rmsnorm(h, weight(f"{p}.post_attention_layernorm.weight"), dims.eps)
    gate = linear(x, weight, f"{p}.mlp.gate_proj", f"blk.{i}.ffn_gate.weight", hook)
    up = linear(x, weight, f"{p}.mlp.up_proj", f"blk.{i}.ffn_up.weight", hook)
    return gate / (1.0 + np.exp(-gate)) * up


def head(dims: Dims, weight: Callable[[str], np.ndarray | None], h: np.ndarray, hook: Hook | None = None,
         logits: bool = True) -> np.ndarray:
    """Final norm, then logits (or the normalised hidden state when `logits` is False)."""
    h = _rmsnorm(h, weight("model.norm.weight"), dims.eps)
    if hook is not None:  # a tied output matrix is token_embd in llama.cpp, and keyed so
        hook("token_embd.weight" if dims.tied else "output.weight", h)
    if not logits:
        return h
    return h @ weight(f"{'model.embed_tokens' if dims.tied else 'lm_head'}.weight").T


class ImatrixCollector:
    """Mean of squared inputs per column of every linear layer: llama.cpp's importance matrix.
    With `gram`, also the sum of x xᵀ per distinct input (q/k/v and gate/up share one, keyed by the
    first name that read it), for error-compensating quantization (converters.gptq)."""

    def __init__(self, gram: bool = False) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.grams: dict[str, np.ndarray] | None = {} if gram else None
        self._last: tuple[np.ndarray | None, np.ndarray | None] = (None, None)

    def __call__(self, name: str, x: np.ndarray) -> None:
        if self._last[0] is x:        # q/k/v (and gate/up) read the same rows: square them once
            sq = self._last[1]
        else:
            sq = np.einsum("ij,ij->j", x, x).astype(np.float64)   # a chunk in float32, the running sum in float64
            self._last = (x, sq)
            if self.grams is not None:
                g = x.T @ x
                self.grams[name] = self.grams[name] + g if name in self.grams else g
        if name in self.sums:
            self.sums[name] += sq
        else:   # a copy: q/k/v share `sq`, and an aliased sum would add every later chunk three times
            self.sums[name] = sq.copy()
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def take_grams(self, into: dict[str, np.ndarray]) -> None:
        """Add this collector's Gram sums into `into` and drop them (bounds memory to one total)."""
        for name, g in (self.grams or {}).items():
            into[name] = into[name] + g if name in into else g
        if self.grams is not None:
            self.grams = {}

    @staticmethod
    def merged(parts: list[ImatrixCollector]) -> dict[str, np.ndarray]:
        """Means over several collectors' inputs (chunks collected on separate threads)."""
        total = ImatrixCollector()
        for part in parts:
            for name, sq in part.sums.items():
                total.sums[name] = total.sums[name] + sq if name in total.sums else sq.copy()
                total.counts[name] = total.counts.get(name, 0) + part.counts[name]
        return total.means()

    def means(self) -> dict[str, np.ndarray]:
        return {k: (v / self.counts[k]).astype(np.float32) for k, v in self.sums.items()}
