"""llama.cpp-specific rules applied after edgellm.gguf_check has parsed a GGUF header.

What llama.cpp (as vendored in llama-cpp-python) would otherwise abort or fail on: the architectures,
tokenizer models, pre-tokenizers and rope scaling types it knows, the types of the metadata keys it reads,
hyper-parameter ranges and expert counts, tensor names per architecture, tensor shapes derived from the
hyper-parameters for the dense loaders, and tokenizer arrays. Every check reports through the cursor's
fail() (InvalidModelError) or raises UnsupportedModelError, so messages read the same as the reader's.
"""
from __future__ import annotations

import re
from typing import Any

import gguf

from edgellm.errors import UnsupportedModelError
from edgellm.gguf_info import Cursor, GGUFInfo, quote

MAX_HPARAM = 1_000_000
MAX_LAYERS = 512               # LLAMA_MAX_LAYERS; llama.cpp aborts beyond it
MAX_EXPERTS = 1024             # LLAMA_MAX_EXPERTS
ARCH_NAMES = frozenset(gguf.MODEL_ARCH_NAMES.values())
_ARCH_BY_NAME = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
_TENSOR_SUFFIXES = {"weight", "bias", "scale", "scales", "input_scale", "lora_a", "lora_b"}
_BID = re.compile(r"^(.*?)\.(0|[1-9][0-9]{0,5})\.(.*)$")
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")

# What llama.cpp (as vendored in llama-cpp-python 0.3.36) accepts; anything else fails to load.
TOKENIZER_MODELS = {"none", "no_vocab", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv",
                    "plamo2", "gemma4"}
_BPE_MODELS = {"gpt2", "hybriddna", "whitespace"}
PRE_TOKENIZERS = set("""default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2
jina-v5-nano deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es
jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m
sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2
qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom
gpt3-finnish exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie
granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe
seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open
mellum2""".split())
ROPE_SCALING_TYPES = {"none", "linear", "yarn", "longrope"}

# Types llama.cpp's GGUFMeta enforces for the keys it reads (a mismatch makes it throw or abort).
U32, _F32, _BOOL, STR = "UINT32", "FLOAT32", "BOOL", "STRING"
_TK = gguf.Keys.Tokenizer
TOKEN_ID_KEYS = [v for k, v in vars(_TK).items() if k.endswith("_ID")]
_KEY_TYPES: dict[str, str | tuple[str, ...]] = {
    "general.architecture": STR, "general.alignment": U32, "general.file_type": U32,
    "general.quantization_version": U32, "general.name": STR, "split.count": "UINT16",
    _TK.MODEL: STR, _TK.PRE: STR, _TK.LIST: "ARRAY[STRING]", _TK.TOKEN_TYPE: "ARRAY[INT32]",
    _TK.SCORES: ("ARRAY[FLOAT32]", "ARRAY[INT32]"), _TK.MERGES: "ARRAY[STRING]", _TK.TOKEN_TYPE_COUNT: U32,
    _TK.ADD_BOS: _BOOL, _TK.ADD_EOS: _BOOL, _TK.ADD_SEP: _BOOL, _TK.ADD_PREFIX: _BOOL,
    _TK.REMOVE_EXTRA_WS: _BOOL, _TK.CHAT_TEMPLATE: STR, **{k: U32 for k in TOKEN_ID_KEYS}}
_ARCH_KEY_TYPES: dict[str, str] = {
    **{k: U32 for k in """context_length embedding_length embedding_length_out block_count vocab_size
       expert_count expert_group_count expert_group_used_count leading_dense_block_count
       expert_feed_forward_length expert_shared_feed_forward_length expert_shared_count nextn_predict_layers
       pooling_type attention.key_length attention.value_length attention.key_length_swa
       attention.value_length_swa attention.sliding_window attention.q_lora_rank attention.kv_lora_rank
       rope.dimension_count rope.dimension_count_swa rope.scaling.original_context_length""".split()},
    **{k: _F32 for k in """rope.freq_base rope.freq_base_swa rope.scaling.factor rope.scale_linear
       rope.scaling.attn_factor rope.scaling.alpha attention.layer_norm_epsilon
       attention.layer_norm_rms_epsilon attention.clamp_kqv attention.max_alibi_bias logit_scale
       embedding_scale residual_scale attention.scale attn_logit_softcapping final_logit_softcapping
       expert_weights_scale""".split()},
    **{k: _BOOL for k in "attention.causal rope.scaling.finetuned use_parallel_residual expert_weights_norm".split()},
    "rope.scaling.type": STR}
