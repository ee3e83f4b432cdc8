"""The decoder as a stateful Core ML program, emitted op by op with coremltools' MIL builder (no torch, no tracing).

Why the builder and not a traced torch module: every weight is placed as edgellm chose it (GPTQ int4 blocks go
into `constexpr_blockwise_shift_scale` as they are, where coremltools' own compressor would re-round them to
nearest), the RoPE tables are never compressed, and the graph is exactly what the MIL interpreter
(edgellm.runtimes.mil_interp) and the tests read back — with no torch or tracing in the way.

The I/O contract is Hugging Face swift-transformers' stateful one (its Mistral-7B export): inputs `inputIds`
int32 (1, q) and `causalMask` fp16 (1, 1, q, end) — an additive mask; end = past + q, so the number of cached
positions is end − q — states `keyCache`/`valueCache` fp16 (layers, 1, kv_heads, ctx, head_dim), output
`logits` fp16 (1, q, vocab). A mask whose query axis is 1 broadcasts over the queries.

Per layer: RMSNorm in fp32 (SmolLM2's residual stream reaches |x| ≈ 2.2·10⁴, so x² overflows fp16), one
fused QKV linear, rotate-half RoPE from fp16 tables sliced at [past, end), K/V written into the state with
one read_state per cache, then per layer slice_update → coreml_update_state, each layer updating the value
the previous one wrote (the pattern coremltools' torch frontend emits for in-place buffer updates), one
scaled_dot_product_attention with the grouped query heads folded onto the sequence axis (no K/V `tile`), one
fused gate/up linear, SiLU. Everything else computes in fp16.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .checkpoint import ModelConfig
from .onnx_graph import fused_units, unit_weight
from .onnx_quant import QuantTensor, unpack

INPUT_IDS, CAUSAL_MASK, KEY_CACHE, VALUE_CACHE, LOGITS = "inputIds", "causalMask", "keyCache", "valueCache", "logits"
Weights = Callable[[str], np.ndarray]


def cache_shape(config: ModelConfig, ctx: int) -> tuple[int, int, int, int, int]:
    """The shape of each KV state: (layers, batch 1, kv_heads, ctx, head_dim), swift-transformers' layout."""
    return (config.num_hidden_layers, 1, config.num_key_value_heads, ctx, config.head_dim)


