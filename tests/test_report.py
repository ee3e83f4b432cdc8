"""benchmarks/report.py: benchmarks/README.md is rendered from benchmarks/out/*.json alone — every section names
its command, machine and anchor, targets show PASS/FAIL as the scripts reported them, a missing JSON says how
to produce it, and `--check` fails when the README is stale. Also: the committed README is up to date."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

META = {"command": "python benchmarks/runtime_bench.py --threads 2 --rounds 5",
        "machine": {"cpu": "Test CPU", "logical_cores": 2, "ram_gib": 24.0, "os": "Linux x86_64", "simd": ["avx2"]},
        "load_average_start": [1.5, 1.0, 1.0], "load_average_end": [2.5, 1.0, 1.0], "date_utc": "2026-01-01 10:00"}


def _write(tmp: Path, name: str, data: dict) -> None:
    (tmp / f"{name}.json").write_text(json.dumps(data))


@pytest.fixture()
def out_dir(tmp_path):
    _write(tmp_path, "runtime_bench", {
        "threads": 2, "rounds": 5, "flash_attn": False, "settings": {"n_prompt": 512, "n_gen": 128},
        "edgellm": {"pp_tps": 260.3, "tg_tps": 112.0, "session_decode_tps": 109.8},
        "llama_bench": {"pp_tps": 260.6, "tg_tps": 114.9}, "llama_cpp_python": {"pp_tps": 260.5, "tg_tps": 110.0},
        "ceiling_tps": 316.0, "bandwidth": {"bandwidth_gbs": 31.0}, "pct_of_ceiling": {"edgellm": 35.4,
                                                                                        "llama_bench": 36.3},
        "ttft": {"cold_s": 3.7, "warm_s": 0.13, "restart_s": 0.2, "without_state_s": 1.6, "shipped_state_s": 0.075,
                 "cold_prompt_tokens": 904, "system_prompt_tokens": 395, "restart_peak_rss_mb": 300},
        "peak_rss_mb": 517,
        "targets": [{"target": "decode_vs_llama_bench", "what": "edgellm decode vs llama-bench tg", "bound": "≥ 0.97",
                     "value": 0.969, "pass": False},
                    {"target": "ttft", "what": "TTFT warm / cold", "bound": "≤ 0.1", "value": 0.035, "pass": True}],
        "meta": META})
    _write(tmp_path, "onnx_bench", {
        "threads": 2, "rounds": 3, "n_gen": 128, "kld_chunks": 8, "onnxruntime": "1.32.0",
        "builder_variants": {"builder": [], "builder_kquant": ["algo_config=k_quant"]},
        "quality": {"int4": {"bytes": 79.2e6, "mean_kld": 0.217, "top1": 0.757},
                    "builder": {"bytes": 86.5e6, "mean_kld": 0.379, "top1": 0.662}},
        "speed": {"tps": {"int4": 258.0, "builder_in_genai": 252.0}, "ratios": {"int4_vs_builder_in_genai": 1.02},
                  "busy_before_round": [0.02]},
        "targets": {"int4_kld_vs_builder": {"what": "edgellm int4 KLD / builder int4 KLD", "value": 0.57,
                                            "bound": "≤ 0.75", "met": True}}})   # no meta: an older run
    _write(tmp_path, "brand_new_bench", {"speedup": 1.7, "notes": "x", "meta": META})
    return tmp_path


def test_sections_carry_command_machine_anchor_and_verdicts(out_dir):
    text = report.build(out_dir)
    runtime = text.split("## Runtime")[1].split("\n## ")[0]
    assert "Reproduce: `python benchmarks/runtime_bench.py --threads 2 --rounds 5`" in runtime
    assert "Test CPU, 2 logical cores, 24.0 GiB, Linux x86_64 (avx2)" in runtime
    assert "load average 1.5 at the start, 2.5 at the end" in runtime
    assert "Anchor: llama.cpp's C++ llama-bench" in runtime
    assert "| edgellm decode vs llama-bench tg | ≥ 0.97 | 0.969 | **FAIL** |" in runtime
    assert "| TTFT warm / cold | ≤ 0.1 | 0.035 | **PASS** |" in runtime
    assert "| decode tg128 (tok/s) | 112.0 | 114.9 | 110.0 |" in runtime
    onnx = text.split("## ONNX export")[1].split("\n## ")[0]
    assert "Machine: not recorded in the JSON" in onnx
    assert "Reproduce: `python benchmarks/onnx_bench.py" in onnx      # the section's default command
    assert "| edgellm int4 KLD / builder int4 KLD | ≤ 0.75 | 0.57 | **PASS** |" in onnx
    assert "algo_config=k_quant" in onnx and "0.57×" in onnx


def test_a_missing_json_says_how_to_produce_it_and_an_unknown_one_still_shows(out_dir):
    text = report.build(out_dir)
    serve = text.split("## Serving")[1].split("\n## ")[0]
    assert "Not measured yet: `python benchmarks/serve_bench.py" in serve
    assert "writes `benchmarks/out/serve_bench.json`" in serve
    assert "## Brand new bench" in text and "| speedup | 1.7 |" in text
    for sec in report.SECTIONS:
        assert f"## {sec.title}" in text


def test_every_known_json_shape_renders_without_errors(tmp_path):
    """Partial or older JSON (missing keys) degrades to dashes, never to a crash."""
    for sec in report.SECTIONS:
        _write(tmp_path, sec.name, {"meta": META})
    text = report.build(tmp_path)
    assert "Not measured yet" not in text and text.count("Reproduce: `python benchmarks/runtime_bench.py") >= 1
    (tmp_path / "quant_quality.json").write_text("{not json")
    assert "is unreadable" in report.build(tmp_path)


def test_quant_table_shows_both_llama_cpp_anchors(tmp_path):
    rows = [{"quant": "Q4_K_M", "variant": v, "bytes": 124.9e6, "bpw": 6.14, "ppl": 24.0, "mean_kld": k,
             "p99_kld": 0.4, "top1": 0.85} for v, k in (("llama.cpp", 0.0776), ("llama.cpp+imatrix", 0.0700),
                                                          ("edgellm", 0.0704))]
    _write(tmp_path, "quant_quality", {"settings": {"ctx": 512, "max_chunks": 4, "scored_tokens": 1020},
                                       "references": {"rotated": {"rows": rows, "targets": [
                                           {"what": "vs llama.cpp+imatrix", "bound": 0.5, "value": 0.503,
                                            "edgellm_type": "mixed", "pass": False}]}}, "meta": META})
    text = report.build(tmp_path)
    assert "| Q4_K_M | edgellm | 124.9 | 6.14 | 24.000 | 0.07040 | 0.4000 | 85.00% | 0.91× | 1.01× |" in text
    assert "| rotated: vs llama.cpp+imatrix | ≤ 0.5 | 0.503 (mixed) | **FAIL** |" in text


def test_check_fails_on_a_stale_readme(out_dir, tmp_path):
    readme = tmp_path / "README.md"
    assert report.main(["--out-dir", str(out_dir), "--readme", str(readme)]) == 0
    assert report.main(["--out-dir", str(out_dir), "--readme", str(readme), "--check"]) == 0
    _write(out_dir, "brand_new_bench", {"speedup": 1.8, "meta": META})
    assert report.main(["--out-dir", str(out_dir), "--readme", str(readme), "--check"]) == 1


def test_committed_readme_is_what_the_committed_json_gives():
    assert report.main(["--check"]) == 0, "benchmarks/README.md is stale: run `make report`"
