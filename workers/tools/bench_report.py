"""The loading benchmark's verdicts and reports: ratios against the targets, a markdown table, a bar chart.

:mod:`gpufleet.workers.tools.bench` measures; this module turns its results dict into the figures the targets are set in
(GPU, 7B-shaped checkpoint) and renders them. Pure functions of that dict, so a stored JSON result can be
re-rendered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.gpu.units import GB, MiB

# The loader's targets on a GPU, for a 7B-shaped checkpoint (README, Benchmarks).
TARGET_FAST_VS_PRETRAINED = 3.0
TARGET_FRACTION_OF_FLOOR = 0.6
TARGET_RESTORE_VS_H2D = 0.8
TARGET_RSS_MODEL_FRACTION = 0.10


def ratios(results: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Speeds, ratios and the targets, each with whether it applies (GPU only) and whether it was met.

    Args:
        results: the measurements :func:`gpufleet.workers.tools.bench.run_bench` collected.
        cuda: the run was on a GPU (the h2d floor exists and the targets can apply).

    Returns:
        The keys to merge into ``results``: GB/s per path, the floor, ``rss_allowed_bytes`` and ``targets``.
    """
    model_bytes = results["model_bytes"]
    fast_s = results["fast_s"]["median"]
    pretrained_s = results["from_pretrained_s"]["median"]
    restore_s = results["parked_restore_s"]["median"]
    floor_gbps = min(results["h2d_gbps"], results["read_gbps"]) if cuda else results["read_gbps"]
    floor_s = model_bytes / (floor_gbps * GB)
    speeds = {
        "from_pretrained_gbps": round(model_bytes / pretrained_s / GB, 2),
        "fast_gbps": round(model_bytes / fast_s / GB, 2),
        "parked_restore_gbps": round(model_bytes / restore_s / GB, 2),
        "floor_gbps": floor_gbps,
        "floor_s": round(floor_s, 4),
    }
    staging = results["staging_bytes"]
    # On the CPU the weights themselves live in host memory, so they count as allowed growth there.
    rss_allowed = staging + TARGET_RSS_MODEL_FRACTION * model_bytes + (0 if cuda else model_bytes)
    gpu_run = cuda and results["size"] == "7b"
    targets = {
        "fast_vs_from_pretrained": _target(pretrained_s / fast_s, TARGET_FAST_VS_PRETRAINED, gpu_run),
        "fast_fraction_of_floor": _target(floor_s / fast_s, TARGET_FRACTION_OF_FLOOR, gpu_run),
        "parked_restore_vs_h2d": _target(
            speeds["parked_restore_gbps"] / results["h2d_gbps"] if cuda else None, TARGET_RESTORE_VS_H2D, gpu_run
        ),
        "rss_growth_vs_allowed": _target(rss_allowed / max(1, results["rss_growth_bytes"]), 1.0, gpu_run),
    }
    return {**speeds, "rss_allowed_bytes": int(rss_allowed), "targets": targets}


def _target(value: float | None, goal: float, applies: bool) -> dict[str, Any]:
    return {
        "value": None if value is None else round(value, 3),
        "goal": goal,
        "met": None if value is None else value >= goal,
        "applies": applies,  # the goals are set for a GPU and a 7B-shaped checkpoint
    }


def render_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report: one table of paths, one of targets."""
    gb = results["model_bytes"] / GB
    lines = [
        f"# Model loading benchmark — {results['machine']}, {results['date']}",
        "",
        f"Device `{results['device']}`, size `{results['size']}` ({gb:.2f} GB bf16, "
        f"{results['checkpoint']['shards']} shards), {results['repeats']} repeats (median), "
        f"{results['read_threads']} reader threads, staging {results['staging_bytes'] / MiB:.0f} MiB; "
        f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}.",
        "",
        "| path | seconds | GB/s |",
        "|---|---:|---:|",
    ]
    if "h2d_gbps" in results:
        lines.append(f"| pinned host→device copy (floor) | {gb / results['h2d_gbps']:.3f} | {results['h2d_gbps']} |")
    lines += [
        f"| parallel read, page cache warm | {gb / results['read_gbps']:.3f} | {results['read_gbps']} |",
        f"| from_pretrained | {results['from_pretrained_s']['median']:.3f} | {results['from_pretrained_gbps']} |",
        f"| fast-safetensors | {results['fast_s']['median']:.3f} | {results['fast_gbps']} |",
        f"| fast-safetensors, first load (allocates staging) | {results['fast_first_s']:.3f} | "
        f"{results['model_bytes'] / results['fast_first_s'] / GB:.2f} |",
        f"| parked restore{' (CPU: no copy, the model stays in host memory)' if results['device'] == 'cpu' else ''} "
        f"| {results['parked_restore_s']['median']:.4f} | {results['parked_restore_gbps']} |",
        "",
        "| target | value | goal | met |",
        "|---|---:|---:|---|",
    ]
    for name, target in results["targets"].items():
        met = "n/a" if target["met"] is None else ("yes" if target["met"] else "no")
        if not target["applies"]:
            met += " (goal is for a GPU, 7B-shaped)"
        lines.append(f"| {name} | {target['value']} | ≥ {target['goal']} | {met} |")
    lines += [
        "",
        f"Peak host RSS growth during the first fast load: {results['rss_growth_bytes'] / MiB:.0f} MiB "
        f"(allowed {results['rss_allowed_bytes'] / MiB:.0f} MiB"
        + ("; on the CPU the weights themselves are in host memory)." if results["device"] == "cpu" else ")."),
        "",
    ]
    if results["device"] == "cpu":
        lines += [
            "On the CPU, from_pretrained maps the safetensors files (pages are read lazily, on first use) while the "
            "fast loader copies the bytes into fresh memory; the goals are set for a GPU, where both must copy.",
            "",
        ]
    return "\n".join(lines)


def render_chart(results: dict[str, Any], file: Path) -> None:
    """A horizontal bar chart of GB/s per path (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    if "h2d_gbps" in results:
        bars.append(("pinned h2d copy", results["h2d_gbps"]))
    bars += [
        ("parallel read (warm)", results["read_gbps"]),
        ("from_pretrained", results["from_pretrained_gbps"]),
        ("fast-safetensors", results["fast_gbps"]),
        ("parked restore", results["parked_restore_gbps"]),
    ]
    figure, axes = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.5))
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    axes.barh(labels, values, color=["#888888"] * (len(bars) - 3) + ["#d62728", "#2ca02c", "#1f77b4"])
    for y, value in enumerate(values):
        axes.text(value, y, f" {value:.1f}", va="center")
    axes.invert_yaxis()
    axes.set_xscale("log")  # a zero-copy CPU restore would flatten every other bar on a linear axis
    axes.set_xlabel("GB/s (model bytes / seconds), log scale")
    axes.set_title(f"{results['machine']} — {results['size']} bf16 ({results['model_bytes'] / GB:.2f} GB)")
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)
