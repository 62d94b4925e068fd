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

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.counting import positive_int

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
    """The checkpoint's weight files, from its index or the files themselves, and their bytes on disk.

    Raises:
        ModelSpecError: an index file is not readable JSON.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if not index_path.is_file():
            continue
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelSpecError(
                f"{index_path} is not a readable JSON index ({exc}): re-download the model's index file"
            ) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        names = sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []
        metadata = index.get("metadata") if isinstance(index, dict) else None
        total = positive_int(metadata.get("total_size")) if isinstance(metadata, dict) else None
        present = [model_dir / n for n in names if (model_dir / n).is_file()]
        if names and len(present) == len(names) and all(n.endswith(".safetensors") for n in names):
            return CheckpointLayout(len(names), total, tuple(present))
        note = ""
        if index_name.startswith("model.safetensors"):
            note = (
                f"bytes: {index_name} total_size ({total} bytes); {len(present)} of {len(names)} shard files "
                "present, so no headers were read: parameters from the config"
            )
        return CheckpointLayout(max(len(names), 1), total, (), note)
    safetensors = sorted(model_dir.glob("*.safetensors"))
    files = safetensors or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        return CheckpointLayout(1, None, ())
    return CheckpointLayout(len(files), sum(f.stat().st_size for f in files), tuple(safetensors))
