#!/usr/bin/env python
"""Check warm-up, the memory pool and model loading on whatever device this machine has, and say what it measured.

An operator's smoke check for a new GPU host (not a pass/fail test with timing thresholds:
``benchmarks/runtime_bench.py`` measures the targets)::

    python scripts/test_gpu_warmup.py --test all                 # CUDA when present, else CPU
    python scripts/test_gpu_warmup.py --test warmup --device cuda --size large
    python scripts/test_gpu_warmup.py --test model --model-dir /models/org/name

Without ``--model-dir`` the model check builds a tiny random Llama (workers.tools.checkpoints) in a temporary
directory. Exit status 0 when every chosen check ran, 1 when one failed (the error is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The allocator reads its configuration when CUDA starts: set it before anything can touch CUDA.
from gpufleet.gpu.runtime.device_memory import configure_allocator

ALLOC_CONF = configure_allocator()

from gpufleet.gpu.config import GpuConfig, WarmupConfig, WarmupSize  # noqa: E402
from gpufleet.gpu.runtime.memory_pool import GPUMemoryPool  # noqa: E402
from gpufleet.gpu.runtime.model_cache import ModelCache  # noqa: E402
from gpufleet.gpu.runtime.warmup import GPUWarmupManager  # noqa: E402
from gpufleet.gpu.units import MiB, fmt_bytes  # noqa: E402


def pick_device(requested: str | None) -> str:
    """``requested``, or CUDA when torch sees a GPU, else the CPU."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here; use --device cpu")
    if requested is not None:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def serve_dtype(device: str) -> str:
    """bf16 where the GPU has it, else fp16; fp32 on the CPU (the worker's AUTO precision)."""
    import torch

    if device == "cpu":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def show(title: str, data: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(data, indent=2, default=str))


def check_warmup(device: str, size: WarmupSize) -> None:
    """Warm the device up twice: the first run pays the one-time costs, the second shows the steady times."""
    manager = GPUWarmupManager(device, WarmupConfig(size=size), dtypes=(serve_dtype(device),))
    first = manager.warm_up()
    second = manager.warm_up()
    print(f"\n== warm-up on {device} ({size.value} shapes), allocator config {ALLOC_CONF!r}")
    print(f"{'op':<10} {'detail':<34} {'first s':>9} {'again s':>9}")
    for a, b in zip(first.steps, second.steps, strict=True):
        note = f"  skipped: {a.skipped}" if a.skipped else ""
        print(f"{a.op:<10} {a.detail:<34} {a.seconds:>9.4f} {b.seconds:>9.4f}{note}")
    print(f"{'total':<45} {first.total_s:>9.4f} {second.total_s:>9.4f}")
    show("device memory after warm-up", GPUMemoryPool.from_config(device, GpuConfig()).stats())


