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
        from gpu.nvml import list_devices

        list_devices()
        pytest.skip("this machine has an NVIDIA driver")
    except Exception:
        pass
    with pytest.raises(WorkerStartError, match="--cpu"):
        build_identity(gpu=0, cpu=False, name=None)
