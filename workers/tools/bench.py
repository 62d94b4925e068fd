"""Model-loading benchmark: pinned copies, parallel reads, ``from_pretrained``, the fast loader, parked restore.

Run with ``python -m workers.tools.bench`` (or ``gpufleet bench``). It streams its own random checkpoint (a
7B-shaped bf16 Llama on a GPU, a ~285 MB one on the CPU; see workers.tools.checkpoints) as sharded safetensors
into a temp directory, measures everything in one process with the page cache warm, and writes
``<machine>-<date>.json``, ``.md`` and ``.png`` into the output directory (workers.tools.bench_report renders
them). The targets (GPU, 7B-shaped) are printed as met or missed; the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gpufleet.gpu.units import GB, MiB
from gpufleet.workers.tools.bench_report import ratios, render_chart, render_markdown
from gpufleet.workers.tools.checkpoints import SHAPES, write_checkpoint

# --------------------------------------------------------------------------------------------------------------
# measurements


def h2d_bandwidth_gbps(device: str, *, n_bytes: int = 1024 * MiB, repeats: int = 5) -> float:
    """Best pinned host→device copy bandwidth in GB/s (10^9 bytes per second)."""
    import torch

    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dest = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dest.copy_(host, non_blocking=True)  # first touch: context, allocator
    torch.cuda.synchronize(device)
    best_s = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dest.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best_s = min(best_s, time.perf_counter() - started)
    return n_bytes / best_s / GB


def read_bandwidth_gbps(files: list[Path], *, threads: int, chunk_bytes: int = 16 * MiB) -> float:
    """Parallel ``pread`` bandwidth over ``files`` in GB/s, after one warming read (page cache warm)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (f, off, min(chunk_bytes, f.stat().st_size - off))
        for f in files
        for off in range(0, f.stat().st_size, chunk_bytes)
    ]
    local = threading.local()

    def read(job: tuple[Path, int, int]) -> int:
        file, offset, n = job
        if getattr(local, "buffer", None) is None:
            local.buffer = bytearray(chunk_bytes)
            local.fds = {}
        fd = local.fds.get(file)
        if fd is None:
            fd = local.fds[file] = os.open(file, os.O_RDONLY)
        return os.preadv(fd, [memoryview(local.buffer)[:n]], offset)

    def run_once() -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            n_bytes = sum(pool.map(read, jobs))
        return n_bytes / (time.perf_counter() - started) / GB

    run_once()
    return max(run_once() for _ in range(2))


class RssSampler:
    """Peak resident set size of this process, sampled every few milliseconds in a thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.baseline_bytes = self._process.memory_info().rss
        self.peak_bytes = self.baseline_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        """Sample while the block runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def growth_bytes(self) -> int:
        """Peak minus the RSS when the sampler was made."""
        return self.peak_bytes - self.baseline_bytes


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _timed_loads(load: Callable[[], Any], device: str, repeats: int) -> tuple[list[float], Any]:
    """Load ``repeats`` times; the seconds of each and the last model (earlier ones are freed)."""
    times: list[float] = []
    loaded: Any = None
    for _ in range(repeats):
        loaded = None
        _free(device)
        started = time.perf_counter()
        loaded = load()
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times, loaded


# --------------------------------------------------------------------------------------------------------------
# the run


