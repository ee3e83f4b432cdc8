"""Error-compensating block quantization (GPTQ, Frantar et al. 2022) for MatMulNBits weights.

Hand-written: onnxruntime's MatMulNBitsQuantizer offers GPTQ only through Intel's neural-compressor
(a heavy extra that also re-runs the model in torch), and it cannot take the importance-searched block
ranges of converters.onnx_quant. Here the calibration pass already has every linear layer's inputs,
so their Gram matrix H = mean(x xᵀ) is all GPTQ needs: columns are rounded one at a time and each
rounding error is pushed onto the columns not yet rounded, along H⁻¹, so that x·w (not w itself)
stays close. Each block's scale and zero point come from onnx_quant's weighted range search on the
already-compensated columns.
"""
from __future__ import annotations

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


def _rows(w: np.ndarray, u: np.ndarray, diag: np.ndarray, bits: int, block: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ over a slice of rows (rows are independent given H): integers, scales, zero points.
    Per-column updates stay inside the current block; the rest of the row gets one matmul per block."""
    n, k = w.shape
    nb, qmax = -(-k // block), (1 << bits) - 1
    q = np.zeros((n, nb * block), np.uint8)
    scales, zps = np.empty((n, nb), np.float32), np.empty((n, nb), np.float32)
    w = w.copy()
    for g in range(nb):
        i1, i2 = g * block, min(g * block + block, k)
        w1, e1 = w[:, i1:i2].copy(), np.empty((n, i2 - i1), np.float32)
        # the block's range is searched on its columns as compensated so far
        qt = quantize_blocks(w1, bits, block, diag[i1:i2])
        s, z = qt.scales[:, 0], unpack(qt.zero_points, bits)[:, 0].astype(np.float32)
        scales[:, g], zps[:, g] = s, z
        for j in range(i2 - i1):
            c = i1 + j
            col = w1[:, j]
            qc = np.clip(np.rint(col / s) + z, 0, qmax)
            q[:, c] = qc
            err = (col - (qc - z) * s) / u[c, c]
            w1[:, j + 1:] -= np.outer(err, u[c, c + 1:i2])
            e1[:, j] = err
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    return q, scales, zps


def gptq_blocks(w: np.ndarray, gram: np.ndarray, bits: int, block: int, *,
                factor: tuple[np.ndarray, np.ndarray] | None = None, rows: int = 2048) -> QuantTensor:
    """Asymmetric `bits`-bit blocks of w [N, K] (HF layout) that minimise the output error tr(E H Eᵀ);
    `gram` is H [K, K]. weighted_error holds that output error, comparable with onnx_quant's Σ imp·δ²
    (the diagonal of H is the importance matrix). Rows go in chunks of `rows` (lm_head is 49k × 576)."""
    n, k = w.shape
    u, dead = factor if factor is not None else inverse_factor(gram)
    w = np.array(w, np.float32)
    w[:, dead] = 0.0
    diag = np.diag(gram).astype(np.float32) + 1e-8 * max(float(np.diag(gram).mean()), 1e-12)
    parts = [_rows(w[r:r + rows], u, diag, bits, block) for r in range(0, n, rows)]
    q = np.concatenate([p[0] for p in parts])
    scales, zps = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    nb = scales.shape[1]
    qt = QuantTensor(bits, block, k, n, pack(q.reshape(n, nb, block), bits), scales,
                     pack(zps.astype(np.uint8), bits), 0.0)
    qt.weighted_error = output_error(w, qt, gram)
    return qt


def output_error(w: np.ndarray, qt: QuantTensor, gram: np.ndarray, rows: int = 8192) -> float:
    """tr(E H Eᵀ) with E = dequant − w: the mean squared change of x·w over the calibration inputs."""
    total = 0.0
    h = np.asarray(gram, np.float32)
    deq = qt.dequantize()
    for r in range(0, qt.n, rows):
        e = deq[r:r + rows] - w[r:r + rows]
        total += float(np.einsum("ij,ij->", e @ h, e))
    return total
