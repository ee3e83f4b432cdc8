"""Read a Hugging Face model directory (config, safetensors, tokenizer) into a lazy Checkpoint.

Nothing is loaded up front beyond the safetensors headers and the tokenizer: each tensor is read
when the consumer asks for it. Only safetensors is accepted (pickled .bin files can run code).

Tensor data is read with plain file reads at the offsets of the safetensors header, not through
safetensors.safe_open: safe_open memory-maps the file and every page it touches stays in the
process's RSS until the file is closed (measured on a 1.2B-parameter F16 checkpoint -> GGUF: 2.5 GB
peak RSS with safe_open, 0.28 GB with reads), and numpy has no bfloat16 anyway.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError

from .checkpoint import (
    PRE_GROUPS,
    SPECIAL_TOKEN_TYPES,
    Checkpoint,
    ModelConfig,
    TensorSource,
    TokenizerData,
    build_pre_tokenizer,
    dequantize,
    hf_tensor_shapes,
)

TT = gguf.TokenType
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json")   # copied verbatim when the checkpoint is written back as HF
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)   # buffers some old checkpoints saved; recomputed by every runtime


def read_hf(path: str | Path) -> Checkpoint:
    """A Checkpoint over `path` (a HF directory); tensors stay on disk until loaded one by one."""
    root = Path(path)
    if not root.is_dir():
        raise ModelNotFoundError(f"{root}: no such model directory")
    config = ModelConfig.from_hf_config(_read_json(root / "config.json"), str(root / "config.json"))
    headers = _read_headers(root)
    expected = hf_tensor_shapes(config)
    _check_tensors(root, config, expected, headers)

    def stored(name: str) -> np.ndarray:
        """The tensor's bytes as stored, viewed as its own type (BF16: the raw uint16 bits)."""
        file, dtype, shape, (start, end) = headers[name]
        raw = np.fromfile(file, dtype=np.uint8, count=end - start, offset=start)
        return raw.view({"BF16": np.uint16, "F16": np.float16}.get(dtype, np.float32)).reshape(shape)

    def load(name: str) -> np.ndarray:
        data = stored(name)
        if headers[name][1] == "BF16":  # numpy has no bfloat16: widen the raw bits exactly to float32
            return dequantize(data, gguf.GGMLQuantizationType.BF16, data.shape)
        return data

    def raw16(name: str) -> np.ndarray:
        if headers[name][1] not in ("BF16", "F16"):
            raise ValueError(f"{name} is stored as {headers[name][1]}, not a 16-bit float")
        return stored(name)

    tensors = TensorSource(expected, load, {n: headers[n][1] for n in expected}, raw16)
    return Checkpoint(config, tensors, read_hf_tokenizer(root, config.vocab_size), name=root.name)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise InvalidModelError(f"{file.parent}: missing {file.name}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{file}: expected a JSON object")
    return data


