"""Shared fixtures: the real default model (pulled once into the user's store) and a loaded session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# one llama.cpp / onnxruntime thread: tests run a client and a server (or a browser, an emulator) side by side
# on 2 cores, and a step's threads wait at a barrier for the slowest one, so 2 threads that share a core with
# the test's own work crawl (34x slower decode measured beside one busy process; docs/reliability.md)
os.environ.setdefault("EDGELLM_THREADS", "1")
# chat/run/serve measure the fastest backend on first use; tests run the model they name unless they opt in
os.environ.setdefault("EDGELLM_OPTIMIZE", "0")

# session-scoped fixtures shared by several test files: the Raspberry Pi bundle, the pruning teacher
pytest_plugins = ["deploy_fixtures", "prune_fixtures"]


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from edgellm import store

    return store.pull(store.DEFAULT_ALIAS, quiet=True)


@pytest.fixture(scope="session")
def llm(default_model_path):
    """The real default model, greedy by default, no disk cache (tests that need one make their own)."""
    import edgellm

    session = edgellm.load(default_model_path, n_ctx=2048, disk_cache=False, sampler=edgellm.GREEDY)
    yield session
    session.close()
