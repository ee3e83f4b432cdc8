"""GPTQ-rounded GGUF blocks: bit-exact in llama.cpp's own dequantizer, better than llama.cpp's rounding on the
layer output, patched into real files by `convert --gptq`, and offered to `--target-size` within its budget."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_mixed import SMALL, TEXT, tiny_hf  # noqa: F401 - module fixture

import edgellm
from edgellm.converters.gguf_blocks import GPTQ_TYPES, gptq_tensor, llama_dequantize, llama_quantize
from edgellm.converters.gptq import values_error
from edgellm.errors import ConversionError, UsageError


def _layer(k: int, n: int = 64, t: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Gram matrix of correlated inputs with a few large channels, as a transformer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) * 0.1 + np.eye(k, dtype=np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32) @ mix * (1 + 20 * (rng.random(k) < 0.02))
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[5, 32:64] = 0.0                               # an all-zero block: scale 0 must still pack and read back
    return w, x.T @ x / len(x)


@pytest.mark.parametrize("qtype", GPTQ_TYPES)
def test_gptq_blocks_dequantize_in_llama_cpp_exactly_and_beat_its_rounding(qtype):
    w, gram = _layer(512)
    b = gptq_tensor(w, gram, qtype)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert b.raw.shape == (64, 512 // block * size) and b.raw.dtype == np.uint8
    ours = llama_dequantize(qtype, b.raw, 512)
    assert np.array_equal(ours, b.values)           # llama.cpp computes with exactly what GPTQ rounded to
    assert np.array_equal(gguf.quants.dequantize(b.raw, gguf.GGMLQuantizationType[qtype]), b.values)
    assert b.error == pytest.approx(values_error(w, ours, gram), rel=1e-5)
    theirs = llama_quantize(qtype, w, np.diag(gram))  # llama.cpp's importance-weighted rounding of the same layer
    assert b.error < 0.7 * values_error(w, llama_dequantize(qtype, theirs, 512), gram)


def test_rows_that_are_not_whole_blocks_and_dead_inputs():
    w, gram = _layer(96)
    with pytest.raises(ConversionError, match="not a whole number of Q4_K blocks"):
        gptq_tensor(w, gram, "Q4_K")
    gram[7, :] = gram[:, 7] = 0.0                  # an input that never fires
    b = gptq_tensor(w, gram, "Q4_0")
    assert np.isfinite(b.values).all() and np.isfinite(b.error)
    with pytest.raises(ConversionError, match="cannot write IQ2_XS"):
        gptq_tensor(w, gram, "IQ2_XS")


@pytest.mark.slow
def test_convert_gptq_patches_blocks_llama_cpp_reads_and_lowers_kld(tiny_hf, tmp_path):  # noqa: F811
    from edgellm.converters.gguf_gptq import file_tensors
    from edgellm.converters.pipeline import convert

    ref = convert(tiny_hf, tmp_path / "f32.gguf", quant="F32")
    plain = convert(tiny_hf, tmp_path / "plain.gguf", quant="Q4_0", calib_text=TEXT, calib_tokens=512,
                    eval_text=TEXT[::-1])
    res = convert(tiny_hf, tmp_path / "gptq.gguf", quant="Q4_0", calib_text=TEXT, calib_tokens=512, gptq=True,
                  eval_text=TEXT[::-1])
    assert res.gptq["tensors_gptq"] >= 10 and res.gptq["error_ratio"] < 0.8 and "gptq" in res.stages
    assert res.bytes == plain.bytes                 # same types, same sizes: only the blocks' contents differ
    a, b = file_tensors(tmp_path / "plain.gguf"), file_tensors(tmp_path / "gptq.gguf")
    assert {n: t.type for n, t in a.items()} == {n: t.type for n, t in b.items()}
    assert res.evaluation["mean_kld"] < plain.evaluation["mean_kld"]
    with edgellm.load(res.output, n_ctx=128, disk_cache=False, sampler=edgellm.GREEDY) as s:
        assert len(s.generate("The quick", max_tokens=4).tokens) > 0
    assert ref.bytes > res.bytes
    with pytest.raises(UsageError, match="--gptq"):
        convert(tiny_hf, tmp_path / "x.gguf", quant="F16", gptq=True)
    with pytest.raises(UsageError, match="--gptq"):
        convert(tiny_hf, tmp_path / "x.gguf", quant="Q4_0", imatrix=False, gptq=True)


@pytest.mark.slow
def test_target_size_offers_gptq_blocks_and_keeps_its_budget(tiny_hf, tmp_path):  # noqa: F811
    from edgellm.converters.gguf_gptq import file_tensors, read_values
    from edgellm.converters.mixed import Recipe, recipe_path
    from edgellm.converters.pipeline import convert

    f16 = convert(tiny_hf, tmp_path / "f16.gguf", quant="F16")
    q4 = convert(tiny_hf, tmp_path / "q4.gguf", quant="Q4_0", calib_text=TEXT, calib_tokens=512)
    budget = (2 * q4.bytes + f16.bytes) // 3
    out = tmp_path / "mixed.gguf"
    res = convert(tiny_hf, out, target_size=budget, calib_text=TEXT, calib_tokens=512, sensitivity_tokens=256)
    assert res.bytes == out.stat().st_size <= budget
    rec = Recipe.load(recipe_path(out))
    assert rec.gptq and any(k.endswith("+gptq") for k in rec.histogram())
    assert any(o[3] == "gptq" for opts in rec.options.values() for o in opts)
    table = file_tensors(out)
    assert {n: t.type for n, t in table.items() if len(t.shape) == 2} == rec.types
    assert res.gptq["tensors_gptq"] == len(rec.gptq)
    again = tmp_path / "again.gguf"                 # a saved recipe reapplies to the same bytes, GPTQ included
    convert(tiny_hf, again, recipe=recipe_path(out), calib_text=TEXT, calib_tokens=512)
    assert again.read_bytes() == out.read_bytes()
    name = rec.gptq[0]
    assert np.isfinite(read_values(out, table[name])).all()
    without = convert(tiny_hf, tmp_path / "nogptq.gguf", target_size=budget, calib_text=TEXT, calib_tokens=512,
                      sensitivity_tokens=256, gptq=False)
    assert without.gptq is None and without.bytes <= budget
    assert not Recipe.load(recipe_path(tmp_path / "nogptq.gguf")).gptq
