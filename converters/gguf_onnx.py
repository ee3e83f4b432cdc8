"""GGUF → fused ONNX directory without re-rounding: llama.cpp's blocks carried into MatMulNBits as they are.

The ONNX exporter (converters/onnx_export.py) reads a model as floats and rounds it afresh, which on a
GGUF source means rounding already-rounded weights a second time (KLD 0.2 against the file it came from).
Here each fused unit's matrices (q+k+v, gate+up, o, down, the output head) are decoded from their GGUF
blocks (converters/gguf_blocks_onnx.py), q/k rows un-permuted from llama.cpp's rope layout, row-stacked in a
common block layout and handed to the same graph emitter (converters/onnx_graph.py) as pre-made blocks.
Norms and other float tensors come through the ordinary dequantizing reader. The result computes what
llama.cpp's dequantized weights compute, to float32 rounding.

`mode`: 'lossless' refuses a file with a tensor that cannot be carried over exactly (and says which, and
why); 'balanced' re-rounds just those tensors with edgellm's calibrated 4-bit blocks and keeps the rest.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgellm.errors import ConversionError, UsageError

from .checkpoint import Checkpoint, gguf_tensor_names, rope_permute
from .gguf_blocks_onnx import NOT_EXACT, Blocks, decode, merge
from .onnx_graph import WeightPlan, build_graph, fused_units
from .onnx_quant import BitChoice, QuantTensor, pack, quantize_blocks

MODES = ("lossless", "balanced")
Progress = Callable[[str, int, int], None]


def quant_tensor(b: Blocks) -> QuantTensor:
    """MatMulNBits inputs from decoded blocks: packed codes, float32 scales, packed (or float) zero points."""
    zps = b.zero_points if b.float_zero_points else pack(b.zero_points, b.bits)
    return QuantTensor(b.bits, b.block, b.k, b.n, pack(b.codes, b.bits), b.scales.astype(np.float32), zps, 0.0)


def unit_blocks(ckpt: Checkpoint, raw: Callable[[str], tuple[str, np.ndarray]], names: list[str]) -> Blocks | str:
    """The row-stacked blocks of one fused unit, or the reason they cannot be carried over exactly."""
    c = ckpt.config
    parts = []
    for name in names:
        type_name, data = raw(name)
        n, k = ckpt.tensors.shapes[name]
        b = decode(type_name, data, n, k)
        if b is None:
            why = NOT_EXACT.get(type_name, f"{type_name} blocks are not decoded for transcoding")
            return f"{name} is {type_name}: {why}"
        if c.rope_permuted and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            order = rope_permute(np.arange(n)[:, None], heads, inverse=True)[:, 0]
            b = b.rows(order)
        parts.append(b)
    merged = merge(parts) if len(parts) > 1 else parts[0]
    if merged is None:
        kinds = ", ".join(f"{raw(n)[0]}" for n in names)
        return f"{names[0].rsplit('.', 2)[0]}: its matrices ({kinds}) have no common exact MatMulNBits layout"
    return merged


def transcode(gguf_path: str | Path, dest: str | Path, *, mode: str = "lossless",
              requant: dict[str, BitChoice] | None = None, accuracy_level: int = 4, progress: Progress | None = None):
    """Write the GGUF at `gguf_path` as a fused ONNX directory at `dest`, its blocks carried over (see module doc).

    `requant` (balanced only): units to re-round on purpose, with the layout to use — e.g. the output head of
    a Q8_0 table in 4-bit blocks, when that keeps quality within bounds and reads far fewer bytes per token; a
    tied embedding then keeps its exact rows for the lookup. `accuracy_level` 4 lets onnxruntime quantize the
    activations of integer-zero-point matrices to int8 (faster; llama.cpp does the same), 0 computes in float32.
    Returns the OnnxExport summary; `.transcoded` maps each unit to the GGUF types it came from, `.rerounded`
    to why a unit was re-rounded — empty for a lossless transcode."""
    from edgellm.gguf_check import validate_gguf

    from .calibrate import weight_getter
    from .gguf_source import read_gguf
    from .onnx_export import OnnxExport, write_onnx_dir

    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if requant and mode != "balanced":
        raise UsageError("re-rounding units (requant) is the balanced mode")
    requant = requant or {}
    t0 = time.perf_counter()
    path = Path(gguf_path)
    info = validate_gguf(path)
    ckpt = read_gguf(path)
    table = {t.name: t for t in info.tensors}
    to_gguf = gguf_tensor_names(ckpt.config)

    def raw(name: str) -> tuple[str, np.ndarray]:
        t = table[to_gguf[name]]
        return t.type_name, np.fromfile(path, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    weight = weight_getter(ckpt)
    plan = WeightPlan()
    units = fused_units(ckpt.config)
    sources: dict[str, list[str]] = {}
    rerounded: dict[str, str] = {}
    for i, (tag, names) in enumerate(units.items()):
        if progress:
            progress("transcode", i, len(units))
        got = unit_blocks(ckpt, raw, names)
        if tag in requant and not isinstance(got, str):
            choice = requant[tag]
            if tag == "lm_head" and ckpt.config.tie_word_embeddings:   # the lookup keeps the exact rows
                exact = quant_tensor(got)
                plan.embed_blocks = exact if exact.zero_points.dtype != np.float32 else None
                plan.embed_f32 = plan.embed_blocks is None
            plan.quantized[tag] = quantize_blocks(got.dequantize(), choice.bits, choice.block)
            plan.bits[tag] = choice
            rerounded[tag] = f"re-rounded on purpose to {choice.bits}-bit blocks of {choice.block}"
            continue
        if isinstance(got, str):
            if mode == "lossless":
                raise ConversionError(f"{path.name} cannot be transcoded without re-rounding: {got} "
                                      "(use the balanced mode, or keep this model on llama.cpp)")
            rerounded[tag] = got
            w = np.concatenate([weight(n) for n in names]) if len(names) > 1 else weight(names[0])
            plan.quantized[tag] = quantize_blocks(w, 4, 32)
            plan.bits[tag] = BitChoice(4, 32)
            continue
        plan.quantized[tag] = quant_tensor(got)
        plan.bits[tag] = BitChoice(got.bits, got.block)
        sources[tag] = [raw(n)[0] for n in names]
    embed = "lm_head" if ckpt.config.tie_word_embeddings else "model.embed_tokens"
    # GatherBlockQuantized takes integer zero points only: a table with float ones is gathered as float32
    # (its exact values; only the embedding lookup reads it, one row per token)
    if embed not in requant:
        plan.embed_f32 = embed in plan.quantized and plan.quantized[embed].zero_points.dtype == np.float32
    plan.accuracy_level = accuracy_level
    model = build_graph(ckpt.config, weight, "fused", plan,
                        progress=None if progress is None else (lambda d, t: progress("graph", d, t)))
    dest = Path(dest)
    quant = "gguf-" + ("lossless" if not rerounded else "balanced")
    write_onnx_dir(ckpt, model, dest, "fused", quant, extra={"transcoded_from": path.name,
                                                             "gguf_file_type": info.file_type_name,
                                                             "rerounded": rerounded})
    size = sum(p.stat().st_size for p in dest.glob("model.onnx*"))
    return OnnxExport(str(dest), "fused", quant, size, ckpt.tensors.n_params(), time.perf_counter() - t0,
                      len(model.graph.node), 0, {t: b.bits for t, b in plan.bits.items()}, None, "transcoded",
                      sources, rerounded)
