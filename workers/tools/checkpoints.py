"""Random-weight checkpoints in the standard Hugging Face layout, made locally with no network.

The one builder behind every generated model: the demo chat model, the tiny models tests load, and the
benchmarks' checkpoints. A checkpoint is a model of an architecture (:data:`ARCHITECTURES`) and a shape
(:data:`SHAPES`, or any :class:`Shape`), in a dtype, tied or not, in one file or sharded, with a
``config.json`` and the local tokenizer (:mod:`gpufleet.workers.tools.tokenizer`). Two ways to write one:

* :func:`make_checkpoint` instantiates the model with transformers (weights from a fixed seed) and saves it with
  ``save_pretrained``: byte for byte the layout a hub checkpoint has, for anything that fits in memory;
* :func:`write_checkpoint` streams random tensor bytes straight into safetensors shards, with the tensor names
  and shapes transformers gives the architecture on the meta device: a 7B-shaped checkpoint without ever
  holding the model (or even one shard) in memory.

Torch, transformers and tokenizers are imported lazily, so importing this module costs nothing. Both writers
build in a scratch directory next to the target and rename it into place, so a crash never leaves a
half-written model where a loader would find it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.units import DTYPES as UNIT_DTYPES
from gpufleet.gpu.units import MiB
from gpufleet.workers.tools.families import ENCODERS, auto_class, config_options, tokenizer_for
from gpufleet.workers.tools.guards import needs_worker_libraries, writing
from gpufleet.workers.tools.shapes import Shape

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3", "bert", "xlm-roberta", "qwen2_vl")
# Encoders are saved as the bare encoder (what an embedding model is), multimodal models with their image-text
# class, the rest as causal LMs; the families' differences live in workers.tools.families.
DTYPES = ("float32", "float16", "bfloat16")
_RANDOM_BLOCK_BYTES = 64 * MiB  # write_checkpoint tiles this much random data over every tensor


SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344, shard_size="8MiB"),
    # ~285 MB in bf16: big enough for parallel reads over several shards, small enough for a CI machine.
    "small": Shape(1024, 6, 16, 16, 2816, max_positions=4096, vocab_size=32000, shard_size="64MiB"),
    "7b": Shape(4096, 32, 32, 32, 11008, max_positions=4096, vocab_size=32000, shard_size="2GiB"),
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint :func:`write_checkpoint` wrote."""

    path: Path
    files: list[Path]  # the safetensors shards
    n_bytes: int  # tensor bytes over all shards


def model_config(arch: str, shape: Shape, *, tie: bool | None = None, tokenizer: Any = None) -> Any:
    """A transformers config for ``arch`` with ``shape`` and the tokenizer's vocabulary and special token ids.

    Args:
        arch: the ``model_type``, one of :data:`ARCHITECTURES`.
        shape: the dimensions.
        tie: share the input embedding with the output head; ``None`` keeps the architecture's default (gpt2
            ties, the others do not).
        tokenizer: the tokenizer whose size and ids the config takes; default the family's
            (:func:`gpufleet.workers.tools.families.tokenizer_for`).

    Returns:
        A ``transformers.PretrainedConfig``.

    Raises:
        ConfigError: an unknown ``arch``, or the worker libraries are missing.
    """
    _check_arch(arch)
    with needs_worker_libraries("making checkpoints"):
        from transformers import AutoConfig

        tokenizer = tokenizer if tokenizer is not None else tokenizer_for(arch)
        return AutoConfig.for_model(arch, **config_options(arch, shape, tokenizer, tie=tie))