# llama.cpp reads these as one u32 or a per-layer array of u32/i32 with block_count entries.
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")


def check_merges(c: Cursor, items: list[bytes]) -> None:
    for i, s in enumerate(items):
        if s.count(b" ") != 1 or s[:1] == b" " or s[-1:] == b" ":
            c.fail(f"tokenizer.ggml.merges[{i}] ({s[:40]!r}) is not two parts separated by one space")


def check_key_types(c: Cursor, info: GGUFInfo) -> None:
    arch = info.metadata.get(gguf.Keys.General.ARCHITECTURE)
    prefix = f"{arch}." if isinstance(arch, str) else None
    block_count = info.metadata.get(f"{arch}.block_count")
    for key, got in info.kv_types.items():
        want: str | tuple[str, ...] | None = _KEY_TYPES.get(key)
        if want is None and prefix and key.startswith(prefix):
            sub = key[len(prefix):]
            if sub in _PER_LAYER_KEYS:
                if got.startswith("ARRAY"):
                    if got not in ("ARRAY[UINT32]", "ARRAY[INT32]") or len(info.metadata[key]) != block_count:
                        c.fail(f"'{key}' must be a UINT32 or a {block_count}-entry UINT32/INT32 array, got {got} "
                               f"of {len(info.metadata[key])}")
                    continue
                want = U32
            else:
                want = _ARCH_KEY_TYPES.get(sub)
        if want is not None and got not in ((want,) if isinstance(want, str) else want):
            wanted = want if isinstance(want, str) else " or ".join(want)
            c.fail(f"'{key}' has type {got} but llama.cpp reads it as {wanted}")
    for key in (f"{arch}.rope.scaling.type",):
        if key in info.metadata and info.metadata[key] not in ROPE_SCALING_TYPES:
            c.fail(f"'{key}' is {quote(info.metadata[key])}, not one of {sorted(ROPE_SCALING_TYPES)}")
    if info.metadata.get("split.count", 0) > 1:
        raise UnsupportedModelError(f"{c.name}: split GGUF files are not supported; merge them with llama-gguf-split")


def _hp(c: Cursor, m: dict, key: str, required: bool, lo: int = 1, hi: int = MAX_HPARAM) -> Any:
    v = m.get(key)
    if v is None:
        if required:
            c.fail(f"missing required key '{key}'")
        return None
    for x in (v if isinstance(v, list) else [v]):
        if not lo <= x <= hi:
            c.fail(f"'{key}' = {x:,} is out of range {lo}..{hi:,}")
    return v


