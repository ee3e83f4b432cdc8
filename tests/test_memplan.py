"""The memory planner: its parts, the boards, refusals with numbers and suggestions, and its accuracy
against the peak RSS of a real process (the benchmark's own measurement, at two small contexts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgellm import memplan
from edgellm.cli import cli
from edgellm.errors import InsufficientMemoryError, UsageError
from edgellm.gguf_check import validate_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

MiB = 1 << 20


def test_parts_follow_the_model_dimensions(default_model_path):
    est = memplan.estimate(default_model_path, 4096)
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K and V) x 2 bytes (f16) per token
    assert est.kv_bytes == 30 * 3 * 64 * 2 * 2 * 4096 == 90 * MiB
    assert est.weights_bytes == default_model_path.stat().st_size
    assert est.state_cache_bytes == est.kv_bytes  # one full-context snapshot by default
    assert est.total_bytes == sum(est.parts().values())
    assert not est.flash_attn and est.quant == "Q4_1" and est.n_params > 100e6
    q8 = memplan.estimate(default_model_path, 4096, "q8_0")
    assert q8.flash_attn and q8.kv_bytes == pytest.approx(est.kv_bytes * 34 / 64, rel=1e-6)
    assert q8.compute_bytes < est.compute_bytes / 3  # no materialised attention scores with flash attention
    longer = memplan.estimate(default_model_path, 8192)
    assert longer.kv_bytes == 2 * est.kv_bytes and longer.compute_bytes > est.compute_bytes
    assert memplan.estimate(default_model_path, 100_000).n_ctx == 8192  # clamped to the trained context
    served = memplan.estimate(default_model_path, 4096, server=True, n_seq=8)
    assert served.runtime_bytes > est.runtime_bytes and served.compute_bytes > est.compute_bytes


def test_boards_and_fit(default_model_path):
    assert set(memplan.BOARDS) == {"pi4-2gb", "pi4-4gb", "pi4-8gb", "pi5-4gb", "pi5-8gb", "pi5-16gb", "zero2w"}
    for b in memplan.BOARDS.values():
        assert 0 < b.usable_bytes < b.ram_bytes and b.cores == 4 and b.llama_cpu_flags
    assert memplan.BOARDS["pi5-8gb"].cpu == "cortex-a76" and memplan.BOARDS["pi5-8gb"].dotprod
    assert memplan.BOARDS["pi4-2gb"].cpu == "cortex-a72" and not memplan.BOARDS["pi4-2gb"].dotprod
    est = memplan.estimate(default_model_path, 4096)
    ok = memplan.check_fit(est, "pi4-2gb")
    assert ok.fits and ok.headroom_bytes == ok.usable_bytes - est.total_bytes > 0
    with pytest.raises(UsageError, match="unknown board"):
        memplan.check_fit(est, "pi3")


def test_refusal_has_the_numbers_and_a_suggestion_that_fits(default_model_path):
    est = memplan.estimate(default_model_path, 8192)
    report = memplan.check_fit(est, "zero2w")
    assert not report.fits and report.headroom_bytes < 0
    ctx = int(next(s for s in report.suggestions if s.startswith("--ctx")).split()[1])
    assert memplan.check_fit(memplan.estimate(default_model_path, ctx), "zero2w").fits
    assert not memplan.check_fit(memplan.estimate(default_model_path, ctx + 256), "zero2w").fits
    with pytest.raises(InsufficientMemoryError) as e:
        memplan.require_fit(est, "zero2w")
    msg = str(e.value)
    assert f"{est.total_bytes / MiB:.0f} MiB" in msg and "330 MiB" in msg and f"--ctx {ctx}" in msg


def test_plan_cli_table_json_and_strict(default_model_path):
    r = CliRunner().invoke(cli, ["plan", str(default_model_path), "--board", "pi4-2gb", "--ctx", "4096", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["fits"][0]["board"] == "pi4-2gb" and data["fits"][0]["fits"]
    assert data["estimate"]["total_bytes"] == memplan.estimate(default_model_path, 4096).total_bytes
    r = CliRunner().invoke(cli, ["plan", str(default_model_path), "--ctx", "8192"])
    assert r.exit_code == 0 and "zero2w" in r.output and "pi5-16gb" in r.output and "kv_cache" in r.output
    from edgellm.cli import main
    with pytest.raises(SystemExit) as e:
        main(["plan", str(default_model_path), "--board", "zero2w", "--ctx", "8192", "--strict"])
    assert e.value.code == InsufficientMemoryError.exit_code


def test_estimate_is_within_15_percent_of_measured_peak_rss(default_model_path):
    """A fresh process per context: load, fill the context, generate, switch prompts (one snapshot)."""
    from memplan_accuracy import TOLERANCE, run

    result = run(default_model_path, [512, 1024])
    for row in result["rows"]:
        assert abs(row["ratio"] - 1) <= TOLERANCE, row
    assert result["target_met"]


def test_kv_cache_bytes_rejects_unknown_types(default_model_path):
    with pytest.raises(UsageError):
        memplan.kv_cache_bytes(validate_gguf(default_model_path), 1024, "q3_k")
