"""Distillation: a few steps on a small pruned SmolLM2 lower KL to the teacher; runs resume where they stopped."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgellm.cli import main
from edgellm.converters.distill import DistillConfig, check_vocab, distill, kd_loss
from edgellm.converters.kd_data import build_kd_data
from edgellm.converters.prune import Shape, apply_plan, make_plan, materialize
from edgellm.converters.torch_llama import to_torch
from edgellm.errors import UsageError
from edgellm.texts import calibration_text

STEP_TOKENS = 2 * 64   # batch 2 x seq_len 64


@pytest.fixture(scope="session")
def kd_setup(default_model_path, teacher, importance):
    """A 3-layer, 288-wide student pruned from SmolLM2 and teacher top-k data on calibration text (built once)."""
    student = materialize(apply_plan(teacher, make_plan(teacher.config, importance, Shape(3, 288, 256, 3, 3))))
    text = calibration_text()[:2600]
    data, _ = build_kd_data(default_model_path, text, k=16, seq_len=64, gen_tokens=0)
    return student, data


def _kl(ckpt, data, idx):
    model = to_torch(ckpt)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data.tokens[idx])).logits
        return float(kd_loss(logits, torch.from_numpy(data.topk_ids[idx]), torch.from_numpy(data.topk_logits[idx]),
                             torch.from_numpy(data.lse[idx])))


@pytest.fixture(scope="session")
def short_run(kd_setup, tmp_path_factory):
    """Four steps, then the same run extended to eight: the second must resume at step 4."""
    student, data = kd_setup
    work = tmp_path_factory.mktemp("kd")
    cfg = DistillConfig(tokens=4 * STEP_TOKENS, batch=2, lr=1e-3, warmup=0.0)
    _, first = distill(student, data, cfg, work)
    trained, second = distill(student, data, dataclasses.replace(cfg, tokens=8 * STEP_TOKENS), work)
    return student, trained, data, first, second


def test_short_distillation_lowers_kl_to_the_teacher(short_run):
    student, trained, data, _, second = short_run
    idx = np.arange(len(data.tokens))
    assert _kl(trained, data, idx) < 0.9 * _kl(student, data, idx)
    assert second.last_loss < second.first_loss


def test_resume_continues_from_the_saved_step(short_run):
    *_, first, second = short_run
    assert (first.steps, first.resumed_from_step) == (4, 0)
    assert (second.steps, second.resumed_from_step, second.tokens) == (8, 4, 8 * STEP_TOKENS)


def test_interruption_saves_state_and_the_rerun_resumes(kd_setup, tmp_path):
    student, data = kd_setup
    cfg = DistillConfig(tokens=3 * STEP_TOKENS, batch=2)

    def stop(s):
        if s["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(student, data, cfg, tmp_path, progress=stop)
    _, res = distill(student, data, cfg, tmp_path)
    assert (res.resumed_from_step, res.steps) == (2, 3)


def test_kd_loss_is_zero_for_the_teacher_itself_and_covers_every_kind():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 3
    top = logits.topk(8, dim=-1)
    lse = torch.logsumexp(logits, -1)
    for kind in ("fkl", "rkl", "skl"):
        assert abs(float(kd_loss(logits, top.indices, top.values, lse, kind=kind))) < 1e-5
        assert float(kd_loss(torch.randn(2, 5, 50), top.indices, top.values, lse, kind=kind)) > 0.01
    assert abs(float(kd_loss(logits, top.indices, top.values, lse, temperature=2.0))) < 1e-5


def test_bad_distillation_inputs(kd_setup, tmp_path, default_model_path, capsys):
    student, data = kd_setup
    other = dataclasses.replace(student, tokenizer=dataclasses.replace(
        student.tokenizer, tokens=student.tokenizer.tokens[:-1] + ["<other>"]))
    with pytest.raises(UsageError, match="vocabulary"):
        check_vocab(other, default_model_path)
    for cfg, word in ((DistillConfig(), "budget"), (DistillConfig(tokens=10, loss="mse"), "--loss"),
                      (DistillConfig(minutes=-1), "positive")):
        with pytest.raises(UsageError, match=word):
            distill(student, data, cfg, tmp_path)
    with pytest.raises(UsageError, match="tokens"):
        build_kd_data(default_model_path, "far too short", seq_len=64)
    with pytest.raises(SystemExit) as e:
        main(["convert", "-o", str(tmp_path / "x"), "--format", "onnx", "--prune-to", "100M"])
    assert e.value.code == 2 and "--format gguf" in capsys.readouterr().err


def test_device_choice_and_the_bf16_autocast_path(kd_setup, tmp_path):
    """auto is CUDA only where torch sees one; asking for CUDA without one is a one-line error; the bf16
    autocast path (what a GPU runs) trains on the CPU too."""
    from edgellm.converters.distill import pick_device

    student, data = kd_setup
    auto = pick_device(DistillConfig(tokens=1))
    assert auto == (("cuda", "bf16") if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else
                    ("cuda", "fp32") if torch.cuda.is_available() else ("cpu", "fp32"))
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            pick_device(DistillConfig(tokens=1, device="cuda"))
    for bad in (dict(device="tpu"), dict(precision="fp8")):
        with pytest.raises(UsageError):
            DistillConfig(tokens=1, **bad).check()
    cfg = DistillConfig(tokens=4 * STEP_TOKENS, batch=2, lr=1e-3, warmup=0.0, device="cpu", precision="bf16")
    trained, res = distill(student, data, cfg, tmp_path)
    assert res.device == "cpu, bf16" and res.steps == 4 and np.isfinite(res.last_loss)
    assert all(w.dtype == np.float32 for _, w in trained.tensors)     # master weights stay float32
    idx = np.arange(len(data.tokens))
    assert _kl(trained, data, idx) < _kl(student, data, idx)
