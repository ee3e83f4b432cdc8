"""Structured pruning on the real SmolLM2-135M: every axis gives a GGUF llama.cpp loads and runs, pruning
nothing is the identity, and importance ranks deliberately zeroed structures last."""
from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

import edgellm
from edgellm.cli import main
from edgellm.converters.gguf_writer import write_gguf
from edgellm.converters.importance import compute_importance
from edgellm.converters.prune import (
    Shape,
    apply_plan,
    candidate_shapes,
    make_plan,
    n_params,
    parse_budget,
    prune_model,
    shape_of,
    shaped,
)
from edgellm.converters.torch_llama import to_torch
from edgellm.errors import UsageError

AXIS_SHAPES = {   # one axis cut at a time (hidden 288 keeps a multiple of the 9 heads, as transformers requires)
    "depth": Shape(22, 576, 1536, 3, 3), "ffn": Shape(30, 576, 1024, 3, 3),
    "heads": Shape(30, 576, 1536, 2, 2), "hidden": Shape(30, 288, 1536, 3, 3)}


@pytest.mark.parametrize("axis", list(AXIS_SHAPES))
def test_each_axis_gives_a_gguf_llama_cpp_loads_and_runs(axis, teacher, importance, tmp_path):
    shape = AXIS_SHAPES[axis]
    pruned = apply_plan(teacher, make_plan(teacher.config, importance, shape))
    assert n_params(pruned.config) < n_params(teacher.config)
    path = tmp_path / f"{axis}.gguf"
    write_gguf(pruned, path, "F16")
    r = gguf.GGUFReader(path)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    q = shape.n_head * 64
    assert shapes["token_embd.weight"] == (shape.hidden, 49152)
    assert shapes["blk.0.attn_q.weight"] == (shape.hidden, q)
    assert shapes["blk.0.attn_k.weight"] == (shape.hidden, shape.n_kv * 64)
    assert shapes["blk.0.attn_output.weight"] == (q, shape.hidden)
    assert shapes["blk.0.ffn_up.weight"] == (shape.hidden, shape.ffn)
    assert f"blk.{shape.n_layer - 1}.ffn_down.weight" in shapes and f"blk.{shape.n_layer}.ffn_down.weight" not in shapes
    with edgellm.load(path, n_ctx=256, disk_cache=False, sampler=edgellm.GREEDY) as s:
        done = s.generate("The capital of France is", max_tokens=8)
    assert done.stats.generated_tokens + (done.stats.stop_reason == "eos") >= 1


def test_pruning_nothing_reproduces_the_teacher(teacher, calib_tokens):
    res = prune_model(teacher, n_params(teacher.config), calib_tokens=64)
    assert res.plan.shape == shape_of(teacher.config) and res.candidates == []
    for name, w in teacher.tensors:
        assert np.array_equal(res.checkpoint.tensors.load(name), w), name
    ids = torch.tensor([calib_tokens[:48]])
    with torch.no_grad():
        a, b = to_torch(teacher)(input_ids=ids).logits, to_torch(res.checkpoint)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_importance_ranks_zeroed_structures_last(teacher, calib_tokens):
    data = {n: w.copy() for n, w in teacher.tensors}
    L = "model.layers.{}."
    data[L.format(4) + "mlp.up_proj.weight"][777] = 0                      # FFN neuron 777 of layer 4
    data[L.format(9) + "self_attn.o_proj.weight"][:, 5 * 64:6 * 64] = 0    # query head 5 of layer 9
    for h in (0, 1, 2):                                                    # every head of KV group 0, layer 12
        data[L.format(12) + "self_attn.o_proj.weight"][:, h * 64:(h + 1) * 64] = 0
    for part in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):       # layer 20 writes nothing
        data[L.format(20) + part][:] = 0
    data["model.embed_tokens.weight"][:, 100] = 0                          # hidden channel 100 stays empty
    for i in range(teacher.config.num_hidden_layers):
        data[L.format(i) + "self_attn.o_proj.weight"][100] = 0
        data[L.format(i) + "mlp.down_proj.weight"][100] = 0
    broken = dataclasses.replace(teacher, tensors=dataclasses.replace(teacher.tensors, load=data.__getitem__))
    imp = compute_importance(broken, calib_tokens)
    assert imp.ffn[4].argmin() == 777 and imp.ffn[4][777] == 0
    assert imp.head[9].argmin() == 5
    assert imp.group[12].argmin() == 0
    assert imp.layer.argmin() == 20 and imp.layer[20] < 1e-6
    assert imp.hidden.argmin() == 100
    plan = make_plan(teacher.config, imp, Shape(29, 512, 1535, 2, 2))
    assert 20 not in plan.layers and 100 not in plan.hidden
    assert 777 not in plan.ffn[plan.layers.index(4)] and 5 not in plan.heads[plan.layers.index(9)]


def test_budget_planner_meets_budget_and_alignment(teacher):
    cfg = teacher.config
    assert parse_budget("100M", 1) == 100_000_000 and parse_budget("70%", 1000) == 700
    assert parse_budget("0.5", 1000) == 500 and parse_budget("1.2B", 1) == 1_200_000_000
    shapes = candidate_shapes(cfg, 100_000_000, align=256)
    assert shapes
    for s in shapes:
        assert 90_000_000 <= n_params(shaped(cfg, s)) <= 100_000_000
        assert s.hidden in (576,) or s.hidden % 256 == 0
        assert s.ffn in (1536,) or s.ffn % 256 == 0
        assert s.hidden % s.n_head == 0
    assert all(s.hidden == 576 and s.ffn == 1536 and s.n_head == 9 for s in candidate_shapes(cfg, 1e8, axes=["depth"]))


@pytest.mark.parametrize("kwargs,words", [
    (dict(target="5M"), ["smallest reachable", "M"]),
    (dict(target="100M", axes=["hidden"], align=256), ["smallest reachable"]),
    (dict(target="100M", axes=["width"]), ["unknown pruning axis"]),
    (dict(target="100M", calib_text="   "), ["calibration text is empty"]),
    (dict(target="100M", calib_text="too short"), ["only", "tokens"]),
    (dict(target="abc"), ["parameter count"]),
])
def test_bad_pruning_requests_fail_with_one_line(teacher, kwargs, words):
    target = kwargs.pop("target")
    with pytest.raises(UsageError) as e:
        prune_model(teacher, target, **kwargs)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_prune_cli_refuses_another_architecture_and_bad_budgets(tmp_path, capsys):
    other = tmp_path / "gpt2-hf"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    for args, code, word in (([str(other), "--prune-to", "0.5", "--explain"], 5, "GPT2LMHeadModel"),
                             (["--prune-to", "1M", "--explain"], 2, "smallest reachable"),
                             (["--prune-to", "100M"], 2, "--explain")):
        with pytest.raises(SystemExit) as e:
            main(["prune", *args])
        assert e.value.code == code
        assert word in capsys.readouterr().err
