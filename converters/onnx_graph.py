"""The decoder graph, emitted node by node from a Checkpoint with onnx.helper (no torch, no tracing).

One code path for every precision; two flavours:
- fused: onnxruntime contrib ops — GroupQueryAttention (rotary inside, past/present BNSH, packed QKV),
  SkipSimplifiedLayerNormalization, MatMulNBits (4/8-bit blocks), GatherBlockQuantized for a
  quantized embedding, one fused gate/up projection with QuickGelu(alpha=1) as SiLU;
- portable: standard ONNX opset 17 only (RMSNorm, rotary, causal attention and the GQA head repeat
  as their decompositions), float32 / float16 / per-channel int8 (DequantizeLinear) weights — what
  providers without Microsoft's contrib ops (NNAPI) can take.

Both take and return the same tensors, the onnxruntime-genai convention: input_ids [B,S] int64,
attention_mask [B,T] int64, past_key_values.{i}.key/value [B,kv_heads,P,head_dim] -> logits
[B,S',vocab] and present.{i}.key/value [B,kv_heads,T,head_dim]; plus num_logits_to_keep [1] int64
(S' = the last that many positions, so a long prompt does not pay for logits it never reads).
Written by hand because onnxruntime-genai's builder needs torch + transformers and knows neither
calibrated mixed bit widths nor a contrib-free graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .checkpoint import ModelConfig
from .onnx_quant import BitChoice, QuantTensor, quantize_blocks, quantize_int8_channels

OPSET = 17
MS = "com.microsoft"
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class WeightPlan:
    """How weights are stored. Fused: a BitChoice per unit tag (see fused_units; absent = float32).
    Portable: one dtype for every matrix. Importance (imatrix per unit tag) guides block quantization."""

    portable_dtype: str = "f32"                        # 'f32' | 'f16' | 'int8' (portable flavour)
    # the portable graph's decompositions with MatMulNBits matrices: the unfused twin of a fused int4
    # graph, so benchmarks measure operator fusion at equal weights (not a flavour users get)
    unfused_bits: BitChoice | None = None
    bits: dict[str, BitChoice] = field(default_factory=dict)
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy_level: int = 4
    quantized: dict[str, QuantTensor] = field(default_factory=dict)  # filled while building
    # gather the embedding from a float32 table even when it is quantized (transcoded blocks whose float
    # zero points GatherBlockQuantized does not take); the output head keeps its blocks
    embed_f32: bool = False
    # or from blocks of its own (a tied table whose output head was re-rounded keeps its exact rows)
    embed_blocks: QuantTensor | None = None


def fused_units(config: ModelConfig) -> dict[str, list[str]]:
    """The matrices of the fused graph (tag -> HF weights stacked by rows), each one MatMulNBits."""
    units: dict[str, list[str]] = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        units[f"{p}.self_attn.qkv_proj"] = [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]
        units[f"{p}.self_attn.o_proj"] = [f"{p}.self_attn.o_proj.weight"]
        units[f"{p}.mlp.gate_up_proj"] = [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]
        units[f"{p}.mlp.down_proj"] = [f"{p}.mlp.down_proj.weight"]
    units["lm_head"] = ["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    if not config.tie_word_embeddings:
        units["model.embed_tokens"] = ["model.embed_tokens.weight"]
    return units


def unit_weight(weight: Callable[[str], np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([weight(n) for n in names], axis=0) if len(names) > 1 else weight(names[0])


class GraphBuilder:
    """A tiny emitter: unique names, initializers, nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: dict[str, int] = {}
        self._small: dict[str, tuple[str, np.ndarray]] = {}

    def name(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, base: str, value: np.ndarray) -> str:
        """An initializer; small ones (shapes, axes, scalars) are made once per base name and reused."""
        value = np.asarray(value)
        if value.size <= 8 and base in self._small:
            if not np.array_equal(self._small[base][1], value):  # pragma: no cover - a naming slip in this module
                raise ValueError(f"constant {base} reused with another value")
            return self._small[base][0]
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if value.size <= 8:
            self._small[base] = (name, value)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, name: str = "", domain: str = "",
           outputs: list[str] | None = None, **attrs) -> list[str]:
        base = self.name(name or op_type)
        outs = outputs or [f"{base}/out{i}" if n_out > 1 else f"{base}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]


def gather_blocks(g: GraphBuilder, qt: QuantTensor, names: list[str] | tuple[str, ...]) -> str:
    """Embedding rows of `input_ids` straight from MatMulNBits blocks (a tied table shares lm_head's)."""
    data, scales, zps = names
    rows = g.one("Reshape", [data, g.const("embed_rows", np.array([qt.n, -1], np.int64))])
    out = g.one("GatherBlockQuantized", [rows, "input_ids", scales, zps], domain=MS,
                bits=qt.bits, block_size=qt.block, gather_axis=0, quantize_axis=1)
    if qt.k % qt.block:  # rows come back padded to whole blocks: cut them to the hidden size
        out = g.one("Slice", [out, g.const("embed_k0", np.array([0], np.int64)),
                              g.const("embed_k", np.array([qt.k], np.int64)),
                              g.const("embed_kaxis", np.array([-1], np.int64))])
    return out


def rope_tables(config: ModelConfig, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n_pos, head_dim/2] of HF's rotate-half rope (same float64 angles as reference.py)."""
    d = config.head_dim
    inv = config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(np.arange(n_pos), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _io(config: ModelConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    kv = config.num_key_value_heads
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    ins = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
           helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
           helper.make_tensor_value_info("num_logits_to_keep", i64, [1])]
    outs = [helper.make_tensor_value_info("logits", f, ["batch_size", "logits_length", config.vocab_size])]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            ins.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f,
                                                     ["batch_size", kv, "past_sequence_length", config.head_dim]))
            outs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f,
                                                      ["batch_size", kv, "total_sequence_length", config.head_dim]))
    return ins, outs


