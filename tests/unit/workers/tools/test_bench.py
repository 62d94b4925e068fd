"""The loading benchmark: its help, a real run on the CPU with a tiny checkpoint, and the target verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpufleet.workers.tools.bench import main, run_bench
from gpufleet.workers.tools.bench_report import TARGET_FAST_VS_PRETRAINED, ratios, render_markdown
from gpufleet.workers.tools.checkpoints import SHAPES


def test_help_prints_usage_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: gpufleet bench")
    for option in ("--out", "--device", "--size", "--repeats", *SHAPES):
        assert option in text


def test_cpu_run_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    results = run_bench(tmp_path / "out", device="cpu", size="tiny", repeats=1)
    files = [Path(name) for name in results["files"]]
    assert [f.suffix for f in files] == [".json", ".md", ".png"] and all(f.stat().st_size > 0 for f in files)
    stored = json.loads(files[0].read_text())
    assert stored["size"] == "tiny" and stored["device"] == "cpu" and stored["fast_loader"] == "fast-safetensors"
    assert stored["checkpoint"]["shards"] == 1 and stored["model_bytes"] > 0
    assert not any(target["applies"] for target in stored["targets"].values())  # the goals are for a GPU
    assert files[1].read_text() == render_markdown(stored)


def test_unknown_size_and_repeats_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size 'huge' is unknown"):
        run_bench(tmp_path, device="cpu", size="huge")
    with pytest.raises(ValueError, match="repeats=0"):
        run_bench(tmp_path, device="cpu", size="tiny", repeats=0)


def _measured(fast_s: float) -> dict[str, Any]:
    return {
        "model_bytes": 14 * 10**9,
        "size": "7b",
        "fast_s": {"median": fast_s},
        "from_pretrained_s": {"median": 30.0},
        "parked_restore_s": {"median": 1.0},
        "h2d_gbps": 50.0,
        "read_gbps": 20.0,
        "staging_bytes": 256 * 2**20,
        "rss_growth_bytes": 512 * 2**20,
    }


def test_targets_apply_on_a_gpu_and_say_whether_they_were_met() -> None:
    fast = ratios(_measured(fast_s=2.0), cuda=True)
    slow = ratios(_measured(fast_s=29.0), cuda=True)
    assert fast["targets"]["fast_vs_from_pretrained"] == {
        "value": 15.0,
        "goal": TARGET_FAST_VS_PRETRAINED,
        "met": True,
        "applies": True,
    }
    assert slow["targets"]["fast_vs_from_pretrained"]["met"] is False
    assert fast["floor_gbps"] == 20.0 and fast["fast_gbps"] == 7.0
    assert ratios(_measured(fast_s=2.0), cuda=False)["targets"]["parked_restore_vs_h2d"]["met"] is None
