"""ONNX export (fused + portable) and the onnxruntime backend, on the real default model.

Exports happen once per test session (fixtures below): the checkpoint is read once and its float32
weights shared between the exports. The llama.cpp side of the parity checks is an F32 GGUF written
from the same checkpoint, so both runtimes see identical weights.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm import GREEDY
from edgellm.errors import BackendError, InvalidModelError, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from device_fixtures import load_fixture  # noqa: E402

PROMPT = "The three most important things to know about growing tomatoes are"
CPU_ONLY = ["CPUExecutionProvider"]


@pytest.fixture(scope="session")
def onnx_ckpt(shipped_ckpt):
    return shipped_ckpt


@pytest.fixture(scope="module")
def onnx_dirs(fused_f32_onnx, f32_gguf, onnx_int4, module_tmp):
    """fused f32, portable f32 (via the CLI) and fused int4 exports, plus an F32 GGUF of the same weights (all but
    the portable export are tests/model_fixtures.py's, shared with other files)."""
    from click.testing import CliRunner

    from edgellm.cli import cli

    root = module_tmp
    res = CliRunner().invoke(cli, ["convert", str(f32_gguf), "--format", "onnx", "--flavour", "portable",
                                   "--quant", "f32", "-o", str(root / "portable-f32"), "--json"])
    assert res.exit_code == 0, res.output
    return {"fused": fused_f32_onnx, "portable": root / "portable-f32", "cli_summary": json.loads(res.stdout),
            "gguf": f32_gguf, "int4": onnx_int4}


def _load(path, **kw):
    return edgellm.load(path, n_ctx=1024, disk_cache=False, sampler=GREEDY, **kw)


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def llama_f32(onnx_dirs):
    s = _load(onnx_dirs["gguf"])
    yield s
    s.close()


@pytest.mark.parametrize("flavour", ["fused", "portable"])
def test_f32_logits_match_llama_cpp(onnx_dirs, llama_f32, flavour):
    with _load(onnx_dirs[flavour]) as s:
        tokens = llama_f32.tokenize(PROMPT)
        assert s.tokenize(PROMPT) == tokens
        llama_f32.backend.truncate(0)
        llama_f32.tokens.clear()
        ref = llama_f32.backend.eval_all_logits(tokens)
        got = s.backend.eval_all_logits(tokens)
        assert _cos(ref, got).min() >= 0.9999
        assert (ref.argmax(-1) == got.argmax(-1)).all()


@pytest.mark.parametrize("flavour", ["fused", "portable"])
def test_greedy_64_tokens_identical_to_llama_cpp(onnx_dirs, llama_f32, flavour):
    want = llama_f32.generate(PROMPT, max_tokens=64).tokens
    with _load(onnx_dirs[flavour]) as s:
        got = s.generate(PROMPT, max_tokens=64)
    assert len(want) == 64 and got.tokens == want
    assert got.text == llama_f32.detokenize(want)


@pytest.mark.parametrize("flavour", ["fused", "portable"])
def test_incremental_decode_equals_full_sequence(onnx_dirs, flavour):
    with _load(onnx_dirs[flavour]) as s:
        be = s.backend
        tokens = s.tokenize(PROMPT)
        full = be.eval_all_logits(tokens)
        be.truncate(0)
        rows = [be.eval_all_logits(tokens[:5]), be.eval_all_logits(tokens[5:9])]
        for t in tokens[9:]:
            be.eval([t])
            rows.append(be.logits()[None])
        inc = np.concatenate(rows)
        assert np.abs(inc - full).max() < 1e-3
        # a saved state restores exactly (after the cache was cut and overwritten)
        state, n = be.save_state(), be.n_past
        be.truncate(4)
        be.eval(tokens[:3])
        assert be.n_past == 7
        be.load_state(state, n)
        be.truncate(n - 1)
        be.eval([tokens[-1]])
        assert np.abs(be.logits() - full[-1]).max() < 1e-3
        with pytest.raises(BackendError, match="expected"):
            be.load_state(state[:-4], n)


@pytest.mark.parametrize("flavour", ["fused", "portable", "int4"])
def test_chat_two_turns_reuses_the_kv_cache(onnx_dirs, flavour, tmp_path):
    with edgellm.load(onnx_dirs[flavour], n_ctx=1024, disk_cache=tmp_path, sampler=GREEDY) as s:
        assert s.plan.backend == "onnxruntime" and s.backend.name == "onnxruntime"
        chat = s.conversation(system="You are a helpful assistant.")
        first = chat.say("What is the capital of France?", max_tokens=24)
        second = chat.say("And of Germany?", max_tokens=24)
        assert first.text.strip() and second.text.strip()
        assert second.stats.cache_source == "context" and second.stats.reused_tokens > first.stats.prompt_tokens
        pieces = list(s.conversation().stream("Say hello.", max_tokens=8))
        assert pieces and all(isinstance(p, str) for p in pieces)
        history = list(chat.messages)
    # a new backend instance (as after a restart) picks the conversation up from the disk cache
    with edgellm.load(onnx_dirs[flavour], n_ctx=1024, disk_cache=tmp_path, sampler=GREEDY) as s:
        again = s.chat(history + [{"role": "user", "content": "Thanks!"}], max_tokens=8)
        assert again.stats.cache_source == "disk" and again.stats.reused_tokens >= 32


def test_int4_is_4bit_blocks_of_64_everywhere_and_smaller_than_the_builders_format(onnx_dirs, llama_f32):
    from edgellm.converters.onnx_inspect import inspect_onnx

    info = inspect_onnx(onnx_dirs["int4"])
    assert info["ops"]["MatMulNBits"] == 4 * 30 + 1 and info["ops"]["GroupQueryAttention"] == 30
    assert info["ops"]["GatherBlockQuantized"] == 1  # the tied embedding shares lm_head's blocks
    layouts = [k for k in info["weight_bytes_by_kind"] if "blocks" in k]
    assert layouts == ["int4 blocks of 64"]  # onnxruntime's fastest MatMulNBits layout here, for every matrix
    assert (onnx_dirs["int4"] / "model.onnx").stat().st_size < 1e6  # weights live in model.onnx.data
    matrices = 134_515_008 - 30 * 2 * 576 - 576  # every weight but the norms
    # 4 bits + a float32 scale and a 4-bit zero point per 64 (zero points padded to whole bytes per row) — below
    # the 5.0 bits of the builder's 4-bit/32 blocks; + cos/sin tables (2.1 MB) and norms
    assert info["weight_bytes"] <= matrices * 4.6 / 8 + 2.3e6
    with _load(onnx_dirs["int4"]) as s:
        tokens = llama_f32.tokenize(PROMPT)
        llama_f32.backend.truncate(0)
        llama_f32.tokens.clear()
        ref, got = llama_f32.backend.eval_all_logits(tokens), s.backend.eval_all_logits(tokens)
        assert np.median(_cos(ref, got)) > 0.97


def test_evaluate_scores_an_onnx_model(onnx_dirs):
    from edgellm.converters.evaluate import evaluate
    from edgellm.texts import heldout_text

    r = evaluate(onnx_dirs["int4"], onnx_dirs["gguf"], heldout_text(), ctx=128, max_chunks=2)
    assert r.tokens_scored == 2 * 63 and 0 < r.mean_kld < 1.0 and r.top1_agreement > 0.6
    assert r.size_bytes < 100e6 and 4.5 < r.bits_per_weight < 6


def test_fused_graph_has_3x_fewer_nodes(onnx_dirs):
    from click.testing import CliRunner

    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(onnx_dirs["fused"]), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    portable = json.loads(CliRunner().invoke(cli, ["inspect", str(onnx_dirs["portable"]), "--json"]).stdout)
    assert info["flavour"] == "fused" and portable["flavour"] == "portable"
    assert info["node_counts"]["unfused"] == portable["nodes"]  # the toy-width count is the real graph's
    assert portable["nodes"] >= 3 * info["nodes"]
    assert not set(portable["ops"]) & {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization"}
    assert portable["opsets"] == {"ai.onnx": 17}
    assert onnx_dirs["cli_summary"]["flavour"] == "portable" and onnx_dirs["cli_summary"]["nodes"] == portable["nodes"]


# -- providers ------------------------------------------------------------------------------------

def _onnx_plan(name, flavour, available, device="auto"):
    from edgellm.plan import Artifact, choose
    from edgellm.runtime_onnx import apply_providers

    plan = choose(load_fixture(name), Artifact("onnx", 90 << 20, "int4", flavour), requested_device=device, env={})
    return apply_providers(plan, device, available)


def test_android_runs_the_portable_graph_on_nnapi():
    plan, choice = _onnx_plan("android-pixel", "portable", ["NnapiExecutionProvider", *CPU_ONLY])
    assert plan.device == "nnapi" and choice.providers == ("NnapiExecutionProvider", "CPUExecutionProvider")
    assert not plan.warnings and any("fall back to CPU" in r for r in plan.reasons)


def test_android_fused_graph_takes_xnnpack():
    plan, choice = _onnx_plan("android-pixel", "fused", ["XnnpackExecutionProvider", *CPU_ONLY])
    assert plan.device == "xnnpack" and choice.providers[0] == "XnnpackExecutionProvider"


def test_missing_provider_falls_back_to_cpu_and_says_so():
    plan, choice = _onnx_plan("android-pixel", "portable", CPU_ONLY)
    assert plan.device == "cpu" and choice.providers == ("CPUExecutionProvider",)
    assert any("NNAPI execution provider is not in this onnxruntime build" in w for w in plan.warnings)


@pytest.mark.parametrize("name", ["x86-avx512", "rpi5", "mac-m2"])
def test_desktop_and_pi_run_onnx_on_cpu(name):
    plan, _ = _onnx_plan(name, "fused", CPU_ONLY)
    assert plan.device == "cpu" and not plan.warnings


def test_requested_provider_that_is_missing_is_an_error(onnx_dirs):
    import onnxruntime

    if "XnnpackExecutionProvider" in onnxruntime.get_available_providers():
        pytest.fail("this test expects the PyPI onnxruntime build (no XNNPACK)")
    with pytest.raises(BackendError, match="XNNPACK execution provider is not in this onnxruntime build"):
        _load(onnx_dirs["fused"], device="xnnpack")
    with pytest.raises(BackendError, match="NNAPI needs Android"):
        _load(onnx_dirs["portable"], device="nnapi")
    with pytest.raises(BackendError, match="NNAPI needs the portable ONNX graph"):
        _onnx_plan("android-pixel", "fused", CPU_ONLY, device="nnapi")


def test_llama_cpp_only_options_are_refused_for_onnx(onnx_dirs):
    from edgellm.errors import UsageError

    for kw, name in ((dict(parallel=2), "parallel"), (dict(rpc="127.0.0.1:50052"), "rpc"),
                     (dict(kv_type="q8_0"), "kv_type"), (dict(flash_attn=True), "flash_attn")):
        with pytest.raises(UsageError, match=f"{name}: llama.cpp options; .* is an ONNX model"):
            _load(onnx_dirs["fused"], **kw)


def test_devices_reports_what_onnxruntime_really_runs(onnx_dirs):
    from click.testing import CliRunner

    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["devices", "--model", str(onnx_dirs["fused"]), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["onnxruntime"]["available"] and "CPU" in data["onnxruntime"]["providers"]
    assert data["plan"]["backend"] == "onnxruntime" and data["plan"]["device"] == "cpu"


# -- bad input ------------------------------------------------------------------------------------

def _partial_copy(src: Path, dst: Path, skip: str) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != skip:
            (dst / p.name).symlink_to(p)
    return dst


def test_missing_tokenizer_is_a_clear_error(onnx_dirs, tmp_path):
    broken = _partial_copy(onnx_dirs["int4"], tmp_path / "m", "tokenizer.json")
    with pytest.raises(InvalidModelError, match="no tokenizer.json"):
        _load(broken)


def test_bad_export_options_are_refused(onnx_ckpt, tmp_path):
    from edgellm.converters.onnx_export import export_onnx

    with pytest.raises(UsageError, match="portable ONNX graph takes"):
        export_onnx(onnx_ckpt[0], tmp_path / "x", flavour="portable", quant="int4")
    with pytest.raises(UsageError, match="unknown ONNX flavour"):
        export_onnx(onnx_ckpt[0], tmp_path / "x", flavour="tiny")
    assert not (tmp_path / "x").exists()


def test_bench_runs_an_onnx_model(onnx_dirs):
    from click.testing import CliRunner

    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["bench", str(onnx_dirs["int4"]), "--threads", "1", "--prompt", "16", "--gen", "4",
                                   "--reps", "1", "--history", "40", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["anchor"] is None and r["settings"]["anchor"] is False  # raw llama-cpp-python runs GGUF only
    assert r["tg_tps"] > 0 and r["pp_tps"] > 0 and r["ceiling_tps"] > 0
    assert r["ttft"]["restart_cache_source"] == "disk" and r["ttft"]["warm_evaluated_tokens"] < 40
