"""Write a Checkpoint as a Hugging Face directory: config.json, safetensors (sharded when large), tokenizer.

A GGUF source has no tokenizer.json: we build one with the `tokenizers` library from the GGUF
vocabulary so that it splits text exactly as llama.cpp does (same merges, the pre-tokenizer of the
GGUF's `tokenizer.ggml.pre`, control tokens as special added tokens). The directory appears at its
destination only when complete (edgellm.atomic).
"""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from edgellm.atomic import atomic_path
from edgellm.errors import ConversionError, UsageError

from .checkpoint import Checkpoint, TokenizerData, build_pre_tokenizer, pre_group, to_bf16

TT = gguf.TokenType
DTYPES = {"F32": (np.float32, "float32"), "F16": (np.float16, "float16"), "BF16": (np.uint16, "bfloat16")}
SHARD_BYTES = 5_000_000_000   # transformers' historical default shard size


def write_hf(ckpt: Checkpoint, dest: str | Path, dtype: str = "F32", *, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `ckpt` as a HF directory at `dest` with weights in `dtype` (F32, F16 or BF16)."""
    key = dtype.upper()
    if key not in DTYPES:
        raise UsageError(f"unknown safetensors dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dest = Path(dest)
    tok = ckpt.tokenizer
    try:
        with atomic_path(dest, directory=True) as tmp:
            config = ckpt.config.to_hf_config()
            config["torch_dtype"] = DTYPES[key][1]
            ids = {f"{t}_token_id": tok.special_ids[t] for t in ("bos", "eos", "pad") if t in tok.special_ids}
            _write_json(tmp / "config.json", {**config, **ids})
            _write_json(tmp / "generation_config.json", ids)
            _write_weights(ckpt, tmp, key, max_shard_bytes)
            if "tokenizer.json" in tok.hf_files:   # read from a HF directory: keep the original files
                for name, text in tok.hf_files.items():
                    (tmp / name).write_text(text, encoding="utf-8")
            else:
                (tmp / "tokenizer.json").write_text(build_tokenizer_json(tok), encoding="utf-8")
                _write_json(tmp / "tokenizer_config.json",
                            tokenizer_config(tok, ckpt.config.max_position_embeddings))
    except OSError as e:
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ConversionError(f"could not write {dest}: {what}") from None
    return dest


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- safetensors -----------------------------------------------------------------------------------
def _write_weights(ckpt: Checkpoint, out: Path, dtype: str, max_shard_bytes: int) -> None:
    """Shards of at most max_shard_bytes (a tensor is never split), plus the index when there are several."""
    itemsize = 4 if dtype == "F32" else 2
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in ckpt.tensors.shapes.items():
        n = int(np.prod(shape)) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        with open(out / file, "wb") as fh:
            _write_safetensors(ckpt, fh, shard, dtype, itemsize)
        weight_map.update({name: file for name, _ in shard})
    if len(files) > 1:
        total = sum(int(np.prod(s)) * itemsize for s in ckpt.tensors.shapes.values())
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_safetensors(ckpt: Checkpoint, fh: BinaryIO, shard: list[tuple[str, tuple[int, ...]]], dtype: str,
                       itemsize: int) -> None:
    """Stream one safetensors file tensor by tensor.

    Hand-written because safetensors' save functions need every tensor of a file in memory at once;
    the format is an 8-byte length, a JSON table of dtype/shape/offsets (padded to 8 bytes), then data.
    """
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        n = int(np.prod(shape)) * itemsize
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    fh.write(len(header).to_bytes(8, "little") + header)
    for name, shape in shard:
        data = ckpt.tensors.load(name)
        if tuple(data.shape) != tuple(shape):
            raise ConversionError(f"tensor {name} has shape {list(data.shape)} but was declared {list(shape)}")
        if dtype == "BF16":
            data = to_bf16(data)
        else:
            data = np.ascontiguousarray(data, dtype=DTYPES[dtype][0])
        data.tofile(fh)
        del data


# -- tokenizer -------------------------------------------------------------------------------------
def build_tokenizer_json(tok: TokenizerData) -> str:
    """tokenizer.json that tokenizes like llama.cpp does with this GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {t: i for i, t in enumerate(tok.tokens)}
    if tok.model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in tok.merges]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre_group(tok.pre) == "llama-bpe"))
        tk.pre_tokenizer = build_pre_tokenizer(tok.pre)
        tk.decoder = decoders.ByteLevel()
    elif tok.model == "llama":
        prefix = tok.add_space_prefix is not False   # llama.cpp's default for SentencePiece vocabularies
        unk = tok.special_token("unk")
        tk = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tok), unk_token=unk, fuse_unk=True,
                                  byte_fallback=True))
        norm = [normalizers.Prepend("▁")] if prefix else []
        tk.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    else:
        raise UsageError(f"cannot build a tokenizer.json for tokenizer model {tok.model!r}")
    # llama.cpp splits out CONTROL/UNKNOWN tokens (special) and USER_DEFINED ones (always) before tokenizing
    added = [AddedToken(t, special=ty != TT.USER_DEFINED, normalized=False)
             for t, ty in zip(tok.tokens, tok.token_types) if ty in (TT.CONTROL, TT.UNKNOWN, TT.USER_DEFINED)]
    tk.add_special_tokens([a for a in added if a.special])
    tk.add_tokens([a for a in added if not a.special])
    bos, eos = tok.special_token("bos"), tok.special_token("eos")
    single = [*([bos] if tok.add_bos and bos else []), "$A", *([eos] if tok.add_eos and eos else [])]
    if len(single) > 1:
        specials = {t: tok.special_ids[k] for k, t in (("bos", bos), ("eos", eos)) if t in single}
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(single + [s.replace("$A", "$B:1") for s in single]),
            special_tokens=list(specials.items()))
    elif tok.model == "gpt2":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk.to_str(pretty=True)


def _merges_from_scores(tok: TokenizerData) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's score-driven SentencePiece merging.

    Hand-written (the tokenizers library only derives these from a .model protobuf): every split of a
    token into two vocabulary pieces is a merge, ranked by the merged token's score, best first.
    """
    if tok.merges:
        return [tuple(m.split(" ", 1)) for m in tok.merges]  # type: ignore[misc]
    scores = tok.scores or [0.0] * len(tok.tokens)
    index = {t: i for i, t in enumerate(tok.tokens)}
    cands = []
    for i, t in enumerate(tok.tokens):
        if tok.token_types[i] != TT.NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = index.get(t[:k]), index.get(t[k:])
            if a is not None and b is not None:
                cands.append((-scores[i], a, b, t[:k], t[k:]))
    cands.sort()
    return [(a, b) for _, _, _, a, b in cands]


def tokenizer_config(tok: TokenizerData, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, BOS/EOS policy and the chat template."""
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                           "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
                           "clean_up_tokenization_spaces": False}
    for which, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unk", "unk_token"), ("pad", "pad_token"),
                       ("sep", "sep_token"), ("mask", "mask_token")):
        if (text := tok.special_token(which)) is not None:
            cfg[key] = text
    if tok.add_space_prefix is not None:
        cfg["add_prefix_space"] = tok.add_space_prefix
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return cfg
