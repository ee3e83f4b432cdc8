"""The Raspberry Pi bundle the deploy tests share: built once per test run (the aarch64 llama.cpp
build it needs is cached under the user cache dir, so only the first run ever compiles)."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEM_PROMPT = "You are a helpful assistant at the information desk of a science museum."
QUESTION = "What is the capital of France?"
BOARD = "pi5-8gb"
N_CTX = 512


@dataclass(frozen=True)
class PiBundle:
    path: Path
    report: object  # edgellm.deploy.bundle.BundleReport
    spec: object  # edgellm.deploy.bundle.BundleSpec
    model: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pi_bundle(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> PiBundle:
    from edgellm.deploy.bundle import BundleSpec, build_bundle
    from edgellm.deploy.crossbuild import toolchain_version

    toolchain_version()  # a clear error naming the apt packages when .ci/setup.sh has not run
    out = tmp_path_factory.mktemp("deploy") / "kiosk"
    spec = BundleSpec(board=BOARD, n_ctx=N_CTX, system_prompt=SYSTEM_PROMPT, port=free_port(), tar=True)
    return PiBundle(out, build_bundle(default_model_path, out, spec), spec, default_model_path)
