"""The quality sweep scores llama.cpp's presets and edgellm's calibrated variants, and charts them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgellm.converters.sweep import VARIANTS, plot, sweep, write_table
from edgellm.errors import UsageError

KEYS = {"variant", "quant", "bytes", "bpw", "ppl", "mean_kld", "p99_kld", "top1"}


@pytest.fixture(scope="module")
def swept(shipped_ckpt, f32_gguf, module_tmp):
    """Q4_0 and Q8_0, both variants, on one short chunk against the F32 reference of the shipped model."""
    work = module_tmp
    rows = sweep(f32_gguf, ["Q4_0", "q8_0"], ckpt=shipped_ckpt[0], calib_tokens=256, ctx=256, max_chunks=1,
                 workdir=work / "q")
    return rows, work, f32_gguf


def test_rows_have_both_variants_of_each_type(swept):
    rows, work, _ = swept
    assert [(r["quant"], r["variant"]) for r in rows] == [(q, v) for q in ("Q4_0", "Q8_0") for v in VARIANTS]
    for r in rows:
        assert set(r) == KEYS
        assert r["bytes"] > 0 and r["ppl"] > 1 and 0 <= r["mean_kld"] <= r["p99_kld"] and 0 < r["top1"] <= 1
    assert not list((work / "q").glob("*.gguf"))  # candidates are removed once scored


def test_more_bits_mean_lower_kld(swept):
    rows, _, _ = swept
    get = {(r["quant"], r["variant"]): r for r in rows}
    for v in VARIANTS:
        assert get[("Q8_0", v)]["mean_kld"] < get[("Q4_0", v)]["mean_kld"]
        assert get[("Q4_0", v)]["bpw"] < get[("Q8_0", v)]["bpw"]
    # same type, ~same size
    assert abs(get[("Q4_0", "edgellm")]["bytes"] / get[("Q4_0", "llama.cpp")]["bytes"] - 1) < 0.01


def test_table_and_plot(swept, tmp_path):
    rows, _, _ = swept
    table = write_table(rows).splitlines()
    assert table[0].startswith("| type |") and len(table) == 2 + len(rows)
    png = plot(rows, tmp_path / "sweep.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_float_and_unknown_types_are_refused(tmp_path):
    for bad in (["F16"], ["Q4_Z"], [" "]):
        with pytest.raises(UsageError):
            sweep(tmp_path / "missing.gguf", bad, workdir=tmp_path)


def _edgellm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (("eval", "m.gguf"), "missing --ref"),
    (("eval", "m.gguf", "--sweep", "Q4_0", "--ref", "r.gguf"), "--ref is not used with --sweep"),
    (("eval", "m.gguf", "--sweep", "F16,Q4_0"), "F16 is not quantized"),
    (("eval", "m.gguf", "--ref", "r.gguf", "--plot", "x.png"), "--plot goes with --sweep"),
])
def test_eval_option_errors(args, fragment):
    r = _edgellm(*args)
    assert r.returncode == 2 and r.stderr.startswith("edgellm: error:") and fragment in r.stderr, r.stderr


def test_eval_sweep_cli(swept, tmp_path):
    r = _edgellm("eval", str(swept[2]), "--sweep", "Q8_0", "--ctx", "256", "--chunks", "1", "--json",
                 "--out", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "sweep.png"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert ([row["variant"] for row in rows] == list(VARIANTS)
            and rows == json.loads((tmp_path / "rows.json").read_text()))
    assert (tmp_path / "sweep.png").stat().st_size > 1000
