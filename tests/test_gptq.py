"""GPTQ blocks: what onnxruntime computes with, and a lower output error than rounding each block alone."""
from __future__ import annotations

import numpy as np
import pytest
from test_onnx_quant import _run_nbits

from edgellm.converters.gptq import gptq_blocks, output_error
from edgellm.converters.onnx_quant import quantize_blocks


def _inputs(k: int, t: int = 2048, seed: int = 0) -> np.ndarray:
    """Correlated inputs with a few large channels, as a transformer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) * 0.1 + np.eye(k, dtype=np.float32)
    return rng.standard_normal((t, k)).astype(np.float32) @ mix * (1 + 20 * (rng.random(k) < 0.02))


@pytest.mark.parametrize("bits,block,k", [(4, 64, 576), (4, 32, 256), (8, 64, 384), (4, 64, 100)])
def test_gptq_beats_importance_weighted_rounding_on_the_output(bits, block, k):
    x = _inputs(k)
    gram = x.T @ x / len(x)
    w = np.random.default_rng(1).standard_normal((96, k)).astype(np.float32) * 0.05
    rtn = quantize_blocks(w, bits, block, np.diag(gram))
    qt = gptq_blocks(w, gram, bits, block)
    direct = float(((x @ (qt.dequantize() - w).T) ** 2).sum() / len(x))
    assert qt.weighted_error == pytest.approx(direct, rel=1e-3)   # the error it reports is the real one
    assert qt.weighted_error < 0.75 * output_error(w, rtn, gram)


def test_gptq_blocks_are_what_onnxruntime_computes_with():
    k = 576
    x = _inputs(k, seed=3)
    w = np.random.default_rng(4).standard_normal((40, k)).astype(np.float32)
    qt = gptq_blocks(w, x.T @ x / len(x), 4, 64)
    a = np.random.default_rng(5).normal(size=(1, 2, k)).astype(np.float32)
    y, _, _ = _run_nbits(qt, a)
    np.testing.assert_allclose(y, a @ qt.dequantize().T, rtol=1e-4, atol=1e-4)


def test_an_input_that_never_fires_leaves_no_nan():
    k = 128
    x = _inputs(k, t=512)
    x[:, 7] = 0.0                       # a dead channel: H is singular without damping and masking
    w = np.random.default_rng(2).standard_normal((32, k)).astype(np.float32)
    qt = gptq_blocks(w, x.T @ x / len(x), 4, 32)
    assert np.isfinite(qt.dequantize()).all() and np.isfinite(qt.weighted_error)


def test_int4_recipes_export_and_run_on_a_tiny_model(tmp_path):
    """'int4' is 4-bit/64 everywhere; 'int4-mixed' spends the builder's 5.0 bits on several layouts."""
    from test_checkpoint import bpe_tokenizer, make_hf
    from test_mixed import SMALL, TEXT

    import edgellm
    from edgellm.converters.hf_source import read_hf
    from edgellm.converters.onnx_export import export_onnx
    from edgellm.converters.onnx_inspect import inspect_onnx

    make_hf(tmp_path / "hf", "llama", bpe_tokenizer("smollm"), **SMALL)
    ckpt = read_hf(tmp_path / "hf")
    matrices = sum(int(np.prod(s)) for n, s in ckpt.tensors.shapes.items() if not n.endswith("norm.weight"))
    layouts = {}
    for quant in ("int4", "int4-mixed"):
        res = export_onnx(ckpt, tmp_path / quant, quant=quant, calib_text=TEXT, calib_tokens=512)
        assert res.rounding == "gptq"
        info = inspect_onnx(tmp_path / quant)
        layouts[quant] = {k for k in info["weight_bytes_by_kind"] if "blocks" in k}
        blocks = sum(v for k, v in info["weight_bytes_by_kind"].items() if "blocks" in k)
        assert blocks <= matrices * (4.6 if quant == "int4" else 5.0) / 8
        with edgellm.load(res.output, n_ctx=128, disk_cache=False) as s:
            assert np.isfinite(s.backend.eval_all_logits(s.tokenize("the quick brown fox"))).all()
    assert layouts["int4"] == {"int4 blocks of 64"}
    assert len(layouts["int4-mixed"]) >= 2


def test_a_hidden_size_that_is_not_a_whole_number_of_blocks_still_loads(tmp_path):
    """Hidden 160 in blocks of 64: the tied embedding's gathered rows are padded and must be cut back."""
    from test_checkpoint import bpe_tokenizer, make_hf
    from test_mixed import SMALL, TEXT

    import edgellm
    from edgellm.converters.hf_source import read_hf
    from edgellm.converters.onnx_export import export_onnx

    dims = {**SMALL, "hidden_size": 160, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 32,
            "intermediate_size": 320}
    make_hf(tmp_path / "hf", "llama", bpe_tokenizer("smollm"), **dims)
    res = export_onnx(read_hf(tmp_path / "hf"), tmp_path / "int4", quant="int4", calib_text=TEXT, calib_tokens=256)
    with edgellm.load(res.output, n_ctx=128, disk_cache=False) as s:
        tokens = s.tokenize("the quick brown fox")
        logits = s.backend.eval_all_logits(tokens)
    assert logits.shape[0] == len(tokens) and np.isfinite(logits).all()
