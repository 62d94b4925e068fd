#!/usr/bin/env python
"""Issue 4's runtime targets, measured as ratios in one run, on a GPU or the CPU.

    python benchmarks/runtime_bench.py                  # CUDA when present, else CPU
    python benchmarks/runtime_bench.py --quick          # fewer repeats, smaller models

writes ``benchmarks/results/runtime-<machine>-<date>.json`` and ``.md``. Three measurements:

(a) **first request after warm-up** vs the steady median, for a causal LM and an embedding model, each mode in
    a FRESH subprocess so CUDA starts cold: ``cold`` (load, then serve), ``device`` (load, device warm-up),
    ``full`` (load, device warm-up, ``warm_model``). Target: ``full`` first ≤ 1.2 x steady.
(b) **load/evict cycles**: 50 acquisitions over models of mixed sizes that together exceed the budget, through
    ``ModelCache`` + ``GPUMemoryPool`` + a real loader, one fresh subprocess per allocator mode:
    ``expandable`` (expandable_segments:True), ``default`` (expandable_segments:False), ``prealloc`` (default
    allocator plus preallocated common sizes), each with and without ``torch.cuda.empty_cache()`` on eviction
    (the worker runtime empties it only on its OOM path). Targets: no OOM, allocator reserved ≤ 1.05 x allocated
    at the end, no growth of the reserved-minus-allocated overhead across cycles.
(c) **cache-hit overhead** per job: ``ModelCache.get`` (which also keeps the usage record), in microseconds.
    Target ≤ 1 ms.

The models are random-weight Llamas (and one BERT) from the project's checkpoint builder
(``gpufleet.workers.tools.checkpoints``) in a temporary directory. On the CPU there is no caching allocator: (b) reports
process RSS instead, and (a) shows the code path runs. Timings are reported, never asserted; the markdown report
(``runtime_report.py``) says which targets were met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime_report import render_markdown  # a sibling module: this file runs as a script

from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.shapes import Shape

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ALLOC_MODES = {
    # mode: (PYTORCH_CUDA_ALLOC_CONF, preallocate common sizes)
    "expandable": ("expandable_segments:True", False),
    "default": ("expandable_segments:False", False),
    "prealloc": ("expandable_segments:False", True),
}
FIRST_FORWARD_MODES = ("cold", "device", "full")


# ------------------------------------------------------------------------------------------------ models


def llama_shape(*, layers: int, hidden: int) -> Shape:
    """A Llama-like shape: 64-wide heads, no grouped-query attention, MLP 2.75 x hidden."""
    heads = max(1, hidden // 64)
    return Shape(hidden, layers, heads, heads, int(hidden * 2.75) // 8 * 8, max_positions=512)


def bert_shape(*, layers: int, hidden: int) -> Shape:
    """A BERT-like shape: 64-wide heads, MLP 4 x hidden (served as an embedding model, mean pooling)."""
    heads = max(1, hidden // 64)
    return Shape(hidden, layers, heads, heads, hidden * 4, max_positions=512)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def make_loader(name: str) -> Any:
    from gpufleet.gpu.runtime import loader

    if name == "fast":
        return loader.FastSafetensorsLoader()  # type: ignore[attr-defined,unused-ignore]
    return loader.PretrainedLoader()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------- children (fresh)


def child_describe(_: dict[str, Any]) -> dict[str, Any]:
    """The machine: CPU, memory, torch, and the GPU when there is one."""
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_bytes=int(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),  # type: ignore[no-untyped-call,unused-ignore]
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


def child_first_forward(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model in this fresh process, warm up per ``mode``, then time the first and steady requests."""
    from gpufleet.gpu.runtime.device_memory import configure_allocator

    configure_allocator()
    from gpufleet.gpu.config import WarmupConfig, WarmupSize
    from gpufleet.gpu.runtime.inference import embed, generate
    from gpufleet.gpu.runtime.model import ModelKind
    from gpufleet.gpu.runtime.options import GenerateOptions
    from gpufleet.gpu.runtime.warmup import GPUWarmupManager

    device, dtype, mode = spec["device"], spec["dtype"], spec["mode"]
    import transformers  # noqa: F401  # imported before the clock starts: load_s is the load, not the import

    started = time.perf_counter()
    loaded = make_loader(spec["loader"]).load("bench/model", Path(spec["path"]), device=device, dtype=dtype)
    load_s = time.perf_counter() - started
    manager = GPUWarmupManager(device, WarmupConfig(size=WarmupSize(spec["size"])), dtypes=(dtype,))
    warm_up_s = warm_model_s = 0.0
    if mode in ("device", "full"):
        warm_up_s = manager.warm_up().total_s
    if mode == "full":
        warm_model_s = manager.warm_model(loaded)

    def request() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        if loaded.kind is ModelKind.EMBEDDING:
            embed(loaded, ["the first real request of the day", "arrives with a second sentence"])
        else:
            generate(
                loaded,
                GenerateOptions(prompt="The first real request of the day is", max_new_tokens=spec["new_tokens"]),
            )
        synchronize(device)
        return time.perf_counter() - t0

    first_s = request()
    steady = [request() for _ in range(spec["repeats"])]
    steady_s = statistics.median(steady)
    return {
        "kind": loaded.kind.value,
        "mode": mode,
        "load_s": load_s,
        "warm_up_s": warm_up_s,
        "warm_model_s": warm_model_s,
        "first_s": first_s,
        "steady_median_s": steady_s,
        "steady_min_s": min(steady),
        "ratio": first_s / steady_s,
    }


