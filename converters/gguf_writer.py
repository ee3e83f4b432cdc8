"""Write a Checkpoint as a llama.cpp GGUF file (F32, F16 or BF16), one tensor in memory at a time.

gguf.GGUFWriter does the format: we declare every tensor's name/shape/type first (known without
loading data), write header, metadata and tensor table, then stream the data tensor by tensor.
The file appears at its destination only when complete and validated (edgellm.atomic).
"""
from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from edgellm.atomic import atomic_path
from edgellm.errors import ConversionError, UsageError
from edgellm.gguf_check import GGUFInfo, validate_gguf

from .checkpoint import SPECIAL_TOKEN_TYPES, Checkpoint, TokenizerData, gguf_tensor_names, llama_cpp_rope, to_bf16

QT = gguf.GGMLQuantizationType
OUT_TYPES = {"F32": (QT.F32, gguf.LlamaFileType.ALL_F32), "F16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
             "BF16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16)}


def write_gguf(ckpt: Checkpoint, dest: str | Path, out_type: str = "F32", *,
               progress: Callable[[int, int], None] | None = None) -> GGUFInfo:
    """Write `ckpt` to `dest` as GGUF with 2-D weights in `out_type` (1-D tensors stay F32).

    progress(done_params, total_params) is called after each tensor. Returns the validated header info.
    """
    key = out_type.upper()
    if key not in OUT_TYPES:
        raise UsageError(f"unknown GGUF output type {out_type!r}; choose from {', '.join(OUT_TYPES)} "
                         "(quantized types are made from these by the quantizer)")
    qtype, ftype = OUT_TYPES[key]
    cfg, src = ckpt.config, ckpt.tensors
    names = gguf_tensor_names(cfg)
    w = gguf.GGUFWriter(None, cfg.gguf_arch)
    _add_metadata(w, ckpt, int(ftype))
    plan = []
    for hf_name, shape in src.shapes.items():
        t = QT.F32 if len(shape) == 1 else qtype
        nbytes = int(np.prod(shape)) * (4 if t == QT.F32 else 2)
        # numpy has no bfloat16: BF16 rows are declared as uint16 elements and written as raw bits
        np_dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}[t]
        w.add_tensor_info(names[hf_name], shape, np.dtype(np_dtype), nbytes, raw_dtype=t)
        plan.append((hf_name, shape, t))
    total, done = sum(int(np.prod(s)) for _, s, _ in plan), 0
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for hf_name, shape, t in plan:
                    w.write_tensor_data(_prepare(ckpt, hf_name, shape, t))
                    done += int(np.prod(shape))
                    if progress:
                        progress(done, total)
            finally:
                w.close()
            info = validate_gguf(tmp)
    except OSError as e:
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ConversionError(f"could not write {dest}: {what}") from None
    return dataclasses.replace(info, path=str(dest))


def _prepare(ckpt: Checkpoint, hf_name: str, shape: tuple[int, ...], t: QT) -> np.ndarray:
    """Load one tensor, permute q/k for llama.cpp's rope, convert to the output type.

    A tensor already stored in the output's 16-bit type is copied bit for bit (no float32 round trip).
    """
    src = ckpt.tensors
    same16 = t in (QT.BF16, QT.F16) and src.raw16 is not None and src.dtypes.get(hf_name) == t.name
    data = src.raw16(hf_name) if same16 else src.load(hf_name)
    if tuple(data.shape) != tuple(shape):
        raise ConversionError(f"tensor {hf_name} has shape {list(data.shape)} but was declared {list(shape)}")
    data = llama_cpp_rope(ckpt.config, hf_name, data)
    if same16:
        return np.ascontiguousarray(data)
    if t == QT.BF16:
        return to_bf16(data)
    return np.ascontiguousarray(data, dtype=np.float32 if t == QT.F32 else np.float16)


def _add_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, ftype: int) -> None:
    c = ckpt.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.name or c.architecture)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if c.gguf_arch == "llama":  # what llama.cpp's converter writes for this architecture
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, ckpt.tokenizer)


def add_tokenizer(w: gguf.GGUFWriter, tok: TokenizerData) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template, as llama.cpp's vocabulary loader reads them."""
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    if tok.model == "gpt2":  # llama.cpp's SPM tokenizer merges by score, not by merge list
        w.add_token_merges(tok.merges)
    for typ in SPECIAL_TOKEN_TYPES:
        if typ in tok.special_ids:
            getattr(w, f"add_{typ}_token_id")(tok.special_ids[typ])
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.add_space_prefix is not None:
        w.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