def machine_name(device: str) -> str:
    """``nvidia-h100-80gb-hbm3`` on a GPU, ``cpu-<host>-<N>c`` on the CPU (lower-case slug)."""
    if device.startswith("cuda"):
        import torch

        raw = torch.cuda.get_device_name(torch.device(device))
    else:
        raw = f"cpu-{platform.node()[:16] or 'host'}-{os.cpu_count() or 1}c"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def run_bench(out_dir: Path, *, device: str | None = None, size: str = "auto", repeats: int = 3) -> dict[str, Any]:
    """Measure loading paths on this machine and write JSON, markdown and PNG results into ``out_dir``.

    Args:
        out_dir: where ``<machine>-<date>.{json,md,png}`` go (created).
        device: "cuda", "cuda:N" or "cpu"; default cuda when available.
        size: "7b", "small", "tiny" or "auto" (7b on a GPU, small on the CPU).
        repeats: timed loads per path (the median is reported).

    Returns:
        The results written to the JSON file.

    Raises:
        ValueError: unknown size or repeats < 1.
    """
    import torch

    from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
    from gpufleet.gpu.runtime.parking import ParkedStore

    if repeats < 1:
        raise ValueError(f"repeats={repeats}; give at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    size = ("7b" if cuda else "small") if size == "auto" else size
    if size not in SHAPES:
        raise ValueError(f"size {size!r} is unknown; use one of {', '.join(SHAPES)} or auto")
    fast = FastSafetensorsLoader()
    results: dict[str, Any] = {
        "machine": machine_name(device),
        "date": dt.date.today().isoformat(),
        "device": device,
        "size": size,
        "repeats": repeats,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
        "cpu_count": os.cpu_count(),
        "read_threads": fast.read_threads,
        "staging_bytes": fast.staging_bytes if cuda else 0,
        # from_pretrained gets device_map only with accelerate installed (else: load on the CPU, then .to()).
        "from_pretrained_device_map": _has_accelerate(),
    }
    loaded: Any
    first: Any
    restored: Any
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as tmp:
        started = time.perf_counter()
        checkpoint = write_checkpoint(Path(tmp) / "llama", size)
        results["checkpoint"] = {
            "bytes": checkpoint.n_bytes,
            "shards": len(checkpoint.files),
            "write_s": round(time.perf_counter() - started, 3),
        }
        print(f"checkpoint: {checkpoint.n_bytes / GB:.2f} GB in {len(checkpoint.files)} shards", flush=True)
        if cuda:
            results["h2d_gbps"] = round(h2d_bandwidth_gbps(device), 2)
            print(f"pinned h2d: {results['h2d_gbps']} GB/s", flush=True)
        results["read_gbps"] = round(read_bandwidth_gbps(checkpoint.files, threads=fast.read_threads), 2)
        print(f"parallel read: {results['read_gbps']} GB/s", flush=True)

        reference = PretrainedLoader()
        times, loaded = _timed_loads(
            lambda: reference.load("bench", checkpoint.path, device=device, dtype="bfloat16"), device, repeats
        )
        results["from_pretrained_s"] = _summary(times)
        print(f"from_pretrained: {results['from_pretrained_s']['median']:.3f} s", flush=True)
        loaded = None
        _free(device)

        # First fast load with the RSS sampler: it includes allocating the pinned staging buffers.
        sampler = RssSampler()
        with sampler.running():
            first = fast.load("bench", checkpoint.path, device=device, dtype="bfloat16")
        model_bytes = first.bytes
        results["fast_first_s"] = round(first.load_s, 4)
        results["fast_loader"] = first.loader
        results["rss_growth_bytes"] = sampler.growth_bytes
        first = None
        times, loaded = _timed_loads(
            lambda: fast.load("bench", checkpoint.path, device=device, dtype="bfloat16"), device, repeats
        )
        results["fast_s"] = _summary(times)
        results["model_bytes"] = model_bytes
        print(f"fast: {results['fast_s']['median']:.3f} s ({loaded.loader})", flush=True)

        store = ParkedStore(host_budget_bytes=int(model_bytes * 1.1) + 64 * MiB)
        restores: list[float] = []
        for _ in range(repeats):
            if not store.park(loaded):
                raise RuntimeError("the parked store refused the benchmark model; this is a bug")
            restored = store.restore("bench", device)
            assert restored is not None
            loaded = restored
            restores.append(restored.load_s)
        results["parked_restore_s"] = _summary(restores)
        print(f"parked restore: {results['parked_restore_s']['median']:.3f} s", flush=True)
        loaded = restored = None
        _free(device)

    results.update(ratios(results, cuda))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{results['machine']}-{results['date']}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{stem}.md").write_text(render_markdown(results))
    render_chart(results, Path(f"{stem}.png"))
    results["files"] = [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    return results


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"transformers": transformers.__version__, "safetensors": safetensors.__version__}


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(times), 4),
        "min": round(min(times), 4),
        "max": round(max(times), 4),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options (``--out``, ``--device``, ``--size``, ``--repeats``) to ``parser``.

    The ``gpufleet bench`` subcommand and :func:`main` share them, so both print the same ``--help``.
    """
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument(
        "--size",
        default="auto",
        choices=["auto", *SHAPES],
        help="checkpoint shape: a 7B-shaped Llama, a ~285 MB one, a tiny one (default: 7b on a GPU, else small)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per path (the median is reported)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed options and print each target's verdict.

    Returns:
        0 when every applicable target is met (or none applies), 1 otherwise.
    """
    results = run_bench(args.out, device=args.device, size=args.size, repeats=args.repeats)
    failed = False
    for name, target in results["targets"].items():
        verdict = "n/a" if target["met"] is None else ("MET" if target["met"] else "MISSED")
        if not target["applies"]:
            verdict += " (informational: the goal is for a GPU and a 7B-shaped checkpoint)"
        elif target["met"] is False:
            failed = True
        print(f"target {name}: {target['value']} (goal >= {target['goal']}) {verdict}")
    print("wrote " + ", ".join(results["files"]))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.tools.bench [--out DIR] [--device D] [--size S] [--repeats N]``; ``--help`` says more.

    Returns:
        0 when every applicable target is met (or none applies), 1 otherwise; ``--help`` exits 0 after printing.
    """
    parser = argparse.ArgumentParser(
        prog="gpufleet bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
