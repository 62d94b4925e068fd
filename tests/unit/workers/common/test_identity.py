from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.tasks.settings import load_settings
from gpufleet.workers.common.identity import cpu_identity, gpu_identity, gpus_identity, parse_gpu_list, worker_name
from gpufleet.workers.errors import WorkerStartError
from gpufleet.workers.main import build_identity, celery_argv, check_priority_models


def test_worker_names_and_queues() -> None:
    assert worker_name("H100", 0, "host") == "h100-0@host"
    assert worker_name("A100-80GB", 3, "node7") == "a100-80gb-3@node7"
    identity = cpu_identity(name="cpu-0@test")
    assert identity.queues == ("cpu", "cpu.cpu-0@test")
    assert identity.consumed_queues == ("cpu", "cpu.cpu-0@test", "fleet"), "the entry queue too, never celery"
    assert identity.device == "cpu" and identity.memory_bytes > 0


def test_exactly_one_device_flag() -> None:
    with pytest.raises(WorkerStartError, match="exactly one"):
        build_identity(gpu=None, cpu=False, name=None)
    with pytest.raises(WorkerStartError, match="exactly one"):
        build_identity(gpu=0, cpu=True, name=None)


def test_worker_starts_on_a_placeholder_queue_only() -> None:
    identity = cpu_identity(name="cpu-0@test")
    argv = celery_argv(identity, load_settings(), None)
    assert "--pool=prefork" in argv and "--concurrency=1" in argv
    assert "--queues=fleet.boot.cpu-0@test" in argv
    assert not any(arg.startswith("--queues=cpu") for arg in argv)


def test_missing_priority_model_fails_at_start_up(tmp_path: object) -> None:
    settings = load_settings(model_root=str(tmp_path), priority_models=("org/absent",))
    with pytest.raises(WorkerStartError, match="GPUFLEET_PRIORITY_MODELS"):
        check_priority_models(settings)


def test_binding_after_torch_import_is_refused() -> None:
    code = "import torch\nfrom gpufleet.workers.common.identity import bind_gpu\nbind_gpu(0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "torch was imported before the GPU was bound" in done.stderr


