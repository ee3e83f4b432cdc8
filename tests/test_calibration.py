"""The reference forward pass agrees with llama.cpp, and its importance matrix makes quantization better."""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.converters.calibrate import compute_imatrix, dims_of, weight_getter
from edgellm.converters.evaluate import evaluate
from edgellm.converters.quantize import quantize
from edgellm.converters.reference import forward
from edgellm.texts import calibration_text, heldout_text


@pytest.fixture(scope="module")
def f32_reference(shipped_ckpt, f32_gguf):
    """The shipped model dequantized to an F32 GGUF: the reference for quality figures."""
    return shipped_ckpt[0], f32_gguf


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


def test_imatrix_is_the_mean_square_of_each_layer_input(f32_reference):
    """Chunked, threaded collection equals a direct mean over all positions (q/k/v share one input)."""
    ckpt, _ = f32_reference
    dims = dims_of(ckpt.config)
    tokens = list(range(1000, 1200))
    seen: dict[str, list[np.ndarray]] = {}
    get = weight_getter(ckpt)
    for s in range(0, 199, 64):                  # the chunks compute_imatrix makes with chunk=64
        forward(dims, get, tokens[s:s + 64], hook=lambda n, x: seen.setdefault(n, []).append(x.copy()),
                logits=False)
    direct = {n: np.mean(np.concatenate(xs) ** 2, axis=0) for n, xs in seen.items()}
    for threads in (1, 2):
        im = compute_imatrix(ckpt, tokens, chunk=64, threads=threads)
        assert set(im) == set(direct)
        for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.29.ffn_up.weight", "blk.3.ffn_down.weight",
                     "token_embd.weight"):
            np.testing.assert_allclose(im[name], direct[name], rtol=1e-4, err_msg=name)


def test_gram_matrices_are_the_mean_outer_product_of_each_distinct_input(f32_reference):
    """GPTQ's statistics: one Gram per distinct input (q/k/v share attn_q's), equal to a direct mean."""
    from edgellm.converters.calibrate import input_statistics

    ckpt, _ = f32_reference
    tokens = list(range(2000, 2150))
    seen: dict[str, list[np.ndarray]] = {}
    for s in range(0, 149, 64):
        forward(dims_of(ckpt.config), weight_getter(ckpt), tokens[s:s + 64],
                hook=lambda n, x: seen.setdefault(n, []).append(x.copy()), logits=False)
    im, grams = input_statistics(ckpt, tokens, chunk=64, threads=2, gram=True)
    assert "blk.4.attn_q.weight" in grams and "blk.4.attn_k.weight" not in grams and "blk.4.ffn_up.weight" not in grams
    assert len(grams) == 4 * ckpt.config.num_hidden_layers + 1
    for name in ("blk.4.attn_q.weight", "blk.4.attn_output.weight", "blk.11.ffn_gate.weight", "blk.29.ffn_down.weight",
                 "token_embd.weight"):
        x = np.concatenate(seen[name])
        np.testing.assert_allclose(grams[name], x.T @ x / len(x), rtol=2e-3, atol=1e-5 * np.abs(x).max() ** 2,
                                   err_msg=name)
        np.testing.assert_allclose(np.diag(grams[name]), im[name], rtol=2e-3, err_msg=name)


def test_imatrix_collector_counts_a_shared_input_once_per_layer():
    from edgellm.converters.reference import ImatrixCollector
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((8, 4), dtype=np.float32) for _ in range(3)]
    c = ImatrixCollector()
    for x in chunks:
        for name in ("q", "k", "v"):       # q/k/v read the same rows (one array)
            c(name, x)
    expected = np.mean(np.concatenate(chunks) ** 2, axis=0)
    for name, got in c.means().items():
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=name)
