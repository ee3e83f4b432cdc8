"""Size-targeted mixed precision and the rotated (off-grid) reference, on tiny random models.

The tiny model's dimensions are multiples of 256 so every llama.cpp type (K-quants included) is a
candidate; the real model's figures come from benchmarks/quant_quality.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import bpe_tokenizer, make_hf

import edgellm
from edgellm.converters.calibrate import dims_of, weight_getter
from edgellm.converters.hf_source import read_hf
from edgellm.converters.mixed import Option, Recipe, choose, parse_size, recipe_path
from edgellm.converters.pipeline import convert
from edgellm.converters.reference import forward
from edgellm.converters.rotate import rotate
from edgellm.errors import UsageError

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, tie_word_embeddings=True)
TEXT = ("Small models run on boards like the Raspberry Pi. " * 40
        + "The quick brown fox jumps over the lazy dog 12345 times. " * 40)


@pytest.fixture(scope="module")
def tiny_hf(module_tmp) -> Path:
    root = module_tmp / "hf"
    make_hf(root, "llama", bpe_tokenizer("smollm"), **SMALL)
    return root


def test_rotation_computes_the_same_function_off_the_grid(tiny_hf):
    ckpt = read_hf(tiny_hf)
    rot = rotate(ckpt, seed=3)
    assert not rot.config.tie_word_embeddings and "lm_head.weight" in rot.tensors.shapes
    assert np.all(rot.tensors.load("model.layers.0.input_layernorm.weight") == 1.0)
    w0, w1 = (ckpt.tensors.load("model.layers.1.mlp.up_proj.weight"),
              rot.tensors.load("model.layers.1.mlp.up_proj.weight"))
    assert w0.shape == w1.shape and not np.allclose(w0, w1, atol=1e-3)
    ids = list(range(5, 45))
    a = forward(dims_of(ckpt.config), weight_getter(ckpt), ids)
    b = forward(dims_of(rot.config), weight_getter(rot), ids)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    with pytest.raises(ValueError, match="orthogonal"):
        rotate(ckpt, rotation=np.ones((256, 256)))


def test_choose_respects_the_budget_and_spends_bits_where_they_matter():
    # 'hot' loses a lot at low precision, 'cold' barely: the bytes must go to 'hot'
    opts = {"hot": [Option("Q4_0", 100, 10.0), Option("Q8_0", 200, 0.1)],
            "cold": [Option("Q4_0", 100, 0.02), Option("Q8_0", 200, 0.01)]}
    sel = choose(opts, 300)
    assert (sel["hot"].type, sel["cold"].type) == ("Q8_0", "Q4_0")
    assert {o.type for o in choose(opts, 10_000).values()} == {"Q8_0"}   # room for everything: the best of each
    rng = np.random.default_rng(0)
    for _ in range(50):
        random = {f"t{i}": [Option(str(j), int(b), float(c)) for j, (b, c) in
                            enumerate(zip(sorted(rng.integers(10, 100, 4)), sorted(rng.random(4))[::-1]))]
                  for i in range(6)}
        lo = sum(min(o.bytes for o in v) for v in random.values())
        hi = sum(max(o.bytes for o in v) for v in random.values())
        budget = int(rng.integers(lo, hi + 1))
        picked = choose(random, budget)
        assert sum(o.bytes for o in picked.values()) <= budget


def test_parse_size():
    assert parse_size("90MB") == 90_000_000 and parse_size("1.5 GiB") == int(1.5 * 2**30) and parse_size("123") == 123
    for bad in ("ninety", "-5MB", "12XB"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_target_size_meets_its_budget_and_the_recipe_reapplies(tiny_hf, tmp_path):
    calib = TEXT
    f16 = convert(tiny_hf, tmp_path / "f16.gguf", quant="F16")
    q4 = convert(tiny_hf, tmp_path / "q4.gguf", quant="Q4_0", calib_text=calib, calib_tokens=512)
    budget = (q4.bytes + f16.bytes) // 3      # between the smallest and the largest mix
    out = tmp_path / "mixed.gguf"
    res = convert(tiny_hf, out, quant="auto", target_size=budget, calib_text=calib, calib_tokens=512,
                  sensitivity_tokens=256, eval_text=calib)
    assert res.bytes == out.stat().st_size <= budget
    rec = Recipe.load(recipe_path(out))
    assert rec.budget_bytes == budget and rec.total_bytes <= budget and len(rec.histogram()) >= 2
    assert res.evaluation is not None and 0 <= res.evaluation["mean_kld"] < 1.0
    with edgellm.load(out, n_ctx=128, disk_cache=False, sampler=edgellm.GREEDY) as s:
        assert len(s.generate("The quick", max_tokens=4).tokens) > 0
        from edgellm.gguf_check import validate_gguf
        types = {t.name: t.type_name for t in validate_gguf(out).tensors if len(t.shape) == 2}
        assert types == rec.types                         # llama.cpp wrote exactly what the recipe says
    again = tmp_path / "again.gguf"
    convert(tiny_hf, again, recipe=recipe_path(out), calib_text=calib, calib_tokens=512)
    assert again.read_bytes() == out.read_bytes()


def test_impossible_budgets_and_bad_recipes_are_refused(tiny_hf, tmp_path):
    with pytest.raises(UsageError, match="possible targets"):
        convert(tiny_hf, tmp_path / "x.gguf", target_size=1000, calib_text=TEXT, calib_tokens=512,
                sensitivity_tokens=128)
    with pytest.raises(UsageError, match="auto"):
        convert(tiny_hf, tmp_path / "x.gguf", quant="auto")
    bad = tmp_path / "bad.recipe.json"
    bad.write_text(json.dumps({"budget_bytes": 1, "overhead_bytes": 0, "tensor_bytes": 0, "predicted_kld": 0,
                               "types": {"blk.0.attn_q.weight": "Q4_0"}}))
    with pytest.raises(UsageError, match="does not match"):
        convert(tiny_hf, tmp_path / "x.gguf", recipe=bad, calib_text=TEXT, calib_tokens=512)
    assert not (tmp_path / "x.gguf").exists()


def test_a_full_disk_is_refused_before_any_work(tiny_hf, tmp_path, monkeypatch):
    import shutil

    from edgellm.errors import ConversionError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))   # a nearly full disk
    with pytest.raises(ConversionError, match="not enough disk space"):
        convert(tiny_hf, tmp_path / "x.gguf", quant="Q4_0")
    assert list(tmp_path.iterdir()) == []


def test_sweep_puts_target_size_recipes_beside_the_presets(tiny_hf, tmp_path):
    from edgellm.converters.sweep import plot, sweep, write_table

    ref = convert(tiny_hf, tmp_path / "f32.gguf", quant="F32").output
    size = convert(tiny_hf, tmp_path / "q4.gguf", quant="Q4_0", calib_text=TEXT, calib_tokens=512).bytes
    rows = sweep(Path(ref), ["Q4_0"], calib_text=TEXT, calib_tokens=512, text=TEXT, ctx=128, max_chunks=2,
                 workdir=tmp_path / "work", sizes=[int(size * 1.1)], sens_tokens=256)
    mixed = [r for r in rows if r["variant"] == "edgellm mixed"]
    assert len(rows) == 3 and len(mixed) == 1 and mixed[0]["bytes"] <= int(size * 1.1)
    assert mixed[0]["mean_kld"] >= 0 and sum(mixed[0]["types"].values()) > 0
    assert "edgellm mixed" in write_table(rows)
    assert plot(rows, tmp_path / "sweep.png").stat().st_size > 1000
