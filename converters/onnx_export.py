"""`edgellm convert --format onnx`: a Checkpoint -> an ONNX directory onnxruntime (and edgellm.load) runs.

The directory: model.onnx (graph) + model.onnx.data (weights, external data: no 2 GB protobuf limit),
tokenizer.json + tokenizer_config.json (chat template), edgellm_onnx.json (model facts the runtime
needs without parsing the graph). Written beside the destination and renamed into place when complete.

Which part is whose: the graph is emitted by converters/onnx_graph.py and the weights packed by
converters/onnx_quant.py, rounded with GPTQ by converters/gptq.py (all edgellm's own). onnxruntime-genai's
model builder is not called: it needs torch + transformers and a HF directory, takes no calibration text
(round-to-nearest by default; k_quant rounding and k_quant_mixed int8 layers on request) and has no
contrib-free flavour. It stays the anchor the benchmark (benchmarks/onnx_bench.py) compares against, at its
defaults and at those settings.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from edgellm.atomic import atomic_path
from edgellm.errors import ConversionError, UsageError

from .checkpoint import Checkpoint, gguf_tensor_names
from .genai_config import write_genai_config
from .gptq import gptq_blocks, inverse_factor
from .onnx_graph import WeightPlan, build_graph, fused_units, unit_weight
from .onnx_quant import BitChoice, allocate_bits, quantize_blocks

FLAVOURS = ("fused", "portable")
QUANTS = {"fused": ("int4", "int4-mixed", "int8", "f32"), "portable": ("int8", "f16", "f32")}
DEFAULT_QUANT = {"fused": "int4", "portable": "f16"}
CONFIG_FILE = "edgellm_onnx.json"
# Block layouts per int4 recipe, the smallest first. 'int4': every matrix in 4-bit blocks of 64 with GPTQ
# error compensation — onnxruntime's fastest MatMulNBits kernel here (8-bit blocks run 1.6x slower per
# matrix, 4-bit/32 1.15x; benchmarks/onnx_bench.py). 'int4-mixed': the allocator spends INT4_BUDGET_BPW
# (what the builder's 4-bit blocks of 32 with a float32 scale take) on 4-bit/32 and 8-bit blocks where
# the calibrated error says they matter most: better KLD, slower decode.
INT4_LAYOUTS = {"int4": (BitChoice(4, 64),),
                "int4-mixed": (BitChoice(4, 64), BitChoice(4, 32), BitChoice(8, 64))}
INT4_BUDGET_BPW = 5.0
HIGH8 = BitChoice(8, 64)
# what ranks the units for int4-mixed's allocation: 'imatrix' (the output error each layout leaves; with GPTQ
# tr(E H Eᵀ)) or 'fisher' (converters.sensitivity, second-order KLD; needs torch; not measured against it)
SENSITIVITY = "imatrix"
GRAM_LIMIT = 2 << 30          # float32 Gram matrices (400 MB for SmolLM2-135M, 3.9 GB for a 1.1B Llama)
Progress = Callable[[str, int, int], None]


@dataclass
class OnnxExport:
    output: str
    flavour: str
    quant: str
    bytes: int              # model.onnx + model.onnx.data (tokenizer files not counted)
    n_params: int
    seconds: float
    nodes: int
    imatrix_tokens: int = 0
    bits: dict[str, int] = field(default_factory=dict)   # unit tag -> bits (fused, quantized)
    sensitivity: str | None = None                       # what ranked the units: 'fisher' | 'imatrix'
    rounding: str | None = None                          # how int4 blocks were rounded: 'gptq' | 'imatrix' | 'plain'
    transcoded: dict[str, list[str]] = field(default_factory=dict)  # unit -> GGUF types carried over as they are
    rerounded: dict[str, str] = field(default_factory=dict)          # unit -> why it was re-rounded instead

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(8 * self.bytes / max(self.n_params, 1), 3)}


def export_onnx(ckpt: Checkpoint, dest: str | Path, *, flavour: str = "fused", quant: str = "auto",
                calib_text: str | None = None, calib_tokens: int = 4096, imatrix: bool = True,
                budget_bpw: float = INT4_BUDGET_BPW, weights: Callable[[str], np.ndarray] | None = None,
                sensitivity: str = SENSITIVITY, calibration: Calibration | None = None,
                progress: Progress | None = None) -> OnnxExport:
    """Write `ckpt` as an ONNX directory at `dest` (graph flavour 'fused' or 'portable').

    `weights`: a converters.calibrate.weight_getter to share between exports of one checkpoint
    (its float32 tensors are loaded once). int4: `sensitivity` 'fisher' (needs torch, the convert extra)
    or 'imatrix' ranks the units for the bit allocation; `calibration` reuses a calibrate_units result."""
    from .calibrate import weight_getter

    t0 = time.perf_counter()
    flavour, quant = _check(flavour, quant)
    weight = weights or weight_getter(ckpt)
    plan = WeightPlan(portable_dtype=quant if flavour == "portable" else "f32")
    calib = calibration
    if flavour == "fused" and quant in INT4_LAYOUTS:
        if sensitivity not in ("fisher", "imatrix"):
            raise UsageError(f"sensitivity must be fisher or imatrix, not {sensitivity!r}")
        if sensitivity == "fisher" and importlib.util.find_spec("torch") is None:
            sensitivity = "imatrix"  # the Fisher pass needs torch (the convert extra); the imatrix does not
        if calib is None and imatrix:
            calib = calibrate_units(ckpt, calib_text, calib_tokens, fisher=sensitivity == "fisher", progress=progress)
        plan.importance = calib.importance if calib else {}
        plan.bits, plan.quantized = choose_bits(ckpt, weight, calib, INT4_LAYOUTS[quant], budget_bpw, progress)
    elif flavour == "fused" and quant == "int8":
        plan.bits = {tag: HIGH8 for tag in fused_units(ckpt.config)}
    n_tok = calib.n_tokens if calib else 0
    model = build_graph(ckpt.config, weight, flavour, plan, progress=_stage(progress, "graph"))
    dest = Path(dest)
    write_onnx_dir(ckpt, model, dest, flavour, quant)
    size = sum(p.stat().st_size for p in dest.glob("model.onnx*"))   # the model; the tokenizer comes on top
    return OnnxExport(str(dest), flavour, quant, size, ckpt.tensors.n_params(), time.perf_counter() - t0,
                      len(model.graph.node), n_tok, {t: b.bits for t, b in plan.bits.items()},
                      ("fisher" if calib.fisher else "imatrix") if calib else None,
                      None if not plan.bits or quant not in INT4_LAYOUTS else
                      "gptq" if calib and calib.gram else "imatrix" if calib else "plain")


def write_onnx_dir(ckpt: Checkpoint, model, dest: Path, flavour: str, quant: str, extra: dict | None = None) -> None:
    """The graph, its weights, the tokenizer and edgellm_onnx.json (plus `extra` facts), renamed into place
    when complete."""
    try:
        with atomic_path(dest, directory=True) as tmp:
            _save_model(model, tmp / "model.onnx")
            write_tokenizer(ckpt, tmp)
            facts = {**model_facts(ckpt, flavour, quant), **(extra or {})}
            (tmp / CONFIG_FILE).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
            write_genai_config(tmp, facts, num_attention_heads=ckpt.config.num_attention_heads)  # genai folder
    except OSError as e:
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ConversionError(f"could not write {dest}: {what}") from None


def _check(flavour: str, quant: str) -> tuple[str, str]:
    flavour, quant = flavour.lower(), quant.lower()
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown ONNX flavour {flavour!r}: choose fused or portable")
    quant = DEFAULT_QUANT[flavour] if quant == "auto" else quant
    if quant not in QUANTS[flavour]:
        raise UsageError(f"the {flavour} ONNX graph takes --quant {', '.join(QUANTS[flavour])} or auto, "
                         f"not {quant!r}")
    return flavour, quant


@dataclass
class Calibration:
    """Per fused unit: the importance matrix (mean squared input per column; guides each block's
    rounding) and, optionally, the diagonal Fisher information (converters.sensitivity: how much the
    output distribution moves per weight; ranks the units for the bit allocation)."""

    importance: dict[str, np.ndarray]
    fisher: dict[str, np.ndarray] | None
    n_tokens: int
    gram: dict[str, np.ndarray] = field(default_factory=dict)   # per unit: mean x xᵀ of its input (GPTQ)


def gram_bytes(ckpt: Checkpoint) -> int:
    """What the Gram matrices of every distinct linear input take in float32."""
    c = ckpt.config
    return 4 * (c.num_hidden_layers * (3 * c.hidden_size ** 2 + c.intermediate_size ** 2) + c.hidden_size ** 2)


def calibrate_units(ckpt: Checkpoint, text: str | None, max_tokens: int, *, fisher: bool = True,
                    gram: bool = True, progress: Progress | None = None) -> Calibration:
    """`gram`: also collect each unit input's Gram matrix for GPTQ, unless they would take more than
    GRAM_LIMIT bytes (then the blocks are rounded with the importance matrix alone)."""
    from edgellm.texts import calibration_text

    from .calibrate import input_statistics

    tokens = tokenizer_of(ckpt).encode(text if text is not None else calibration_text()).ids[:max_tokens]
    if len(tokens) < 64:
        raise UsageError(f"the calibration text has only {len(tokens)} tokens; give at least a few hundred (--calib)")
    gram = gram and gram_bytes(ckpt) <= GRAM_LIMIT
    im, grams = input_statistics(ckpt, tokens, gram=gram, progress=_stage(progress, "calibrate"))
    to_gguf = gguf_tensor_names(ckpt.config)
    head = "token_embd.weight" if ckpt.config.tie_word_embeddings else "output.weight"
    units = fused_units(ckpt.config)
    importance, unit_grams = {}, {}
    for tag, names in units.items():
        key = head if tag == "lm_head" else to_gguf[names[0]]
        if key in im and tag != "model.embed_tokens":
            importance[tag] = im[key]
        if key in grams:
            unit_grams[tag] = grams[key]
    per_unit = None
    if fisher:
        from .sensitivity import fisher_diagonals

        diag, _ = fisher_diagonals(ckpt, tokens, progress=_stage(progress, "sensitivity"))
        per_unit = {tag: np.concatenate([diag[n] for n in names]) if len(names) > 1 else diag[names[0]]
                    for tag, names in units.items()}
    return Calibration(importance, per_unit, len(tokens), unit_grams)


def choose_bits(ckpt: Checkpoint, weight: Callable[[str], np.ndarray], calib: Calibration | None,
                layouts: tuple[BitChoice, ...], budget_bpw: float, progress: Progress | None = None):
    """Each unit quantized in every one of `layouts` (GPTQ where calibration has its Gram matrix,
    else importance-weighted rounding); the allocator then picks a layout per unit within
    `budget_bpw` bits per weight by the error each removes: ½ Σ F·δ² (the second-order rise of the KL
    divergence) with a Fisher diagonal, else the importance-weighted Σ imp·δ². Returns the choice and
    the chosen blocks."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    units = fused_units(ckpt.config)
    report = _stage(progress, "quantize")
    importance = calib.importance if calib else {}
    fisher = calib.fisher if calib else None
    grams = calib.gram if calib else {}

    def layouts_of(tag: str):
        w = unit_weight(weight, units[tag])
        choices = layouts[:1] if tag == "model.embed_tokens" else layouts  # a lookup table: no matmul error
        if tag in grams:
            factor = inverse_factor(grams[tag])
            opts = {c: gptq_blocks(w, grams[tag], c.bits, c.block, factor=factor) for c in choices}
        else:
            opts = {c: quantize_blocks(w, c.bits, c.block, importance.get(tag)) for c in choices}
        if fisher is None:
            return w.shape, opts, {c: q.weighted_error for c, q in opts.items()}
        return w.shape, opts, {c: 0.5 * float((fisher[tag] * (q.dequantize() - w) ** 2).sum()) for c, q in opts.items()}

    shapes, options, errors = {}, {}, {}
    # numpy releases the GIL here; BLAS stays single-threaded under the unit threads (no oversubscription),
    # and the largest units start first so that lm_head does not run alone at the end
    order = sorted(units, key=lambda t: -sum(int(np.prod(ckpt.tensors.shapes[n])) for n in units[t]))
    with (ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool,
          threadpool_limits(1, user_api="blas")):
        for i, (tag, (shape, opts, errs)) in enumerate(zip(order, pool.map(layouts_of, order))):
            shapes[tag], options[tag], errors[tag] = shape, opts, errs
            if report:
                report(i + 1, len(units))
    budget = int(sum(n * k for n, k in shapes.values()) * budget_bpw / 8)
    bits = allocate_bits(shapes, errors, budget)
    return bits, {tag: options[tag][c] for tag, c in bits.items()}


