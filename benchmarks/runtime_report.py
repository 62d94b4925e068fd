"""The runtime benchmark's markdown report: one section per measurement, each against its target.

``runtime_bench.py`` measures and writes the JSON; :func:`render_markdown` turns that report dict into the
``.md`` next to it (a pure function of the dict, so a stored JSON can be re-rendered).
"""

from __future__ import annotations

from typing import Any

TARGET_FIRST_RATIO = 1.2  # first request after full warm-up, over the steady median
TARGET_RESERVED_RATIO = 1.05  # allocator reserved over allocated after the load/evict cycles
TARGET_HIT_US = 1000.0  # per-job bookkeeping on a cache hit


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, then (a) first request, (b) load/evict cycles, (c) cache-hit overhead."""
    machine = report["machine"]
    device = report["device"]
    lines = [
        f"# Runtime benchmark — {machine.get('gpu') or machine['cpu']} ({device})",
        "",
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- machine: {machine['cpu']} x {machine['cpu_count']} CPUs, {_mb(machine['memory_bytes'])} MiB RAM; "
        f"{machine['platform']}",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}"
        + (
            f"; GPU {machine['gpu']} ({_mb(machine['gpu_memory_bytes'])} MiB, cc {machine['compute_capability']}, "
            f"CUDA {machine['cuda']}, cuDNN {machine['cudnn']})"
            if machine.get("gpu")
            else "; no GPU"
        ),
        f"- loader: {report['loader']}; dtype {report['plan']['dtype']}; total {report['elapsed_s']:.0f} s",
        "",
        "## (a) First request vs steady median (fresh process per row)",
        "",
        f"Target: with full warm-up, first ≤ {TARGET_FIRST_RATIO} x steady. `load s` in a fresh process includes "
        "importing the architecture's modeling code from transformers (seconds on a small CPU).",
        "",
        "| model | mode | MiB | load s | warm-up s | warm_model s | first ms | steady median ms | first/steady |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["first_forward"]:
        if "error" in row:
            lines.append(f"| ? | ? | | | | | | | error: {row['error']} |")
            continue
        lines.append(
            f"| {row['kind']} | {row['mode']} | {_mb(row['model_bytes'])} | {row['load_s']:.2f} | "
            f"{row['warm_up_s']:.3f} | {row['warm_model_s']:.3f} | {row['first_s'] * 1e3:.1f} | "
            f"{row['steady_median_s'] * 1e3:.1f} | **{row['ratio']:.2f}** |"
        )
    full = [r for r in report["first_forward"] if r.get("mode") == "full"]
    if full:
        worst = max(r["ratio"] for r in full)
        lines += ["", f"Worst full-warm-up ratio {worst:.2f}: {_verdict(worst <= TARGET_FIRST_RATIO)}."]
    if device == "cpu":
        lines += [
            "",
            f"On the CPU nothing needs warming and these ratios mostly show scheduling noise (load average "
            f"{report.get('load_average', '?')} on {machine['cpu_count']} CPUs at the start); they prove the code "
            "path runs. The GPU run is the measurement.",
        ]
    cyc = report["cycles"]
    lines += [
        "",
        f"## (b) {report['cycles']['runs'][0].get('cycles', '?')} load/evict cycles (fresh process per row)",
        "",
        f"Models (MiB on disk): {', '.join(f'{k} {_mb(v)}' for k, v in cyc['model_bytes'].items())}; "
        f"together {_mb(cyc['total_bytes'])} MiB against a budget of {_mb(cyc['budget_bytes'])} MiB.",
        "",
    ]
    if device == "cuda":
        lines += [
            f"Targets: no OOM; reserved ≤ {TARGET_RESERVED_RATIO} x allocated at the end; no growth of the "
            "reserved-allocated overhead (second-half max vs first-half max).",
            "",
            "| allocator | empty_cache on evict | errors | loads | end alloc MiB | end reserved MiB | reserved/alloc "
            "| overhead 1st half max MiB | 2nd half max MiB | peak reserved MiB | retries | OOMs | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in cyc["runs"]:
            if "error" in run:
                lines.append(f"| {run['mode']} | | error: {run['error']} |" + " |" * 10)
                continue
            end = run["end"]
            ratio = run["end_ratio"]
            lines.append(
                f"| {run['mode']} ({run['alloc_conf']}{', prealloc' if run['prealloc'] else ''}) | "
                f"{run['empty_cache_on_evict']} | {len(run['errors'])} | {run['cache']['loads']} | "
                f"{_mb(end['allocated'])} | {_mb(end['reserved'])} | "
                f"**{'-' if ratio is None else f'{ratio:.3f}'}** | {_mb(run['overhead_first_half_max'])} | "
                f"{_mb(run['overhead_second_half_max'])} | {_mb(run['peak_reserved'])} | {end['alloc_retries']} | "
                f"{end['ooms']} | {run['elapsed_s']:.1f} |"
            )
    else:
        lines += [
            "No caching allocator on the CPU: the run shows the path (cache + pool + loader, no errors) and the "
            "process RSS.",
            "",
            "| run | errors | loads | hits | evictions | RSS 1st half max MiB | RSS 2nd half max MiB | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in cyc["runs"]:
            if "error" in run:
                lines.append(f"| {run['mode']} | error: {run['error']} | | | | | | |")
                continue
            c = run["cache"]
            lines.append(
                f"| {run['mode']} | {len(run['errors'])} | {c['loads']} | {c['hits']} | {c['evictions']} | "
                f"{_mb(run['rss_first_half_max'])} | {_mb(run['rss_second_half_max'])} | {run['elapsed_s']:.1f} |"
            )
    hit = report["cache_hit"]
    lines += [
        "",
        "## (c) Cache-hit overhead per job",
        "",
        f"`ModelCache.get` over {hit['entries']} entries: median "
        f"**{hit['hit_us_median']:.2f} µs** (min {hit['hit_us_min']:.2f} µs) per job — "
        f"{_verdict(hit['hit_us_median'] <= TARGET_HIT_US)} (≤ {TARGET_HIT_US / 1000:.0f} ms). A status snapshot "
        f"(`stats()` + `entries()`) takes {hit['status_snapshot_us']:.1f} µs.",
        "",
    ]
    return "\n".join(lines)
