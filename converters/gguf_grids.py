"""The per-block grids of GGUF's legacy and K-quant types: how a block's scale (and min) are fitted and
one column rounds, with exactly the float arithmetic of llama.cpp's dequantizer, plus the byte helpers
both packers share (converters/gguf_blocks.py, converters/gguf_kblocks.py). Hand-written for the reason
gguf_blocks.py gives: no library rounds to given integers in ggml's layouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType
_FIT_STEPS = np.linspace(0.80, 1.12, 17, dtype=np.float32)   # candidate scales around the block's extreme
IQ4_LEVELS = np.array(gguf.quants.IQ4_NL.kvalues, np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 values as llama.cpp reads them back from their fp16 fields."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _wsum(imp: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x * imp).sum(-1)


@dataclass(frozen=True)
class ScaleGrid:
    """value = d · level[q] with one fp16 scale d per block: Q4_0 (levels −8..7), Q5_0 (−16..15),
    Q8_0 (−128..127) and IQ4_NL (llama.cpp's 16 non-uniform levels). `uniform` levels round with rint."""

    levels: np.ndarray
    uniform: bool
    block: int = 32

    def _codes(self, t: np.ndarray) -> np.ndarray:
        lv = self.levels
        if self.uniform:
            return (np.clip(np.rint(t), lv[0], lv[-1]) - lv[0]).astype(np.int16)
        mid = (lv[1:] + lv[:-1]) / 2
        return np.searchsorted(mid, t).astype(np.int16)

    def _rounded(self, x: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d[..., None] != 0, x / d[..., None], 0.0)
        return self._codes(t)

    def fit(self, w: np.ndarray, imp: np.ndarray, half: bool = True) -> np.ndarray:
        """Each row's d: candidates map the block's extreme onto levels near the grid's end, each refitted by
        weighted least squares for its integers; the least Σ imp·(x − d·level)² (after fp16 rounding, with
        `half`) wins. Any leading shape: w [..., block] with imp broadcasting against it."""
        far = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)[..., 0]    # signed extreme
        best_d, best_e = np.zeros(far.shape, np.float32), np.full(far.shape, np.inf, np.float32)
        rnd = _f16 if half else (lambda x: np.asarray(x, np.float32))
        for step in _FIT_STEPS:
            d0 = far / (self.levels[0] * step)
            lv = self.levels[self._rounded(w, d0)]
            den = _wsum(imp, lv * lv)
            with np.errstate(divide="ignore", invalid="ignore"):
                d1 = np.where(den > 0, _wsum(imp, w * lv) / den, 0.0)
            for cand in (d0, d1):
                cand = rnd(cand)
                err = _wsum(imp, (self.levels[self._rounded(w, cand)] * cand[..., None] - w) ** 2)
                better = err < best_e
                best_d, best_e = np.where(better, cand, best_d), np.where(better, err, best_e)
        return best_d

    def round(self, d: np.ndarray, col: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._rounded(col[:, None], d)[:, 0]
        return q, self.levels[q] * d


@dataclass(frozen=True)
class MinGrid:
    """value = q·d + m with fp16 d and m per block, q in 0..qmax: Q4_1 (qmax 15) and Q5_1 (31)."""

    qmax: int
    block: int = 32

    def _codes(self, x: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d[..., None] != 0, (x - m[..., None]) / d[..., None], 0.0)
        return np.clip(np.rint(t), 0, self.qmax).astype(np.int16)

    def fit(self, w: np.ndarray, imp: np.ndarray, half: bool = True, max_min: float | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """Ranges shrunk about their centre, each refitted by weighted least squares in (d, m) for its
        integers; the least weighted error (after fp16 rounding, with `half`) wins. `max_min` caps m (the
        K-quants store −m ≥ 0). Any leading shape: w [..., block] with imp broadcasting against it."""
        lo, hi = w.min(-1), w.max(-1)
        if max_min is not None:
            lo = np.minimum(lo, max_min)
        best = (np.zeros(lo.shape, np.float32), lo.astype(np.float32), np.full(lo.shape, np.inf, np.float32))
        sw = np.broadcast_to(imp, w.shape).sum(-1)
        rnd = _f16 if half else (lambda x: np.asarray(x, np.float32))
        for shrink in (1.0, 0.96, 0.92, 0.88, 0.84, 0.8):
            span = (hi - lo) * shrink
            d0, m0 = span / self.qmax, (lo + hi) / 2 - span / 2
            if max_min is not None:
                m0 = np.minimum(m0, max_min)
            q = self._codes(w, d0, m0).astype(np.float32)
            sq, sqq, sx, sqx = _wsum(imp, q), _wsum(imp, q * q), _wsum(imp, w), _wsum(imp, q * w)
            det = sqq * sw - sq * sq
            with np.errstate(divide="ignore", invalid="ignore"):
                d1 = np.where(det > 0, (sqx * sw - sq * sx) / det, d0)
                m1 = np.where(det > 0, (sqq * sx - sq * sqx) / det, m0)
            if max_min is not None:
                m1 = np.minimum(m1, max_min)
            for d, m in ((d0, m0), (d1, m1)):
                d, m = rnd(np.maximum(d, 0.0)), rnd(m)
                err = _wsum(imp, (self._codes(w, d, m) * d[..., None] + m[..., None] - w) ** 2)
                better = err < best[2]
                best = (np.where(better, d, best[0]), np.where(better, m, best[1]), np.where(better, err, best[2]))
        return best[0], best[1]

    def round(self, params, col, j):
        d, m = params
        q = self._codes(col[:, None], d, m)[:, 0]
        return q, q.astype(np.float32) * d + m


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes (low 4 bits) as ggml's 16 bytes: byte j holds q[j] low, q[j + 16] high."""
    q = q.astype(np.uint8) & 0x0F
    return q[..., :16] | (q[..., 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes' bit 4 as ggml's little-endian uint32 (Q5_0/Q5_1's qh)."""
    return np.packbits(((q.astype(np.uint8) >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _half(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)[..., None].view(np.uint8)
