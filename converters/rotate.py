"""A random orthogonal rotation of the residual stream, merged into the weights (the QuaRot idea).

The rotated model computes the same function (up to float rounding), but none of its weights lie on
any quantization grid: it is the off-grid reference for quality measurements, since the shipped
SmolLM2 file's weights all sit on its Q4_1 grid and flatter Q4_1-like choices.

With column vectors and RMSNorm gains g folded into the layers that read the normalised stream,
h' = R h holds everywhere if:
  embeddings  E' = E Rᵀ                    (rows are tokens)
  readers     W' = W diag(g) Rᵀ            (q, k, v after input_layernorm; gate, up after post_attention_layernorm;
                                            lm_head after the final norm)
  writers     W' = R W,  b' = R b          (o_proj, down_proj add into the stream)
and every norm gain becomes 1, because ‖R h‖ = ‖h‖ makes RMSNorm commute with R. Tied embeddings must
be untied: the head needs E diag(g) Rᵀ while the lookup needs E Rᵀ.

Hand-written: neither gguf nor transformers rotates checkpoints; the algebra is the paper's.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from .checkpoint import Checkpoint, TensorSource, hf_tensor_shapes

_READERS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
            "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
_WRITERS = ("o_proj", "down_proj")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), in float64."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotate(ckpt: Checkpoint, seed: int = 0, rotation: np.ndarray | None = None) -> Checkpoint:
    """`ckpt` with its residual stream rotated (lazily, one tensor at a time) and embeddings untied."""
    c = ckpt.config
    rot = random_orthogonal(c.hidden_size, seed) if rotation is None else np.asarray(rotation, np.float64)
    if rot.shape != (c.hidden_size, c.hidden_size) or not np.allclose(rot @ rot.T, np.eye(c.hidden_size), atol=1e-6):
        raise ValueError(f"rotation must be an orthogonal {c.hidden_size}×{c.hidden_size} matrix")
    config = dataclasses.replace(c, tie_word_embeddings=False)
    shapes = hf_tensor_shapes(config)
    src = ckpt.tensors

    def gain(name: str) -> np.ndarray:
        return np.asarray(src.load(name), np.float64)

    def load(name: str) -> np.ndarray:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return np.ones(shapes[name], np.float32)
        if name == "model.embed_tokens.weight":
            return _f32(np.asarray(src.load(name), np.float64) @ rot.T)
        if name == "lm_head.weight":
            head = "lm_head.weight" if "lm_head.weight" in src.shapes else "model.embed_tokens.weight"
            return _f32((np.asarray(src.load(head), np.float64) * gain("model.norm.weight")) @ rot.T)
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"rotate: no rule for tensor {name}")
        layer, proj, kind = m.groups()
        if proj in _READERS:
            if kind == "bias":    # a reader's bias lives in its output space: unchanged
                return src.load(name)
            g = gain(f"model.layers.{layer}.{_READERS[proj]}.weight")
            return _f32((np.asarray(src.load(name), np.float64) * g) @ rot.T)
        if proj in _WRITERS:
            return _f32(rot @ np.asarray(src.load(name), np.float64))
        raise ValueError(f"rotate: no rule for tensor {name}")

    dtypes = {n: "F32" for n in shapes}
    return Checkpoint(config=config, tensors=TensorSource(shapes=shapes, load=load, dtypes=dtypes),
                      tokenizer=ckpt.tokenizer, name=f"{ckpt.name or c.architecture}-rotated")


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


__all__ = ["random_orthogonal", "rotate"]