def _save_model(model, path: Path) -> None:
    """Weights always go to model.onnx.data: protobuf cannot hold more than 2 GB, and serializing
    hundreds of MB through protobuf is slower than writing the raw bytes (measured: 13 s vs 6 s, 540 MB)."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def tokenizer_of(ckpt: Checkpoint):
    """A `tokenizers.Tokenizer` that splits text as the source model does."""
    from tokenizers import Tokenizer

    from .hf_writer import build_tokenizer_json

    text = ckpt.tokenizer.hf_files.get("tokenizer.json") or build_tokenizer_json(ckpt.tokenizer)
    return Tokenizer.from_str(text)


def write_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    from .hf_writer import build_tokenizer_json, tokenizer_config

    tok = ckpt.tokenizer
    if "tokenizer.json" in tok.hf_files:
        for name, text in tok.hf_files.items():
            (out / name).write_text(text, encoding="utf-8")
    else:
        (out / "tokenizer.json").write_text(build_tokenizer_json(tok), encoding="utf-8")
        cfg = tokenizer_config(tok, ckpt.config.max_position_embeddings)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


# llama.cpp's end-of-generation heuristics for tokens a vocabulary does not flag as EOS/EOT
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|end_of_text|>")


def model_facts(ckpt: Checkpoint, flavour: str, quant: str) -> dict:
    """What the runtime reads instead of the graph: shapes, special tokens, chat template, flavour."""
    c, tok = ckpt.config, ckpt.tokenizer
    special = {k: v for k, v in tok.special_ids.items()}
    eog = {v for k, v in special.items() if k in ("eos", "eot", "eom")}
    eog |= {i for i, t in enumerate(tok.tokens) if t in _EOG_TEXTS}
    return {
        "format": "edgellm-onnx", "version": 1, "flavour": flavour, "quant": quant, "name": ckpt.name,
        "architecture": c.architecture, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size, "context_length": c.max_position_embeddings,
        "tied": c.tie_word_embeddings, "attention_bias": c.attention_bias, "tokenizer_model": tok.model,
        "n_params": ckpt.tensors.n_params(), "add_bos": tok.add_bos, "special_ids": special,
        "eog_ids": sorted(eog), "control_ids": [i for i, ty in enumerate(tok.token_types) if ty in (3, 2)],
        "chat_template": tok.chat_template,
    }


def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda d, t: progress(name, d, t))


def convert_to_onnx(source: str, dest: str | Path, *, flavour: str = "fused", quant: str = "auto",
                    calib_text: str | None = None, calib_tokens: int = 4096, imatrix: bool = True,
                    progress: Progress | None = None) -> OnnxExport:
    """`source` (store alias, GGUF file or HF directory) -> ONNX directory `dest`."""
    from edgellm import store

    from .pipeline import read_checkpoint

    _check(flavour, quant)  # bad options fail before the model is read
    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    return export_onnx(ckpt, dest, flavour=flavour, quant=quant, calib_text=calib_text, calib_tokens=calib_tokens,
                       imatrix=imatrix, progress=progress)
