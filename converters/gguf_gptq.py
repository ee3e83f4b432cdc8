"""GPTQ for a whole GGUF: which Gram matrix each tensor reads, its blocks in llama.cpp's row order, and the
patch that puts them into a file llama.cpp's quantizer wrote.

llama.cpp's quantizer still writes the file (metadata, per-tensor types, every tensor edgellm does not
round itself); edgellm then overwrites the data of the tensors it rounded with GPTQ, whose type — hence
byte size and offset — is the same, and checks each patched tensor by reading it back through llama.cpp's
own dequantizer. A tensor is only replaced where GPTQ's measured output error tr(E H Eᵀ) is lower than
that of llama.cpp's blocks for it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from threadpoolctl import threadpool_limits

from edgellm.errors import ConversionError

from .checkpoint import Checkpoint, ModelConfig, gguf_tensor_names, llama_cpp_rope
from .gguf_blocks import GPTQ_TYPES, Blocks, fits, gptq_tensor, llama_dequantize
from .gptq import inverse_factor, values_error

Progress = Callable[[int, int], None]


def gram_key(config: ModelConfig, hf_name: str) -> str | None:
    """The input_statistics key of the Gram matrix of the input `hf_name` reads (q/k/v share attn_q's,
    gate/up share ffn_gate's), or None where GPTQ does not apply: 1-D tensors, and the embedding table
    (a lookup; when tied it is also the head, but the rows a lookup returns must stay each row's own
    best rounding, so a tied table keeps llama.cpp's)."""
    names = gguf_tensor_names(config)
    g = names.get(hf_name, "")
    if hf_name == "lm_head.weight" and not config.tie_word_embeddings:
        return "output.weight"
    for suffix, key in ((".attn_k.weight", ".attn_q.weight"), (".attn_v.weight", ".attn_q.weight"),
                        (".ffn_up.weight", ".ffn_gate.weight")):
        if g.endswith(suffix):
            return g[: -len(suffix)] + key
    if g.startswith("blk.") and g.endswith((".attn_q.weight", ".attn_output.weight", ".ffn_gate.weight",
                                           ".ffn_down.weight")):
        return g
    return None


def gguf_order(config: ModelConfig, hf_name: str, rows: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rows of a tensor (blocks or values) moved to llama.cpp's rope layout (q/k), or back with `inverse`:
    rows are rounded independently, so permuting them after rounding gives the permuted weight's blocks."""
    return llama_cpp_rope(config, hf_name, rows, inverse=inverse)


@dataclass
class FileTensor:
    type: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]     # numpy order [rows, n_per_row]


def file_tensors(path: Path) -> dict[str, FileTensor]:
    """Where each tensor's data lies in a GGUF file (validated before: edgellm.gguf_check)."""
    r = gguf.GGUFReader(path, "r")
    out = {t.name: FileTensor(gguf.GGMLQuantizationType(t.tensor_type).name, int(t.data_offset), int(t.n_bytes),
                              tuple(int(x) for x in reversed(t.shape))) for t in r.tensors}
    del r
    return out


def read_values(path: Path, info: FileTensor) -> np.ndarray:
    """One tensor of a GGUF as llama.cpp computes with it (its own dequantizer), [rows, n_per_row]."""
    with open(path, "rb") as f:
        f.seek(info.offset)
        raw = np.frombuffer(f.read(info.nbytes), np.uint8)
    rows = info.shape[0] if len(info.shape) == 2 else 1
    return llama_dequantize(info.type, raw.reshape(rows, -1), info.shape[-1])


@dataclass
class GptqReport:
    """What GPTQ did to one file: tensors rounded by edgellm, tensors where llama.cpp's blocks stayed (its
    output error was already lower), the summed output errors before/after, and the seconds spent."""

    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    error_llama_cpp: float = 0.0
    error_after: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"tensors_gptq": len(self.replaced), "tensors_llama_cpp": len(self.kept),
                "output_error_llama_cpp": self.error_llama_cpp, "output_error_after": self.error_after,
                "error_ratio": self.error_after / self.error_llama_cpp if self.error_llama_cpp else 1.0,
                "seconds": round(self.seconds, 2)}


def candidates(ckpt: Checkpoint, grams: Mapping[str, np.ndarray], types: Mapping[str, str]) -> dict[str, str]:
    """GGUF name -> HF name of the tensors GPTQ can round: a Gram for their input, a type it writes, rows
    that are whole blocks. `types` maps GGUF names to the ggml type chosen for them."""
    cfg = ckpt.config
    out = {}
    for hf, g in gguf_tensor_names(cfg).items():
        key = gram_key(cfg, hf)
        t = types.get(g)
        if key in grams and t in GPTQ_TYPES and fits(t, ckpt.tensors.shapes[hf]):
            out[g] = hf
    return out


def gptq_many(ckpt: Checkpoint, grams: Mapping[str, np.ndarray], jobs: Mapping[str, tuple[str, str]], *,
              threads: int | None = None, progress: Progress | None = None) -> dict[str, Blocks]:
    """GPTQ blocks for each GGUF name -> (HF name, type) in `jobs`, rows in HF order. Tensors that read the
    same input in the same type (q/k/v, gate/up) are rounded as one stack of rows: rows are independent given
    H, so this is the same result in one column loop. Stacks go on threads with single-threaded BLAS (numpy
    releases the GIL in its kernels); one inverse factor per Gram."""
    cfg = ckpt.config
    stacks: dict[tuple[str, str], list[str]] = {}
    for name, (hf, t) in jobs.items():
        stacks.setdefault((gram_key(cfg, hf), t), []).append(name)
    factors = {key: inverse_factor(grams[key]) for key in {k for k, _ in stacks}}

    def one(item: tuple[tuple[str, str], list[str]]) -> dict[str, Blocks]:
        (key, t), names = item
        ws = [np.asarray(ckpt.tensors.load(jobs[n][0]), np.float32) for n in names]
        b = gptq_tensor(np.concatenate(ws) if len(ws) > 1 else ws[0], grams[key], t, factor=factors[key])
        out, r = {}, 0
        for n, w in zip(names, ws):
            values = b.values[r:r + len(w)]
            out[n] = Blocks(t, b.raw[r:r + len(w)], values, values_error(w, values, grams[key]))
            r += len(w)
        return out

    def size(item) -> int:
        return -sum(int(np.prod(ckpt.tensors.shapes[jobs[n][0]])) for n in item[1])

    order = sorted(stacks.items(), key=size)        # largest first, so the head does not run alone at the end
    out: dict[str, Blocks] = {}
    workers = max(1, min(threads or os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(workers) as pool, threadpool_limits(1 if workers > 1 else None, user_api="blas"):
        for i, blocks in enumerate(pool.map(one, order)):
            out.update(blocks)
            if progress:
                progress(i + 1, len(order))
    return out


def patch(path: Path, ckpt: Checkpoint, blocks: Mapping[str, Blocks], hf_names: Mapping[str, str]) -> None:
    """Overwrite tensors of a llama.cpp-written GGUF with edgellm's blocks (same type, size and offset), then
    read each back through llama.cpp's dequantizer: it must give exactly the values GPTQ rounded to."""
    table = file_tensors(path)
    with open(path, "r+b") as f:
        for name, b in blocks.items():
            info = table.get(name)
            raw = gguf_order(ckpt.config, hf_names[name], b.raw)
            if info is None or info.type != b.type or info.nbytes != raw.nbytes:
                raise ConversionError(f"{path}: tensor {name} is not {b.type} of {raw.nbytes} bytes; cannot patch it")
            f.seek(info.offset)
            f.write(np.ascontiguousarray(raw).tobytes())
    for name, b in blocks.items():
        got = gguf_order(ckpt.config, hf_names[name], read_values(path, table[name]), inverse=True)
        if not np.array_equal(got, b.values):
            raise ConversionError(f"llama.cpp reads tensor {name} back differently from the blocks edgellm wrote")


def improve_file(path: Path, ckpt: Checkpoint, grams: Mapping[str, np.ndarray], *, force: bool = False,
                 only: set[str] | None = None, threads: int | None = None,
                 progress: Progress | None = None) -> GptqReport:
    """GPTQ every tensor of a llama.cpp-quantized GGUF at `path` it can round (or the names in `only`), and
    patch it in where its output error is lower than llama.cpp's blocks' (always, with `force`: a recipe
    that chose GPTQ by a measured cost)."""
    import time

    t0 = time.perf_counter()
    table = file_tensors(path)
    todo = candidates(ckpt, grams, {n: t.type for n, t in table.items()})
    if only is not None:
        todo = {g: h for g, h in todo.items() if g in only}
    blocks = gptq_many(ckpt, grams, {g: (h, table[g].type) for g, h in todo.items()}, threads=threads,
                       progress=progress)
    report, chosen = GptqReport(), {}
    for name, b in blocks.items():
        hf = todo[name]
        w = np.asarray(ckpt.tensors.load(hf), np.float32)
        theirs = values_error(w, gguf_order(ckpt.config, hf, read_values(path, table[name]), inverse=True),
                              grams[gram_key(ckpt.config, hf)])
        report.error_llama_cpp += theirs
        if force or b.error < theirs:
            chosen[name] = b
            report.replaced.append(name)
            report.error_after += b.error
        else:
            report.kept.append(name)
            report.error_after += theirs
    patch(path, ckpt, chosen, todo)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["GptqReport", "candidates", "file_tensors", "gptq_many", "gram_key", "improve_file", "patch", "read_values"]
