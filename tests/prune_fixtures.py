"""Session fixtures shared by the pruning and distillation tests: the real teacher, loaded and scored once."""
from __future__ import annotations

import pytest

from edgellm.converters.gguf_source import read_gguf
from edgellm.converters.importance import compute_importance
from edgellm.converters.prune import materialize
from edgellm.converters.torch_llama import tokenize
from edgellm.texts import calibration_text


@pytest.fixture(scope="session")
def teacher(default_model_path):
    return materialize(read_gguf(default_model_path))


@pytest.fixture(scope="session")
def calib_tokens(teacher):
    return tokenize(teacher, calibration_text())[:128]


@pytest.fixture(scope="session")
def importance(teacher, calib_tokens):
    return compute_importance(teacher, calib_tokens)