def test_binding_sets_visible_devices_in_pci_order() -> None:
    code = (
        "import os\nfrom gpufleet.workers.common.identity import bind_gpu\nbind_gpu(3)\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["3", "PCI_BUS_ID"], done.stderr


def test_gpu_flag_without_nvidia_gpu_says_use_cpu() -> None:
    try:
        from gpufleet.gpu.nvml import list_devices

        list_devices()
        pytest.skip("this machine has an NVIDIA driver")
    except Exception:
        pass
    with pytest.raises(WorkerStartError, match="--cpu"):
        build_identity(gpu=0, cpu=False, name=None)


FAKE_DEVICES = (
    # (name, memory bytes, compute capability), as NVML reports them
    ("NVIDIA H100 80GB HBM3", 85_520_809_984, (9, 0)),
    ("NVIDIA L4", 24_152_899_584, (8, 9)),
    # A board the catalog does not know: it must not inherit L40S's FP8 (compute capability 8.6 has none).
    ("NVIDIA RTX A6000", 51_527_024_640, (8, 6)),
)
# A host with two H100s and an L4, for workers owning several GPUs.
TWO_H100_HOST = (FAKE_DEVICES[0], FAKE_DEVICES[0], FAKE_DEVICES[1])


class FakeNvml:
    """Stands in for pynvml on a machine without a GPU: the given devices, as NVML would report them."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: tuple[tuple[str, int, tuple[int, int]], ...] = FAKE_DEVICES) -> None:
        self.devices = devices

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.devices[handle][0].encode()

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self.devices[handle][2]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        total = self.devices[handle][1]
        return type("Memory", (), {"total": total, "used": 0, "free": total})()


def test_gpu_identity_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    h100 = gpu_identity(0)
    assert h100.gpu_type == "h100" and h100.name.startswith("h100-0@")
    assert h100.queues == ("gpu.h100", f"gpu.h100.{h100.name}")
    assert h100.device == "cuda:0" and h100.device_label == "cuda:0 (NVIDIA H100 80GB HBM3)"
    l4 = gpu_identity(1, name="l4-1@box")
    assert l4.gpu_type == "l4" and l4.queues == ("gpu.l4", "gpu.l4.l4-1@box")
    a6000 = gpu_identity(2)
    assert a6000.gpu_type == "a100-40gb", "an unknown board stands in for a type it fully covers, without FP8"
    with pytest.raises(WorkerStartError, match=r"--gpu 0\.\.2"):
        gpu_identity(3)


def test_gpu_disabled_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.workers.main import run_worker

    monkeypatch.setenv("GPUFLEET_GPU__ENABLED", "false")
    with pytest.raises(WorkerStartError, match="GPUFLEET_GPU__ENABLED"):
        run_worker(gpu=0, cpu=False)


# -- workers owning several GPUs (--gpus) -------------------------------------------------------------------


def test_gpus_identity_spans_gpus_of_one_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(TWO_H100_HOST))
    pair = gpus_identity((0, 1))
    assert pair.gpu_type == "h100" and pair.gpu_indices == (0, 1) and pair.gpu_count == 2
    assert pair.name == worker_name("h100", 0, gpu_count=2) and pair.name.startswith("h100x2-0@")
    assert pair.queues == ("gpu.h100", f"gpu.h100.{pair.name}")
    assert pair.memory_bytes == 2 * FAKE_DEVICES[0][1], "memory is the sum over the GPUs"
    assert pair.device == "cuda:0" and pair.devices == ("cuda:0", "cuda:1") and pair.device_index == 0
    assert pair.device_label == "cuda:0-1 (2x NVIDIA H100 80GB HBM3)"
    # Listed from the second GPU on: named after the first listed, the devices renumbered by the binding.
    reversed_pair = gpus_identity((1, 0), name="h100-pair@box")
    assert reversed_pair.gpu_indices == (1, 0) and reversed_pair.device_index == 1
    assert reversed_pair.queues == ("gpu.h100", "gpu.h100.h100-pair@box")


def test_gpus_with_one_index_is_the_gpu_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(TWO_H100_HOST))
    for index in (0, 2):
        one = gpus_identity(parse_gpu_list(str(index)))
        assert one == gpu_identity(index), "--gpus N must give the identity --gpu N gives"
        assert one.gpu_count == 1 and one.devices == ("cuda:0",) and "x1" not in one.name


def test_gpus_of_mixed_types_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(TWO_H100_HOST))
    with pytest.raises(
        WorkerStartError, match=r"--gpus mixes GPU types \(GPU 0: NVIDIA H100.*\(h100\).*GPU 2: NVIDIA L4"
    ):
        gpus_identity((0, 2))
    with pytest.raises(WorkerStartError, match="one worker per type"):
        gpus_identity((2, 1, 0))


@pytest.mark.parametrize("text", ["", " ", "a", "0,", "0,,1", "-1", "1.5", "0;1", "0 1"])
def test_malformed_gpu_lists_are_refused(text: str) -> None:
    with pytest.raises(WorkerStartError, match="--gpus takes comma-separated GPU indices"):
        parse_gpu_list(text)


def test_gpu_lists_parse_and_repeats_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_gpu_list("0,1") == (0, 1) and parse_gpu_list(" 3, 1 ") == (3, 1) and parse_gpu_list("2") == (2,)
    with pytest.raises(WorkerStartError, match="lists GPU 1 more than once"):
        parse_gpu_list("1,0,1")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(TWO_H100_HOST))
    with pytest.raises(WorkerStartError, match=r"GPU 5 of --gpus 0,5 does not exist: this host has 3 .*--gpus 0\.\.2"):
        gpus_identity((0, 5))
    with pytest.raises(WorkerStartError, match="names no GPU"):
        gpus_identity(())


def test_only_one_device_flag_with_gpus() -> None:
    with pytest.raises(WorkerStartError, match="exactly one of --gpu N, --gpus N,M or --cpu"):
        build_identity(gpu=0, gpus="0,1", cpu=False, name=None)
    with pytest.raises(WorkerStartError, match="exactly one"):
        build_identity(gpu=None, gpus="0", cpu=True, name=None)


def test_cli_parses_gpus() -> None:
    from gpufleet.workers.cli import build_parser

    args = build_parser().parse_args(["worker", "--gpus", "0,1", "--name", "pair@box"])
    assert args.gpus == "0,1" and args.gpu is None and not args.cpu and args.name == "pair@box"
    assert build_parser().parse_args(["worker", "--gpu", "1"]).gpus is None
    for both in (["--gpu", "0", "--gpus", "0,1"], ["--cpu", "--gpus", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["worker", *both])


def test_cli_reports_a_bad_gpu_list_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from gpufleet.workers.cli import main

    assert main(["worker", "--gpus", "0,x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpufleet worker: WorkerStartError: --gpus takes comma-separated GPU indices")
    assert "'0,x'" in err and len(err.splitlines()) == 1


def test_gpus_disabled_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.workers.main import run_worker

    monkeypatch.setenv("GPUFLEET_GPU__ENABLED", "false")
    with pytest.raises(WorkerStartError, match="GPUFLEET_GPU__ENABLED"):
        run_worker(gpu=None, gpus="0,1", cpu=False)


FAKE_PYNVML_MODULE = """
class NVMLError(Exception):
    pass

DEVICES = {devices!r}

def nvmlInit(): ...
def nvmlShutdown(): ...
def nvmlDeviceGetCount(): return len(DEVICES)
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetName(handle): return DEVICES[handle][0].encode()
def nvmlDeviceGetUUID(handle): return f"GPU-{{handle:04d}}"
def nvmlDeviceGetCudaComputeCapability(handle): return DEVICES[handle][2]
def nvmlDeviceGetMemoryInfo(handle):
    total = DEVICES[handle][1]
    return type("Memory", (), {{"total": total, "used": 0, "free": total}})()
"""

BUILD_IN_A_FRESH_PARENT = """
import json, os, sys
from gpufleet.workers.main import build_identity
identity = build_identity(gpu={gpu!r}, gpus={gpus!r}, cpu=False, name=None)
print(json.dumps({{
    "name": identity.name, "queues": identity.queues, "device": identity.device, "devices": identity.devices,
    "gpu_indices": identity.gpu_indices, "memory_bytes": identity.memory_bytes, "label": identity.device_label,
    "visible": os.environ["CUDA_VISIBLE_DEVICES"], "order": os.environ["CUDA_DEVICE_ORDER"],
    "torch_imported": "torch" in sys.modules,
}}))
"""


def build_in_subprocess(tmp_path: Path, *, gpu: int | None = None, gpus: str | None = None) -> dict[str, Any]:
    """build_identity in a fresh process (as a worker's parent runs it) over a fake pynvml module."""
    fake = tmp_path / "fake_nvml"
    fake.mkdir(exist_ok=True)
    (fake / "pynvml.py").write_text(FAKE_PYNVML_MODULE.format(devices=TWO_H100_HOST))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    code = BUILD_IN_A_FRESH_PARENT.format(gpu=gpu, gpus=gpus)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_gpus_binds_every_gpu_before_torch_loads(tmp_path: Path) -> None:
    pair = build_in_subprocess(tmp_path, gpus="1,0")
    assert pair["visible"] == "1,0" and pair["order"] == "PCI_BUS_ID"
    assert pair["devices"] == ["cuda:0", "cuda:1"] and pair["gpu_indices"] == [1, 0]
    assert pair["name"].startswith("h100x2-1@") and pair["queues"][0] == "gpu.h100"
    assert pair["memory_bytes"] == 2 * FAKE_DEVICES[0][1]
    assert pair["torch_imported"] is False, "the worker's parent must never import torch"


def test_gpus_zero_starts_exactly_like_gpu_zero(tmp_path: Path) -> None:
    assert build_in_subprocess(tmp_path, gpus="0") == build_in_subprocess(tmp_path, gpu=0)
    single = build_in_subprocess(tmp_path, gpu=0)
    assert single["visible"] == "0" and single["devices"] == ["cuda:0"] and single["label"].startswith("cuda:0 (")
