"""What an ONNX directory holds: op histogram, node counts fused vs unfused, weight bytes by kind.

The unfused count is measured, not estimated: the same architecture (layers, heads, tying, biases) is
emitted as the portable standard-op graph at toy width — node counts do not depend on widths — and its
nodes counted; likewise the fused count for a portable directory.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edgellm.errors import InvalidModelError

from .checkpoint import ModelConfig, hf_tensor_shapes
from .onnx_graph import WeightPlan, build_graph

_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}  # onnx TensorProto data types


def _toy_config(facts: dict, graph_heads: int) -> ModelConfig:
    kv = int(facts["num_key_value_heads"])
    return ModelConfig(architecture=facts.get("architecture") or "llama", hidden_size=2 * graph_heads,
                       intermediate_size=4, num_hidden_layers=int(facts["num_hidden_layers"]),
                       num_attention_heads=graph_heads, num_key_value_heads=kv, head_dim=2, vocab_size=8,
                       max_position_embeddings=4, tie_word_embeddings=bool(facts.get("tied", True)),
                       attention_bias=bool(facts.get("attention_bias", False)))


def equivalent_nodes(facts: dict, flavour: str, heads: int) -> int:
    """Nodes of the `flavour` graph (float32 weights) for this architecture."""
    config = _toy_config(facts, heads)
    shapes = hf_tensor_shapes(config)
    rng = np.random.default_rng(0)
    cache = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    model = build_graph(config, lambda name: cache.get(name), flavour, WeightPlan())
    return len(model.graph.node)


def _heads(model) -> int | None:
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            return next(a.i for a in node.attribute if a.name == "num_heads")
    for init in model.graph.initializer:   # portable graphs: the reshape to [0, 0, heads, head_dim]
        if init.name.startswith("heads") and len(init.dims) == 1 and init.dims[0] == 4:
            from onnx import numpy_helper
            return int(numpy_helper.to_array(init)[2])
    return None


def _tensor_bytes(t) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims)) * _BYTES.get(t.data_type, 4)


def inspect_onnx(model_dir: str | Path) -> dict:
    """A JSON-ready description of an ONNX model directory."""
    import onnx

    from edgellm.runtimes.onnx_backend import read_facts

    model_dir = Path(model_dir)
    path = model_dir / "model.onnx"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf / onnx raise assorted types for a damaged file
        raise InvalidModelError(f"{path}: not a readable ONNX graph "
                                f"({str(e).splitlines()[0] if str(e) else e})") from None
    facts = read_facts(model_dir)
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {t.name: t for t in model.graph.initializer}
    by_kind: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: a.i for a in node.attribute}
            kind = f"int{attrs.get('bits', 4)} blocks of {attrs.get('block_size')}"
            for name in node.input[1:4] if node.op_type == "MatMulNBits" else node.input[2:4]:
                if name in inits:
                    by_kind[kind] += _tensor_bytes(inits.pop(name))
    for t in inits.values():
        by_kind[onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name] += _tensor_bytes(t)
    flavour = "fused" if any(o.domain == "com.microsoft" for o in model.opset_import) else "portable"
    heads = _heads(model)
    counts = {flavour: len(model.graph.node)}
    other = "portable" if flavour == "fused" else "fused"
    if heads and "num_hidden_layers" in facts:
        facts.setdefault("tied", True)
        counts[other] = equivalent_nodes(facts, other, heads)
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    return {
        "path": str(model_dir), "format": facts.get("format"), "flavour": flavour, "quant": facts.get("quant"),
        "nodes": len(model.graph.node), "ops": dict(ops.most_common()),
        "contrib_ops": sum(c for op, c in ops.items() if op in _CONTRIB),
        "node_counts": {"fused": counts.get("fused"), "unfused": counts.get("portable"),
                        "ratio": round(counts["portable"] / counts["fused"], 2)
                        if counts.get("fused") and counts.get("portable") else None},
        "weight_bytes": sum(by_kind.values()), "weight_bytes_by_kind": dict(by_kind.most_common()),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "files": files,
        "n_params": facts.get("n_params"), "layers": facts.get("num_hidden_layers"),
    }


_CONTRIB = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
            "MatMulNBits", "GatherBlockQuantized", "QuickGelu", "RotaryEmbedding", "MultiHeadAttention",
            "SkipLayerNormalization"}
