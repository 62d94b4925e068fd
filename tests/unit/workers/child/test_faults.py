from __future__ import annotations

import pytest
import torch

from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.child.faults import Faults
from gpufleet.workers.errors import WorkerStartError


def test_no_faults_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFLEET_FAULTS", raising=False)
    faults = Faults.from_settings(load_settings())
    faults.check("load", "a/b")
    faults.delay("warmup")
    assert faults == Faults()


def test_faults_need_diagnostics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_FAULTS", "oom:load:a/b:1")
    with pytest.raises(SettingsError, match="GPUFLEET_DIAGNOSTICS=true"):
        load_settings()  # the typed settings refuse faults without diagnostics, before any worker starts
    assert Faults.from_settings(load_settings(diagnostics=True)).ooms == {("load", "a/b"): 1}


def test_armed_oom_comes_out_of_the_real_forward_and_counts_down() -> None:
    faults = Faults.parse("oom:infer:a/b:1,oom:load:*:1,slow:warmup:0.01")
    module = torch.nn.Linear(4, 4)
    faults.arm("infer", "c/d", module)  # nothing left for c/d at the infer stage
    module(torch.ones(1, 4))
    faults.arm("infer", "a/b", module)
    with pytest.raises(torch.OutOfMemoryError):
        module(torch.ones(1, 4))
    module(torch.ones(1, 4))  # the hook fired its one time and is gone
    faults.arm("infer", "a/b", module)  # the count is spent
    module(torch.ones(1, 4))
    faults.arm("load", "any/model", module)
    with pytest.raises(torch.OutOfMemoryError):
        module(torch.ones(1, 4))
    assert faults.delays_s == {"warmup": 0.01}


@pytest.mark.parametrize("spec", ["boom:load:a:1", "oom:load:a:many", "oom:train:a:1", "slow:load:x", "oom"])
def test_unreadable_fault_spec(spec: str) -> None:
    with pytest.raises(WorkerStartError, match="GPUFLEET_FAULTS"):
        Faults.parse(spec)
