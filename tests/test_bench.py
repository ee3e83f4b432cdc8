"""`edgellm bench` end to end on the real model, at tiny sizes: the figures exist, are positive, and
the KV-cache reuse they claim really happens (warm and restarted TTFT below cold).

One thread: on a shared 2-core machine two llama.cpp threads spin at every graph barrier while the
other is descheduled, so speeds collapse unpredictably; these tests check structure, not speed."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def result(default_model_path):
    from edgellm.bench import run_bench

    seen: list[tuple[int, int, str]] = []
    r = run_bench(default_model_path, threads=1, n_prompt=64, n_gen=16, repetitions=1, history_tokens=200,
                  anchor=True, progress=lambda done, total, msg: seen.append((done, total, msg)))
    r["_progress"] = seen
    return r


def test_run_bench_structure(result):
    for key in ("model", "threads", "device", "pp_tps", "tg_tps", "session_decode_tps", "ttft", "peak_rss_mb",
                "bandwidth_gbs", "ceiling_tps", "pct_of_ceiling", "anchor", "ratios", "reps"):
        assert key in result, key
    json.dumps(result)  # JSON-ready as it is
    assert result["threads"] == 1
    assert set(result["anchor"]) >= {"pp_tps", "tg_tps"}
    assert set(result["ratios"]) >= {"pp_vs_anchor", "tg_vs_anchor", "ttft_warm_vs_cold", "ttft_restart_vs_cold",
                                     "ttft_shipped_vs_without"}
    assert len(result["reps"]["tg"]) == len(result["reps"]["anchor_tg"]) == 1
    done = [d for d, _, _ in result["_progress"]]
    assert done == sorted(done) and done[-1] == result["_progress"][-1][1]  # monotonic, ends complete


def test_run_bench_numbers_are_sane(result):
    assert result["tg_tps"] > 1 and result["pp_tps"] > result["tg_tps"] / 2
    assert result["session_decode_tps"] > 1
    assert result["anchor"]["tg_tps"] > 1 and result["anchor"]["pp_tps"] > 1
    assert 0.05 < result["ratios"]["tg_vs_anchor"] < 20
    assert 20 < result["peak_rss_mb"] < 8000
    assert result["bandwidth_gbs"] > 0.1 and result["ceiling_tps"] > 1
    assert 0 < result["pct_of_ceiling"] <= 100   # a decoder cannot beat the bandwidth ceiling (check_ceiling)
    # bytes per token ≈ the model's tensor data (tied embeddings: the output matrix is read in full)
    need = result["bytes_per_token"]
    assert 0.9 * need["file_data_bytes"] <= need["weight_bytes"] <= need["file_data_bytes"]


def test_ttft_reuse_is_real(result):
    t = result["ttft"]
    assert 150 <= t["cold_prompt_tokens"] <= 260
    assert 0 < t["warm_s"] < t["cold_s"]
    assert 0 < t["restart_s"] < t["cold_s"]
    assert t["restart_cache_source"] == "disk"
    assert t["warm_evaluated_tokens"] < t["cold_prompt_tokens"] / 2  # only the new turn was evaluated
    assert t["restart_evaluated_tokens"] < t["cold_prompt_tokens"] / 2
    assert t["system_prompt_tokens"] > 50 and t["shipped_state_s"] > 0 and t["without_state_s"] > 0
    assert 20 < t["restart_peak_rss_mb"] < 8000


def test_cli_bench_json(default_model_path):
    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["bench", str(default_model_path), "--threads", "1", "--prompt", "16",
                                   "--gen", "4", "--reps", "1", "--history", "64", "--no-anchor", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["anchor"] is None and data["threads"] == 1
    assert data["tg_tps"] > 0 and data["ttft"]["cold_s"] > 0


def test_a_wrong_ceiling_fails_the_bench(default_model_path, monkeypatch, capsys):
    """Over 100 % of the bandwidth ceiling means the ceiling is wrong: the bench fails, one line, exit 7."""
    from edgellm import bench
    from edgellm.cli import main
    from edgellm.errors import BackendError

    assert bench.check_ceiling(50.0, 100.0) == 50.0
    with pytest.raises(BackendError, match="ceiling is wrong"):
        bench.check_ceiling(101.0, 100.0)
    monkeypatch.setattr(bench, "measure_bandwidth", lambda threads, **kw: {"bandwidth_gbs": 0.001, "threads": threads})
    with pytest.raises(SystemExit) as e:
        main(["bench", str(default_model_path), "--threads", "1", "--prompt", "16", "--gen", "4", "--reps", "1",
              "--history", "64", "--no-anchor", "--json"])
    err = capsys.readouterr().err
    assert e.value.code == BackendError.exit_code, err
    assert "ceiling is wrong" in err and "Traceback" not in err


def test_cli_bench_help():
    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output and "--no-anchor" in res.output and "512" in res.output