Weights = Callable[[str], np.ndarray]


def build_graph(config: ModelConfig, weight: Weights, flavour: str, plan: WeightPlan, *,
                max_positions: int | None = None, progress: Callable[[int, int], None] | None = None
                ) -> onnx.ModelProto:
    """The decoder as an onnx ModelProto; `weight(hf_name)` gives float32 tensors in HF layout."""
    g = GraphBuilder()
    emit = _Fused(g, config, weight, plan) if flavour == "fused" else _Portable(g, config, weight, plan)
    n_pos = max_positions or config.max_position_embeddings
    h = emit.start(n_pos)
    for i in range(config.num_hidden_layers):
        h = emit.layer(i, h)
        if progress:
            progress(i + 1, config.num_hidden_layers)
    emit.finish(h)
    ins, outs = _io(config)
    graph = helper.make_graph(g.nodes, f"edgellm-{config.architecture}-{flavour}", ins, outs, g.inits)
    contrib = flavour == "fused" or plan.unfused_bits is not None
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS, 1)] if contrib else [])
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgellm", ir_version=8)


class _Common:
    def __init__(self, g: GraphBuilder, config: ModelConfig, weight: Weights, plan: WeightPlan) -> None:
        self.g, self.c, self.w, self.plan = g, config, weight, plan
        self.eps = float(config.rms_norm_eps)
        self.tied = config.tie_word_embeddings

    def bias(self, x: str, hf: str) -> str:
        return self.g.one("Add", [x, self.g.const(hf, self.w(hf).astype(np.float32))]) if self._has(hf) else x

    def _has(self, hf: str) -> bool:
        try:
            return self.w(hf) is not None
        except KeyError:
            return False

    def keep_last(self, h: str) -> str:
        g = self.g
        start = g.one("Neg", ["num_logits_to_keep"])
        return g.one("Slice", [h, start, g.const("int64_max", np.array([INT64_MAX], np.int64)),
                               g.const("axis1", np.array([1], np.int64))])

    def head_weight(self) -> str:
        return "model.embed_tokens.weight" if self.tied else "lm_head.weight"