def check_arch(c: Cursor, info: GGUFInfo, arch: str) -> None:
    m, a = info.metadata, arch
    march = _ARCH_BY_NAME[arch]
    kinds = gguf.MODEL_TENSORS.get(march, [])
    attention = gguf.MODEL_TENSOR.ATTN_Q in kinds or gguf.MODEL_TENSOR.ATTN_QKV in kinds
    n_layer = _hp(c, m, f"{a}.block_count", True, 1, MAX_HPARAM)
    if n_layer > MAX_LAYERS:
        raise UnsupportedModelError(f"{c.name}: {a}.block_count {n_layer:,} exceeds llama.cpp's limit of {MAX_LAYERS}")
    n_embd = _hp(c, m, f"{a}.embedding_length", True)
    _hp(c, m, f"{a}.context_length", arch != "clip")
    n_head = _hp(c, m, f"{a}.attention.head_count", attention, 0 if not attention else 1)
    dense = arch in _DENSE_ARCHS and not m.get(f"{a}.expert_count")
    n_head_kv = _hp(c, m, f"{a}.attention.head_count_kv", False, 1 if dense else 0)
    n_ff = _hp(c, m, f"{a}.feed_forward_length", dense, 1 if dense else 0)
    if isinstance(n_head, int) and isinstance(n_head_kv, int) and (n_head_kv < 1 or n_head % n_head_kv):
        c.fail(f"{a}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}")
    # Expert counts: llama.cpp GGML_ASSERTs (aborts the process) when these disagree.
    n_exp = _hp(c, m, f"{a}.expert_count", False, 0, MAX_EXPERTS) or 0
    used = _hp(c, m, f"{a}.expert_used_count", False, 0, MAX_EXPERTS) or 0
    used = max(used) if isinstance(used, list) else used
    groups = _hp(c, m, f"{a}.expert_group_count", False, 0) or 0
    g_used = _hp(c, m, f"{a}.expert_group_used_count", False, 0) or 0
    if used > n_exp or (n_exp > 0) != (used > 0) or (groups and groups >= n_exp) \
            or (groups > 1 and (n_exp % groups or not 0 < g_used < groups)):
        c.fail(f"inconsistent expert counts (expert_count {n_exp}, expert_used_count {used}, "
               f"expert_group_count {groups}, expert_group_used_count {g_used})")
    _hp(c, m, f"{a}.nextn_predict_layers", False, 0, n_layer)
    # Tensor names must be ones llama.cpp knows for this architecture (it refuses any extra tensor).
    plain = {gguf.TENSOR_NAMES[k] for k in kinds if "{bid}" not in gguf.TENSOR_NAMES[k]}
    per_block = {gguf.TENSOR_NAMES[k] for k in kinds if "{bid}" in gguf.TENSOR_NAMES[k]}
    blocks: set[int] = set()
    for t in info.tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix not in _TENSOR_SUFFIXES:
            base = t.name
        mt = _BID.match(base)
        if mt and f"{mt[1]}.{{bid}}.{mt[3]}" in per_block:
            if mt[1] == "blk":
                if int(mt[2]) >= n_layer:
                    c.fail(f"tensor '{t.name}' is in block {mt[2]} but {a}.block_count is {n_layer}")
                blocks.add(int(mt[2]))
        elif base not in plain:
            c.fail(f"tensor '{t.name}' is not a tensor of architecture '{a}'")
    if blocks and len(blocks) != n_layer:
        c.fail(f"block {min(set(range(n_layer)) - blocks)} has no tensors but {a}.block_count is {n_layer}")
    if dense and all(isinstance(x, int) for x in (n_head, n_ff, n_head_kv or 1)):
        _check_dense_shapes(c, info, arch, n_layer, n_embd, n_head, n_head_kv or n_head, n_ff)


_DENSE_ARCHS = {"llama", "qwen2", "qwen3"}
# Such files load, then abort in the CPU kernels on the first decode (binary ops want F32 1-D operands;
# Q8_1/Q8_K are activation-only types; the integer types have no matmul).
_NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}


