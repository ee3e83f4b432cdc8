"""Core ML export, the numpy MIL interpreter of the saved package, and the Core ML backend.

Off macOS nothing can run a Core ML model, so every check here reads the *saved* .mlpackage back (its MIL
program and weight blobs, through coremltools' own reader) and runs it with edgellm's interpreter. The real
default model is exported once per session (f16 through the CLI, int4 through the API); the llama.cpp side of
the parity checks is an F32 GGUF written from the same checkpoint. Random-weight checkpoints of the other
architectures (tied/untied, q/k/v biases) check the graph against transformers in seconds. Tests that need
Core ML itself (macOS 15+, marker `apple`) are here too and skip elsewhere; .github/workflows/apple.yml runs them.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm.errors import BackendError, EdgeLLMError, InvalidModelError, UnsupportedModelError, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from device_fixtures import load_fixture
from model_fixtures import COREML_CTX

ON_MAC = sys.platform == "darwin"
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS 15+: coremltools cannot predict on "
                                                 f"{sys.platform} (the MIL interpreter tests cover the package here)")
APPLE_SILICON = pytest.mark.skipif(not (ON_MAC and __import__("platform").machine() == "arm64"),
                                   reason="needs an Apple-silicon Mac (Metal GPU, Neural Engine)")
PROMPT = "The three most important things to know about growing tomatoes are"
CTX = COREML_CTX   # the int4 package is the shared fixture's
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cm_pkgs(default_model_path, coreml_int4, f32_gguf, module_tmp):
    """f16 via `edgellm convert --format coreml` (CLI), int4 via the API (shared with the iOS packaging tests),
    an F32 GGUF of the same weights."""
    from click.testing import CliRunner

    from edgellm.cli import cli

    root = module_tmp
    res = CliRunner().invoke(cli, ["convert", str(default_model_path), "--format", "coreml", "--quant", "f16",
                                   "--ctx", str(CTX), "-o", str(root / "f16" / "model.mlpackage"), "--json"])
    assert res.exit_code == 0, res.output
    return {"root": root, "f16": root / "f16" / "model.mlpackage", "f16_summary": json.loads(res.stdout),
            "int4_res": coreml_int4, "int4": Path(coreml_int4.output), "gguf": f32_gguf}


@pytest.fixture(scope="module")
def f16_session(cm_pkgs):
    from edgellm.runtime_coreml import load_coreml

    s = load_coreml(cm_pkgs["f16"], device="interpreter", n_ctx=CTX,
                    session_kw={"disk_cache": False, "sampler": edgellm.GREEDY})
    yield s
    s.close()


def greedy(backend, tokens: list[int], n: int) -> list[int]:
    backend.truncate(0)
    backend.eval(tokens)
    out = []
    for _ in range(n):
        t = backend.sample(edgellm.GREEDY)
        out.append(t)
        backend.eval([t])
    return out


# -- the real default model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_swift_transformers_contract(cm_pkgs):
    """Names, dtypes, shapes and flexible ranges swift-transformers' LanguageModelWithStatefulKVCache reads;
    the side files its LanguageModelConfigurationFromHub reads; edgellm's manifest in the metadata."""
    from edgellm.runtimes.coreml_package import HF_NAME_KEY, MANIFEST_KEY, io_contract, load_spec

    spec = load_spec(cm_pkgs["f16"])
    io = io_contract(spec)
    assert io["inputs"]["inputIds"]["dtype"] == "INT32" and io["inputs"]["inputIds"]["ranges"] == [[1, 1], [1, CTX]]
    mask = io["inputs"]["causalMask"]
    assert mask["dtype"] == "FLOAT16" and mask["ranges"] == [[1, 1], [1, 1], [1, CTX], [1, CTX]]
    assert io["states"] == {n: {"dtype": "FLOAT16", "shape": [30, 1, 3, CTX, 64]} for n in ("keyCache", "valueCache")}
    assert io["outputs"] == {"logits": {"dtype": "FLOAT16"}}
    meta = spec.description.metadata.userDefined
    facts = json.loads(meta[MANIFEST_KEY])
    assert meta[HF_NAME_KEY] and facts["format"] == "edgellm-coreml" and facts["context_length"] == CTX
    assert facts["quant"] == "f16" and len(facts["source_fingerprint"]) == 64 and facts["chat_template"]
    folder = cm_pkgs["f16"].parent
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    assert cfg["eos_token_id"] == facts["special_ids"]["eos"]
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    assert (folder / "tokenizer.json").is_file()
    summary = cm_pkgs["f16_summary"]
    assert summary["settings"]["format"] == "coreml" and summary["states"]["keyCache"] == [30, 1, 3, CTX, 64]