class _Fused(_Common):
    def start(self, n_pos: int) -> str:
        g = self.g
        self._inits: dict[str, tuple[str, str, str]] = {}
        mask_sum = g.one("ReduceSum", ["attention_mask", g.const("axes1", np.array([1], np.int64))], keepdims=0)
        seqlens = g.one("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))])
        self.seqlens = g.one("Cast", [seqlens], to=TensorProto.INT32)
        total = g.one("Gather", [g.one("Shape", ["attention_mask"]), g.const("one_idx", np.array(1, np.int64))], axis=0)
        self.total = g.one("Cast", [total], to=TensorProto.INT32)
        cos, sin = rope_tables(self.c, n_pos)
        self.cos, self.sin = g.const("cos_cache", cos), g.const("sin_cache", sin)
        h = self.embedding()
        self.residual = h
        return g.one("SimplifiedLayerNormalization", [h, g.const("model.layers.0.input_layernorm.weight",
                                                                 self.w("model.layers.0.input_layernorm.weight"))],
                     axis=-1, epsilon=self.eps, stash_type=1)

    def embedding(self) -> str:
        g = self.g
        tag = "lm_head" if self.tied else "model.embed_tokens"
        if self.plan.embed_blocks is not None:
            qt = self.plan.embed_blocks
            key = f"model.embed_tokens.gather.q{qt.bits}"
            names = (g.const(key, qt.data), g.const(f"{key}.scales", qt.scales),
                     g.const(f"{key}.zero_points", qt.zero_points))
            return gather_blocks(g, qt, names)
        if tag not in self.plan.bits or self.plan.embed_f32:
            self.embed_f32 = g.const("model.embed_tokens.weight", self.w("model.embed_tokens.weight"))
            return g.one("Gather", [self.embed_f32, "input_ids"], axis=0)
        qt, names = self.quantized(tag)  # a tied table shares lm_head's blocks
        return gather_blocks(g, qt, names)

    def quantized(self, tag: str) -> tuple[QuantTensor, tuple[str, str, str]]:
        """The tag's blocks (quantized on first use unless the exporter did) and their initializer names."""
        if tag not in self.plan.quantized:
            choice = self.plan.bits[tag]
            w = unit_weight(self.w, fused_units(self.c)[tag])
            self.plan.quantized[tag] = quantize_blocks(w, choice.bits, choice.block, self.plan.importance.get(tag))
        qt = self.plan.quantized[tag]
        if tag not in self._inits:
            g, key = self.g, f"{tag}.q{qt.bits}"
            # float zero points are not stored: offset_linear takes them as per-block offsets
            zps = "" if qt.zero_points.dtype == np.float32 else g.const(f"{key}.zero_points", qt.zero_points)
            self._inits[tag] = (g.const(key, qt.data), g.const(f"{key}.scales", qt.scales), zps)
        return qt, self._inits[tag]

    def linear(self, x: str, tag: str, outputs: list[str] | None = None) -> str:
        """x @ Wᵀ for the unit `tag`: one MatMulNBits (or a float MatMul) over its row-stacked weights."""
        g = self.g
        if tag not in self.plan.bits:
            w = unit_weight(self.w, fused_units(self.c)[tag])
            return g.op("MatMul", [x, g.const(f"{tag}.weight_t", np.ascontiguousarray(w.T))], name=tag,
                        outputs=outputs)[0]
        qt, (data, scales, zps) = self.quantized(tag)
        if qt.zero_points.dtype == np.float32:
            return self.offset_linear(x, tag, qt, data, scales, outputs)
        return g.op("MatMulNBits", [x, data, scales, zps], domain=MS, name=tag, outputs=outputs, K=qt.k, N=qt.n,
                    bits=qt.bits, block_size=qt.block, accuracy_level=self.plan.accuracy_level)[0]

    def offset_linear(self, x: str, tag: str, qt: QuantTensor, data: str, scales: str,
                      outputs: list[str] | None) -> str:
        """Blocks with float zero points (GGUF's q·d + m, transcoded) as integer blocks plus one offset per
        block: Σ (q − z)·s·x = Σ (q − 8)·s·x + Σ_blocks (8 − z)·s · (Σ_block x). MatMulNBits with its default
        zero point takes onnxruntime's int8 kernel (accuracy_level 4), which float zero points rule out
        (decode ran at 0.13× llama-bench with them); the offsets are one small float MatMul over the block
        sums of x, K/block rows — the bytes the float zero points took."""
        g = self.g
        mid = 2 ** (qt.bits - 1)
        offsets = ((mid - qt.zero_points.astype(np.float64)) * qt.scales).astype(np.float32)  # [N, K/block]
        main = g.one("MatMulNBits", [x, data, scales], domain=MS, name=tag, K=qt.k, N=qt.n, bits=qt.bits,
                     block_size=qt.block, accuracy_level=self.plan.accuracy_level)
        nb = qt.k // qt.block
        blocked = g.one("Reshape", [x, g.const(f"blocks_{nb}x{qt.block}", np.array([0, 0, nb, qt.block], np.int64))])
        sums = g.one("ReduceSum", [blocked, g.const("last_axis", np.array([-1], np.int64))], keepdims=0)
        shift = g.one("MatMul", [sums, g.const(f"{tag}.block_offsets", np.ascontiguousarray(offsets.T))])
        return g.op("Add", [main, shift], outputs=outputs)[0]

    def layer(self, i: int, normed: str) -> str:
        g, c, p = self.g, self.c, f"model.layers.{i}"
        qkv = self.linear(normed, f"{p}.self_attn.qkv_proj")
        if self._has(f"{p}.self_attn.q_proj.bias"):
            b = np.concatenate([self.w(f"{p}.self_attn.{x}_proj.bias") for x in "qkv"])
            qkv = g.one("Add", [qkv, g.const(f"{p}.self_attn.qkv_proj.bias", b.astype(np.float32))])
        attn, _, _ = g.op("GroupQueryAttention",
                          [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens,
                           self.total, self.cos, self.sin], 3, domain=MS, name=f"{p}.attn",
                          outputs=[f"{p}.attn/out", f"present.{i}.key", f"present.{i}.value"],
                          num_heads=c.num_attention_heads, kv_num_heads=c.num_key_value_heads,
                          scale=float(1 / np.sqrt(c.head_dim)), do_rotary=1, rotary_interleaved=0,
                          local_window_size=-1)
        o = self.bias(self.linear(attn, f"{p}.self_attn.o_proj"),
                      f"{p}.self_attn.o_proj.bias")
        normed2 = self.skip_norm(o, f"{p}.post_attention_layernorm.weight")
        gate_up = self.linear(normed2, f"{p}.mlp.gate_up_proj")
        gate, up = g.op("Split", [gate_up, g.const("split_ffn", np.array([c.intermediate_size] * 2, np.int64))], 2,
                        axis=-1)
        act = g.one("Mul", [g.one("QuickGelu", [gate], domain=MS, alpha=1.0), up])
        down = self.linear(act, f"{p}.mlp.down_proj")
        last = i == c.num_hidden_layers - 1
        return self.skip_norm(down, "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight")

    def skip_norm(self, x: str, weight_name: str) -> str:
        g = self.g
        normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization",
                                    [self.residual, x, g.const(weight_name, self.w(weight_name))], 4, domain=MS,
                                    epsilon=self.eps)
        self.residual = summed
        return normed

    def finish(self, normed: str) -> None:
        h = self.keep_last(normed)
        if self.tied and "lm_head" not in self.plan.bits:
            _gemm_logits(self.g, h, self.embed_f32, self.c)
        else:
            self.linear(h, "lm_head", outputs=["logits"])


