"""GGUF K-quant super-blocks (Q4_K, Q5_K, Q6_K) for GPTQ: fitted once per 256 columns, packed as ggml reads them.

A super-block holds 256 weights of one row in sub-blocks (8 × 32 for Q4_K/Q5_K: value = d·sc·q − dmin·m with
6-bit sc, m; 16 × 16 for Q6_K: value = d·sc·(q − 32) with int8 sc) under fp16 d (and dmin). GPTQ needs every
sub-block's scale before it rounds the first column of the super-block, so the grid is fitted on the
super-block's columns as compensated at that point (GPTQ's "static groups") and each column is then
rounded on it. The float arithmetic of `round` is the order llama.cpp's dequantize_row_q*_K uses
(d·sc first, then ·q, then − dmin·m), so the values are bit-exact. Q2_K and Q3_K are not offered: their
sub-block scales are 4-bit with a different min scheme (Q2_K) or signed 6-bit codes with a separate
high-bit mask (Q3_K) — possible, but they only fit ffn_down on 576-wide models and lose to Q4_0+GPTQ
per byte there, so they stay with llama.cpp's quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_grids import MinGrid, ScaleGrid, _f16, _half

QK = 256


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values [n, 8] as fp16 super-scale · 6-bit integers (as llama.cpp does)."""
    top = values.max(-1)
    d = _f16(top / 63.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] > 0, np.rint(values / d[:, None]), 0.0)
    return d, np.clip(q, 0, 63).astype(np.int16)


@dataclass(frozen=True)
class KMinGrid:
    """Q4_K (qmax 15) and Q5_K (qmax 31): value = (d·sc)·q − (dmin·m) per 32-wide sub-block."""

    qmax: int
    block: int = QK

    def fit(self, w: np.ndarray, imp: np.ndarray):
        n = len(w)
        x, im = w.reshape(n, 8, 32), imp.reshape(8, 32)
        scale, offset = MinGrid(self.qmax).fit(x, im, half=False, max_min=0.0)   # offset ≤ 0: stored as −m
        d, sc = _six_bit(np.maximum(scale, 0.0))
        dmin, m = _six_bit(-offset)
        step = d[:, None] * sc.astype(np.float32)           # d1 = d * sc, as float32, as in C
        low = dmin[:, None] * m.astype(np.float32)          # m1 = min * m
        return d, dmin, sc, m, step, low

    def round(self, params, col, j):
        step, low = params[4][:, j // 32], params[5][:, j // 32]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(step != 0, (col + low) / step, 0.0)
        q = np.clip(np.rint(t), 0, self.qmax).astype(np.int16)
        return q, step * q.astype(np.float32) - low


@dataclass(frozen=True)
class Q6KGrid:
    """Q6_K: value = (d·sc)·(q − 32) per 16-wide sub-block, q in 0..63, sc int8, d fp16."""

    block: int = QK

    def fit(self, w: np.ndarray, imp: np.ndarray):
        n = len(w)
        scale = ScaleGrid(np.arange(-32, 32, dtype=np.float32), True).fit(w.reshape(n, 16, 16), imp.reshape(16, 16),
                                                                          half=False)
        far = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(far != 0, -128.0 / far, 0.0)
        sc = np.clip(np.rint(iscale[:, None] * scale), -128, 127).astype(np.int16)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = _f16(np.where(iscale != 0, 1.0 / iscale, 0.0))
        step = d[:, None] * sc.astype(np.float32)
        return d, sc, step

    def round(self, params, col, j):
        step = params[2][:, j // 16]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(step != 0, col / step, 0.0)
        q = np.clip(np.rint(t), -32, 31).astype(np.int16)
        return q + 32, step * q.astype(np.float32)


KQUANTS = {"Q4_K": KMinGrid(15), "Q5_K": KMinGrid(31), "Q6_K": Q6KGrid()}


def _scales12(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [..., 8] → ggml's 12 packed bytes (get_scale_min_k4's inverse)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return out


def pack_k(name: str, codes: np.ndarray, params: list) -> np.ndarray:
    """codes [n, nb, 256] and the blocks' parameters → [n, nb, type_size] bytes."""
    n, nb, _ = codes.shape
    q = codes.astype(np.uint8)
    if name == "Q6_K":
        d = np.stack([p[0] for p in params], 1)
        sc = np.stack([p[1] for p in params], 1).astype(np.int8).view(np.uint8)
        h = q.reshape(n, nb, 2, 4, 32)                              # [half, s, l]: element 128h + 32s + l
        ql = np.empty((n, nb, 2, 64), np.uint8)
        ql[..., :32] = (h[..., 0, :] & 0x0F) | ((h[..., 2, :] & 0x0F) << 4)
        ql[..., 32:] = (h[..., 1, :] & 0x0F) | ((h[..., 3, :] & 0x0F) << 4)
        hi = h >> 4
        qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        return np.concatenate([ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sc, _half(d)], axis=-1)
    d, dmin = np.stack([p[0] for p in params], 1), np.stack([p[1] for p in params], 1)
    sc, m = np.stack([p[2] for p in params], 1), np.stack([p[3] for p in params], 1)
    sub = q.reshape(n, nb, 4, 2, 32)                                # pairs of 32-wide sub-blocks
    qs = ((sub[..., 0, :] & 0x0F) | ((sub[..., 1, :] & 0x0F) << 4)).reshape(n, nb, 128)
    parts = [_half(d), _half(dmin), _scales12(sc, m)]
    if name == "Q5_K":
        bits = (q.reshape(n, nb, 8, 32) >> 4) & 1                   # bit s of qh[l]: sub-block s, element l
        parts.append((bits << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


__all__ = ["KQUANTS", "pack_k"]
