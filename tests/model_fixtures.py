"""Session fixtures for the converted forms of the default model that several test files read.

The dequantized checkpoint and its F32 GGUF were each built by up to seven files, the fused f32 ONNX graph by two:
about a minute and a half of a CI run. The int4 ONNX and Core ML exports live here beside them. Tests only read
these; a test that needs to change one copies it first.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shipped_ckpt(default_model_path):
    """The shipped GGUF read as a checkpoint, and its dequantized float32 weights (cached by weight_getter)."""
    from edgellm.converters.calibrate import weight_getter
    from edgellm.converters.gguf_source import read_gguf

    ckpt = read_gguf(default_model_path)
    return ckpt, weight_getter(ckpt)


@pytest.fixture(scope="session")
def f32_gguf(shipped_ckpt, tmp_path_factory) -> Path:
    """The same weights as an F32 GGUF: the reference that exports are compared with on llama.cpp."""
    from edgellm.converters.gguf_writer import write_gguf

    path = tmp_path_factory.mktemp("f32-gguf") / "f32.gguf"
    write_gguf(shipped_ckpt[0], path, "F32")
    return path


@pytest.fixture(scope="session")
def fused_f32_onnx(shipped_ckpt, tmp_path_factory) -> Path:
    """The fused float32 ONNX graph (its batch rows equal single steps)."""
    from edgellm.converters.onnx_export import export_onnx

    ckpt, weights = shipped_ckpt
    return Path(export_onnx(ckpt, tmp_path_factory.mktemp("onnx-f32") / "fused-f32", flavour="fused", quant="f32",
                            weights=weights).output)


@pytest.fixture(scope="session")
def onnx_int4(shipped_ckpt, tmp_path_factory) -> Path:
    """The fused int4 ONNX export (GPTQ on a short calibration: the tests check the format, not its quality)."""
    from edgellm.converters.onnx_export import export_onnx

    ckpt, weights = shipped_ckpt
    return Path(export_onnx(ckpt, tmp_path_factory.mktemp("onnx-int4") / "fused-int4", flavour="fused", quant="int4",
                            weights=weights, calib_tokens=256).output)


COREML_CTX = 256


@pytest.fixture(scope="session")
def coreml_int4(default_model_path, tmp_path_factory):
    """The int4 Core ML package as `edgellm convert --format coreml` makes it (256-token context, 512 calibration
    tokens), beside the f16 one of tests/test_coreml.py."""
    from edgellm.converters.coreml_export import convert_to_coreml  # coremltools: in the test extra, never skipped

    return convert_to_coreml(str(default_model_path), tmp_path_factory.mktemp("coreml-int4") / "model.mlpackage",
                             ctx=COREML_CTX, calib_tokens=512)
