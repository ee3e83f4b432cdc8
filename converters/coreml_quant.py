"""Weights for Core ML packages: edgellm's calibrated blocks, and coremltools' own compressors as the anchors.

- int4: asymmetric 4-bit blocks of 64 along the input axis, rounded by GPTQ from the calibration pass's Gram
  matrices (converters.gptq — the same machinery as the ONNX int4 export), stored as uint4 data with an fp16
  scale and a uint4 offset per block: 4.31 bits per weight, under coremltools' int4 recipe (symmetric int4
  blocks of 32 with an fp16 scale: 4.5 bits per weight).
- int8: asymmetric 8-bit per output channel (one block spanning the row), GPTQ-rounded the same way.
- palette4 / coreml-int4: coremltools' own compressors (k-means palettization; round-to-nearest symmetric int4
  blocks of 32, the recipe of swift-transformers' Mistral export) applied to edgellm's f16 program, restricted to
  linear and gather weights so the RoPE tables stay exact.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from edgellm.errors import UnsupportedModelError

from .checkpoint import Checkpoint
from .gptq import gptq_blocks, inverse_factor
from .onnx_graph import fused_units, unit_weight
from .onnx_quant import QuantTensor, quantize_blocks

INT4_BLOCK = 64
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


def quantize_units(ckpt: Checkpoint, weight: Callable[[str], np.ndarray], bits: int, *, importance=None, grams=None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, QuantTensor]:
    """Every fused unit (onnx_graph.fused_units) in `bits`-bit blocks: GPTQ where a Gram matrix is known,
    else importance-weighted range search (onnx_quant.quantize_blocks). Scales are rounded to fp16 here, so
    the blocks returned are exactly the ones the package stores."""
    units = fused_units(ckpt.config)
    importance, grams = importance or {}, grams or {}

    def one(tag: str) -> QuantTensor:
        w = unit_weight(weight, units[tag])
        block = block_for(bits, w.shape[1])
        if tag in grams:
            qt = gptq_blocks(w, grams[tag], bits, block, factor=inverse_factor(grams[tag]))
        else:
            qt = quantize_blocks(w, bits, block, importance.get(tag))
        qt.scales = np.clip(qt.scales, _FP16_TINY, 65504.0).astype(np.float16).astype(np.float32)
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
