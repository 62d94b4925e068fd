"""Resolve model ids to local directories, refusing anything that escapes the model root.

No network is ever used: an id like ``org/name`` resolves to ``<model_root>/org/name`` or, failing that, to a
snapshot in an offline Hugging Face cache (``<hf_cache>/models--org--name/snapshots/<rev>``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gpufleet.gpu.errors import ModelNotInstalledError, UnsafeModelIdError

# One or two path segments of letters, digits, '.', '_' and '-', each starting with a letter or digit:
# the shape of Hugging Face repo ids. Anything else (absolute paths, '..', backslashes) is refused.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_ID_PATTERN = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")
# A GGUF model may come without a config.json (the file's metadata is the config): any .gguf file marks one.
GGUF_GLOB = "*.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model id lives on this machine."""

    model_id: str
    path: Path
    source: str  # "root" or "hf-cache"


def validate_model_id(model_id: str) -> str:
    """Check that ``model_id`` has the shape ``org/name`` (or ``name``) and nothing that could escape a root.

    Raises:
        UnsafeModelIdError: the id is empty, too long, absolute, contains ``..`` or characters outside the set.
    """
    if not isinstance(model_id, str) or not model_id:
        raise UnsafeModelIdError("model id is empty: pass an id like 'org/name' that exists under the model root")
    if ".." in model_id.split("/") or not MODEL_ID_PATTERN.match(model_id) or ".." in model_id:
        raise UnsafeModelIdError(
            f"model id {model_id!r} is not allowed: use 'org/name' with letters, digits, '.', '_' and '-' only "
            "(no absolute paths, no '..')"
        )
    return model_id


def default_hf_cache() -> Path:
    """The Hugging Face hub cache this process would use (``HF_HUB_CACHE``, ``HF_HOME``, or ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home) / "hub"


def _inside(child: Path, root: Path) -> bool:
    try:
        child.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _hf_snapshot(model_id: str, cache: Path) -> Path | None:
    repo_dir = cache / ("models--" + model_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return revisions[-1] if revisions else None


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a model: a ``config.json``, safetensors weights or a ``.gguf`` file."""
    if not path.is_dir():
        return False
    return any((path / marker).is_file() for marker in MODEL_MARKERS) or any(p.is_file() for p in path.glob(GGUF_GLOB))


def resolve_model(model_id: str, model_root: Path | None, hf_cache: Path | None = None) -> ResolvedModel:
    """Find the local directory of ``model_id``.

    Args:
        model_id: ``org/name`` (validated by :func:`validate_model_id`).
        model_root: directory that holds ``org/name`` subdirectories; ``None`` to use only the HF cache.
        hf_cache: offline Hugging Face hub cache to fall back on; ``None`` to skip it.

    Returns:
        The resolved model with its directory, which is guaranteed to lie inside ``model_root`` (after
        following symlinks) when it came from there.

    Raises:
        UnsafeModelIdError: the id is malformed or resolves outside the root.
        ModelNotInstalledError: no directory with a ``config.json``, safetensors or ``.gguf`` file was found.
    """
    validate_model_id(model_id)
    searched: list[str] = []
    if model_root is not None:
        candidate = model_root / model_id
        searched.append(str(candidate))
        if candidate.exists():
            if not _inside(candidate, model_root):
                raise UnsafeModelIdError(
                    f"model id {model_id!r} resolves outside the model root {model_root} (a symlink?): "
                    "move the model inside the root"
                )
            if is_model_dir(candidate):
                return ResolvedModel(model_id, candidate, "root")
    if hf_cache is not None:
        searched.append(str(hf_cache / ("models--" + model_id.replace("/", "--"))))
        snapshot = _hf_snapshot(model_id, hf_cache)
        if snapshot is not None and is_model_dir(snapshot):
            return ResolvedModel(model_id, snapshot, "hf-cache")
    raise ModelNotInstalledError(
        f"model {model_id!r} was not found (looked in: {', '.join(searched) or 'nowhere: no model root set'}); "
        "put it under GPUFLEET_MODEL_ROOT as org/name (`gpufleet models make-demo ROOT` creates the demo models) "
        "or pre-download it into the offline Hugging Face cache"
    )


def list_models(model_root: Path) -> list[str]:
    """Model ids (``org/name`` or ``name``) present under ``model_root``, sorted: directories one or two levels
    down holding a ``config.json`` or a ``.gguf`` file (hidden directories, where models are built, are skipped).
    """
    found: set[str] = set()
    if not model_root.is_dir():
        return []
    for pattern in ("config.json", GGUF_GLOB):
        for marker in [*model_root.glob(f"*/{pattern}"), *model_root.glob(f"*/*/{pattern}")]:
            model_id = marker.parent.relative_to(model_root).as_posix()
            if marker.is_file() and not any(part.startswith(".") for part in model_id.split("/")):
                found.add(model_id)
    return sorted(found)
