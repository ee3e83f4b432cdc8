"""Error-compensating block quantization (GPTQ, Frantar et al. 2022): one loop for every block format.

Hand-written: onnxruntime's MatMulNBitsQuantizer offers GPTQ only through Intel's neural-compressor
(a heavy extra that also re-runs the model in torch), and it cannot take the importance-searched block
ranges of converters.onnx_quant. Here the calibration pass already has every linear layer's inputs,
so their Gram matrix H = mean(x xᵀ) is all GPTQ needs: columns are rounded one at a time and each
rounding error is pushed onto the columns not yet rounded, along H⁻¹, so that x·w (not w itself)
stays close. A format is a Grid (how a block's parameters are fitted, how one column rounds):
MatMulNBits' asymmetric blocks here (scale and zero point from onnx_quant's weighted range search on the
already-compensated columns), GGUF's block types in converters/gguf_blocks.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .onnx_quant import QuantTensor, pack, quantize_blocks, unpack

DAMP = 0.01      # fraction of mean(diag H) added to the diagonal: keeps H invertible for rarely-used inputs


def inverse_factor(gram: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) and the columns no input ever reached; one per
    input, shared by every layout tried for it."""
    h = np.array(gram, np.float32)   # float32 throughout, as the reference implementation
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * max(float(np.diag(h).mean()), 1e-12)
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


class Grid(Protocol):
    """How one weight format rounds, for the shared GPTQ loop. `block` columns share parameters;
    `fit` chooses each row's parameters for one block from its columns as compensated so far
    (`imp`: the block's importance, the diagonal of H); `round` maps one column of that block to
    its integer codes and to the exact float32 values the runtime will compute from them."""

    block: int

    def fit(self, w: np.ndarray, imp: np.ndarray) -> Any: ...

    def round(self, params: Any, col: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]: ...


def gptq_rows(w: np.ndarray, u: np.ndarray, imp: np.ndarray, grid: Grid
              ) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """GPTQ over a slice of rows (rows are independent given H): codes [n, n_blocks·block], each block's
    parameters, and the rounded values [n, K]. Per-column updates stay inside the current block; the rest
    of the row gets one matmul per block. `u` is inverse_factor's upper factor of H⁻¹."""
    n, k = w.shape
    b = grid.block
    nb = -(-k // b)
    codes = np.zeros((n, nb * b), np.int16)
    values = np.empty((n, k), np.float32)
    params = []
    w = w.copy()
    for g in range(nb):
        i1, i2 = g * b, min(g * b + b, k)
        w1, e1 = w[:, i1:i2].copy(), np.empty((n, i2 - i1), np.float32)
        p = grid.fit(w1, imp[i1:i2])     # the block's grid is chosen on its columns as compensated so far
        params.append(p)
        for j in range(i2 - i1):
            c = i1 + j
            col = w1[:, j]
            qc, vc = grid.round(p, col, j)
            codes[:, c], values[:, c] = qc, vc
            err = (col - vc) / u[c, c]
            w1[:, j + 1:] -= np.outer(err, u[c, c + 1:i2])
            e1[:, j] = err
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    return codes, params, values


def gptq(w: np.ndarray, gram: np.ndarray, grid: Grid, *, factor: tuple[np.ndarray, np.ndarray] | None = None,
         rows: int = 2048) -> tuple[np.ndarray, list[list[Any]], np.ndarray]:
    """GPTQ of w [N, K] (HF layout) on `grid`, minimising the output error tr(E H Eᵀ) with H = `gram` [K, K].
    Returns codes, per row chunk the blocks' parameters, and the rounded values. Rows go in chunks of
    `rows` (lm_head is 49k × 576). Inputs that never fire (zero diagonal) are zeroed first: nothing reads them."""
    u, dead = factor if factor is not None else inverse_factor(gram)
    w = np.array(w, np.float32)
    w[:, dead] = 0.0
    imp = importance_of(gram)
    parts = [gptq_rows(w[r:r + rows], u, imp, grid) for r in range(0, w.shape[0], rows)]
    return (np.concatenate([p[0] for p in parts]), [p[1] for p in parts], np.concatenate([p[2] for p in parts]))


def importance_of(gram: np.ndarray) -> np.ndarray:
    """The diagonal of H, floored so that no column weighs exactly nothing in a block's range search."""
    return np.diag(gram).astype(np.float32) + 1e-8 * max(float(np.diag(gram).mean()), 1e-12)


@dataclass(frozen=True)
class NBitsGrid:
    """MatMulNBits' asymmetric grid: (q − zp)·scale, range searched by onnx_quant's weighted search."""

    bits: int
    block: int

    def fit(self, w: np.ndarray, imp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qt = quantize_blocks(w, self.bits, self.block, imp)
        return qt.scales[:, 0], unpack(qt.zero_points, self.bits)[:, 0].astype(np.float32)

    def round(self, params, col, j):
        s, z = params
        qc = np.clip(np.rint(col / s) + z, 0, (1 << self.bits) - 1)
        return qc, (qc - z) * s


def gptq_blocks(w: np.ndarray, gram: np.ndarray, bits: int, block: int, *,
                factor: tuple[np.ndarray, np.ndarray] | None = None, rows: int = 2048) -> QuantTensor:
    """Asymmetric `bits`-bit blocks of w [N, K] (HF layout) that minimise the output error tr(E H Eᵀ);
    `gram` is H [K, K]. weighted_error holds that output error, comparable with onnx_quant's Σ imp·δ²
    (the diagonal of H is the importance matrix). Rows go in chunks of `rows` (lm_head is 49k × 576)."""
    n, k = w.shape
    codes, params, _ = gptq(w, gram, NBitsGrid(bits, block), factor=factor, rows=rows)
    scales = np.concatenate([np.stack([p[0] for p in part], 1) for part in params])
    zps = np.concatenate([np.stack([p[1] for p in part], 1) for part in params])
    nb = scales.shape[1]
    qt = QuantTensor(bits, block, k, n, pack(codes.astype(np.uint8).reshape(n, nb, block), bits), scales,
                     pack(zps.astype(np.uint8), bits), 0.0)
    qt.weighted_error = output_error(w, qt, gram)
    return qt


def output_error(w: np.ndarray, qt: QuantTensor, gram: np.ndarray, rows: int = 8192) -> float:
    """tr(E H Eᵀ) with E = dequant − w: the mean squared change of x·w over the calibration inputs."""
    return values_error(w, qt.dequantize(), gram, rows)


def values_error(w: np.ndarray, values: np.ndarray, gram: np.ndarray, rows: int = 8192,
                 row_weight: np.ndarray | None = None) -> float:
    """tr(E H Eᵀ) with E = values − w (rows weighted by `row_weight` when given: Σ_i a_i e_i H e_iᵀ)."""
    total = 0.0
    h = np.asarray(gram, np.float32)
    for r in range(0, w.shape[0], rows):
        e = np.asarray(values[r:r + rows], np.float32) - np.asarray(w[r:r + rows], np.float32)
        per_row = np.einsum("ij,ij->i", e @ h, e)
        total += float(per_row.sum() if row_weight is None else per_row @ row_weight[r:r + rows])
    return total
