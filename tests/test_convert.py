"""edgellm convert on the real model: every offered type loads and generates; HF round trip via the pipeline."""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.converters.pipeline import convert
from edgellm.converters.quantize import quantize
from edgellm.errors import UsageError

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
    with edgellm.load(q.output, n_ctx=256, disk_cache=False) as s, \
            edgellm.load(f32.output, n_ctx=256, disk_cache=False) as ref:
        a, b = s.logits(prompt), ref.logits(prompt)
        # measured 0.978 here (F16: 0.99999); that Q8_0 lands below the shipped Q4_1 file (0.999) is an
        # open question for the quality work, so this only guards against a broken conversion
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.95
    with pytest.raises(UsageError):
        convert(default_model_path, tmp_path / "x.gguf", quant="Q9_9")