def check_memory(device: str) -> None:
    """Budget from the config, reservations refused when full, and the allocator's own figures."""
    pool = GPUMemoryPool.from_config(device, GpuConfig())
    print(f"\n== memory pool on {device}: budget {fmt_bytes(pool.budget_bytes)} (0.90 of the device)")
    block = min(pool.budget_bytes // 4, 256 * MiB)
    pool.reserve("check/a", block)
    pool.reserve("check/b", block)
    print(f"reserved a and b at {fmt_bytes(block)} each; free {fmt_bytes(pool.free_bytes)}")
    print(f"commit a at {fmt_bytes(block // 2)}: delta {fmt_bytes(pool.commit('check/a', block // 2))}")
    try:
        pool.reserve("check/too-big", pool.free_bytes + 1)
    except Exception as exc:  # the check is that it is refused with a clear message
        print(f"refused as expected: {type(exc).__name__}: {exc}")
    else:
        raise AssertionError("a reservation larger than the free budget was accepted")
    tensors: list[Any] = []
    if device.startswith("cuda"):
        import torch

        tensors = [torch.empty(size * MiB, dtype=torch.uint8, device=device) for size in (16, 64, 200)]
    show("pool stats with 280 MiB of tensors live" if tensors else "pool stats", pool.stats())
    del tensors
    for model_id in list(pool.reservations()):
        pool.release(model_id)


def build_tiny_llama(directory: Path) -> Path:
    """A tiny random Llama with the demo tokenizer, from the project's checkpoint builder."""
    from gpufleet.workers.tools.checkpoints import make_checkpoint

    return make_checkpoint(directory / "tiny-llama", "llama")


def check_model(device: str, model_dir: Path | None) -> None:
    """Load through pool + cache with the reference loader, warm the model up, then time five requests."""
    from gpufleet.gpu.runtime.inference import embed, generate
    from gpufleet.gpu.runtime.loader import PretrainedLoader
    from gpufleet.gpu.runtime.model import ModelKind
    from gpufleet.gpu.runtime.options import GenerateOptions

    with tempfile.TemporaryDirectory(prefix="gpufleet-check-") as scratch:
        path = model_dir if model_dir is not None else build_tiny_llama(Path(scratch))
        model_id = path.name
        dtype = serve_dtype(device)
        # The pool counts resident models through the cache (read only when a reservation is made).
        pool = GPUMemoryPool.from_config(device, GpuConfig(), resident_bytes=lambda: cache.used_bytes)
        cache: ModelCache[Any] = ModelCache(pool.budget_bytes)
        estimate = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        cache.make_room(estimate, for_key=model_id)
        pool.reserve(model_id, estimate)
        loaded = PretrainedLoader().load(model_id, path, device=device, dtype=dtype)
        cache.put(model_id, loaded, loaded.bytes, load_s=loaded.load_s)
        delta = pool.commit(model_id, loaded.bytes)
        print(f"\n== model {model_id} ({loaded.kind.value}) on {device} in {dtype}")
        print(f"loaded in {loaded.load_s:.3f} s, {fmt_bytes(loaded.bytes)} (estimate off by {fmt_bytes(delta)})")
        manager = GPUWarmupManager(device, WarmupConfig(), dtypes=(dtype,))
        print(f"warm_model: {manager.warm_model(loaded):.4f} s")
        request: Callable[[], object]
        if loaded.kind is ModelKind.EMBEDDING:
            request = lambda: embed(loaded, ["a first request", "and a second sentence"])  # noqa: E731
        else:
            request = lambda: generate(loaded, GenerateOptions(prompt="The first real request", max_new_tokens=8))  # noqa: E731
        times = []
        for _ in range(5):
            started = time.perf_counter()
            request()
            times.append(time.perf_counter() - started)
        print("request seconds: " + ", ".join(f"{t:.4f}" for t in times))
        print(f"first / median of the rest: {times[0] / sorted(times[1:])[len(times[1:]) // 2]:.2f}")
        hit_started = time.perf_counter()
        assert cache.get(model_id) is loaded
        print(f"cache hit: {(time.perf_counter() - hit_started) * 1e6:.1f} us")
        show("cache stats", cache.stats().to_dict())
        cache.clear()
        show("pool after unload", {"reserved_bytes": pool.reserved_bytes, "reservations": pool.reservations()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", choices=("all", "warmup", "memory", "model"), default="all")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    parser.add_argument("--model-dir", type=Path, default=None, help="a local model directory to load")
    parser.add_argument("--size", choices=[s.value for s in WarmupSize], default=WarmupSize.MEDIUM.value)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    checks: dict[str, Callable[[], None]] = {
        "warmup": lambda: check_warmup(device, WarmupSize(args.size)),
        "memory": lambda: check_memory(device),
        "model": lambda: check_model(device, args.model_dir),
    }
    failed = []
    for name, check in checks.items():
        if args.test not in ("all", name):
            continue
        try:
            check()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks ran'} on {device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