def _allocator_figures(device: str) -> dict[str, int]:
    if device.startswith("cuda"):
        import torch

        stats = torch.cuda.memory_stats()
        return {
            "allocated": int(stats.get("allocated_bytes.all.current", 0)),
            "reserved": int(stats.get("reserved_bytes.all.current", 0)),
            "inactive_split": int(stats.get("inactive_split_bytes.all.current", 0)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "ooms": int(stats.get("num_ooms", 0)),
        }
    import psutil

    return {"rss": int(psutil.Process().memory_info().rss)}


def child_cycles(spec: dict[str, Any]) -> dict[str, Any]:
    """``cycles`` acquisitions over mixed-size models through cache + pool + loader, like the worker runtime."""
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = spec["alloc_conf"]  # before torch starts CUDA in this process
    import torch

    from gpufleet.gpu.config import GpuConfig, MemoryPoolConfig
    from gpufleet.gpu.errors import BudgetExceededError
    from gpufleet.gpu.runtime.inference import embed, generate
    from gpufleet.gpu.runtime.memory_pool import GPUMemoryPool
    from gpufleet.gpu.runtime.model import LoadedModel, ModelKind
    from gpufleet.gpu.runtime.model_cache import ModelCache
    from gpufleet.gpu.runtime.options import GenerateOptions

    device, dtype = spec["device"], spec["dtype"]
    models: dict[str, str] = spec["models"]
    config = GpuConfig(
        memory_pool=MemoryPoolConfig(
            budget_bytes=spec["budget_bytes"],
            preallocate_common_sizes=spec["prealloc"],
            common_sizes_mb=tuple(spec["common_sizes_mb"]),
        )
    )
    # The pool counts resident models through the cache (defined below; read only when a reservation is made).
    pool = GPUMemoryPool.from_config(device, config, resident_bytes=lambda: cache.used_bytes)
    loader = make_loader(spec["loader"])

    def on_evict(model_id: str, loaded: LoadedModel, reason: str) -> None:
        loaded.module = None
        gc.collect()
        if spec["empty_cache"] and device.startswith("cuda"):
            torch.cuda.empty_cache()

    cache: ModelCache[LoadedModel] = ModelCache(pool.budget_bytes, on_evict=on_evict)
    order = random.Random(spec["seed"]).choices(sorted(models), k=spec["cycles"])
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.perf_counter()
    for cycle, model_id in enumerate(order):
        loaded = cache.get(model_id)
        hit = loaded is not None
        try:
            if loaded is None:
                path = Path(models[model_id])
                estimate = dir_bytes(path)
                cache.make_room(estimate, for_key=model_id)
                pool.reserve(model_id, estimate)
                try:
                    loaded = loader.load(model_id, path, device=device, dtype=dtype)
                except BaseException:
                    pool.release(model_id)
                    raise
                cache.put(model_id, loaded, loaded.bytes, load_s=loaded.load_s)
                pool.commit(model_id, loaded.bytes)
            # A job: some activations come and go, as between real loads.
            if loaded.kind is ModelKind.EMBEDDING:
                embed(loaded, ["cycle request", "with two sentences"])
            else:
                generate(loaded, GenerateOptions(prompt="cycle request", max_new_tokens=4))
        except (BudgetExceededError, torch.OutOfMemoryError) as exc:
            errors.append(f"cycle {cycle} {model_id}: {type(exc).__name__}: {exc}")
        synchronize(device)
        samples.append({"cycle": cycle, "model": model_id, "hit": hit, **_allocator_figures(device)})
    elapsed_s = time.perf_counter() - started
    end = _allocator_figures(device)
    result: dict[str, Any] = {
        "alloc_conf": spec["alloc_conf"],
        "prealloc": spec["prealloc"],
        "empty_cache_on_evict": spec["empty_cache"],
        "cycles": spec["cycles"],
        "elapsed_s": elapsed_s,
        "errors": errors,
        "cache": cache.stats().to_dict(),
        "end": end,
        "samples": samples,
    }
    if device.startswith("cuda"):
        overhead = [s["reserved"] - s["allocated"] for s in samples]
        half = len(overhead) // 2
        result.update(
            end_ratio=end["reserved"] / end["allocated"] if end["allocated"] else None,
            overhead_first_half_max=max(overhead[:half]),
            overhead_second_half_max=max(overhead[half:]),
            peak_reserved=int(torch.cuda.max_memory_reserved()),
            peak_allocated=int(torch.cuda.max_memory_allocated()),
        )
    else:
        rss = [s["rss"] for s in samples]
        half = len(rss) // 2
        result.update(rss_first_half_max=max(rss[:half]), rss_second_half_max=max(rss[half:]))
    return result


CHILDREN = {"describe": child_describe, "first_forward": child_first_forward, "cycles": child_cycles}


def run_child(name: str, spec: dict[str, Any], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``name`` in a fresh interpreter (fresh CUDA state) and return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    child_env = {**os.environ, **(env or {})}
    command = [sys.executable, __file__, "--child", name, "--spec", json.dumps(spec), "--out", str(out_path)]
    try:
        completed = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=1800, check=False)
        if completed.returncode != 0:
            return {"error": f"child {name} exited {completed.returncode}", "stderr": completed.stderr[-4000:]}
        data: dict[str, Any] = json.loads(out_path.read_text())
        return data
    finally:
        out_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ (c) in this process


def measure_hit_overhead(iterations: int) -> dict[str, Any]:
    """Per-job bookkeeping on a cache hit: ``cache.get`` (recency and the usage record), in microseconds."""
    from gpufleet.gpu.runtime.model_cache import ModelCache

    cache: ModelCache[object] = ModelCache(10**12)
    for i in range(32):
        cache.put(f"org/model-{i}", object(), 10**9, pinned=i < 2, ttl_s=3600)
    keys = [f"org/model-{i % 32}" for i in range(iterations)]
    batches = []
    for _ in range(7):
        t0 = time.perf_counter()
        for key in keys:
            if cache.get(key) is None:
                raise AssertionError(f"{key} missed; every key was put and nothing can expire")
        batches.append((time.perf_counter() - t0) / iterations * 1e6)
    t0 = time.perf_counter()
    for _ in range(100):
        cache.stats()
        cache.entries()
    status_us = (time.perf_counter() - t0) / 100 * 1e6
    return {
        "iterations": iterations,
        "entries": len(cache),
        "hit_us_median": statistics.median(batches),
        "hit_us_min": min(batches),
        "status_snapshot_us": status_us,
    }


# ---------------------------------------------------------------------------------------------- the run


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def plan(device: str, quick: bool) -> dict[str, Any]:
    """Model shapes and budgets per device: GPU models are tens to hundreds of MB, CPU ones a few MB."""
    if device == "cuda":
        return {
            "dtype": "float16",
            "size": "medium",
            "first_llama": {"layers": 2 if quick else 8, "hidden": 1024 if quick else 2048},
            "first_bert": {"layers": 4 if quick else 12, "hidden": 768},
            "hidden": 1024,
            "cycle_layers": [2, 3, 4, 6, 8, 12, 16] if not quick else [1, 2, 4, 6],
            "budget_fraction_of_total": 0.45,
            "common_sizes_mb": [64, 256, 1024],
        }
    return {
        "dtype": "float32",
        "size": "small",
        "first_llama": {"layers": 2, "hidden": 256},
        "first_bert": {"layers": 2, "hidden": 256},
        "hidden": 256,
        "cycle_layers": [1, 2, 3, 4, 6, 8, 12] if not quick else [1, 2, 4],
        "budget_fraction_of_total": 0.45,
        "common_sizes_mb": [64, 256, 1024],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=None, help="steady requests per first-forward child")
    parser.add_argument("--loader", choices=("pretrained", "fast"), default="pretrained")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](json.loads(args.spec or "{}"))
        Path(args.out).write_text(json.dumps(result, default=str))
        return 0

    machine = run_child("describe", {})
    if "error" in machine:
        print(machine["stderr"], file=sys.stderr)
        return 1
    device = args.device or ("cuda" if machine["cuda_available"] else "cpu")
    if device == "cuda" and not machine["cuda_available"]:
        raise SystemExit("--device cuda asked for, but the child saw no CUDA device")
    shape = plan(device, args.quick)
    repeats = args.repeats or (5 if args.quick else 20)
    label = slug(machine.get("gpu") or f"cpu-{machine['cpu']}")
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "runtime",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "machine": machine,
        "loader": args.loader,
        "plan": shape,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as scratch:
        root = Path(scratch)
        dtype = shape["dtype"]
        print(f"building models in {root} ...", flush=True)
        llama = make_checkpoint(
            root / "first-llama", "llama", size=llama_shape(**shape["first_llama"]), dtype=dtype, seed=1
        )
        bert = make_checkpoint(root / "first-bert", "bert", size=bert_shape(**shape["first_bert"]), dtype=dtype, seed=2)
        cycle_models = {
            f"bench/llama-{layers}l": str(
                make_checkpoint(
                    root / f"llama-{layers}l",
                    "llama",
                    size=llama_shape(layers=layers, hidden=shape["hidden"]),
                    dtype=dtype,
                    seed=layers,
                )
            )
            for layers in shape["cycle_layers"]
        }
        sizes = {model_id: dir_bytes(Path(path)) for model_id, path in cycle_models.items()}
        total = sum(sizes.values())
        budget = max(int(total * shape["budget_fraction_of_total"]), max(sizes.values()) + 1)

        # (a) first request, fresh process per model and mode
        first: list[dict[str, Any]] = []
        for kind, path in (("causal-lm", llama), ("embedding", bert)):
            for mode in FIRST_FORWARD_MODES:
                print(f"(a) first forward: {kind} {mode}", flush=True)
                spec = {
                    "device": device,
                    "dtype": dtype,
                    "mode": mode,
                    "path": str(path),
                    "size": shape["size"],
                    "repeats": repeats,
                    "new_tokens": 8,
                    "loader": args.loader,
                }
                first.append({"model_bytes": dir_bytes(path), **run_child("first_forward", spec)})
        report["first_forward"] = first

        # (b) load/evict cycles, fresh process per allocator mode
        cycles: list[dict[str, Any]] = []
        for mode, (alloc_conf, prealloc) in ALLOC_MODES.items():
            for empty_cache in (True, False):
                if device == "cpu" and (mode != "expandable" or not empty_cache):
                    continue  # no caching allocator on the CPU: one run shows the path and RSS
                print(f"(b) cycles: {mode} empty_cache_on_evict={empty_cache}", flush=True)
                spec = {
                    "device": device,
                    "dtype": dtype,
                    "models": cycle_models,
                    "budget_bytes": budget,
                    "cycles": args.cycles,
                    "seed": 4,
                    "alloc_conf": alloc_conf,
                    "prealloc": prealloc,
                    "common_sizes_mb": shape["common_sizes_mb"],
                    "empty_cache": empty_cache,
                    "loader": args.loader,
                }
                result = run_child("cycles", spec, env={"PYTORCH_CUDA_ALLOC_CONF": alloc_conf})
                cycles.append({"mode": mode if device == "cuda" else "cpu (no caching allocator)", **result})
        report["cycles"] = {"model_bytes": sizes, "total_bytes": total, "budget_bytes": budget, "runs": cycles}

    print("(c) cache-hit overhead", flush=True)
    report["cache_hit"] = measure_hit_overhead(2000 if args.quick else 20000)
    report["elapsed_s"] = time.time() - started

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-{label}-{dt.date.today().isoformat()}"
    json_path = args.out_dir / f"{stem}.json"
    md_path = args.out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