def _check_dense_shapes(c: Cursor, info: GGUFInfo, arch: str, n_layer: int, n_embd: int, n_head: int,
                        n_head_kv: int, n_ff: int) -> None:
    """Shapes llama.cpp's llama/qwen2/qwen3 loaders will ask for, derived from the hyper-parameters."""
    m, a = info.metadata, arch
    if n_embd % n_head and f"{a}.attention.key_length" not in m:
        c.fail(f"{a}.embedding_length {n_embd} is not divisible by attention.head_count {n_head}")
    dk = m.get(f"{a}.attention.key_length", n_embd // n_head)
    dv = m.get(f"{a}.attention.value_length", n_embd // n_head)
    rot = m.get(f"{a}.rope.dimension_count")
    if arch == "llama" and rot is not None and rot != dk:
        c.fail(f"{a}.rope.dimension_count {rot} must equal the head size {dk}")
    if f"{a}.attention.layer_norm_rms_epsilon" not in m:
        c.fail(f"missing required key '{a}.attention.layer_norm_rms_epsilon'")
    n_vocab = len(m[_TK.LIST]) if _TK.LIST in m else m.get(f"{a}.vocab_size")
    q, k, v = dk * n_head, dk * n_head_kv, dv * n_head_kv
    spec: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((n_embd, n_vocab), True), "output_norm.weight": ((n_embd,), True),
        "output.weight": ((n_embd, n_vocab), False), "output.bias": ((n_vocab,), False)}
    if isinstance(rot, int):
        spec["rope_freqs.weight"] = ((rot // 2,), False)
    fused = any(t.name.endswith(".attn_qkv.weight") for t in info.tensors)
    for i in range(n_layer):
        b = f"blk.{i}."
        spec.update({
            b + "attn_norm.weight": ((n_embd,), True), b + "ffn_norm.weight": ((n_embd,), True),
            b + "attn_q.weight": ((n_embd, q), not fused), b + "attn_k.weight": ((n_embd, k), not fused),
            b + "attn_v.weight": ((n_embd, v), not fused), b + "attn_qkv.weight": ((n_embd, q + k + v), False),
            b + "attn_q.bias": ((q,), False), b + "attn_k.bias": ((k,), False), b + "attn_v.bias": ((v,), False),
            b + "attn_qkv.bias": ((q + k + v,), False),
            b + "attn_output.weight": ((dv * n_head, n_embd), True), b + "attn_output.bias": ((n_embd,), False),
            b + "ffn_gate.weight": ((n_embd, n_ff), True), b + "ffn_down.weight": ((n_ff, n_embd), True),
            b + "ffn_up.weight": ((n_embd, n_ff), True), b + "ffn_gate.bias": ((n_ff,), False),
            b + "ffn_down.bias": ((n_embd,), False), b + "ffn_up.bias": ((n_ff,), False)})
        if arch == "qwen3":
            spec[b + "attn_q_norm.weight"] = ((dk,), True)
            spec[b + "attn_k_norm.weight"] = ((dk,), True)
    present = {t.name: t for t in info.tensors}
    for name, (shape, required) in spec.items():
        t = present.get(name)
        if t is None:
            if required:
                c.fail(f"missing tensor '{name}' required by architecture '{a}'")
            continue
        if t.shape != shape:
            c.fail(f"tensor '{name}' has shape {list(t.shape)} but the hyper-parameters imply {list(shape)}")
        if t.type_name in _NOT_WEIGHTS or (len(shape) == 1 and t.type_name != "F32"):
            c.fail(f"tensor '{name}' has type {t.type_name}, which llama.cpp cannot compute with "
                   "(1-D weights must be F32)")
    extra = sorted(set(present) - set(spec))
    if extra:
        c.fail(f"tensor '{extra[0]}' is not used by llama.cpp's '{a}' loader (it would refuse the file)")


def check_tokenizer(c: Cursor, info: GGUFInfo) -> None:
    """What llama.cpp's vocabulary loader needs; duplicate tokens make it abort (GGML_ASSERT)."""
    m = info.metadata
    model = m.get(_TK.MODEL)
    if model is None:
        c.fail(f"missing required key '{_TK.MODEL}'")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedModelError(f"{c.name}: tokenizer model {quote(model)} is not one llama.cpp knows")
    if model in ("none", "no_vocab"):
        return
    tokens, types = c.tokens, c.token_types
    if tokens is None:
        c.fail(f"missing tokenizer vocabulary '{_TK.LIST}'")
    n = len(tokens)
    pre = m.get(_TK.PRE)
    if model in _BPE_MODELS:
        if _TK.MERGES not in m and pre != "kimi-k2":
            c.fail(f"BPE tokenizer without '{_TK.MERGES}'")
        if pre is not None and pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(f"{c.name}: pre-tokenizer {quote(pre)} is not one llama.cpp knows")
    for key in (_TK.TOKEN_TYPE, _TK.SCORES):
        if key in m and len(m[key]) != n:
            c.fail(f"'{key}' has {len(m[key]):,} entries but there are {n:,} tokens")
    for key in TOKEN_ID_KEYS:
        if key in m and m[key] >= n:
            c.fail(f"'{key}' = {m[key]:,} is not below the vocabulary size {n:,}")
    named = [s or b"[EMPTY_%d]" % i for i, s in enumerate(tokens)] if not all(tokens) else tokens
    if len(set(named)) != n:  # llama.cpp names empty tokens [EMPTY_i], then asserts the texts are unique
        seen: dict[bytes, int] = {}
        for i, s in enumerate(named):
            if s in seen:
                c.fail(f"tokenizer.ggml.tokens[{i}] {s[:40]!r} duplicates token {seen[s]}")
            seen[s] = i
    if types is not None and n and (min(types) < 0 or max(types) > 6):
        bad = next(i for i, t in enumerate(types) if not 0 <= t <= 6)
        c.fail(f"tokenizer.ggml.token_type[{bad}] = {types[bad]} is not a token type (0..6)")
    for i in (i for i, t in enumerate(types or ()) if t == 6):  # BYTE tokens are parsed as <0xHH>
        if not _BYTE_TOKEN.fullmatch(tokens[i]):
            c.fail(f"tokenizer.ggml.tokens[{i}] {tokens[i][:40]!r} has type BYTE but is not of the form <0xHH>")
    c.tokens = c.token_types = None
