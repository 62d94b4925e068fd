from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.settings import load_settings
from workers.errors import WorkerStartError
from workers.identity import cpu_identity, worker_name
from workers.main import build_identity, celery_argv, check_priority_models


def test_worker_names_and_queues() -> None:
    assert worker_name("H100", 0, "host") == "h100-0@host"
    assert worker_name("A100-80GB", 3, "node7") == "a100-80gb-3@node7"
    identity = cpu_identity(name="cpu-0@test")
    assert identity.queues == ("cpu", "cpu.cpu-0@test")
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
    code = "import torch\nfrom workers.identity import bind_gpu\nbind_gpu(0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "torch was imported before the GPU was bound" in done.stderr


def test_binding_sets_visible_devices_in_pci_order() -> None:
    code = (
        "import os\nfrom workers.identity import bind_gpu\nbind_gpu(3)\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["3", "PCI_BUS_ID"], done.stderr


def test_gpu_flag_without_nvidia_gpu_says_use_cpu() -> None:
    try:
        from gpu.runtime.nvml import list_devices

        list_devices()
        pytest.skip("this machine has an NVIDIA driver")
    except Exception:
        pass
    with pytest.raises(WorkerStartError, match="--cpu"):
        build_identity(gpu=0, cpu=False, name=None)


class FakeNvml:
    """Stands in for pynvml on a machine without a GPU: two devices, as NVML would report them."""

    class NVMLError(Exception):
        pass

    DEVICES = (
        ("NVIDIA H100 80GB HBM3", 85_520_809_984),
        ("NVIDIA L4", 24_152_899_584),
        # A board the catalog does not know: it must not inherit L40S's FP8 (compute capability 8.6 has none).
        ("NVIDIA RTX A6000", 51_527_024_640),
    )

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return len(self.DEVICES)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.DEVICES[handle][0].encode()

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return ((9, 0), (8, 9), (8, 6))[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        total = self.DEVICES[handle][1]
        return type("Memory", (), {"total": total, "used": 0, "free": total})()


def test_gpu_identity_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.identity import gpu_identity

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
    from workers.main import run_worker

    monkeypatch.setenv("GPUFLEET_GPU__ENABLED", "false")
    with pytest.raises(WorkerStartError, match="GPUFLEET_GPU__ENABLED"):
        run_worker(gpu=0, cpu=False)