def _read_headers(root: Path) -> dict[str, tuple[Path, str, tuple[int, ...], tuple[int, int]]]:
    """name -> (file, dtype, shape, data offsets) for every tensor, from a single file or an index."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidModelError(f"{index}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (root / f).is_file():
                raise InvalidModelError(f"{root}: shard {f} listed in {index.name} is missing")
    elif (root / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    elif any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise UnsupportedModelError(f"{root}: only safetensors weights are supported (pickled .bin/.pt files "
                                    "can run code); re-save the model with save_pretrained(safe_serialization=True)")
    else:
        raise InvalidModelError(f"{root}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for f in files:
        for name, (dtype, shape, offsets) in _safetensors_header(root / f).items():
            if weight_map is None or weight_map.get(name) == f:
                out[name] = (root / f, dtype, shape, offsets)
    if weight_map is not None:
        missing = next((n for n in weight_map if n not in out), None)
        if missing:
            raise InvalidModelError(f"{root}: tensor {missing} is not in its shard {weight_map[missing]}")
    return out


def _safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """name -> (dtype, shape, absolute byte range) from the 8-byte length + JSON table, checked against the file."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 << 20):
            raise InvalidModelError(f"{file}: not a safetensors file (bad header length)")
        try:
            table = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise InvalidModelError(f"{file}: corrupt safetensors header") from None
    out = {}
    for name, t in table.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in t["data_offsets"])
            shape, dtype = tuple(int(d) for d in t["shape"]), str(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise InvalidModelError(f"{file}: corrupt safetensors entry for {name}") from None
        if not 0 <= start <= end <= size - 8 - n:
            raise InvalidModelError(f"{file}: tensor {name} lies outside the file (truncated?)")
        if dtype in _ITEMSIZE and end - start != _ITEMSIZE[dtype] * int(np.prod(shape)):
            raise InvalidModelError(f"{file}: tensor {name} has {end - start} bytes, not what {dtype} "
                                    f"{list(shape)} needs")
        out[name] = (dtype, shape, (8 + n + start, 8 + n + end))
    return out


def _check_tensors(root: Path, config: ModelConfig, expected: dict[str, tuple[int, ...]],
                   headers: dict[str, tuple[Path, str, tuple[int, ...], tuple[int, int]]]) -> None:
    for name, shape in expected.items():
        if name not in headers:
            raise InvalidModelError(f"{root}: missing tensor {name} (expected shape {list(shape)})")
        _, dtype, found, _ = headers[name]
        if tuple(found) != shape:
            raise InvalidModelError(f"{root}: tensor {name} has shape {list(found)}, expected {list(shape)} "
                                    "from config.json")
        if dtype not in _ITEMSIZE:
            raise UnsupportedModelError(f"{root}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 "
                                        "checkpoints are supported")
    for name in headers:
        if name in expected or name.endswith(_IGNORED_SUFFIXES) or (
                name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        raise UnsupportedModelError(f"{root}: tensor {name} is not part of a standard {config.architecture} "
                                    "checkpoint")


# -- tokenizer -------------------------------------------------------------------------------------
def read_hf_tokenizer(root: Path, vocab_size: int) -> TokenizerData:
    """Vocabulary, types, merges, special ids and pre-tokenizer of tokenizer.json (+ tokenizer_config.json)."""
    file = root / "tokenizer.json"
    if not file.is_file():
        raise InvalidModelError(f"{root}: missing tokenizer.json (a tokenizer.model alone is not supported)")
    data = _read_json(file)
    model = data.get("model") or {}
    spm = bool(model.get("byte_fallback"))
    if model.get("type") != "BPE" or (not spm and (data.get("decoder") or {}).get("type") != "ByteLevel"):
        raise UnsupportedModelError(f"{file}: tokenizer model {model.get('type')!r} is not supported; supported: "
                                    "byte-level BPE (GPT-2 style) and byte-fallback BPE (SentencePiece style)")
    try:
        vocab = [(str(t), int(i), int(TT.BYTE if spm and _is_byte(t) else TT.NORMAL))
                 for t, i in (model.get("vocab") or {}).items()]
        added = [(str(a["content"]), int(a["id"]),
                  int(TT.CONTROL if a.get("special") or _looks_special(a["content"]) else TT.USER_DEFINED))
                 for a in data.get("added_tokens") or []]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidModelError(f"{file}: malformed vocabulary or added_tokens") from None
    ids = [i for _, i, _ in vocab + added]
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise InvalidModelError(f"{file}: token id {max(ids) if max(ids) >= vocab_size else min(ids)} is outside "
                                f"config.json's vocab_size {vocab_size}")
    n = vocab_size  # llama.cpp needs one token per embedding row: pad like its converter does
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(TT.UNUSED)] * n
    for tok, i, ty in vocab + added:   # added tokens override the base vocabulary's entry
        tokens[i], types[i] = tok, ty
    if len(set(tokens)) != n:
        dup = next(t for t, count in Counter(tokens).items() if count > 1)
        raise InvalidModelError(f"{file}: token {dup!r} appears twice in the vocabulary")
    sv = gguf.SpecialVocab(root, load_merges=True, special_token_types=SPECIAL_TOKEN_TYPES, n_vocab=n)
    if not sv.merges:
        raise InvalidModelError(f"{file}: BPE tokenizer without merges")
    if spm and "unk" in sv.special_token_ids:
        types[sv.special_token_ids["unk"]] = int(TT.UNKNOWN)
    template = sv.chat_template
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    config_file = root / "tokenizer_config.json"
    tok_config = _read_json(config_file) if config_file.is_file() else {}
    prefix = tok_config.get("add_prefix_space")
    return TokenizerData(
        model="llama" if spm else "gpt2", pre="default" if spm else detect_pre(data, file),
        tokens=tokens, token_types=types, merges=list(sv.merges),
        scores=_scores_from_merges(tokens, sv.merges) if spm else None,
        special_ids=dict(sv.special_token_ids), add_bos=sv.add_special_token.get("bos", spm),
        add_eos=sv.add_special_token.get("eos", False), add_space_prefix=prefix if isinstance(prefix, bool) else None,
        chat_template=template,
        hf_files={f: (root / f).read_text("utf-8") for f in _TOKENIZER_FILES if (root / f).is_file()})


def _is_byte(tok: str) -> bool:
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")


def _looks_special(tok: str) -> bool:
    """Added tokens some models forget to mark special (same rule as llama.cpp's converter)."""
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<pad>", "<mask>")


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: a token made by an earlier merge scores higher (llama.cpp's SPM
    tokenizer merges the highest-scoring bigram first, HF's BPE the lowest merge rank)."""
    scores = [-1e9] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    for rank, m in enumerate(merges):
        i = index.get(m.replace(" ", "", 1).replace(chr(ord(" ") + 256), " "))
        if i is not None and scores[i] == -1e9:
            scores[i] = -float(rank)
    return scores


def _signature(node: Any) -> Any:
    """A pre-tokenizer's JSON without the offset-only options, for structural comparison."""
    if isinstance(node, dict):
        return {k: _signature(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_signature(v) for v in node]
    return node


def detect_pre(tokenizer_json: dict[str, Any], where: str | Path = "tokenizer.json") -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json.

    llama.cpp's converter hashes the token ids of a fixed text, which needs one known hash per released
    tokenizer; we compare the pre_tokenizer block with the tokenizers-library form of each llama.cpp
    regex family instead, which also recognises retrained or re-exported tokenizers of that family.
    """
    from tokenizers import Tokenizer, models

    have = _signature(tokenizer_json.get("pre_tokenizer"))
    for group in PRE_GROUPS:
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = build_pre_tokenizer(group)
        if _signature(json.loads(probe.to_str())["pre_tokenizer"]) == have:
            return group
    raise UnsupportedModelError(f"{where}: the BPE pre-tokenizer is not one llama.cpp supports for our model "
                                f"families ({', '.join(PRE_GROUPS)})")