def make_checkpoint(
    directory: Path,
    arch: str = "llama",
    *,
    size: str | Shape = "tiny",
    dtype: str = "float32",
    tie: bool | None = None,
    max_shard_size: str | None = None,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Instantiate a random ``arch`` model with transformers and save it, with the tokenizer, to ``directory``.

    The same arguments always give the same weights (a private RNG stream: the caller's RNG state is untouched).
    Causal LMs get a greedy ``generation_config.json``, so a plain ``generate`` call is deterministic.

    Args:
        directory: the model directory to create; it must not exist yet (or be empty).
        arch: the ``model_type``, one of :data:`ARCHITECTURES` (``bert`` is saved as a bare encoder).
        size: a name in :data:`SHAPES` or a :class:`Shape`; the default is a few MB.
        dtype: one of :data:`DTYPES`.
        tie: share the input embedding with the output head (one tensor in the checkpoint); ``None`` keeps the
            architecture's default.
        max_shard_size: split the weights into shards of at most this size (``"200KB"``) with a
            ``model.safetensors.index.json``; ``None`` writes one ``model.safetensors``.
        seed: seed for the random weights.
        with_tokenizer: also write the tokenizer files (leave out to test a model without them).

    Returns:
        ``directory``.

    Raises:
        ConfigError: an unknown ``arch``, ``size`` or ``dtype``, ``directory`` already holds files, the worker
            libraries are missing, or ``directory`` cannot be written.
    """
    directory = Path(directory)
    shape = _checked(directory, arch, size, dtype)

    def build(target: Path) -> None:
        with needs_worker_libraries("making checkpoints"):
            import torch

            tokenizer = tokenizer_for(arch)
            config = model_config(arch, shape, tie=tie, tokenizer=tokenizer)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = auto_class(arch).from_config(config)
            model = model.to(getattr(torch, dtype)).eval()
            if arch not in ENCODERS:
                model.generation_config.do_sample = False
            options: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            with _quiet_progress():
                model.save_pretrained(str(target), **options)
            if with_tokenizer:
                tokenizer.save_pretrained(str(target))

    with writing(directory, f"{arch} checkpoint"):
        publish_atomically(directory, build)
    return directory


def write_checkpoint(
    directory: Path,
    size: str | Shape = "7b",
    *,
    arch: str = "llama",
    dtype: str = "bfloat16",
    tie: bool | None = None,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Checkpoint:
    """Stream a random ``arch`` checkpoint of ``size`` to ``directory`` without building the model in memory.

    Tensor names and shapes come from the model built on the meta device (no storage); the values are one
    64 MiB block of small normals tiled over every tensor, written straight to the shard files. The tensor names
    are the modules' own (the hub's for the llama family). The config and the tokenizer are written as
    :func:`make_checkpoint` writes them.

    Args:
        directory: the model directory to create; it must not exist yet (or be empty).
        size: a name in :data:`SHAPES` or a :class:`Shape`.
        arch: the ``model_type``, one of :data:`ARCHITECTURES`.
        dtype: one of :data:`DTYPES`.
        tie: as for :func:`make_checkpoint`.
        max_shard_size: the largest shard (``"2GiB"``); default the shape's ``shard_size``.
        seed: seed for the random block.

    Returns:
        The checkpoint: its directory, shard files and tensor bytes.

    Raises:
        ConfigError: an unknown ``arch``, ``size`` or ``dtype``, ``directory`` already holds files, the worker
            libraries are missing, or ``directory`` cannot be written.
    """
    directory = Path(directory)
    shape = _checked(directory, arch, size, dtype)
    written: list[Checkpoint] = []

    def build(target: Path) -> None:
        with needs_worker_libraries("making checkpoints"):
            import torch
            from transformers.utils.hub import convert_file_size_to_int

            tokenizer = tokenizer_for(arch)
            config = model_config(arch, shape, tie=tie, tokenizer=tokenizer)
            with torch.device("meta"):
                skeleton = auto_class(arch).from_config(config)
            # keep_vars: tied weights are one Parameter under two names; the checkpoint holds it once, under
            # the first name (the input embedding), as save_pretrained does.
            seen: set[int] = set()
            tensors: list[tuple[str, tuple[int, ...]]] = []
            for name, tensor in skeleton.state_dict(keep_vars=True).items():
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensors.append((name, tuple(tensor.shape)))
            config.architectures = [type(skeleton).__name__]
            config.dtype = dtype
            del skeleton
            config.save_pretrained(str(target))
            tokenizer.save_pretrained(str(target))
            limit = int(convert_file_size_to_int(max_shard_size or shape.shard_size))
            generator = torch.Generator().manual_seed(seed)
            element_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            block = (torch.randn(_RANDOM_BLOCK_BYTES // element_bytes, generator=generator) * 0.02).to(
                getattr(torch, dtype)
            )
            files, total = _write_shards(
                target,
                tensors,
                dtype=dtype,
                element_bytes=element_bytes,
                limit_bytes=limit,
                block=block.view(torch.uint8),
            )
        written.append(Checkpoint(directory, [directory / f.name for f in files], total))

    with writing(directory, f"{arch} checkpoint"):
        publish_atomically(directory, build)
    return written[0]


def _write_shards(
    target: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    *,
    dtype: str,
    element_bytes: int,
    limit_bytes: int,
    block: Any,
) -> tuple[list[Path], int]:
    """Cut ``tensors`` into shards of at most ``limit_bytes`` and write them (an index when more than one)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, dims in tensors:
        nbytes = _numel(dims) * element_bytes
        if shards[-1] and shard_bytes + nbytes > limit_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, dims))
        shard_bytes += nbytes
    data = memoryview(block.numpy().tobytes())
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards):
        single = len(shards) == 1
        file = target / ("model.safetensors" if single else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors")
        total += _write_safetensors(file, shard, dtype, element_bytes, data)
        files.append(file)
        weight_map.update({name: file.name for name, _ in shard})
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return files, total


def _write_safetensors(
    file: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, element_bytes: int, data: memoryview
) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = _numel(dims) * element_bytes
        header[name] = {
            "dtype": UNIT_DTYPES[dtype].safetensors,
            "shape": list(dims),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with file.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for _, dims in tensors:
            left = _numel(dims) * element_bytes
            while left:
                n = min(left, len(data))
                handle.write(data[:n])
                left -= n
    return offset


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


# --- publishing ---------------------------------------------------------------------------------------------


def is_complete(path: Path, required: tuple[str, ...]) -> bool:
    """Every file in ``required`` is present under ``path`` and not empty."""
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in required)


def publish_atomically(path: Path, build: Callable[[Path], None], *, required: tuple[str, ...] = ()) -> bool:
    """Build into a scratch directory next to ``path`` and rename it into place, replacing what is there.

    Args:
        path: the model directory to publish.
        build: writes the model's files into the directory it is given.
        required: files that make a model complete; when another process publishes a complete model at
            ``path`` while this one builds, theirs is kept.

    Returns:
        False when another process's complete model was kept, True when this build was published.

    Raises:
        OSError: the scratch directory or the rename failed (the old model, if any, is put back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space two levels below a hidden directory: on the same file system as the target (so the final
    # rename is atomic), and too deep for repository.list_models' ``*/config.json`` and ``*/*/config.json``
    # globs to mistake a half-built model for a real one.
    scratch_root = path.parent / ".partial"
    scratch_root.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=scratch_root))
    try:
        staged = scratch / "model"
        staged.mkdir()
        build(staged)
        old = scratch / "old"
        if path.exists():
            # An old or incomplete copy: move it aside first, so the name is without a model only between two
            # renames, and put it back if the second one fails.
            path.rename(old)
        try:
            staged.rename(path)
        except OSError:
            if required and is_complete(path, required):
                return False  # another process (a second setup container) published first: keep theirs
            if old.exists() and not path.exists():
                old.rename(path)
            raise
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with suppress(OSError):
            scratch_root.rmdir()  # only when empty: another build may be using it


# --- comparing loaded models --------------------------------------------------------------------------------


def sample_inputs() -> dict[str, Any]:
    """A fixed batch of two sequences (the second padded) with ids inside every built model's vocabulary."""
    import torch

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def outputs(module: Any, inputs: dict[str, Any]) -> Any:
    """Logits of a causal LM or last hidden states of an encoder for ``inputs``, on the module's device."""
    import torch

    device = next(module.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = module(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- helpers ------------------------------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}")


def _checked(directory: Path, arch: str, size: str | Shape, dtype: str) -> Shape:
    _check_arch(arch)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(size, str) and size not in SHAPES:
        raise ConfigError(f"size {size!r} is unknown; use one of {', '.join(SHAPES)} or pass a Shape")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} already exists and is not empty; pass a new directory for the checkpoint")
    return SHAPES[size] if isinstance(size, str) else size


@contextmanager
def _quiet_progress() -> Iterator[None]:
    # save_pretrained draws a "Writing model shards" bar on stderr: noise in CLI output and test logs. The
    # switch is process-wide, so put it back the way it was.
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # its switches are untyped
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