def rope_tables(config: ModelConfig, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 cos and signed sin [ctx, head_dim] for rotate-half RoPE: x·cos + swap_halves(x)·sin_signed, where
    sin_signed = [−sin, sin] folds rotate_half's negation into the table (one op fewer per rotation)."""
    d = config.head_dim
    inv = config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(np.arange(ctx), inv)
    cos, sin = np.cos(ang), np.sin(ang)
    return (np.concatenate([cos, cos], -1).astype(np.float16),
            np.concatenate([-sin, sin], -1).astype(np.float16))


def quant_arrays(qt: QuantTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, scale, offset) of constexpr_blockwise_shift_scale for edgellm's asymmetric blocks:
    integers [N, K], fp16 scales and integer zero points [N, K/block]; w = scale · (data − offset)."""
    nb = qt.scales.shape[1]
    data = unpack(qt.data, qt.bits).reshape(qt.n, -1)[:, :qt.k]
    offset = unpack(qt.zero_points, qt.bits)[:, :nb]
    return data, qt.scales.astype(np.float16), offset


def build_program(config: ModelConfig, weight: Weights, ctx: int, quantized: dict[str, QuantTensor],
                  progress: Callable[[int, int], None] | None = None):
    """The pymil Program of the decoder (function 'main'); `quantized` holds the blocks of each fused unit
    (onnx_graph.fused_units tags) to store compressed, every other matrix is fp16."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    q_len, mask_q, end = get_new_symbol(), get_new_symbol(), get_new_symbol()
    state = cache_shape(config, ctx)
    specs = [mb.TensorSpec((1, q_len), dtype=types.int32), mb.TensorSpec((1, 1, mask_q, end), dtype=types.fp16),
             mb.StateTensorSpec(state, dtype=types.fp16), mb.StateTensorSpec(state, dtype=types.fp16)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def main(inputIds, causalMask, keyCache, valueCache):
        return _Decoder(mb, types, config, weight, ctx, quantized, progress).run(inputIds, causalMask,
                                                                                 keyCache, valueCache)

    return main


class _Decoder:
    """Emits the ops inside the builder's program context (a class only to keep the shared vars together)."""

    def __init__(self, mb, types, config: ModelConfig, weight: Weights, ctx: int, quantized: dict[str, QuantTensor],
                 progress) -> None:
        self.mb, self.types, self.c, self.w, self.ctx = mb, types, config, weight, ctx
        self.quantized, self.progress = quantized, progress
        self.units = fused_units(config)
        self._vars: dict[str, object] = {}
        self.group = config.num_attention_heads // config.num_key_value_heads

    # -- weights ---------------------------------------------------------------------------------
    def matrix(self, tag: str):
        """The unit's weight [N, K] as one var (a tied table is made once and shared by gather and lm_head)."""
        if tag in self._vars:
            return self._vars[tag]
        mb, types = self.mb, self.types
        qt = self.quantized.get(tag)
        if qt is None:
            var = mb.const(val=unit_weight(self.w, self.units[tag]).astype(np.float16), name=f"{tag}.weight")
        else:
            data, scale, offset = quant_arrays(qt)
            np_int = types.np_uint4_dtype if qt.bits == 4 else np.uint8
            var = mb.constexpr_blockwise_shift_scale(data=data.astype(np_int), scale=scale,
                                                     offset=offset.astype(np_int), name=f"{tag}.weight")
        self._vars[tag] = var
        return var

    def bias(self, names: list[str]):
        parts = []
        for n in names:
            try:
                b = self.w(n)
            except KeyError:
                b = None
            if b is None:
                return None
            parts.append(b)
        return np.concatenate(parts).astype(np.float16)

    def linear(self, x, tag: str, name: str):
        b = self.bias([n.replace(".weight", ".bias") for n in self.units[tag]])
        kw = {} if b is None else {"bias": b}
        return self.mb.linear(x=x, weight=self.matrix(tag), name=name, **kw)

    # -- blocks ----------------------------------------------------------------------------------
    def rmsnorm(self, x, weight_name: str, name: str):
        """RMSNorm computed in fp32 and returned in fp16 (mean(x²) overflows fp16 once |x| > 256)."""
        mb = self.mb
        x32 = mb.cast(x=x, dtype="fp32", name=f"{name}.fp32")
        ms = mb.reduce_mean(x=mb.mul(x=x32, y=x32), axes=[-1], keep_dims=True)
        inv = mb.rsqrt(x=ms, epsilon=np.float32(self.c.rms_norm_eps))
        y = mb.mul(x=mb.mul(x=x32, y=inv), y=self.w(weight_name).astype(np.float32))
        return mb.cast(x=y, dtype="fp16", name=name)

    def heads(self, x, n: int):
        """(1, q, n·d) -> (1, n, q, d)."""
        mb = self.mb
        return mb.transpose(x=mb.reshape(x=x, shape=[1, -1, n, self.c.head_dim]), perm=[0, 2, 1, 3])

    def rope(self, x, cos, sin):
        mb = self.mb
        lo, hi = mb.split(x=x, num_splits=2, axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=mb.concat(values=[hi, lo], axis=-1), y=sin))

    def run(self, ids, mask, key_cache, value_cache):
        mb, c = self.mb, self.c
        kv, d = c.num_key_value_heads, c.head_dim
        q_len = mb.slice_by_index(x=mb.shape(x=ids), begin=[1], end=[2], name="q_len")
        end = mb.slice_by_index(x=mb.shape(x=mask), begin=[3], end=[4], name="end")
        past = mb.sub(x=end, y=q_len, name="past")
        # RoPE rows of positions [past, end)
        cos_t, sin_t = rope_tables(c, self.ctx)
        rows_b = mb.concat(values=[past, np.array([0], np.int32)], axis=0)
        rows_e = mb.concat(values=[end, np.array([d], np.int32)], axis=0)
        cos = mb.slice_by_index(x=cos_t, begin=rows_b, end=rows_e, name="rope_cos")
        sin = mb.slice_by_index(x=sin_t, begin=rows_b, end=rows_e, name="rope_sin")
        # the mask as (1, 1, q, end) — a (1, 1, 1, end) mask broadcasts — then repeated for the folded groups
        full = mb.fill(shape=mb.concat(values=[np.array([1, 1], np.int32), q_len, end], axis=0),
                       value=np.float16(0.0))
        mask = mb.add(x=mask, y=full, name="mask_full")
        if self.group > 1:
            mask = mb.tile(x=mask, reps=[1, 1, self.group, 1], name="mask_folded")
        self.cache = {"k": mb.read_state(input=key_cache, name="k_read"),
                      "v": mb.read_state(input=value_cache, name="v_read")}
        table = self.matrix("model.embed_tokens" if "model.embed_tokens" in self.units else "lm_head")
        h = mb.gather(x=table, indices=ids, axis=0, name="embed")
        normed = self.rmsnorm(h, "model.layers.0.input_layernorm.weight", "layers.0.attn_norm")
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            begin = mb.concat(values=[np.array([i, 0, 0], np.int32), past, np.array([0], np.int32)], axis=0,
                              name=f"layers.{i}.kv_begin")
            stop = mb.concat(values=[np.array([i + 1, 1, kv], np.int32), end, np.array([d], np.int32)], axis=0,
                             name=f"layers.{i}.kv_end")
            attn = self.attention(i, normed, cos, sin, mask, begin, stop, key_cache, value_cache)
            h = mb.add(x=h, y=self.linear(attn, f"{p}.self_attn.o_proj", f"layers.{i}.o_proj"), name=f"layers.{i}.res1")
            x = self.rmsnorm(h, f"{p}.post_attention_layernorm.weight", f"layers.{i}.ffn_norm")
            gate, up = mb.split(x=self.linear(x, f"{p}.mlp.gate_up_proj", f"layers.{i}.gate_up"), num_splits=2, axis=-1)
            act = mb.mul(x=mb.silu(x=gate), y=up)
            h = mb.add(x=h, y=self.linear(act, f"{p}.mlp.down_proj", f"layers.{i}.down"), name=f"layers.{i}.res2")
            last = i == c.num_hidden_layers - 1
            normed = self.rmsnorm(h, "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight",
                                  "final_norm" if last else f"layers.{i + 1}.attn_norm")
            if self.progress:
                self.progress(i + 1, c.num_hidden_layers)
        return self.linear(normed, "lm_head", LOGITS)

    def attention(self, i: int, x, cos, sin, mask, begin, stop, key_cache, value_cache):
        mb, c = self.mb, self.c
        h_q, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = self.linear(x, f"model.layers.{i}.self_attn.qkv_proj", f"layers.{i}.qkv")
        q, k, v = mb.split(x=qkv, split_sizes=[h_q * d, kv * d, kv * d], axis=-1)
        q = self.rope(self.heads(q, h_q), cos, sin)
        k = self.rope(self.heads(k, kv), cos, sin)
        v = self.heads(v, kv)
        cached = []
        for which, state, new in (("k", key_cache, k), ("v", value_cache, v)):
            upd = mb.slice_update(x=self.cache[which], update=mb.expand_dims(x=new, axes=[0]), begin=begin, end=stop,
                                  name=f"layers.{i}.{which}_write")
            # each layer updates the value the previous layer wrote: a read_state per layer would be merged into
            # one by coremltools' common-subexpression pass, and every layer would then update a stale copy
            self.cache[which] = mb.coreml_update_state(state=state, value=upd, name=f"layers.{i}.{which}_state")
            cached.append(mb.slice_by_index(x=self.cache[which], begin=[i, 0, 0, 0, 0], end=stop,
                                            squeeze_mask=[True, False, False, False, False],
                                            name=f"layers.{i}.{which}_all"))
        # fold the `group` query heads of each KV head onto the sequence axis: (1, kv, group·q, d)
        qf = mb.reshape(x=q, shape=[1, kv, -1, d]) if self.group > 1 else q
        att = mb.scaled_dot_product_attention(query=qf, key=cached[0], value=cached[1], attn_mask=mask,
                                              name=f"layers.{i}.attn")
        att = mb.transpose(x=mb.reshape(x=att, shape=[1, h_q, -1, d]), perm=[0, 2, 1, 3])
        return mb.reshape(x=att, shape=[1, -1, h_q * d])
