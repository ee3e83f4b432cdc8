"""Read a GGUF file into a lazy Checkpoint: dequantized on demand, back in Hugging Face layout.

The file is validated by edgellm's strict checker first; its tensor table gives each tensor's offset,
read with a plain file read (a memory map would keep every touched page in RSS) and dequantized
with gguf.quants when asked for. q/k rows are un-permuted from llama.cpp's rope layout, names mapped
back through gguf's own name map; gguf's GGUFReader reads the tokenizer arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.errors import InvalidModelError, UnsupportedModelError
from edgellm.gguf_check import validate_gguf

from .checkpoint import (
    SPECIAL_TOKEN_TYPES,
    Checkpoint,
    ModelConfig,
    TensorSource,
    TokenizerData,
    dequantize,
    gguf_tensor_names,
    hf_tensor_shapes,
    llama_cpp_rope,
    pre_group,
)

QT = gguf.GGMLQuantizationType
SUPPORTED_ARCHS = ("llama", "qwen2")


def read_gguf(path: str | Path) -> Checkpoint:
    """A Checkpoint over the GGUF at `path`; tensors are dequantized to float32 one at a time."""
    path = Path(path)
    info = validate_gguf(path)
    arch = info.architecture
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_ARCHS)}")
    m = info.metadata
    present = {t.name: t for t in info.tensors}
    if "rope_freqs.weight" in present or m.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise UnsupportedModelError(f"{path}: rope scaling is not supported yet (only plain rope)")
    config = _config(path, arch, m, present)
    shapes = hf_tensor_shapes(config)
    to_gguf = gguf_tensor_names(config)
    extra = sorted(set(present) - set(to_gguf.values()))
    if extra:
        raise UnsupportedModelError(f"{path}: tensor {extra[0]} has no Hugging Face equivalent here")
    for hf_name, shape in shapes.items():
        t = present.get(to_gguf[hf_name])
        if t is None:
            raise InvalidModelError(f"{path}: missing tensor {to_gguf[hf_name]}")
        if tuple(reversed(t.shape)) != shape:
            raise InvalidModelError(f"{path}: tensor {t.name} has shape {list(t.shape)}, "
                                    f"expected {list(reversed(shape))}")

    def load(hf_name: str) -> np.ndarray:
        t = present[to_gguf[hf_name]]
        raw = np.fromfile(path, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        if t.ggml_type in (QT.F32, QT.F16):
            data = raw.view(np.float32 if t.ggml_type == QT.F32 else np.float16).reshape(shapes[hf_name])
        else:
            data = dequantize(raw, QT(t.ggml_type), shapes[hf_name])
        return llama_cpp_rope(config, hf_name, data, inverse=True)

    dtypes = {n: present[to_gguf[n]].type_name for n in shapes}
    name = m.get(gguf.Keys.General.NAME) or path.stem
    return Checkpoint(config, TensorSource(shapes, load, dtypes), read_gguf_tokenizer(path), name=str(name))


def _uniform(path: Path, key: str, value: Any) -> Any:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer '{key}' values differ; only uniform layers are supported")
        return value[0]
    return value


def _config(path: Path, arch: str, m: dict[str, Any], present: dict[str, Any]) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        return _uniform(path, key, m.get(f"{arch}.{key}", default))

    n_head, n_embd = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: key and value head sizes differ")
    return ModelConfig(
        architecture=arch, hidden_size=n_embd, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=n_head,
        num_key_value_heads=get("attention.head_count_kv", n_head), head_dim=head_dim,
        vocab_size=present["token_embd.weight"].shape[1], max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in present, attention_bias="blk.0.attn_q.bias" in present)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_tokenizer(path: Path) -> TokenizerData:
    """Tokenizer metadata through gguf's GGUFReader (call after validate_gguf: the reader trusts the file)."""
    K = gguf.Keys.Tokenizer
    reader = gguf.GGUFReader(path, "r")  # maps the file but touches only the header
    model = _field(reader, K.MODEL)
    if model not in ("gpt2", "llama"):
        raise UnsupportedModelError(f"{path}: tokenizer model {model!r} is not supported; supported: gpt2 (BPE), "
                                    "llama (SentencePiece)")
    try:
        tokens = _field(reader, K.LIST)
        merges = _field(reader, K.MERGES, [])
    except UnicodeDecodeError:
        raise UnsupportedModelError(f"{path}: the vocabulary has tokens that are not valid UTF-8") from None
    pre = _field(reader, K.PRE, "default")
    spm = model == "llama"
    scores = _field(reader, K.SCORES)
    # llama.cpp's defaults when the add_* keys are absent (src/llama-vocab.cpp)
    add_bos_default = spm or pre_group(pre) == "llama-bpe"
    return TokenizerData(
        model=model, pre=pre, tokens=list(tokens),
        token_types=[int(x) for x in _field(reader, K.TOKEN_TYPE, [int(gguf.TokenType.NORMAL)] * len(tokens))],
        merges=list(merges), scores=None if scores is None else [float(s) for s in scores],
        special_ids={typ: int(v) for typ in SPECIAL_TOKEN_TYPES
                     if (v := _field(reader, getattr(K, f"{typ.upper()}_ID"))) is not None},
        add_bos=bool(_field(reader, K.ADD_BOS, add_bos_default)), add_eos=bool(_field(reader, K.ADD_EOS, False)),
        add_space_prefix=_field(reader, K.ADD_PREFIX), chat_template=_field(reader, K.CHAT_TEMPLATE))