@pytest.mark.slow
def test_graph_structure(cm_pkgs):
    """One fused SDPA per layer; no K/V tile (grouped queries folded); the state written in place per layer;
    int4: every linear/gather weight compressed, nothing else (the RoPE tables stay exact fp16)."""
    from edgellm.runtimes.coreml_package import compressed_consumers, load_spec, op_histogram

    f16, int4 = load_spec(cm_pkgs["f16"]), load_spec(cm_pkgs["int4"])
    ops = op_histogram(f16)
    assert ops["scaled_dot_product_attention"] == 30 and ops["slice_update"] == 60 and ops["write_state"] == 60
    assert ops.get("tile", 0) == 1            # the mask's, once per call; never K/V
    assert "constexpr_blockwise_shift_scale" not in ops
    q = op_histogram(int4)
    assert q["constexpr_blockwise_shift_scale"] == 121    # 30 × (qkv, o, gate_up, down) + the tied table
    assert compressed_consumers(int4) == {"linear", "gather"}
    res = cm_pkgs["int4_res"]
    assert res.rounding == "gptq" and 4.2 < res.to_dict()["bits_per_weight"] < 4.6


@pytest.mark.slow
def test_int4_blocks_read_back_equal_what_edgellm_chose(cm_pkgs):
    from edgellm.converters.coreml_graph import quant_arrays
    from edgellm.converters.coreml_quant import compressed_weights

    stored = compressed_weights(cm_pkgs["int4"])
    chosen = cm_pkgs["int4_res"].quantized
    assert len(stored) == len(chosen) == 121
    for tag in ("model.layers.0.self_attn.qkv_proj", "model.layers.29.mlp.down_proj", "lm_head"):
        got = stored[tag.replace(".", "_") + "_weight"]
        data, scale, offset = quant_arrays(chosen[tag])
        assert np.array_equal(got["data"], data) and np.array_equal(got["offset"], offset)
        assert np.array_equal(got["scale"], scale) and got["data"].max() <= 15
        want = chosen[tag].dequantize()
        assert np.allclose(got["dense"].astype(np.float32), want, rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_f16_parity_with_llama_cpp_f32(cm_pkgs, f16_session):
    """Cosine ≥ 0.999 with llama.cpp's F32 logits at every position; greedy 32 tokens identical."""
    with edgellm.load(cm_pkgs["gguf"], n_ctx=CTX, disk_cache=False, threads=2) as ref:
        ids = ref.tokenize(PROMPT)
        ref.backend.truncate(0)
        want = ref.backend.eval_all_logits(ids)
        ref_tokens = greedy(ref.backend, ids, 32)
    backend = f16_session.backend
    backend.truncate(0)
    got = backend.eval_all_logits(ids)
    assert cosine(got, want).min() >= 0.999
    assert greedy(backend, ids, 32) == ref_tokens


@pytest.mark.slow
def test_prefill_then_decode_equals_full_evaluation(f16_session):
    b = f16_session.backend
    ids = f16_session.tokenize(PROMPT + " sunlight, water and soil.")
    b.truncate(0)
    full = b.eval_all_logits(ids)
    b.truncate(0)
    k = len(ids) // 2
    parts = [b.eval_all_logits(ids[:k])] + [b.eval_all_logits([t]) for t in ids[k:]]
    step = np.concatenate(parts)
    assert np.array_equal(step.argmax(-1), full.argmax(-1))
    assert cosine(step, full).min() > 0.9999 and np.abs(step - full).max() < 0.25   # fp16 accumulation order only
    # truncating then re-evaluating overwrites the dropped positions: the same steps give the same logits
    b.truncate(k)
    again = np.concatenate([b.eval_all_logits([t]) for t in ids[k:]])
    assert np.array_equal(again, step[k:])


@pytest.mark.slow
def test_state_save_restore_and_chat_through_session(cm_pkgs, f16_session):
    from edgellm.runtime_coreml import load_coreml

    b = f16_session.backend
    ids = f16_session.tokenize(PROMPT)
    b.truncate(0)
    b.eval(ids[:-1])
    saved = b.save_state()
    assert len(saved) == 2 * 30 * 3 * (len(ids) - 1) * 64 * 2
    b.eval(ids[-1:])
    want = b.logits()
    with load_coreml(cm_pkgs["f16"], device="interpreter", n_ctx=CTX, session_kw={"disk_cache": False}) as other:
        other.backend.load_state(saved, len(ids) - 1)
        other.backend.eval(ids[-1:])
        assert np.array_equal(other.backend.logits(), want)
        with pytest.raises(BackendError):
            other.backend.load_state(saved[:-2], len(ids) - 1)
    f16_session.reset()
    answer = f16_session.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    assert "Paris" in answer.text


@pytest.mark.slow
def test_int4_beats_coremltools_round_to_nearest_at_no_larger_size(cm_pkgs, f16_session):
    """edgellm's GPTQ int4 against coremltools' own int4 recipe (RTN, symmetric, blocks of 32) on the same f16
    program: closer to the f16 package's predictions on held-out text, in fewer bytes."""
    from coremltools.models import MLModel

    from edgellm.converters.coreml_export import save_package
    from edgellm.converters.coreml_quant import coremltools_int4
    from edgellm.converters.evaluate import compare_logits
    from edgellm.runtime_coreml import load_coreml
    from edgellm.runtimes.coreml_package import package_bytes
    from edgellm.texts import heldout_text

    anchor = cm_pkgs["root"] / "anchor" / "model.mlpackage"
    save_package(coremltools_int4(MLModel(str(cm_pkgs["f16"]), skip_model_load=True)), anchor)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cm_pkgs["f16"].parent / name, anchor.parent / name)
    ids = f16_session.tokenize(heldout_text()[:3000])[:200]
    f16_session.backend.truncate(0)
    ref = f16_session.backend.eval_all_logits(ids)
    kld, top1 = {}, {}
    for name, pkg in (("int4", cm_pkgs["int4"]), ("anchor", anchor)):
        with load_coreml(pkg, device="interpreter", n_ctx=CTX, session_kw={"disk_cache": False}) as q:
            got = q.backend.eval_all_logits(ids)
        k, agree, _, _ = compare_logits(ref[20:-1], got[20:-1], np.asarray(ids[21:]))
        kld[name], top1[name] = float(k.mean()), float(agree.mean())
    assert kld["int4"] < 0.8 * kld["anchor"] and top1["int4"] > 0.6, (kld, top1)
    assert package_bytes(cm_pkgs["int4"]) <= package_bytes(anchor)


