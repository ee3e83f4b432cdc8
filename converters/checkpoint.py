"""The in-memory hub format every converter step reads and writes: config + lazy tensors + tokenizer.

Tensors keep Hugging Face names and layouts (q/k *not* permuted for llama.cpp's rope); the GGUF
reader and writer are the only places that know llama.cpp's names and permutation. Tensors are
loaded one at a time, so a conversion holds about one tensor in memory whatever the model's size.
No heavy imports here: the runtime may import this module without torch/transformers installed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from edgellm.errors import InvalidModelError, UnsupportedModelError

# HF architecture class -> our architecture name; llama.cpp runs Mistral as its 'llama' architecture.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}
_HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
# transformers' defaults for the keys a config may omit
_DEFAULT_CTX = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
# tokenizer.ggml.<typ>_token_id keys llama.cpp reads (GGUFWriter.add_<typ>_token_id exists for each)
SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask", "eot", "eom")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class ModelConfig:
    """The hyper-parameters of a dense Llama-family decoder (what both HF config.json and GGUF carry)."""
    architecture: str                 # 'llama' | 'qwen2' | 'mistral'
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v biases (always on for Qwen2; Llama's flag adds o_proj's too)

    @property
    def gguf_arch(self) -> str:
        return GGUF_ARCH[self.architecture]

    @property
    def rope_permuted(self) -> bool:
        """llama.cpp's 'llama' arch uses interleaved (GPT-J style) rope: q/k rows are permuted on export."""
        return self.gguf_arch == "llama"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        name = archs[0] if archs else _HF_CLASS.get(_MODEL_TYPES.get(cfg.get("model_type", ""), ""))
        if name not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architecture {name or cfg.get('model_type') or 'unknown'!s} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[name]
        for key in _REQUIRED:
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise InvalidModelError(f"{source}: missing or invalid required key '{key}'")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UnsupportedModelError(f"{source}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                                        "is not supported yet (only plain rope)")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: only SiLU MLPs without bias are supported "
                                        f"(hidden_act={cfg.get('hidden_act')!r}, mlp_bias={cfg.get('mlp_bias')})")
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=arch, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings") or _DEFAULT_CTX[arch],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)))

    def to_hf_config(self) -> dict[str, Any]:
        """config.json content transformers (v4 and v5) loads as the matching *ForCausalLM."""
        cfg: dict[str, Any] = {
            "architectures": [_HF_CLASS[self.architecture]], "model_type": _MODEL_TYPES[self.architecture],
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32"}
        if self.architecture == "llama":
            cfg.update(attention_bias=self.attention_bias, mlp_bias=False)
        elif self.architecture == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None)
        else:
            cfg.update(sliding_window=None)  # llama.cpp runs Mistral without a sliding window
        return cfg


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a standard checkpoint of `config` has, with its HF (PyTorch) shape, in canonical order."""
    c, h = config, config.hidden_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, n in (("q", q), ("k", kv), ("v", kv)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (n, h)
            if c.attention_bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (n,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if c.attention_bias and c.architecture == "llama":   # LlamaConfig.attention_bias covers o_proj too
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
        out[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
    out["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, h)
    return out


def gguf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """HF name -> llama.cpp name, from gguf's own TensorNameMap (no hand-kept table)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[config.gguf_arch.upper()], config.num_hidden_layers)
    out = {}
    for name in hf_tensor_shapes(config):
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:  # pragma: no cover - the names above are all in gguf's map
            raise UnsupportedModelError(f"tensor {name} has no llama.cpp name")
        out[name] = mapped
    return out


