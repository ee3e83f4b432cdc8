"""Block-quantized weights for onnxruntime's MatMulNBits (4/8-bit) and per-channel int8 for QDQ graphs.

Hand-written: onnxruntime's own MatMulNBitsQuantizer rounds each block to min/max (or |max|) with no
notion of which input columns matter. Here every block's scale and zero point are searched to
minimise the *importance-weighted* error Σ_k imp_k (w_k − ŵ_k)², where imp is the importance matrix
(mean squared input of each column, from converters.calibrate) — the llama.cpp imatrix idea applied
to onnxruntime's layout. `allocate_bits` then spends a size budget on 8-bit blocks where they remove
the most weighted error per byte (4-bit blocks of 64 or 32, or 8-bit blocks).

Layouts (onnxruntime contrib op MatMulNBits): B uint8 [N, n_blocks, block·bits/8] (4-bit: low nibble
first), scales float32 [N, n_blocks], zero points uint8 [N, ⌈n_blocks·bits/8⌉] (4-bit packed the same
way); dequantised w = (q − zp) · scale, blocks run along K (the input dimension).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .knapsack import exact_choice

# candidate shrink factors of the block range (1.0 = plain min/max); the least weighted error wins.
# 8-bit steps are fine enough that clipping outliers rarely pays: two candidates keep that layout cheap.
_SHRINK = {4: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75), 8: (1.0, 0.97)}


@dataclass
class QuantTensor:
    """One weight [N, K] as MatMulNBits inputs, plus the weighted error its rounding left."""

    bits: int
    block: int
    k: int
    n: int
    data: np.ndarray          # uint8 [N, n_blocks, block*bits/8]
    scales: np.ndarray        # float32 [N, n_blocks]
    zero_points: np.ndarray   # uint8 packed [N, ceil(n_blocks*bits/8)], or float32 [N, n_blocks] (4-bit only)
    weighted_error: float

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] back from the blocks (what onnxruntime computes with)."""
        q = unpack(self.data, self.bits).astype(np.float32)
        zp = (self.zero_points if self.zero_points.dtype == np.float32 else  # float zero points: not packed
              unpack(self.zero_points, self.bits)[:, :self.scales.shape[1]].astype(np.float32))
        w = (q - zp[..., None]) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, :self.k]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits along the last axis into bytes (4-bit: two per byte, low nibble first)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    pad = (-k) % block
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), w.dtype)], axis=1)
    return w.reshape(n, -1, block)


def quantize_blocks(w: np.ndarray, bits: int, block: int, importance: np.ndarray | None = None,
                    rows: int = 4096) -> QuantTensor:
    """Asymmetric `bits`-bit block quantization of w [N, K] (HF layout) minimising importance-weighted error."""
    n, k = w.shape
    imp = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    imp = _blocks((imp + 1e-8 * max(float(imp.mean()), 1e-12))[None, :], block)[0]   # [nb, block]
    if k % block:
        imp[-1, k % block:] = 0.0  # padding columns never count
    qmax = (1 << bits) - 1
    nb = -(-k // block)
    data = np.empty((n, nb, block * bits // 8), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.uint8)
    total = 0.0
    for r in range(0, n, rows):  # row chunks bound the temporaries (lm_head is 49k × 576)
        x = _blocks(np.asarray(w[r:r + rows], np.float32), block)
        lo, hi = np.minimum(x.min(-1), 0.0), np.maximum(x.max(-1), 0.0)
        best_err = np.full(lo.shape, np.inf, np.float32)
        best_s, best_z = np.ones_like(lo), np.zeros_like(lo)
        for shrink in _SHRINK.get(bits, _SHRINK[4]):
            s = np.maximum((hi - lo) * shrink / qmax, 1e-12)
            z = np.clip(np.round(-lo * shrink / s), 0, qmax)
            q = np.clip(np.round(x / s[..., None]) + z[..., None], 0, qmax)
            err = (imp * ((q - z[..., None]) * s[..., None] - x) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
        # one weighted least-squares refit of the scale for the chosen integers (zero point fixed)
        q = np.clip(np.round(x / best_s[..., None]) + best_z[..., None], 0, qmax)
        c = q - best_z[..., None]
        den = (imp * c * c).sum(-1)
        s2 = np.where(den > 0, (imp * c * x).sum(-1) / np.maximum(den, 1e-30), best_s)
        err2 = (imp * (c * s2[..., None] - x) ** 2).sum(-1)
        use = (err2 < best_err) & (s2 > 0)
        best_s, best_err = np.where(use, s2, best_s), np.where(use, err2, best_err)
        data[r:r + rows] = pack(q.astype(np.uint8), bits)
        scales[r:r + rows], zps[r:r + rows] = best_s, best_z.astype(np.uint8)
        total += float(best_err.sum())
    return QuantTensor(bits, block, k, n, data, scales, pack(zps, bits), total)


def quantize_int8_channels(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 (DequantizeLinear form, zero point 0): q int8, scale float32 along `axis`."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.maximum(amax / 127.0, 1e-12).astype(np.float32)
    shape = (1, -1) if axis == 1 else (-1, 1)
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class BitChoice:
    bits: int
    block: int


def bytes_of(n: int, k: int, choice: BitChoice) -> int:
    nb = -(-k // choice.block)
    return n * nb * (choice.block * choice.bits // 8 + 4) + n * -(-nb * choice.bits // 8)


def allocate_bits(shapes: Mapping[str, tuple[int, int]], errors: Mapping[str, Mapping[BitChoice, float]],
                  budget_bytes: int) -> dict[str, BitChoice]:
    """Every tensor at its smallest layout, then step by step the upgrade (to any larger layout of any
    tensor) that removes the most weighted error per extra byte, while the total fits `budget_bytes`.
    A greedy multiple-choice knapsack, checked against an exact one (the better wins); sizes are exact
    (bytes_of)."""
    size = {t: {c: bytes_of(*shapes[t], c) for c in errors[t]} for t in shapes}
    choice = {t: min(errors[t], key=lambda c: size[t][c]) for t in shapes}
    used = sum(size[t][choice[t]] for t in shapes)
    while True:
        best, best_rate = None, 0.0
        for t in shapes:
            cur = choice[t]
            for c, err in errors[t].items():
                extra = size[t][c] - size[t][cur]
                gain = errors[t][cur] - err
                if extra > 0 and gain > 0 and used + extra <= budget_bytes and gain / extra > best_rate:
                    best, best_rate = (t, c), gain / extra
        if best is None:
            break
        t, c = best
        used += size[t][c] - size[t][choice[t]]
        choice[t] = c
    # the greedy can miss the optimum where one upgrade blocks a better pair: an exact dynamic programme over
    # the bytes (converters/knapsack.py) is the check, and the choice with less error wins
    order = {t: list(errors[t]) for t in shapes}
    exact = exact_choice({t: [(size[t][c], errors[t][c]) for c in order[t]] for t in shapes}, budget_bytes)
    if exact is not None and sum(errors[t][order[t][j]] for t, j in exact.items()) < \
            sum(errors[t][choice[t]] for t in shapes):
        choice = {t: order[t][j] for t, j in exact.items()}
    return choice


Progress = Callable[[int, int], None]
