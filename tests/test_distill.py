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


@pytest.fixture(scope="module")
def short_run(kd_setup, module_tmp):
    """Four steps, then the same run extended to eight: the second must resume at step 4."""
    student, data = kd_setup
    work = module_tmp / "kd"
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


def test_held_back_sequences_pick_the_returned_weights(kd_setup, tmp_path):
    """With sequences held back, the run measures their loss at the start, during and at the end, never trains
    on them, and returns the weights at the lowest point of that curve — the start itself when training at a
    learning rate far too high only makes the held-back loss worse."""
    student, data = kd_setup
    n = len(data.tokens)
    held = np.arange(n - 2, n)
    good = DistillConfig(tokens=6 * STEP_TOKENS, batch=2, lr=1e-3, warmup=0.0, val_seqs=2, eval_every_s=0.0)
    trained, res = distill(student, data, good, tmp_path / "good")
    steps = [s for s, _ in res.val_curve]
    assert steps == list(range(7))                      # step 0, after every step (eval_every_s=0), no repeat
    best_step, best_loss = min(res.val_curve, key=lambda r: r[1])
    assert res.best_step == best_step
    assert _kl(trained, data, held) == pytest.approx(best_loss, rel=1e-4)
    assert res.val_curve[0][1] == pytest.approx(_kl(student, data, held), rel=1e-4)

    wild = dataclasses.replace(good, lr=3.0)
    trained, res = distill(student, data, wild, tmp_path / "wild")
    assert res.best_step == 0 and min(v for _, v in res.val_curve[1:]) > res.val_curve[0][1]
    assert _kl(trained, data, held) == pytest.approx(_kl(student, data, held), rel=1e-5)
    with pytest.raises(UsageError, match="hold back"):
        distill(student, data, dataclasses.replace(good, val_seqs=n), tmp_path / "all")


def test_unfiltered_sampling_draws_from_the_whole_distribution():
    """Filtered, a flat distribution yields only the 40 kept tokens; unfiltered, the draws spread over the
    whole vocabulary (seeded, so this cannot flake)."""
    from edgellm.converters.kd_data import _sample

    logits = torch.zeros(400, 1000)
    kept = set(_sample(logits, torch.Generator().manual_seed(0), temperature=1.0).tolist())
    every = set(_sample(logits, torch.Generator().manual_seed(0), temperature=1.0, filtered=False).tolist())
    assert len(kept) <= 40 < 200 < len(every)


def test_recipe_repeats_the_calibration_text(default_model_path, tmp_path, monkeypatch):
    """prose_repeats puts the calibration text that many times in the data (here a short stand-in for it,
    no samples); a recipe without a positive repeat count or temperature is a usage error."""
    import edgellm
    import edgellm.texts
    from edgellm.converters.kd_data import TextRecipe

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    short = calibration_text()[:1500]
    monkeypatch.setattr(edgellm.texts, "calibration_text", lambda: short)
    data, source = build_kd_data(default_model_path, None, k=4, seq_len=64, gen_tokens=0,
                                 recipe=TextRecipe(prose_repeats=2))
    with edgellm.load(default_model_path, n_ctx=256, disk_cache=False) as s:
        twice = s.tokenize(short, special=False) * 2
    assert data.tokens.ravel().tolist() == twice[:len(twice) // 64 * 64] and "×2" in source
    for bad in (TextRecipe(prose_repeats=0), TextRecipe(temperature=0.0)):
        with pytest.raises(UsageError, match="recipe"):
            build_kd_data(default_model_path, None, gen_tokens=0, recipe=bad)


def test_teacher_generations_are_seeded_prompted_pieces(default_model_path, tmp_path, monkeypatch):
    """Sampled side by side, each piece is a prompt (cut to the shortest prompt's length) plus the teacher's
    continuation plus EOS; the same seed gives the same text, another seed other text."""
    import edgellm
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.kd_data import prompts_from, teacher_generations

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))       # no cache shared with other runs
    model = to_torch(read_gguf(default_model_path)).eval()
    prompts = prompts_from(calibration_text())[:3]
    with edgellm.load(default_model_path, n_ctx=256, disk_cache=False) as s:
        eos = s.backend.special_token("eos")
        a = teacher_generations(model, s, prompts, 40, seed=1, max_len=6, batch=3)
        assert a == teacher_generations(model, s, prompts, 40, seed=1, max_len=6, batch=3)      # cached: same
        b = teacher_generations(model, s, prompts, 40, seed=2, max_len=6, batch=3)
        plain = [s.tokenize(p, special=False) for p in prompts]
    width = min(map(len, plain))
    pieces, cur = [], []
    for tok in a:
        cur.append(tok)
        if tok == eos:
            pieces.append(cur)
            cur = []
    assert len(pieces) >= 3 and not cur
    for i, piece in enumerate(pieces):
        assert piece[:width] == plain[i % 3][:width] and width < len(piece) <= width + 7
    assert a != b and len(a) >= 40


def test_distill_cli_writes_the_best_held_back_weights(kd_setup, tmp_path, default_model_path, capsys):
    """`edgellm distill` end to end on a tiny student: JSON report with the held-back curve, the written GGUF
    loads and answers; a too-short text and an existing output are one-line errors that write nothing."""
    import json

    import edgellm
    from edgellm.converters.gguf_writer import write_gguf

    student, _ = kd_setup
    src, text, dest = tmp_path / "s.gguf", tmp_path / "t.txt", tmp_path / "kd.gguf"
    write_gguf(student, src, "F32")
    text.write_text(calibration_text())                    # ~30 sequences of 256 tokens: one is held back
    args = ["distill", str(src), "--teacher", str(default_model_path), "-o", str(dest), "--text", str(text),
            "--tokens", "2048", "--no-eval", "--threads", "2", "--json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    report = json.loads(capsys.readouterr().out)
    tr = report["training"]
    assert tr["steps"] == 2 and [s for s, _ in tr["val_curve"]] == [0, 2]
    assert tr["best_step"] == min(tr["val_curve"], key=lambda r: r[1])[0]
    with edgellm.load(dest, n_ctx=128, disk_cache=False, sampler=edgellm.GREEDY) as s:
        assert len(s.generate("The", max_tokens=2).tokens) >= 1

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0 and "--force" in capsys.readouterr().err
    text.write_text("far too short")
    with pytest.raises(SystemExit) as e:
        main([*args[:4], "-o", str(tmp_path / "never.gguf"), *args[6:]])
    assert e.value.code != 0 and "tokens" in capsys.readouterr().err
    assert not (tmp_path / "never.gguf").exists()
