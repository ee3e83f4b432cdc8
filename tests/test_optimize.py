"""`edgellm optimize` and load(optimize=True): the transcoded graph computes the GGUF's own weights, the measured
decision is kept per (model content, device, library versions) and reused, a pinned backend wins, and the chosen
ONNX backend behaves like llama.cpp under the session and the server (KV reuse at every level, shipped states)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from serving import post

import edgellm
from edgellm import optimize as opt
from edgellm.errors import BackendError, ConversionError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def decision(default_model_path):
    """The lossless decision for the default model (measured once, or the stored one)."""
    return opt.optimize(default_model_path, quality="lossless")


def test_transcoded_graph_is_the_gguf_within_noise(decision, default_model_path, f32_gguf):
    from edgellm.converters.evaluate import evaluate
    from edgellm.texts import heldout_text

    onnx = next(c for c in decision.candidates if c.name == "onnx-lossless")
    assert onnx.excluded is None and onnx.mean_kld <= opt.QUALITY["lossless"]
    # against the file's weights evaluated exactly (llama.cpp on the dequantized F32 file): the transcoded weights are
    # the file's exactly (tests/test_transcode.py), and MatMulNBits at accuracy level 4 rounds activations to 8 bits
    # per block as llama.cpp's Q4_1 kernels do, so both land as far from the exact weights (measured: 2.79e-3 and
    # 2.80e-3; at level 0 the graph is 5e-7 from them but decodes at a tenth of the speed)
    exact = evaluate(onnx.path, f32_gguf, heldout_text(), ctx=256, max_chunks=2)
    native = evaluate(default_model_path, f32_gguf, heldout_text(), ctx=256, max_chunks=2)
    assert exact.mean_kld < 1.25 * native.mean_kld and exact.top1_agreement > 0.95


def test_decision_is_stored_and_reused_and_keyed(decision, default_model_path, monkeypatch):
    again = opt.optimize(default_model_path, quality="lossless")
    assert again.measured_at == decision.measured_at and again.winner == decision.winner  # not measured again
    assert opt.cached(default_model_path, "lossless").measured_at == decision.measured_at
    assert decision.winner in {c.name for c in decision.candidates if c.excluded is None}
    assert all(c.decode_tps and c.prefill_tps and c.ttft_s and c.deep_decode_tps and c.turn_prefill_s
               for c in decision.candidates if c.excluded is None)
    # the deep turn evaluates only its own tokens: the 767 before it stay in the KV cache
    assert all(c.turn_prefill_s < (opt.DEEP_TOKENS / 4) / c.prefill_tps
               for c in decision.candidates if c.excluded is None)
    eligible = [c for c in decision.candidates if c.excluded is None]
    assert decision.winner == max(eligible, key=lambda c: c.conversation_tps).name
    assert f"after {opt.DEEP_TOKENS} tokens" in decision.reason()
    monkeypatch.setattr(opt, "versions", lambda: {**decision.versions, "onnxruntime": "0.0.1"})
    assert opt.cached(default_model_path, "lossless") is None      # an upgrade measures again
    monkeypatch.undo()
    monkeypatch.setattr(opt, "device_key", lambda: "another device")
    assert opt.cached(default_model_path, "lossless") is None      # so does another device


def test_load_uses_the_winner_and_a_pin_wins(decision, default_model_path):
    with edgellm.load(default_model_path, n_ctx=512, optimize=True, quality="lossless", disk_cache=False) as s:
        assert s.plan.reasons[0].startswith("measured on this device")
        assert s.plan.backend == ("onnxruntime" if decision.chosen.backend == "onnxruntime" else "llama.cpp")
    with edgellm.load(default_model_path, n_ctx=512, backend="llama.cpp", disk_cache=False) as s:
        assert s.plan.backend == "llama.cpp" and s.optimized is None
    with edgellm.load(default_model_path, n_ctx=512, backend="onnx", quality="lossless", disk_cache=False) as s:
        assert s.plan.backend == "onnxruntime" and s.optimized is not None
    with pytest.raises(edgellm.EdgeLLMError, match="llama.cpp options"):
        edgellm.load(default_model_path, backend="onnx", parallel=4, quality="lossless")


def test_missing_onnx_extra_is_said_or_skipped(default_model_path, monkeypatch):
    monkeypatch.setattr(opt, "onnx_available", lambda: False)
    with pytest.raises(BackendError, match=r"pip install 'edgellm\[onnx\]'"):
        opt.optimize(default_model_path)
    with edgellm.load(default_model_path, n_ctx=512, optimize=True, disk_cache=False) as s:
        assert s.plan.backend == "llama.cpp"   # chat/run/serve keep llama.cpp without the extra


def test_blocks_that_cannot_be_carried_over_are_refused_with_the_reason(default_model_path, tmp_path):
    from edgellm.converters.gguf_onnx import transcode
    from edgellm.converters.pipeline import convert

    q51 = tmp_path / "q5_1.gguf"
    convert(default_model_path, q51, quant="Q5_1", imatrix=False)
    with pytest.raises(ConversionError, match="Q5_1.*float zero points.*keep this model on llama.cpp"):
        transcode(q51, tmp_path / "out", mode="lossless")
    assert not (tmp_path / "out").exists()


def test_onnx_backend_keeps_every_kv_reuse_level(decision, tmp_path):
    path = next(c.path for c in decision.candidates if c.name == "onnx-lossless")
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 8}, {"role": "user", "content": "Hi"}]
    with edgellm.load(path, n_ctx=1024, disk_cache=tmp_path / "kv", sampler=edgellm.GREEDY) as s:
        cold = s.chat(msgs, max_tokens=8)
        turn = s.chat(msgs + [{"role": "assistant", "content": cold.text}, {"role": "user", "content": "More?"}],
                      max_tokens=4)
        assert turn.stats.cache_source == "context" and turn.stats.reused_tokens > cold.stats.prompt_tokens - 2
        n = s.cache_prompt("You are a kiosk.", tmp_path / "kiosk.kv")
    with edgellm.load(path, n_ctx=1024, disk_cache=tmp_path / "kv", sampler=edgellm.GREEDY,
                      prompt_state=tmp_path / "kiosk.kv") as s:
        warm = s.chat(msgs, max_tokens=8)                       # after a restart: from the disk cache
        assert warm.stats.cache_source == "disk" and warm.tokens == cold.tokens
        shipped = s.chat([{"role": "system", "content": "You are a kiosk."}, {"role": "user", "content": "Hi"}],
                         max_tokens=4)
        assert shipped.stats.reused_tokens >= n - 1
    # llama.cpp's states never load into onnxruntime: the fingerprints differ
    with edgellm.load(decision.source, n_ctx=1024, disk_cache=tmp_path / "kv", sampler=edgellm.GREEDY) as s:
        assert s.chat(msgs, max_tokens=8).stats.cache_source is None


def test_serve_on_the_onnx_backend(decision, tmp_path):
    from serving import cli_server

    src = decision.source
    with cli_server(src, "--backend", "onnx", "--quality", "lossless", "--ctx", "1024",
                    "--system", "You are a museum guide.", env={"EDGELLM_OPTIMIZE": "1"}) as (url, proc):
        info = json.loads(subprocess.run([sys.executable, "-c", f"import urllib.request;print(urllib.request."
                                          f"urlopen('{url}/v1/edgellm/info').read().decode())"],
                                         capture_output=True, text=True).stdout)
        assert "onnx" in json.dumps(info).lower()
        first = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}],
                                                   "max_tokens": 6, "temperature": 0})
        assert first[0] == 200 and first[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 5  # system state
        history = [{"role": "user", "content": "Hello!"},
                   {"role": "assistant", "content": first[1]["choices"][0]["message"]["content"]},
                   {"role": "user", "content": "And then?"}]
        second = post(f"{url}/v1/chat/completions", {"messages": history, "max_tokens": 4, "temperature": 0})
        assert second[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > first[1]["usage"]["prompt_tokens"] - 2
    assert proc.returncode is not None


def test_cli_optimize_prints_the_decision(decision, default_model_path):
    r = subprocess.run([sys.executable, "-m", "edgellm.cli", "optimize", str(default_model_path), "--quality",
                        "lossless", "--json"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGELLM_OPTIMIZE": "1"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["winner"] == decision.winner and d["reason"].startswith("measured on this device")
    assert {c["name"] for c in d["candidates"]} == {"llama.cpp", "llama.cpp-fa", "onnx-lossless"}  # a CPU
    np.testing.assert_equal(d["kld_bound"], opt.QUALITY["lossless"])
    assert dataclasses.asdict(decision.chosen)["path"] == d["candidates"][[c["name"] for c in d["candidates"]].index(
        d["winner"])]["path"]


def test_the_ranking_weighs_a_deep_context_as_much_as_a_short_chat():
    """A backend that wins a short chat by 10 % but decodes at half speed after 768 tokens loses: the rank is
    answered tok/s over a shallow and a deep turn of equal length, not the short chat alone."""
    fast_short = opt.Candidate("a", "onnxruntime", "a", decode_tps=110.0, deep_decode_tps=50.0)
    steady = opt.Candidate("b", "llama.cpp", "b", decode_tps=100.0, deep_decode_tps=80.0)
    assert steady.conversation_tps == pytest.approx(2 / (1 / 100 + 1 / 80))   # no prefill timed: decode alone
    assert steady.conversation_tps > fast_short.conversation_tps
    assert opt.Candidate("c", "llama.cpp", "c", decode_tps=90.0).conversation_tps == 90.0  # not timed deep
    assert opt.Candidate("d", "llama.cpp", "d").conversation_tps == 0.0


def test_the_ranking_counts_the_prefill_of_each_turn():
    """llama.cpp's CPU flash attention (measured on an AMD EPYC): faster decode, slower short turns over a deep
    cache. It wins when its decode gain outweighs the turn's prefill, and loses when it does not — which a rank
    by decode alone could not see."""
    n = opt.DECODE_TOKENS
    plain = opt.Candidate("llama.cpp", "llama.cpp", "m", decode_tps=120.0, deep_decode_tps=100.0, ttft_s=0.12,
                          turn_prefill_s=0.10)
    assert plain.conversation_tps == pytest.approx(2 * n / (0.12 + n / 120 + 0.10 + n / 100))
    fa = dataclasses.replace(plain, name="llama.cpp-fa", flash_attn=True, decode_tps=130.0, turn_prefill_s=0.15)
    assert fa.conversation_tps > plain.conversation_tps           # 8 % faster decode pays for 50 ms more
    slow_turns = dataclasses.replace(fa, turn_prefill_s=0.40)
    assert slow_turns.decode_tps > plain.decode_tps and slow_turns.conversation_tps < plain.conversation_tps


def test_a_flash_attention_winner_loads_with_it_unless_turned_off(decision, default_model_path, monkeypatch):
    """The llama.cpp-fa candidate is the same file with flash attention on: its quality is measured (KLD to the
    file run the default way), and when it wins load(optimize=True) turns it on — flash_attn=False still wins."""
    fa = next(c for c in decision.candidates if c.name == "llama.cpp-fa")
    assert fa.flash_attn is True and fa.path == decision.source and fa.mean_kld is not None
    assert fa.mean_kld > 0   # another kernel: not assumed equal (f16 accumulation; 0.0032 on an AMD EPYC)
    assert (fa.excluded is None) == (fa.mean_kld <= opt.QUALITY["lossless"])
    won = dataclasses.replace(decision, winner="llama.cpp-fa")
    monkeypatch.setattr(opt, "optimize", lambda *a, **k: won)
    with edgellm.load(default_model_path, n_ctx=512, optimize=True, disk_cache=False) as s:
        assert s.backend.options.flash_attn is True and s.plan.reasons[0].startswith("measured on this device")
    with edgellm.load(default_model_path, n_ctx=512, optimize=True, flash_attn=False, disk_cache=False) as s:
        assert s.backend.options.flash_attn is False and s.plan.reasons[0].startswith("pinned: llama.cpp ")


def test_busy_counts_other_processes_not_optimize_itself(monkeypatch):
    """The 'CPUs busy' warning measures what other processes ran while timing; optimize's own threads (2 on 2
    cores) filled the load average and set it off on every run."""
    monkeypatch.setattr(opt.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(opt, "_cpu_clock", lambda: (12.0, 113.0, 57.0))
    assert opt._busy((10.0, 110.0, 55.0)) == pytest.approx((3 - 2) / (2 * 2))   # 3 CPU-s in all, 2 of them ours
    monkeypatch.setattr(opt, "_cpu_clock", lambda: (12.0, 113.0, 59.0))
    assert opt._busy((10.0, 110.0, 55.0)) == 0.0                                # never below zero
    monkeypatch.undo()
    if not os.path.exists("/proc/stat"):
        pytest.skip("the machine's CPU clock is read from /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        clock = opt._cpu_clock()
        time.sleep(1.0)
        share = opt._busy(clock)
    finally:
        spinner.kill()
        spinner.wait()
    assert share >= 0.7 / (os.cpu_count() or 1)    # one process spinning a CPU is seen
