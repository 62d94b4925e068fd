"""A checkpoint's weight files, as both the planner and the loader read them: which files, and their headers.

One finder (:func:`weight_files`) with transformers' own rule, and one safetensors header reader
(:func:`read_header`) with the format's 100 MiB header limit: the planner sizes a model from the same files and
headers the loader then reads. Pure Python: never imports torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from gpufleet.gpu.errors import CheckpointFormatError
from gpufleet.gpu.units import SAFETENSORS_DTYPES

__all__ = ["MAX_HEADER_BYTES", "TensorEntry", "WeightFiles", "read_header", "weight_files"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Bigger headers than this mean a corrupt or hostile file (the format's own readers cap it the same way).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype (the format's code, ``"BF16"``), shape and byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header: an 8-byte little-endian length, then JSON naming dtype, shape and offsets.

    Args:
        file: a ``.safetensors`` file.

    Returns:
        Tensor name → :class:`TensorEntry` (``__metadata__`` left out).

    Raises:
        CheckpointFormatError: the file is unreadable, truncated, not a safetensors file, or names a dtype this
            reader does not know.
    """
    try:
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointFormatError(f"{file} is too short to be a safetensors file; re-download the weights")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointFormatError(
                    f"{file} declares a {header_len}-byte header, over the format's 100 MiB limit: it is not a "
                    "safetensors file or is corrupt; re-download the weights"
                )
            raw = handle.read(header_len)
        file_bytes = file.stat().st_size
    except OSError as exc:
        raise CheckpointFormatError(
            f"cannot read {file}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointFormatError(f"{file} has no valid safetensors JSON header: re-download the weights") from None
    if not isinstance(header, dict) or len(raw) < header_len:
        raise CheckpointFormatError(f"{file} has a truncated or malformed safetensors header: re-download the weights")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entry = _entry(file, name, meta, data_start)
        if entry.offset + entry.nbytes > file_bytes:
            raise CheckpointFormatError(
                f"{file} is truncated: tensor {name!r} ends past the end of the file; re-download the weights"
            )
        entries[name] = entry
    return entries


def _entry(file: Path, name: str, meta: object, data_start: int) -> TensorEntry:
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{file}: tensor {name!r} has a malformed header entry; re-download the weights")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(
            f"{file}: tensor {name!r} has dtype {dtype!r}, which gpufleet does not know; "
            f"known: {', '.join(SAFETENSORS_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{file}: tensor {name!r} has a malformed shape {shape!r}; re-download the weights")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointFormatError(f"{file}: tensor {name!r} has no byte range; re-download the weights")
    begin, end = offsets
    if end < begin or begin < 0:
        raise CheckpointFormatError(f"{file}: tensor {name!r} has a bad byte range {offsets}; re-download the weights")
    return TensorEntry(file=file, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)


@dataclass(frozen=True)
class WeightFiles:
    """A model directory's weight files, found the way transformers looks for them.

    Attributes:
        files: every weight file the checkpoint names (an index's shards, or its one file), present or not.
        present: those present on disk.
        index: the index file, when the checkpoint is sharded.
        index_total_bytes: the index's ``metadata.total_size``, when it says.
    """

    files: tuple[Path, ...]
    present: tuple[Path, ...]
    index: Path | None = None
    index_total_bytes: int | None = None

    @property
    def safetensors(self) -> tuple[Path, ...]:
        """Every weight file, when all are safetensors files present on disk; else empty."""
        if self.files and len(self.present) == len(self.files) and all(f.suffix == ".safetensors" for f in self.files):
            return self.present
        return ()

    @property
    def complete(self) -> bool:
        return bool(self.files) and len(self.present) == len(self.files)


def weight_files(model_dir: Path) -> WeightFiles:
    """The checkpoint's weight files: ``model.safetensors.index.json``'s shards, else ``model.safetensors``, else
    the same for ``pytorch_model.bin`` (transformers' order), else shards found by their names without an index;
    no files when there are none of these.

    Raises:
        CheckpointFormatError: an index file is not readable JSON.
    """
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = model_dir / index_name
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointFormatError(
                    f"{index} is not a readable JSON index ({exc}): re-download the model's index file"
                ) from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            names = sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []
            metadata = data.get("metadata") if isinstance(data, dict) else None
            total = metadata.get("total_size") if isinstance(metadata, dict) else None
            files = tuple(model_dir / name for name in names)
            return WeightFiles(
                files=files,
                present=tuple(f for f in files if f.is_file()),
                index=index,
                index_total_bytes=total if isinstance(total, int) and total > 0 else None,
            )
        single = model_dir / single_name
        if single.is_file():
            return WeightFiles(files=(single,), present=(single,))
    # Shards without their index (a partial download or copy): what is on disk, by the shards' own names.
    for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"):
        shards = tuple(sorted(model_dir.glob(pattern)))
        if shards:
            return WeightFiles(files=shards, present=shards)
    return WeightFiles(files=(), present=())
