"""Weights for Core ML packages: edgellm's calibrated blocks, and coremltools' own compressors as the anchors.

- int4: asymmetric 4-bit blocks of 64 along the input axis, rounded by GPTQ from the calibration pass's Gram
  matrices (converters.gptq — the same machinery as the ONNX int4 export), stored as uint4 data with an fp16
  scale and a uint4 offset per block: 4.31 bits per weight, under coremltools' int4 recipe (symmetric int4
  blocks of 32 with an fp16 scale: 4.5 bits per weight).
- int8: asymmetric 8-bit per output channel (one scale and offset per row), GPTQ-rounded in batches of 128
  columns against that fixed grid.
- palette4 / coreml-int4: coremltools' own compressors (k-means palettization; round-to-nearest symmetric int4
  blocks of 32, the recipe of swift-transformers' Mistral export) applied to edgellm's f16 program, restricted to
  linear and gather weights so the RoPE tables stay exact.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from edgellm.errors import UnsupportedModelError

from .checkpoint import Checkpoint
from .gptq import NBitsGrid, gptq_rows, importance_of, inverse_factor, output_error
from .onnx_graph import fused_units, unit_weight
from .onnx_quant import QuantTensor, pack, quantize_blocks, unpack

INT4_BLOCK = 64
CHANNEL_BATCH = 128           # columns per GPTQ batch for per-channel int8
ANCHOR_INT4_BLOCK = 32        # coremltools' per_block recipe in swift-transformers' export and Apple's Llama article
COMPRESSED_OPS = ("linear", "gather")   # the weights edgellm compresses; never the RoPE tables (slice_by_index)
_FP16_TINY = float(np.finfo(np.float16).tiny)


def block_for(bits: int, k: int) -> int:
    """Block length along the input axis: per channel for 8-bit; 64 (or the largest power of two ≤ 64
    that divides K) for 4-bit — constexpr_blockwise_shift_scale needs whole blocks."""
    if bits == 8:
        return k
    for block in (INT4_BLOCK, 32, 16, 8):
        if k % block == 0:
            return block
    raise UnsupportedModelError(f"a matrix with {k} inputs has no 4-bit block length (8..64) that divides it")


def _fp16(scale: np.ndarray) -> np.ndarray:
    """Scales as the package stores them (fp16), back in float32."""
    return np.clip(scale, _FP16_TINY, 65504.0).astype(np.float16).astype(np.float32)


@dataclass(frozen=True)
class F16BlockGrid(NBitsGrid):
    """onnx_quant's asymmetric blocks with each scale rounded to fp16 before GPTQ rounds against it, so the
    error compensation sees exactly the values Core ML will compute."""

    def fit(self, w: np.ndarray, imp: np.ndarray):
        s, z = super().fit(w, imp)
        return _fp16(s), z


@dataclass(frozen=True)
class ChannelGrid:
    """One fixed (scale, zero point) per output channel for the whole row, GPTQ-compensated over columns in
    lazy batches of `block` (with the row as one block, GPTQ's per-column updates would grow with K²)."""

    block: int
    scale: np.ndarray
    zero: np.ndarray
    bits: int = 8

    def fit(self, w: np.ndarray, imp: np.ndarray) -> None:
        return None

    def round(self, params, col: np.ndarray, j: int):
        qc = np.clip(np.rint(col / self.scale) + self.zero, 0, (1 << self.bits) - 1)
        return qc, (qc - self.zero) * self.scale


def gptq_quant(w: np.ndarray, gram: np.ndarray, bits: int, *, rows: int = 2048) -> QuantTensor:
    """GPTQ blocks of w [N, K] in the package's layout: 4-bit blocks (block_for) or 8-bit per channel, scales
    already fp16. The returned QuantTensor is exactly what the package stores."""
    n, k = w.shape
    block = block_for(bits, k)
    u, dead = inverse_factor(gram)
    w = np.array(w, np.float32)
    w[:, dead] = 0.0
    imp = importance_of(gram)
    codes, scales, zeros = [], [], []
    for r in range(0, n, rows):
        chunk = w[r:r + rows]
        if bits == 8:   # the row's range first (importance-weighted search over the whole row), then GPTQ
            qt = quantize_blocks(chunk, bits, block, imp)
            grid = ChannelGrid(CHANNEL_BATCH, _fp16(qt.scales[:, 0]), unpack(qt.zero_points, bits)[:, 0]
                               .astype(np.float32))
            c, _, _ = gptq_rows(chunk, u, imp, grid)
            s, z = grid.scale[:, None], grid.zero[:, None]
        else:
            c, params, _ = gptq_rows(chunk, u, imp, F16BlockGrid(bits, block))
            s, z = np.stack([p[0] for p in params], 1), np.stack([p[1] for p in params], 1)
        codes.append(c[:, :k])
        scales.append(s)
        zeros.append(z)
    scales, zeros = np.concatenate(scales), np.concatenate(zeros)
    nb = scales.shape[1]
    q = np.concatenate(codes).astype(np.uint8).reshape(n, nb, block)
    qt = QuantTensor(bits, block, k, n, pack(q, bits), scales, pack(zeros.astype(np.uint8), bits), 0.0)
    qt.weighted_error = output_error(w, qt, gram)
    return qt


def quantize_units(ckpt: Checkpoint, weight: Callable[[str], np.ndarray], bits: int, *, importance=None, grams=None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, QuantTensor]:
    """Every fused unit (onnx_graph.fused_units) in `bits`-bit blocks: GPTQ where a Gram matrix is known,
    else importance-weighted range search (onnx_quant.quantize_blocks). Scales are fp16 (as stored), so the
    blocks returned are exactly the ones the package holds."""
    units = fused_units(ckpt.config)
    importance, grams = importance or {}, grams or {}

    def one(tag: str) -> QuantTensor:
        w = unit_weight(weight, units[tag])
        if tag in grams:
            return gptq_quant(w, grams[tag], bits)
        qt = quantize_blocks(w, bits, block_for(bits, w.shape[1]), importance.get(tag))
        qt.scales = _fp16(qt.scales)
        return qt

    order = sorted(units, key=lambda t: -sum(int(np.prod(ckpt.tensors.shapes[n])) for n in units[t]))
    out: dict[str, QuantTensor] = {}
    # numpy releases the GIL in GPTQ's products: units on threads, BLAS single-threaded under them
    with (ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool,
          threadpool_limits(1, user_api="blas")):
        for i, (tag, qt) in enumerate(zip(order, pool.map(one, order))):
            out[tag] = qt
            if progress:
                progress(i + 1, len(order))
    return {tag: out[tag] for tag in units}


def _op_configs(config) -> dict:
    import coremltools as ct

    return ct.optimize.coreml.OptimizationConfig(op_type_configs={op: config for op in COMPRESSED_OPS})


def coremltools_int4(mlmodel):
    """coremltools' own int4 recipe on an f16 package: round-to-nearest, linear_symmetric, per_block, block 32
    (the anchor edgellm's calibrated int4 is measured against)."""
    import coremltools as ct

    cfg = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                     block_size=ANCHOR_INT4_BLOCK, weight_threshold=2048)
    return ct.optimize.coreml.linear_quantize_weights(mlmodel, config=_op_configs(cfg))


def coremltools_palette4(mlmodel, group_size: int = 16):
    """coremltools' 4-bit k-means palettization, one 16-entry table per `group_size` output channels. One k-means
    worker: several deadlocked in a process that had imported torch."""
    import coremltools as ct

    cfg = ct.optimize.coreml.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel",
                                                group_size=group_size, num_kmeans_workers=1, weight_threshold=2048)
    return ct.optimize.coreml.palettize_weights(mlmodel, config=_op_configs(cfg))


def compressed_weights(package) -> dict[str, dict[str, np.ndarray]]:
    """Read back every compressed weight of a saved package: op output name -> its stored arrays and the dense
    fp16 value Core ML computes from them ('dense')."""
    from edgellm.runtimes.mil_interp import CONSTEXPR, materialize, read_program

    prog, _ = read_program(package)
    values: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "const":
            values[op.outputs[0].name] = np.asarray(op.outputs[0].val)
        elif op.op_type in CONSTEXPR:
            name = op.outputs[0].name
            arrays = {k: values[v.name] for k, v in op.inputs.items()}
            values[name] = materialize(op, values)
            out[name] = {**arrays, "dense": values[name]}
    return out
