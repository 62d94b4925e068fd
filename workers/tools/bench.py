"""Model-loading benchmark: pinned copies, parallel reads, ``from_pretrained``, the fast loader, parked restore.

Run with ``python -m workers.tools.bench`` (or ``gpufleet bench``). It writes its own random checkpoint (a
7B-shaped bf16 Llama on a GPU, a ~285 MB one on the CPU) as sharded safetensors into a temp directory, measures
everything in one process with the page cache warm, and writes ``<machine>-<date>.json``, ``.md`` and ``.png``
into the output directory. The targets (GPU, 7B-shaped) are printed as met or missed.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu.units import GB, MiB

# Checkpoint shapes: Llama with hidden, layers, intermediate, vocab, heads, and the shard size they are cut into.
SIZES: dict[str, dict[str, int]] = {
    "7b": {"hidden": 4096, "layers": 32, "intermediate": 11008, "vocab": 32000, "heads": 32, "shard_mib": 2048},
    "small": {"hidden": 1024, "layers": 6, "intermediate": 2816, "vocab": 32000, "heads": 16, "shard_mib": 64},
    "tiny": {"hidden": 256, "layers": 2, "intermediate": 688, "vocab": 32000, "heads": 4, "shard_mib": 8},
}
# Targets from issue 5 (GPU, 7B-shaped checkpoint).
TARGET_FAST_VS_PRETRAINED = 3.0
TARGET_FRACTION_OF_FLOOR = 0.6
TARGET_RESTORE_VS_H2D = 0.8
TARGET_RSS_MODEL_FRACTION = 0.10


@dataclass(frozen=True)
class Checkpoint:
    """A benchmark checkpoint on disk."""

    path: Path
    files: list[Path]
    n_bytes: int  # tensor bytes over all shards


# --------------------------------------------------------------------------------------------------------------
# checkpoint


def write_checkpoint(directory: Path, size: str) -> Checkpoint:
    """Write a random bf16 Llama of ``size`` as sharded safetensors, a config and a tiny tokenizer.

    Tensor values come from one 64 MiB block of small normals, tiled: the writer streams bytes to the files and
    never holds a model (or even one shard) in memory.

    Raises:
        KeyError: ``size`` is not in :data:`SIZES`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    specs = [(name, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    del skeleton
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    _write_tokenizer(directory)

    generator = torch.Generator().manual_seed(0)
    block = (torch.randn(32 * MiB, generator=generator) * 0.02).to(torch.bfloat16).view(torch.uint8)
    block_bytes = memoryview(block.numpy().tobytes())
    shard_limit = shape["shard_mib"] * MiB
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, dims in specs:
        nbytes = _numel(dims) * 2
        if shards[-1] and shard_bytes + nbytes > shard_limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, dims))
        shard_bytes += nbytes
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards):
        file = directory / f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(file, shard, block_bytes)
        files.append(file)
        weight_map.update({name: file.name for name, _ in shard})
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return Checkpoint(directory, files, total)


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _write_safetensors(file: Path, tensors: list[tuple[str, tuple[int, ...]]], block: memoryview) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = _numel(dims) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with file.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for _, dims in tensors:
            left = _numel(dims) * 2
            while left:
                n = min(left, len(block))
                handle.write(block[:n])
                left -= n
    return offset


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["load the model fast", "park it and restore it"],
        trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]),
    )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(directory))


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

    from gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
    from gpu.runtime.parking import ParkedStore

    if repeats < 1:
        raise ValueError(f"repeats={repeats}; give at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    size = ("7b" if cuda else "small") if size == "auto" else size
    if size not in SIZES:
        raise ValueError(f"size {size!r} is unknown; use one of {', '.join(SIZES)} or auto")
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

    results.update(_ratios(results, cuda))
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


def _ratios(results: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Speeds, ratios and the targets, each with whether it applies (GPU only) and whether it was met."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.tools.bench [--out DIR] [--device D] [--size S] [--repeats N]``.

    Returns 0 when every applicable target is met (or none applies), 1 otherwise."""
    parser = argparse.ArgumentParser(prog="gpufleet bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--size", default="auto", choices=["auto", *SIZES], help="checkpoint shape")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per path")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
