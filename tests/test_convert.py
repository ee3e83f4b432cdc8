"""edgellm convert on the real model: every offered type loads and generates; HF round trip via the pipeline."""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.converters.evaluate import evaluate, evaluate_many
from edgellm.converters.pipeline import convert
from edgellm.converters.quantize import quantize
from edgellm.errors import UsageError
from edgellm.texts import heldout_text

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q5_1", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS"]


@pytest.mark.slow
def test_every_listed_type_loads_and_generates(default_model_path, tmp_path):
    sizes = {}
    for quant in TYPES:
        res = quantize(default_model_path, tmp_path / f"{quant}.gguf", quant)
        sizes[quant] = res.bytes
        # SmolLM2's 576-wide rows do not fit 256-wide K-quant blocks: llama.cpp falls back and edgellm says so
        assert bool(res.fallbacks) == (quant in ("Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS")), quant
        with edgellm.load(res.path, n_ctx=256, disk_cache=False, sampler=edgellm.GREEDY) as s:
            out = s.chat([{"role": "user", "content": "Say hello."}], max_tokens=6)
            assert out.stats.generated_tokens >= 1 and out.text.strip(), quant
        res.path.unlink()
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]


def test_pipeline_gguf_to_hf_to_quantized_gguf(default_model_path, tmp_path):
    hf = convert(default_model_path, tmp_path / "hf", to="hf")
    assert hf.format == "hf" and (tmp_path / "hf" / "tokenizer.json").is_file()
    q = convert(tmp_path / "hf", tmp_path / "q8.gguf", quant="Q8_0", calib_tokens=256)
    assert q.quant == "Q8_0" and q.imatrix_tokens == 256 and 8.0 < q.bits_per_weight < 9.5
    assert not list(tmp_path.glob(".q8.gguf.work-*"))  # the staging directory is gone
    f32 = convert(tmp_path / "hf", tmp_path / "f32.gguf", quant="F32")
    prompt = "The three primary colours are red, yellow and"
    # Q8_0 is near-lossless: held-out KL divergence to the F32 conversion of the same HF directory, not one
    # position's cosine (which a broken conversion can pass). Measured: mean KLD ~0.004, top-1 ~97 %; the
    # same file at Q4_0 scores ~0.2, so the bound catches a wrong type, wrong scales or swapped tensors.
    r = evaluate(q.output, f32.output, heldout_text(), ctx=512, max_chunks=2)
    print(f"\nQ8_0 vs F32 on held-out text: mean KLD {r.mean_kld:.5f}, top-1 {r.top1_agreement:.3f}")
    assert r.mean_kld <= 0.01 and r.top1_agreement >= 0.93, (r.mean_kld, r.top1_agreement)
    # several models against one reference pass (optimize's candidates): each scored as if alone
    both = evaluate_many([q.output, f32.output], f32.output, heldout_text(), ctx=512, max_chunks=2)
    assert both[0].mean_kld == pytest.approx(r.mean_kld, rel=1e-6) and both[0].model == str(q.output)
    assert both[1].mean_kld < 1e-6 and both[1].top1_agreement == 1.0
    with edgellm.load(q.output, n_ctx=256, disk_cache=False) as s:
        assert np.isfinite(s.logits(prompt)).all()
    with pytest.raises(UsageError):
        convert(default_model_path, tmp_path / "x.gguf", quant="Q9_9")
