"""The reference forward pass agrees with llama.cpp, and its importance matrix makes quantization better."""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.converters.calibrate import compute_imatrix, dims_of, weight_getter
from edgellm.converters.evaluate import evaluate
from edgellm.converters.gguf_source import read_gguf
from edgellm.converters.gguf_writer import write_gguf
from edgellm.converters.quantize import quantize
from edgellm.converters.reference import forward
from edgellm.texts import calibration_text, heldout_text


@pytest.fixture(scope="module")
def f32_reference(default_model_path, tmp_path_factory):
    """The shipped model dequantized to an F32 GGUF: the reference for quality figures."""
    ckpt = read_gguf(default_model_path)
    path = tmp_path_factory.mktemp("ref") / "f32.gguf"
    write_gguf(ckpt, path, "F32")
    return ckpt, path


def test_reference_forward_matches_llama_cpp(f32_reference):
    ckpt, path = f32_reference
    with edgellm.load(path, n_ctx=256, disk_cache=False) as s:
        tokens = s.tokenize("The committee met on Tuesday to discuss the new library's opening hours.")
        expected = s.backend.eval_all_logits(tokens)
    ours = forward(dims_of(ckpt.config), weight_getter(ckpt), tokens)
    cos = (ours * expected).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() >= 0.9999
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_imatrix_changes_the_output_and_lowers_kld(f32_reference, tmp_path):
    ckpt, ref = f32_reference
    with edgellm.load(ref, n_ctx=256, disk_cache=False) as s:
        tokens = s.tokenize(calibration_text())[:1024]
    im = compute_imatrix(ckpt, tokens)
    assert set(im) >= {"blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"}
    assert im["blk.0.ffn_down.weight"].shape == (1536,) and (im["blk.0.ffn_down.weight"] > 0).all()
    plain = quantize(ref, tmp_path / "plain.gguf", "Q4_0")
    guided = quantize(ref, tmp_path / "imatrix.gguf", "Q4_0", imatrix=im)
    assert plain.path.read_bytes() != guided.path.read_bytes()
    text = heldout_text()
    kld_plain = evaluate(plain.path, ref, text, ctx=256, max_chunks=4).mean_kld
    kld_guided = evaluate(guided.path, ref, text, ctx=256, max_chunks=4).mean_kld
    assert kld_guided < 0.85 * kld_plain