def _gemm_logits(g: GraphBuilder, h: str, table: str, c: ModelConfig) -> None:
    """logits = h · tableᵀ without a transposed copy of a tied table: Gemm(transB) on 2-D rows."""
    rows = g.one("Reshape", [h, g.const("rows_shape", np.array([-1, c.hidden_size], np.int64))])
    logits = g.one("Gemm", [rows, table], transB=1)
    shape = g.one("Concat", [g.one("Slice", [g.one("Shape", [h]), g.const("zero1", np.array([0], np.int64)),
                                             g.const("two1", np.array([2], np.int64))]),
                             g.const("vocab1", np.array([c.vocab_size], np.int64))], axis=0)
    g.op("Reshape", [logits, shape], outputs=["logits"])


class _Portable(_Common):
    def start(self, n_pos: int) -> str:
        g, c = self.g, self.c
        past = g.one("Gather", [g.one("Shape", ["past_key_values.0.key"]), g.const("two", np.array(2, np.int64))],
                     axis=0)
        seq = g.one("Gather", [g.one("Shape", ["input_ids"]), g.const("one", np.array(1, np.int64))], axis=0)
        total = g.one("Add", [past, seq])
        positions = g.one("Range", [past, total, g.const("step", np.array(1, np.int64))])
        cos, sin = rope_tables(c, n_pos)
        full = lambda t: np.concatenate([t, t], axis=-1)  # noqa: E731 - rotate-half tables
        unsq = g.const("axes_0_1", np.array([0, 1], np.int64))
        self.cos = g.one("Unsqueeze", [g.one("Gather", [g.const("rope_cos", full(cos)), positions], axis=0), unsq])
        self.sin = g.one("Unsqueeze", [g.one("Gather", [g.const("rope_sin", full(sin)), positions], axis=0), unsq])
        # causal mask [S, T]: position past+i sees keys 0..past+i
        cols = g.one("Range", [g.const("zero", np.array(0, np.int64)), total, g.const("step1", np.array(1, np.int64))])
        rows = g.one("Unsqueeze", [positions, g.const("axes_1", np.array([1], np.int64))])
        self.mask = g.one("Where", [g.one("Greater", [cols, rows]), g.const("neg_inf", np.array(-1e30, np.float32)),
                                    g.const("zero_f", np.array(0.0, np.float32))])
        self.group = c.num_attention_heads // c.num_key_value_heads
        self._blocks: dict[str, tuple[QuantTensor, list[str]]] = {}
        shared = self.plan.unfused_bits is not None and self.tied   # the embedding is lm_head's blocks then
        self.embed = "" if shared else self.table("model.embed_tokens.weight", axis=0)
        h = self.embedding()
        self.residual = h
        return self.rmsnorm(h, "model.layers.0.input_layernorm.weight")

    def table(self, hf: str, axis: int) -> str | tuple[str, str]:
        """A weight as stored: float name, or (int8 name, scale name) for per-channel int8."""
        g, w, dt = self.g, self.w(hf), self.plan.portable_dtype
        if axis == 1:
            w = np.ascontiguousarray(w.T)
        if dt == "int8":
            q, scale = quantize_int8_channels(w, axis)
            return g.const(f"{hf}.int8", q), g.const(f"{hf}.scale", scale)
        if dt == "f16":
            return g.one("Cast", [g.const(f"{hf}.f16", w.astype(np.float16))], to=TensorProto.FLOAT)
        return g.const(hf, w)

    def dequant(self, t: str | tuple[str, str], axis: int) -> str:
        return t if isinstance(t, str) else self.g.one("DequantizeLinear", [t[0], t[1]], axis=axis)

    def embedding(self) -> str:
        g = self.g
        if self.plan.unfused_bits is not None and self.tied:  # as the fused graph: lm_head's blocks
            return gather_blocks(g, *self.blocks(self.head_weight()))
        if isinstance(self.embed, str):
            return g.one("Gather", [self.embed, "input_ids"], axis=0)
        q, scale = self.embed  # gather int8 rows and their scales, then scale: no full-table dequantize
        rows = g.one("Cast", [g.one("Gather", [q, "input_ids"], axis=0)], to=TensorProto.FLOAT)
        s = g.one("Unsqueeze", [g.one("Gather", [scale, "input_ids"], axis=0), g.const("axes_m1", np.array([-1]))])
        return g.one("Mul", [rows, s])

    def rmsnorm(self, x: str, weight_name: str) -> str:
        g = self.g
        mean = g.one("ReduceMean", [g.one("Pow", [x, g.const("two_f", np.array(2.0, np.float32))])], axes=[-1],
                     keepdims=1)
        rms = g.one("Sqrt", [g.one("Add", [mean, g.const("eps", np.array(self.eps, np.float32))])])
        return g.one("Mul", [g.one("Div", [x, rms]), g.const(weight_name, self.w(weight_name))])

    def linear(self, x: str, hf: str) -> str:
        if self.plan.unfused_bits is not None:
            y = self.nbits(x, f"{hf}.weight")
        else:
            y = self.g.one("MatMul", [x, self.dequant(self.table(f"{hf}.weight", axis=1), axis=1)])
        return self.bias(y, f"{hf}.bias")

    def blocks(self, hf: str) -> tuple[QuantTensor, list[str]]:
        """(blocks, initializer names) of a weight in the unfused twin; made once (a tied table is shared)."""
        if hf not in self._blocks:
            g, c = self.g, self.plan.unfused_bits
            qt = quantize_blocks(self.w(hf), c.bits, c.block)
            self._blocks[hf] = qt, [g.const(f"{hf}.q", qt.data), g.const(f"{hf}.scales", qt.scales),
                                    g.const(f"{hf}.zp", qt.zero_points)]
        return self._blocks[hf]

    def nbits(self, x: str, hf: str, outputs: list[str] | None = None) -> str:
        qt, names = self.blocks(hf)
        return self.g.op("MatMulNBits", [x, *names], domain=MS, outputs=outputs, K=qt.k, N=qt.n, bits=qt.bits,
                         block_size=qt.block, accuracy_level=self.plan.accuracy_level)[0]

    def heads(self, x: str, n: int) -> str:
        """[B,S,n*D] -> [B,n,S,D]"""
        g = self.g
        shaped = g.one("Reshape", [x, g.const(f"heads{n}", np.array([0, 0, n, self.c.head_dim], np.int64))])
        return g.one("Transpose", [shaped], perm=[0, 2, 1, 3])

    def rope(self, x: str) -> str:
        g, half = self.g, self.c.head_dim // 2
        x1 = g.one("Slice", [x, g.const("r0", np.array([0])), g.const("rh", np.array([half])),
                             g.const("r3", np.array([3]))])
        x2 = g.one("Slice", [x, g.const("rh2", np.array([half])), g.const("rmax", np.array([INT64_MAX])),
                             g.const("r3b", np.array([3]))])
        rot = g.one("Concat", [g.one("Neg", [x2]), x1], axis=-1)
        return g.one("Add", [g.one("Mul", [x, self.cos]), g.one("Mul", [rot, self.sin])])

    def repeat_kv(self, x: str) -> str:
        """[B,kv,T,D] -> [B,kv*group,T,D] (each KV head serves `group` query heads)."""
        if self.group == 1:
            return x
        g, c = self.g, self.c
        x5 = g.one("Unsqueeze", [x, g.const("axes2", np.array([2], np.int64))])
        shape = g.one("Shape", [x5])
        target = g.one("Concat", [g.one("Slice", [shape, g.const("s0", np.array([0])), g.const("s2", np.array([2]))]),
                                  g.const("grp", np.array([self.group], np.int64)),
                                  g.one("Slice", [shape, g.const("s3", np.array([3])), g.const("s5", np.array([5]))])],
                          axis=0)
        return g.one("Reshape", [g.one("Expand", [x5, target]),
                                 g.const("rep_shape", np.array([0, c.num_attention_heads, -1, c.head_dim], np.int64))])

    def layer(self, i: int, normed: str) -> str:
        g, c, p = self.g, self.c, f"model.layers.{i}"
        q = self.rope(self.heads(self.linear(normed, f"{p}.self_attn.q_proj"), c.num_attention_heads))
        k = self.rope(self.heads(self.linear(normed, f"{p}.self_attn.k_proj"), c.num_key_value_heads))
        v = self.heads(self.linear(normed, f"{p}.self_attn.v_proj"), c.num_key_value_heads)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)[0]
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2)[0]
        kt = g.one("Transpose", [self.repeat_kv(k_all)], perm=[0, 1, 3, 2])
        scores = g.one("Mul", [g.one("MatMul", [q, kt]),
                               g.const("scale", np.array(1 / np.sqrt(c.head_dim), np.float32))])
        probs = g.one("Softmax", [g.one("Add", [scores, self.mask])], axis=-1)
        ctx = g.one("Transpose", [g.one("MatMul", [probs, self.repeat_kv(v_all)])], perm=[0, 2, 1, 3])
        ctx = g.one("Reshape", [ctx, g.const("merge", np.array([0, 0, -1], np.int64))])
        self.residual = g.one("Add", [self.residual, self.linear(ctx, f"{p}.self_attn.o_proj")])
        x = self.rmsnorm(self.residual, f"{p}.post_attention_layernorm.weight")
        gate = self.linear(x, f"{p}.mlp.gate_proj")
        act = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate])]), self.linear(x, f"{p}.mlp.up_proj")])
        self.residual = g.one("Add", [self.residual, self.linear(act, f"{p}.mlp.down_proj")])
        last = i == c.num_hidden_layers - 1
        return self.rmsnorm(self.residual,
                            "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight")

    def finish(self, normed: str) -> None:
        g = self.g
        h = self.keep_last(normed)
        if self.plan.unfused_bits is not None:
            self.nbits(h, self.head_weight(), outputs=["logits"])
            return
        table = self.embed if self.tied else self.table("lm_head.weight", axis=0)
        _gemm_logits(g, h, self.dequant(table, axis=0), self.c)