def rope_permute(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """Reorder q/k rows (or biases) between HF's half-split rope and llama.cpp's interleaved rope.

    Hand-written: gguf-py has no such helper (llama.cpp's converter does it inline in torch).
    Within each head, HF rows [x0..x(d/2-1), y0..] become [x0, y0, x1, y1, ...]; inverse undoes it.
    """
    shape = w.shape
    half = shape[0] // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return np.ascontiguousarray(w.reshape(*split, *shape[1:]).swapaxes(1, 2).reshape(shape))


def llama_cpp_rope(config: ModelConfig, hf_name: str, data: np.ndarray, *, inverse: bool = False) -> np.ndarray:
    """`data` of tensor `hf_name` permuted to llama.cpp's rope layout (or back), where the arch needs it."""
    if config.rope_permuted and ".self_attn.q_proj." in hf_name:
        return rope_permute(data, config.num_attention_heads, inverse)
    if config.rope_permuted and ".self_attn.k_proj." in hf_name:
        return rope_permute(data, config.num_key_value_heads, inverse)
    return data


_CHUNK = 1 << 22   # elements per conversion step: bounds the temporaries of gguf.quants whatever the tensor size


def dequantize(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` from raw ggml-typed bytes (BF16, F16, Q4_1, ...), via gguf.quants.

    Converted in row chunks into one preallocated output: gguf.quants makes several full-size
    temporaries (int32/uint64 intermediates), which would otherwise multiply peak memory.
    """
    out = np.empty(shape, np.float32)
    if qtype == gguf.GGMLQuantizationType.BF16:   # exact widening, in place: 8x faster than gguf.quants' rows
        bits = out.view(np.uint32)
        bits[...] = raw.view(np.uint16).reshape(shape)
        bits <<= 16
        return out
    flat = out.reshape(-1, shape[-1])
    rows = raw.reshape(flat.shape[0], -1)
    step = max(1, _CHUNK // shape[-1])
    for r in range(0, flat.shape[0], step):
        flat[r:r + step] = gguf.quants.dequantize(rows[r:r + step], qtype)
    return out


def to_bf16(data: np.ndarray) -> np.ndarray:
    """BF16 bits (uint16, same shape) of `data`, rounded by gguf.quants like ggml does, in row chunks."""
    out = np.empty(data.shape, np.uint16)
    flat, src = out.reshape(-1, data.shape[-1]), data.reshape(-1, data.shape[-1])
    step = max(1, _CHUNK // data.shape[-1])
    for r in range(0, flat.shape[0], step):
        chunk = np.ascontiguousarray(src[r:r + step], dtype=np.float32)
        flat[r:r + step] = gguf.quants.quantize(chunk, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    return out


@dataclass
class TensorSource:
    """Names, shapes and dtypes known up front; data loaded on demand, one tensor per `load` call.

    `load(name)` returns float32 or float16 numpy data in HF layout. Iterating yields (name, array)
    in canonical order and drops each array before loading the next, so memory stays ~one tensor.
    """
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], np.ndarray]
    dtypes: dict[str, str] = field(default_factory=dict)   # what the source stores ('BF16', 'Q4_1', ...)
    # the stored bits of a BF16 (uint16) or F16 tensor, unconverted: lets a writer copy them through
    raw16: Callable[[str], np.ndarray] | None = None

    def stored_16bit(self) -> str | None:
        """'BF16' or 'F16' when every 2-D tensor is stored so and can be read raw, else None."""
        kinds = {self.dtypes.get(n) for n, s in self.shapes.items() if len(s) == 2}
        kind = kinds.pop() if len(kinds) == 1 else None
        return kind if self.raw16 is not None and kind in ("BF16", "F16") else None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.shapes:
            yield name, self.load(name)

    def names(self) -> list[str]:
        return list(self.shapes)

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())


@dataclass
class TokenizerData:
    """What GGUF's tokenizer.ggml.* keys and a HF tokenizer.json both need.

    model: 'gpt2' (byte-level BPE; tokens in GPT-2's byte-to-unicode form) or 'llama' (SentencePiece
    style: '▁' for spaces, <0xXX> byte tokens, scores). pre: llama.cpp's pre-tokenizer name.
    hf_files: the original tokenizer.json / tokenizer_config.json text when read from a HF directory
    (written back verbatim by the HF writer; a GGUF source builds them instead).
    """
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # 'bos', 'eos', 'unk', 'pad', ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    hf_files: dict[str, str] = field(default_factory=dict, repr=False)

    def special_token(self, which: str) -> str | None:
        tid = self.special_ids.get(which)
        return None if tid is None else self.tokens[tid]


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: TensorSource
    tokenizer: TokenizerData
    name: str = ""


# -- pre-tokenizers --------------------------------------------------------------------------------
# llama.cpp pre-tokenizer names grouped by the regex llama.cpp applies (src/llama-vocab.cpp); the
# first name of each group is the one we write. Each group has one tokenizers-library equivalent.
PRE_GROUPS: dict[str, tuple[str, ...]] = {
    "smollm": ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"),
    "gpt-2": ("gpt-2", "mpt", "olmo", "jais", "trillion", "granite-docling"),
    "qwen2": ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"),
    "llama-bpe": ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
}
# The regexes as the original tokenizer.json files spell them (llama.cpp adapts them for its engine).
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_RE = _QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def pre_group(pre: str) -> str | None:
    return next((g for g, names in PRE_GROUPS.items() if pre in names), None)


def build_pre_tokenizer(pre: str) -> Any:
    """The tokenizers-library pre-tokenizer that splits text exactly as llama.cpp's `pre` does."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    group = pre_group(pre)
    if group == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if group == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if group in ("qwen2", "llama-bpe"):
        regex = Regex(_QWEN2_RE if group == "qwen2" else _LLAMA3_RE)
        return pt.Sequence([pt.Split(regex, behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedModelError(f"BPE pre-tokenizer {pre!r} is not supported; supported: "
                                f"{', '.join(n for names in PRE_GROUPS.values() for n in names)}")
