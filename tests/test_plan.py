"""Backend choice on the recorded devices: the plan and the reasons it gives."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from edgellm.errors import BackendError, UsageError
from edgellm.plan import Artifact, MiB, choose, describe

sys.path.insert(0, str(Path(__file__).parent))
from device_fixtures import NAMES, load_fixture  # noqa: E402

GGUF = Artifact("gguf", 98 * 1000 * 1000, quant="Q4_1")
PORTABLE = Artifact("onnx", 300 * MiB, onnx_flavour="portable")
FUSED = Artifact("onnx", 300 * MiB, onnx_flavour="fused")


def text(plan) -> str:
    return "\n".join(plan.reasons)


@pytest.mark.parametrize("name", NAMES)
def test_small_gguf_fits_everywhere(name):
    plan = choose(load_fixture(name), GGUF, env={})
    assert plan.backend == "llama.cpp" and plan.fits and not plan.warnings
    assert plan.est_memory_bytes == GGUF.size_bytes + 64 * MiB
    assert "performance cores" in text(plan)
    assert f"SIMD: {plan.simd}" in text(plan)
    assert "why:" in describe(plan) and plan.backend in describe(plan)


def test_rpi4_plan():
    plan = choose(load_fixture("rpi4"), GGUF, env={})
    assert (plan.device, plan.threads, plan.gpu_layers, plan.simd) == ("cpu", 4, 0, "NEON")


def test_rpi5_plan_uses_dotprod():
    plan = choose(load_fixture("rpi5"), GGUF, env={})
    assert (plan.device, plan.threads, plan.simd) == ("cpu", 4, "NEON+dotprod")
    assert "NEON+dotprod" in text(plan)


def test_x86_plan_ignores_hyperthreads():
    plan = choose(load_fixture("x86-avx512"), GGUF, env={})
    assert (plan.device, plan.threads, plan.simd) == ("cpu", 16, "AVX-512")
    assert "threads=16: the 16 performance cores" in text(plan)
    assert "hyper-threads add nothing" in text(plan) and "AVX-512" in text(plan)


def test_mac_plan_offloads_to_metal():
    plan = choose(load_fixture("mac-m2"), GGUF, env={})
    assert (plan.device, plan.gpu_layers, plan.threads) == ("metal", -1, 8)
    assert plan.simd == "NEON+dotprod+i8mm"
    assert "Metal: Apple GPU present, all layers offloaded" in text(plan)
    assert "efficiency cores" in text(plan)
    forced = choose(load_fixture("mac-m2"), GGUF, requested_device="cpu", env={})
    assert (forced.device, forced.gpu_layers) == ("cpu", 0)
    assert choose(load_fixture("mac-m2"), GGUF, requested_device="gpu", env={}).device == "metal"


def test_pixel_gguf_uses_big_cores_only():
    plan = choose(load_fixture("android-pixel"), GGUF, env={})
    assert (plan.device, plan.threads, plan.simd) == ("cpu", 2, "NEON+dotprod")
    assert "the 2 performance cores" in text(plan) and "6 efficiency cores" in text(plan)


def test_android_onnx_portable_goes_to_nnapi():
    plan = choose(load_fixture("android-pixel"), PORTABLE, env={})
    assert (plan.backend, plan.device) == ("onnxruntime", "nnapi")
    assert "NNAPI: Android API 34 ≥ 27 and the artifact is a portable ONNX graph" in text(plan)


def test_android_onnx_fused_goes_to_xnnpack():
    plan = choose(load_fixture("android-pixel"), FUSED, env={})
    assert plan.device == "xnnpack"
    assert "NNAPI needs the portable graph" in text(plan)
    with pytest.raises(BackendError, match="portable"):
        choose(load_fixture("android-pixel"), FUSED, requested_device="nnapi", env={})


def test_old_android_portable_falls_back_to_xnnpack():
    old = dataclasses.replace(load_fixture("android-pixel"), android_sdk=26, nnapi=False)
    plan = choose(old, PORTABLE, env={})
    assert plan.device == "xnnpack" and "27" in text(plan)


def test_onnx_on_desktop_is_cpu():
    plan = choose(load_fixture("x86-avx512"), PORTABLE, env={})
    assert (plan.backend, plan.device) == ("onnxruntime", "cpu")
    with pytest.raises(BackendError, match="NNAPI"):
        choose(load_fixture("x86-avx512"), PORTABLE, requested_device="nnapi", env={})


def test_coreml():
    plan = choose(load_fixture("mac-m2"), Artifact("coreml", 200 * MiB), env={})
    assert (plan.backend, plan.device) == ("coreml", "ane") and "Core ML" in text(plan)
    with pytest.raises(BackendError, match="Apple") as err:
        choose(load_fixture("rpi5"), Artifact("coreml", 200 * MiB), env={})
    assert "\n" not in str(err.value)


def test_metal_refused_off_apple():
    for name in ("x86-avx512", "rpi5", "android-pixel"):
        with pytest.raises(BackendError, match="Metal"):
            choose(load_fixture(name), GGUF, requested_device="metal", env={})


def test_unknown_device_lists_valid_values():
    with pytest.raises(UsageError, match="cpu, metal, gpu"):
        choose(load_fixture("rpi4"), GGUF, requested_device="tpu", env={})


def test_threads_from_env_and_argument():
    p = load_fixture("x86-avx512")
    env_plan = choose(p, GGUF, env={"EDGELLM_THREADS": "6"})
    assert env_plan.threads == 6 and "EDGELLM_THREADS" in text(env_plan)
    assert choose(p, GGUF, threads=3, env={"EDGELLM_THREADS": "6"}).threads == 3  # flag beats environment
    assert choose(p, GGUF, env={"EDGELLM_THREADS": ""}).threads == 16  # empty means unset
    assert choose(p, GGUF, threads=64, env={}).warnings  # more threads than logical cores
    for bad in ("0", "-2", "four", "2.5"):
        with pytest.raises(UsageError, match="EDGELLM_THREADS"):
            choose(p, GGUF, env={"EDGELLM_THREADS": bad})
    with pytest.raises(UsageError):
        choose(p, GGUF, threads=0, env={})


def test_busy_cores_are_left_to_the_work_that_holds_them():
    """A thread sharing a core with another process stalls every step's barrier (34x slower decode measured with
    2 threads beside one busy process on a 2-core VM): the default leaves busy cores alone, settings win."""
    vm = load_fixture("x86-vm-recorded")
    assert vm.logical_cores == 2 and choose(vm, GGUF).threads == 2
    busy = dataclasses.replace(vm, busy_cores=1)
    plan = choose(busy, GGUF)
    assert plan.threads == 1 and "busy with other work" in text(plan)
    assert choose(dataclasses.replace(vm, busy_cores=5), GGUF).threads == 1       # never below one
    assert choose(busy, GGUF, threads=2).threads == 2                             # explicit wins
    assert choose(busy, GGUF, env={"EDGELLM_THREADS": "2"}).threads == 2
    desktop = load_fixture("x86-avx512")                                           # 16 physical of 32 logical
    assert choose(dataclasses.replace(desktop, busy_cores=8), GGUF).threads == 16  # 24 cores still free
    assert choose(dataclasses.replace(desktop, busy_cores=20), GGUF).threads == 12


def test_busy_cores_reads_proc_stat(tmp_path):
    from edgellm.device import _cpu_times, busy_cores

    line = "cpu  100 5 50 1000 20 0 3 0 0 0\ncpu0 50 2 25 500 10 0 1 0 0 0\n"
    assert _cpu_times(line) == (158, 1178)      # busy = user+nice+system+irq+softirq+steal; idle+iowait apart
    assert _cpu_times("no cpu line") is None
    stat = tmp_path / "stat"
    stat.write_text(line)
    assert busy_cores(0.0, stat) == 0           # no time passed between the two reads: nothing to say
    assert busy_cores(0.0, tmp_path / "missing") == 0


def test_efficiency_only_device_uses_all_cores():
    zero2w = dataclasses.replace(load_fixture("rpi4"), performance_cores=0, efficiency_cores=4)
    plan = choose(zero2w, GGUF, env={})
    assert plan.threads == 4 and "all 4 cores" in text(plan)


def test_not_fits_warns_with_both_numbers():
    tiny = dataclasses.replace(load_fixture("rpi4"), ram_bytes=512 * MiB, ram_available_bytes=100 * MiB)
    plan = choose(tiny, GGUF, env={}, kv_bytes=90 * MiB)
    assert not plan.fits
    assert plan.est_memory_bytes == GGUF.size_bytes + 90 * MiB + 64 * MiB
    (warning,) = plan.warnings
    assert f"{plan.est_memory_bytes / MiB:.0f} MiB" in warning and "100 MiB" in warning
    assert "does NOT fit" in describe(plan)


def test_mac_fit_uses_total_ram_when_available_unknown():
    mac = load_fixture("mac-m2")
    assert mac.ram_available_bytes == 0
    assert choose(mac, Artifact("gguf", 20 * 1024 * MiB), env={}).fits
    assert not choose(mac, Artifact("gguf", 30 * 1024 * MiB), env={}).fits
