from __future__ import annotations

import pytest

from gpu.errors import DeviceOutOfMemoryError
from workers.faults import Faults


def test_no_faults_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFLEET_FAULTS", raising=False)
    faults = Faults.from_env()
    faults.check("load", "a/b")
    faults.delay("warmup")


def test_injected_oom_counts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_FAULTS", "oom:load:a/b:2,oom:infer:*:1,slow:warmup:0.01")
    faults = Faults.from_env()
    for _ in range(2):
        with pytest.raises(DeviceOutOfMemoryError, match="injected"):
            faults.check("load", "a/b")
    faults.check("load", "a/b")
    faults.check("load", "c/d")
    with pytest.raises(DeviceOutOfMemoryError):
        faults.check("infer", "c/d")
    faults.check("infer", "c/d")
    assert faults.delays_s == {"warmup": 0.01}


def test_unreadable_fault_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_FAULTS", "boom:load:a:1")
    with pytest.raises(ValueError, match="GPUFLEET_FAULTS"):
        Faults.from_env()
