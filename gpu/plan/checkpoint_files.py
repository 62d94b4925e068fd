"""A model directory's files as planning reads them: its ``config.json`` (parsed once per version of the file)
and the layout of its weight files (an index, shards, safetensors or not, bytes on disk).

Pure Python: never imports torch or transformers.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.checkpoint_format import SAFETENSORS_INDEX, weight_files
from gpufleet.gpu.errors import ModelSpecError

__all__ = ["CheckpointLayout", "checkpoint_layout", "read_config"]


def read_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` at ``path``, read once per version of the file.

    Cached on the resolved path, the file's modification time and its size, so a model load that plans, counts
    and loads reads the file once, and a rewritten config is read again. Callers get a fresh copy: mutating it
    does not change what the next caller sees.

    Args:
        path: a ``config.json`` file (or any JSON config).

    Returns:
        The JSON object.

    Raises:
        ModelSpecError: the file cannot be read, is not valid JSON, or holds something other than an object.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelSpecError(f"cannot read {path}: {exc.strerror or exc}; check the path and permissions") from None
    return copy.deepcopy(_read_config(path.resolve(), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=256)
def _read_config(path: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelSpecError(f"cannot read {path}: {exc.strerror or exc}; check the path and permissions") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSpecError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
            "re-download or fix the config"
        ) from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{path} holds a JSON {type(config).__name__}, not an object: fix the config")
    return config


@dataclass(frozen=True)
class CheckpointLayout:
    """The weight files of a model directory.

    Attributes:
        num_files: weight files (shards) in the checkpoint.
        total_bytes: the index's ``total_size`` or the files' sizes on disk; ``None`` without weight files.
        safetensors: every weight file, when all are safetensors files present on disk; else empty.
        note: a why-string when the index names shards that are not all there.
    """

    num_files: int
    total_bytes: int | None  # the index's total_size or the files' sizes on disk
    safetensors: tuple[Path, ...]  # every weight file, when all are safetensors files present on disk
    note: str = ""


def checkpoint_layout(model_dir: Path) -> CheckpointLayout:
    """The checkpoint's weight files (:func:`gpufleet.gpu.checkpoint_format.weight_files`: the loader's rule) and
    their bytes on disk.

    Raises:
        ModelSpecError: an index file is not readable JSON.
    """
    found = weight_files(model_dir)
    if not found.files:
        return CheckpointLayout(1, None, ())
    if found.index is None:
        on_disk = sum(f.stat().st_size for f in found.present)
        return CheckpointLayout(len(found.files), on_disk, found.safetensors)
    total = found.index_total_bytes
    if found.safetensors:
        return CheckpointLayout(len(found.files), total, found.safetensors)
    note = ""
    if found.index.name == SAFETENSORS_INDEX:
        note = (
            f"bytes: {found.index.name} total_size ({total} bytes); {len(found.present)} of {len(found.files)} shard "
            "files present, so no headers were read: parameters from the config"
        )
    return CheckpointLayout(len(found.files), total, (), note)
