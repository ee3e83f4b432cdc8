"""The memory planner against real processes where it matters: at 4096 tokens of context, per part
(weights, KV cache, compute buffer, each against what llama.cpp itself reports allocating) and in total
(against the peak RSS of a fresh process that fills the context), and on a second model shape (a random-weight
checkpoint of another size and head layout), so the ±15 % target is not only met on the model the planner's
constants were fitted on; that one at 1024 and 4096, so a term that grows wrongly with the context fails too.
benchmarks/memplan_accuracy.py does the measuring (and the benchmark adds 8192 on the default model: filling it took
a minute of every CI run); this holds it to its targets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memplan_accuracy import PART_TOLERANCE, TOLERANCE, run, second_shape_model  # noqa: E402

pytestmark = pytest.mark.slow


def _check(result: dict) -> None:
    for row in result["rows"]:
        print(f"\n{result['model']} ctx {row['n_ctx']}: estimate {row['estimate_mib']} MiB, peak "
              f"{row['measured_peak_mib']} MiB ({row['ratio']}); parts {row['parts_mib']}; buffers "
              f"{row['buffers_mib']} vs llama.cpp {row['llama_cpp_parts_mib']}")
        assert abs(row["ratio"] - 1) <= TOLERANCE, row
        assert set(row["part_ratios"]) == {"weights", "kv_cache", "compute"}, row["llama_cpp_parts_mib"]
        for part, ratio in row["part_ratios"].items():
            assert abs(ratio - 1) <= PART_TOLERANCE, (part, row)


def test_default_model_at_4096_in_total_and_per_part(default_model_path):
    _check(run(default_model_path, [4096]))


def test_a_second_model_shape(default_model_path, tmp_path):
    model, shape = second_shape_model(tmp_path, default_model_path)
    result = run(model, [1024, 4096], shape=shape)
    assert result["shape"].startswith("random weights")
    _check(result)
