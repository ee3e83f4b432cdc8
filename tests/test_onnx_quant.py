"""MatMulNBits block packing against onnxruntime itself, the calibrated search, the bit allocator, the sampler."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgellm.converters.onnx_quant import BitChoice, allocate_bits, bytes_of, quantize_blocks
from edgellm.runtimes.base import SamplerConfig
from edgellm.runtimes.sampling import NumpySampler


def _run_nbits(qt, a):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(qt.data, "B"), numpy_helper.from_array(qt.scales, "S"),
             numpy_helper.from_array(qt.zero_points, "Z"), numpy_helper.from_array(np.array([qt.n, -1]), "shape")]
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=qt.k, N=qt.n,
                              bits=qt.bits, block_size=qt.block, accuracy_level=0),
             helper.make_node("Reshape", ["B", "shape"], ["R"]),
             helper.make_node("GatherBlockQuantized", ["R", "ids", "S", "Z"], ["E"], domain="com.microsoft",
                              bits=qt.bits, block_size=qt.block, gather_axis=0, quantize_axis=1)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("A", 1, None),
                                           helper.make_tensor_value_info("ids", 7, None)],
                              [helper.make_tensor_value_info("Y", 1, None),
                               helper.make_tensor_value_info("E", 1, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, qt.n - 1, 3]], np.int64)
    y, e = sess.run(None, {"A": a, "ids": ids})
    return y, e, ids


@pytest.mark.parametrize("bits,block,k", [(4, 32, 576), (4, 64, 576), (8, 64, 1536), (4, 64, 100)])
def test_blocks_are_what_onnxruntime_computes_with(bits, block, k):
    rng = np.random.default_rng(bits + block + k)
    w = rng.normal(size=(24, k)).astype(np.float32)
    qt = quantize_blocks(w, bits, block, rng.random(k).astype(np.float32))
    a = rng.normal(size=(1, 3, k)).astype(np.float32)
    y, e, ids = _run_nbits(qt, a)
    deq = qt.dequantize()
    assert np.abs(y - a @ deq.T).max() < 1e-3
    if k % block == 0:  # GatherBlockQuantized wants whole blocks (the exporter's tables always are)
        assert np.array_equal(e, deq[ids])
    rel_rms = np.sqrt(((deq - w) ** 2).mean() / (w ** 2).mean())
    assert rel_rms < (0.2 if bits == 4 else 0.015)
    assert qt.nbytes == bytes_of(24, k, BitChoice(bits, block))


def test_importance_weighting_lowers_the_error_where_it_counts():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(256, 256)).astype(np.float32)
    imp = np.exp(rng.normal(size=256) * 2).astype(np.float32)   # a few columns matter far more
    plain, weighted = quantize_blocks(w, 4, 64), quantize_blocks(w, 4, 64, imp)

    def err(qt):
        return float((imp * (qt.dequantize() - w) ** 2).sum())

    assert err(weighted) < 0.9 * err(plain)


def test_allocator_spends_the_budget_on_the_largest_gain_per_byte():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    small, mid, high = BitChoice(4, 64), BitChoice(4, 32), BitChoice(8, 64)
    errors = {"a": {small: 2.0, mid: 1.9, high: 1.0}, "b": {small: 6.0, mid: 5.0, high: 1.0},
              "c": {small: 7.0, mid: 6.9, high: 1.0}}
    base = sum(bytes_of(n, k, small) for n, k in shapes.values())
    budget = base + bytes_of(64, 64, high) - bytes_of(64, 64, small)
    choice = allocate_bits(shapes, errors, budget)
    assert choice == {"a": small, "b": high, "c": small}  # c gains more but per byte less, and does not fit
    assert allocate_bits(shapes, errors, base) == {t: small for t in shapes}
    roomy = allocate_bits(shapes, errors, 10 * base)
    assert roomy == {t: high for t in shapes}


def test_sampler_follows_its_settings():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], np.float32)
    assert NumpySampler(SamplerConfig(temperature=0)).sample(logits) == 1
    assert all(NumpySampler(SamplerConfig(top_k=1, seed=s)).sample(logits) == 1 for s in range(5))
    draws = [NumpySampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)).sample(logits)
             for _ in range(2)]
    assert draws[0] == draws[1]  # a seed makes it reproducible
    s = NumpySampler(SamplerConfig(temperature=1.0, top_k=2, min_p=0.0, seed=1))
    assert {s.sample(logits) for _ in range(50)} == {1, 2}
    pen = NumpySampler(SamplerConfig(temperature=0, repeat_penalty=2.0), history=[1])
    assert pen.sample(logits) == 2  # token 1 penalised below token 2


def _full_chain(config: SamplerConfig, x: np.ndarray, rng: np.random.Generator) -> int:
    """The sampler chain over the whole sorted vocabulary: the oracle for the pre-filtered one."""
    ids = np.argsort(-x, kind="stable")[:config.top_k or None]
    z = x[ids].astype(np.float64)
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), config.top_p) + 1) if config.top_p < 1.0 else len(ids)
    keep = min(keep, max(1, int((p >= config.min_p * p[0]).sum())))
    z = z[:keep] / config.temperature
    q = np.exp(z - z.max())
    return int(ids[rng.choice(keep, p=q / q.sum())])


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.05), (0, 0.95, 0.05), (0, 0.9, 0.0), (0, 1.0, 0.0),
                                               (300, 0.5, 0.0), (5000, 1.0, 0.1)])
def test_sampler_draws_what_the_full_vocabulary_chain_draws(top_k, top_p, min_p):
    """Sorting only the logits that can survive top-k/top-p/min-p changes no draw."""
    config = SamplerConfig(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p, seed=5)
    gen, sampler, rng = np.random.default_rng(0), NumpySampler(config), np.random.default_rng(5)
    for scale in (0.5, 2.0, 6.0):
        for _ in range(10):
            x = (gen.standard_normal(49152) * scale).astype(np.float32)
            assert sampler.sample(x) == _full_chain(config, x, rng)


@pytest.mark.parametrize("arch,tied,bias", [("llama", True, False), ("qwen2", False, True), ("llama", False, True)])
def test_graphs_match_the_reference_forward_on_toy_models(arch, tied, bias):
    """Both flavours at float32 against converters.reference on random Llama/Qwen2-shaped weights
    (untied heads, q/k/v and o biases), prompt then incremental decode through past/present."""
    import onnxruntime as ort

    from edgellm.converters.calibrate import dims_of
    from edgellm.converters.checkpoint import ModelConfig, hf_tensor_shapes
    from edgellm.converters.onnx_graph import WeightPlan, build_graph
    from edgellm.converters.reference import forward

    c = ModelConfig(architecture=arch, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=16, vocab_size=80,
                    max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias)
    rng = np.random.default_rng(1)
    w = {n: (rng.normal(size=s) * (1.0 if "norm" in n else 0.2)).astype(np.float32)
         for n, s in hf_tensor_shapes(c).items()}
    tokens = [3, 17, 42, 8, 77, 5, 61]
    want = forward(dims_of(c), w.get, tokens)
    for flavour in ("fused", "portable"):
        model = build_graph(c, w.get, flavour, WeightPlan())
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        past = {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32)
                for i in range(2) for k in ("key", "value")}
        rows = []
        for ids in (tokens[:4], tokens[4:5], tokens[5:]):
            n = sum(len(r) for r in rows) + len(ids)
            outs = sess.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64),
                                   "num_logits_to_keep": np.array([len(ids)]), **past})
            names = [o.name for o in sess.get_outputs()]
            got = dict(zip(names, outs))
            rows.append(got["logits"][0])
            past = {k: got[k.replace("past_key_values", "present")] for k in past}
        assert np.abs(np.concatenate(rows) - want).max() < 1e-4, flavour
