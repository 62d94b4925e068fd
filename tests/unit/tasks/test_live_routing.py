"""What live routing tells a person: each decision's reason, and what to start when nothing live can run a model.

The routing rule itself is tested in ``test_routing.py``; these pin the wording (issue 21, items 16 and 17).
"""

from __future__ import annotations

import pytest

from gpufleet.tasks.errors import RoutingError
from gpufleet.tasks.fleet import WorkerRecord
from gpufleet.tasks.live_routing import route_live
from gpufleet.tasks.settings import load_settings
from tests.support.fleet_records import GiB, fleet, worker

SMALL = "Qwen/Qwen2.5-0.5B-Instruct"  # ~2 GiB of fp32 weights on the CPU, one T4 / L4 / H100 on a GPU
BIG = "meta-llama/Llama-3.1-70B-Instruct"  # 2 x H100
GPTQ = "TheBloke/Llama-2-7B-GPTQ"  # GPU kernels only: a CPU can never run it


def _refusal(model: str, *workers: WorkerRecord) -> str:
    with pytest.raises(RoutingError) as raised:
        route_live(model, fleet(*workers), load_settings())
    return str(raised.value)


def test_a_reason_names_the_model_a_worker_can_hold_not_its_type() -> None:
    settings = load_settings()
    shared = route_live(SMALL, fleet(worker("a")), settings)
    assert shared.reason.endswith(f"1 ready worker(s) on cpu can hold {SMALL!r} (1.9 GiB of weights)")
    assert "can hold cpu" not in shared.reason
    warming = route_live(SMALL, fleet(worker("a", ready=False)), settings)
    assert f"a is warming up; it can hold {SMALL!r} (1.9 GiB of weights) and takes the job once warm" in warming.reason
    one = worker("h100-0", "h100", memory_budget_bytes=72 * GiB)
    two = worker("h100-1+2", "h100", gpu_count=2, memory_budget_bytes=144 * GiB)
    direct = route_live(BIG, fleet(one, two), settings)
    assert f"not every worker on gpu.h100 can hold {BIG!r} (" in direct.reason
    assert "GiB of weights over 2 x h100), so straight to h100-1+2" in direct.reason


def test_a_gpu_only_model_is_never_told_to_start_a_cpu_worker() -> None:
    message = _refusal(GPTQ, worker("cpu-0"))
    assert "weights need CUDA kernels" in message
    assert "`gpufleet worker --gpu N` on a t4 GPU" in message
    assert "--cpu" not in message


def test_a_multi_gpu_need_says_to_start_a_worker_over_several_gpus() -> None:
    message = _refusal(BIG, worker("h100-0", "h100", memory_budget_bytes=72 * GiB))
    assert "it needs 2 x h100 (" in message
    assert "`gpufleet worker --gpus 0,1` over 2 h100 GPUs" in message
    assert "--cpu" not in message and "--gpu N" not in message


def test_with_nothing_live_every_kind_of_worker_that_can_run_it_is_named() -> None:
    message = _refusal(SMALL)
    assert "no worker is live" in message
    assert "(`gpufleet worker --gpu N` on a t4 GPU, or `gpufleet worker --cpu`)" in message
    # A CPU-only fleet setting: no GPU worker is suggested where the router would never send the job.
    with pytest.raises(RoutingError) as raised:
        route_live(GPTQ, fleet(), load_settings(fleet={"gpu_types": ("cpu",)}))
    assert "--cpu" not in str(raised.value)