@pytest.mark.slow
def test_edgellm_eval_scores_a_coreml_package(cm_pkgs):
    """`edgellm eval PKG --ref F32.gguf` runs the package in the interpreter through the same evaluation code."""
    from click.testing import CliRunner

    from edgellm.cli import cli

    res = CliRunner().invoke(cli, ["eval", str(cm_pkgs["f16"]), "--ref", str(cm_pkgs["gguf"]), "--ctx", "128",
                                   "--chunks", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["tokens_scored"] == 63 and r["mean_kld"] < 0.01 and r["top1_agreement"] > 0.95
    assert 15.9 < r["bits_per_weight"] < 16.2


# -- random-weight checkpoints of the other architectures (fast) ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(module_tmp):
    from test_checkpoint import bpe_tokenizer, make_hf

    root = module_tmp / "tiny"
    out = {}
    for case, arch, pre, kw in (("llama-tied", "llama", "smollm", {"tie_word_embeddings": True}),
                                ("qwen2-bias", "qwen2", "qwen2", {"tie_word_embeddings": False})):
        out[case] = (make_hf(root / case, arch, bpe_tokenizer(pre), **kw), root / case)
    return out


@pytest.mark.parametrize("case", ["llama-tied", "qwen2-bias"])
def test_interpreter_matches_transformers_on_random_checkpoints(tiny_models, tmp_path, case):
    import torch

    from edgellm.converters.coreml_export import export_coreml
    from edgellm.converters.hf_source import read_hf
    from edgellm.runtimes.coreml_backend import CoreMLBackend, MilEngine

    model, hf = tiny_models[case]
    res = export_coreml(read_hf(hf), tmp_path / "m.mlpackage", quant="f16", ctx=64)
    ids = list(range(3, 40, 2))
    with torch.no_grad():
        want = model.float()(torch.tensor([ids])).logits[0].numpy()
    b = CoreMLBackend(res.output, MilEngine(Path(res.output)), n_ctx=64)
    got = b.eval_all_logits(ids)
    assert cosine(got, want).min() > 0.999
    q = export_coreml(read_hf(hf), tmp_path / "q.mlpackage", quant="int8", ctx=64, calib_text="hello world " * 100)
    assert q.rounding == "gptq"
    got8 = CoreMLBackend(q.output, MilEngine(Path(q.output)), n_ctx=64).eval_all_logits(ids)
    assert cosine(got8, want).min() > 0.99


# -- plans --------------------------------------------------------------------------------------------------
def test_plan_per_device_fixture(tiny_pkg, tmp_path, monkeypatch):
    from edgellm.runtime_coreml import CHECK_HINT, compute_device, plan_coreml

    pkg = _tiny_package(tiny_pkg, tmp_path)
    m2 = load_fixture("mac-m2")
    plan, _ = plan_coreml(pkg, profile=m2)
    assert plan.backend == "coreml" and plan.device == "ane" and compute_device(plan, "auto") == "ane"
    assert any("Neural Engine" in r for r in plan.reasons)
    cpu, _ = plan_coreml(pkg, profile=m2, device="cpu")
    assert cpu.device == "cpu" and compute_device(cpu, "cpu") == "cpu"
    for name in ("x86-avx512", "rpi5", "android-pixel"):
        with pytest.raises(BackendError) as e:
            plan_coreml(pkg, profile=load_fixture(name))
        assert "Apple" in str(e.value) and "interpreter" in str(e.value) and CHECK_HINT[:20] in str(e.value)
    interp, _ = plan_coreml(pkg, profile=load_fixture("x86-avx512"), device="interpreter")
    assert interp.device == "interpreter" and "interpreter" in interp.reasons[0]
    with pytest.raises(BackendError):
        plan_coreml(pkg, profile=m2, device="nnapi")


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pkg(module_tmp) -> Path:
    """A small real edgellm package (random 2-layer Llama, its HF checkpoint beside it), made once per file."""
    from test_checkpoint import bpe_tokenizer, make_hf

    from edgellm.converters.coreml_export import export_coreml
    from edgellm.converters.hf_source import read_hf

    root = module_tmp / "tiny-pkg"
    make_hf(root / "hf", "llama", bpe_tokenizer("smollm"), tie_word_embeddings=True)
    export_coreml(read_hf(root / "hf"), root / "out" / "tiny.mlpackage", quant="f16", ctx=32)
    return root / "out" / "tiny.mlpackage"


def _tiny_package(tiny_pkg: Path, tmp_path: Path) -> Path:
    """A copy of the tiny package that a test may break."""
    dest = tmp_path / "copy"
    shutil.copytree(tiny_pkg.parent, dest)
    return dest / "tiny.mlpackage"


def test_off_macos_load_refuses_and_says_how_to_check(tiny_pkg, tmp_path):
    from edgellm.runtime_coreml import load_coreml

    pkg = _tiny_package(tiny_pkg, tmp_path)
    if ON_MAC:
        pytest.skip("on macOS Core ML runs the package")
    with pytest.raises(BackendError) as e:
        load_coreml(pkg)
    msg = str(e.value)
    assert "\n" not in msg and "Apple" in msg and "device='interpreter'" in msg and "edgellm eval" in msg
    with load_coreml(pkg, device="interpreter", session_kw={"disk_cache": False}) as s:
        from edgellm.runtimes.base import Backend
        assert isinstance(s.backend, Backend)      # the protocol the Session (chat, serve one-at-a-time) uses
        assert s.plan.device == "interpreter" and s.backend.n_ctx == 32
        s.backend.eval([1, 2, 3])
        assert s.backend.logits().shape == (s.backend.n_vocab,)


@pytest.mark.parametrize("how, error, words", [
    ("truncated weights", InvalidModelError, ["truncated or corrupt"]),
    ("no spec", InvalidModelError, ["model.mlmodel"]),
    ("garbage manifest", InvalidModelError, ["Manifest.json"]),
    ("manifest escapes", InvalidModelError, ["outside the package"]),
    ("no manifest", InvalidModelError, ["not a Core ML package"]),
    ("garbage spec", InvalidModelError, ["model.mlmodel"]),
    ("foreign", UnsupportedModelError, ["not written by edgellm", "edgellm convert --format coreml"]),
])
def test_bad_packages_fail_with_one_line_errors(tiny_pkg, tmp_path, how, error, words):
    from edgellm.runtime_coreml import load_coreml

    pkg = _tiny_package(tiny_pkg, tmp_path)
    data = pkg / "Data" / "com.apple.CoreML"
    if how == "truncated weights":
        blob = data / "weights" / "weight.bin"
        with open(blob, "r+b") as f:
            f.truncate(blob.stat().st_size // 2)
    elif how == "no spec":
        (data / "model.mlmodel").unlink()
    elif how == "garbage manifest":
        (pkg / "Manifest.json").write_text("{not json")
    elif how == "manifest escapes":
        m = json.loads((pkg / "Manifest.json").read_text())
        for e in m["itemInfoEntries"].values():
            e["path"] = "../../../../etc/" + e["name"]
        (pkg / "Manifest.json").write_text(json.dumps(m))
    elif how == "no manifest":
        (pkg / "Manifest.json").unlink()
    elif how == "garbage spec":
        (data / "model.mlmodel").write_bytes(b"\x08\x09garbage" * 100)
    elif how == "foreign":
        _strip_manifest(pkg)
    with pytest.raises(error) as e:
        load_coreml(pkg, device="interpreter", session_kw={"disk_cache": False})
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def _strip_manifest(pkg: Path) -> None:
    """The same package without edgellm's metadata: what a package from another tool looks like to edgellm."""
    import coremltools as ct

    from edgellm.runtimes.coreml_package import MANIFEST_KEY

    spec = ct.utils.load_spec(str(pkg))
    del spec.description.metadata.userDefined[MANIFEST_KEY]
    other = pkg.with_name("foreign.mlpackage")
    ct.utils.save_spec(spec, str(other), weights_dir=str(pkg / "Data" / "com.apple.CoreML" / "weights"))
    shutil.rmtree(pkg)
    other.rename(pkg)


def test_bad_conversion_options(tiny_pkg, tmp_path, monkeypatch):
    from dataclasses import replace

    from edgellm.converters.coreml_export import check_options, export_coreml
    from edgellm.converters.hf_source import read_hf
    from edgellm.runtimes import coreml_package

    with pytest.raises(UsageError, match="int4, int8, f16, palette4"):
        check_options(8192, "q4_k_m", None)
    with pytest.raises(UsageError, match="longer than the model's 8192"):
        check_options(8192, "int4", 16384)
    assert check_options(256, "auto", None) == ("int4", 256)
    src = tiny_pkg.parent.parent / "hf"
    ckpt = read_hf(src)
    with pytest.raises(UsageError, match=r"\*\.mlpackage"):
        export_coreml(ckpt, tmp_path / "x.mlmodel")
    big = replace(ckpt, config=replace(ckpt.config, num_hidden_layers=200, num_key_value_heads=32, head_dim=128,
                                       max_position_embeddings=8192))
    with pytest.raises(UsageError, match="KV state"):
        export_coreml(big, tmp_path / "big.mlpackage", ctx=8192)
    phi = replace(ckpt, config=replace(ckpt.config, architecture="phi3"))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        export_coreml(phi, tmp_path / "phi.mlpackage")
    # the folder holds another model's tokenizer: refuse rather than overwrite it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="another model"):
        export_coreml(ckpt, tmp_path / "other" / "m.mlpackage", quant="f16", ctx=32)
    # coremltools missing, or a numpy it cannot run on
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(BackendError, match=r"pip install 'edgellm\[coreml\]'"):
        coreml_package.coremltools()
    monkeypatch.undo()
    monkeypatch.setattr(np, "__version__", "2.4.1")
    with pytest.raises(UsageError, match="numpy < 2.4"):
        coreml_package.coremltools()


def test_cli_convert_options_are_checked_before_work(tmp_path, default_model_path):
    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["convert", str(default_model_path), "--ctx", "512", "-o", str(tmp_path / "x.gguf")])
    assert isinstance(r.exception, UsageError) and "--format coreml" in str(r.exception)
    r = CliRunner().invoke(cli, ["convert", str(default_model_path), "--format", "coreml", "--quant", "q4_0",
                                 "-o", str(tmp_path / "x.mlpackage")])
    assert isinstance(r.exception, UsageError) and "palette4" in str(r.exception)
    (tmp_path / "y.mlpackage").mkdir()
    r = CliRunner().invoke(cli, ["convert", str(default_model_path), "--format", "coreml",
                                 "-o", str(tmp_path / "y.mlpackage")])
    assert isinstance(r.exception, UsageError) and "--force" in str(r.exception)


def test_interpreter_refuses_unknown_ops(tmp_path):
    """An op the interpreter does not know is reported by name, not executed wrongly."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from edgellm.runtimes.mil_interp import MilProgram

    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.erf(x=x, name="y")

    m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    m.save(str(tmp_path / "erf.mlpackage"))
    with pytest.raises(UnsupportedModelError, match="'erf'"):
        MilProgram(tmp_path / "erf.mlpackage")


def test_errors_are_edgellm_errors():
    assert all(issubclass(e, EdgeLLMError) for e in (BackendError, InvalidModelError, UnsupportedModelError))


# -- macOS only (run by .github/workflows/apple.yml) -------------------------------------------------------
@pytest.mark.apple
@MAC_ONLY
def test_coreml_predictions_equal_the_interpreter(tiny_pkg, tmp_path):
    from edgellm.runtime_coreml import load_coreml

    pkg = _tiny_package(tiny_pkg, tmp_path)
    ids = list(range(3, 30))
    with load_coreml(pkg, session_kw={"disk_cache": False}) as s, \
            load_coreml(pkg, device="interpreter", session_kw={"disk_cache": False}) as ref:
        assert s.backend.name == "coreml" and s.plan.device in ("ane", "cpu")
        got, want = s.backend.eval_all_logits(ids), ref.backend.eval_all_logits(ids)
        assert cosine(got, want).min() > 0.999
        # the KV state through MLState.read_state / write_state
        s.backend.truncate(10)
        saved = s.backend.save_state()
        s.backend.eval(ids[10:12])
        a = s.backend.logits()
        s.backend.load_state(saved, 10)
        s.backend.eval(ids[10:12])
        assert cosine(s.backend.logits(), a) > 0.9999


@pytest.mark.apple
@MAC_ONLY
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_coreml_chat_on_the_default_model(tmp_path, default_model_path, device):
    from edgellm.converters.coreml_export import convert_to_coreml
    from edgellm.runtime_coreml import load_coreml

    res = convert_to_coreml(str(default_model_path), tmp_path / "m.mlpackage", quant="int4", ctx=512)
    with load_coreml(res.output, device=device, session_kw={"disk_cache": False, "sampler": edgellm.GREEDY}) as s:
        assert s.plan.backend == "coreml"
        c = s.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
        assert "Paris" in c.text


@pytest.mark.apple
@APPLE_SILICON
def test_llama_cpp_metal_matches_cpu(default_model_path):
    """llama.cpp with every layer on the Apple GPU: same greedy answer as its CPU kernels."""
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    with edgellm.load(default_model_path, device="metal", disk_cache=False, sampler=edgellm.GREEDY) as gpu, \
            edgellm.load(default_model_path, device="cpu", disk_cache=False, sampler=edgellm.GREEDY) as cpu:
        assert gpu.plan.device == "metal" and gpu.plan.gpu_layers == -1
        assert "Paris" in gpu.chat(prompt, max_tokens=16).text
        assert cosine(gpu.logits("The capital of France is"), cpu.logits("The capital of France is")) > 0.99
