"""Shared fixtures: the real default model (pulled once into the user's store) and a loaded session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# one llama.cpp / onnxruntime thread: tests run a client and a server (or a browser, an emulator) side by side
# on 2 cores, and a step's threads wait at a barrier for the slowest one, so 2 threads that share a core with
# the test's own work crawl (34x slower decode measured beside one busy process; docs/reliability.md)
_THREADS_SET_BY_USER = bool(os.environ.get("EDGELLM_THREADS", "").strip())
os.environ.setdefault("EDGELLM_THREADS", "1")
# chat/run/serve measure the fastest backend on first use; tests run the model they name unless they opt in
os.environ.setdefault("EDGELLM_OPTIMIZE", "0")

# session-scoped fixtures shared by several test files: the Raspberry Pi bundle, the pruning teacher, the
# converted forms of the default model (F32 GGUF, ONNX and Core ML exports)
pytest_plugins = ["deploy_fixtures", "prune_fixtures", "model_fixtures"]


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from edgellm import store

    return store.pull(store.DEFAULT_ALIAS, quiet=True)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Path:
    """A directory for one test file's shared artifacts (exports, apps, tiny checkpoints), removed when the file is
    done. Why: kept to the end of the run, every file's artifacts added up to ~12 GB of /tmp at the suite's peak,
    and a CI run on a smaller disk failed its last test (the emulated Pi's install) with ENOSPC. Per-test
    directories go as soon as a test passes (tmp_path_retention_policy = "failed" in pyproject.toml)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def llm(default_model_path):
    """The real default model, greedy by default, no disk cache (tests that need one make their own)."""
    import edgellm

    session = edgellm.load(default_model_path, n_ctx=2048, disk_cache=False, sampler=edgellm.GREEDY)
    yield session
    session.close()


# The fast tier (`make fast`, pytest -m "not slow") is what a change can be checked against in a couple of
# minutes: the parsers, planners, validators, the session on the real model. Whole files that convert or
# quantize models, start servers, browsers or emulators, package apps or measure are in the full suite only
# (their slowest tests carry @pytest.mark.slow as well). Measured in the full run of 2026-12-06.
SLOW_FILES = frozenset({
    "test_bench", "test_calibration", "test_checkpoint", "test_cli", "test_convert", "test_coreml",
    "test_deploy_board", "test_distill", "test_gguf_gptq", "test_gptq", "test_gptq_guard", "test_hostile_server",
    "test_memplan_accuracy", "test_mixed", "test_onnx", "test_onnx_exports", "test_onnx_quant", "test_optimize",
    "test_package_android", "test_package_ios", "test_prune", "test_refit", "test_rpc", "test_sampling_dist",
    "test_serve", "test_serve_exact", "test_serve_limits", "test_speculate", "test_sweep", "test_transcode",
    "test_units_verify",
    "test_web",
})


# Files whose tests run one process at a time (converters and quality measurements: no server, client, browser or
# emulator beside them) get every core, up to 4, instead: nothing shares the cores with their llama.cpp and
# onnxruntime work, and at one thread they were a third of the suite's wall time with the second core idle.
ALONE_FILES = frozenset({
    "test_calibration", "test_checkpoint", "test_convert", "test_coreml", "test_distill", "test_gguf_gptq",
    "test_gptq", "test_gptq_guard", "test_mixed", "test_onnx", "test_onnx_exports", "test_onnx_quant",
    "test_package_ios", "test_prune", "test_refit", "test_sweep", "test_transcode",
})


# `make test` runs two pytest-xdist workers, one whole file per worker at a time (--dist loadfile): most of the suite
# is one busy thread (a client, a server, an emulator, Python), so the second core sat idle for half the run. The
# other worker owns the second core, so under xdist every file keeps llama.cpp and onnxruntime at one thread (see
# above), and BLAS / OpenMP pools too: oversubscribed, their spinning threads made the refit tests 4x slower
# (50 → 193 s). A session fixture used by several files is built once per worker that runs one of them.
_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


@pytest.fixture(scope="module", autouse=True)
def _all_cores_when_alone(request):
    if _THREADS_SET_BY_USER or _XDIST_WORKER or request.path.stem not in ALONE_FILES:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELLM_THREADS", str(max(1, min(4, os.cpu_count() or 1))))
        yield


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
