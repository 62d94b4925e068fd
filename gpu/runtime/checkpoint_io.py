"""What every loader shares: the errors a checkpoint read can raise, the tokenizer, the served dtype (torch lazily).

Apart from the loaders themselves so that each (the fast loader, ``from_pretrained``, GGUF, device maps) imports
this and none imports another.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.gpu.errors import LoadFailedError
from gpufleet.gpu.units import DTYPES, SERVED_DTYPES

if TYPE_CHECKING:
    import torch

# What reading a checkpoint raises when the files are wrong: missing or unreadable files, bad JSON or shapes, a
# pickle that torch's weights-only loader refuses (never executed), a size mismatch. A device OOM is translated
# before these are caught, so it stays an out-of-memory error.
CHECKPOINT_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        LoadFailedError: the name is not a served dtype.
    """
    import torch

    if name not in SERVED_DTYPES:
        raise LoadFailedError(f"dtype {name!r} is not served; use {', '.join(SERVED_DTYPES)}")
    return getattr(torch, DTYPES[name].torch_name or name)  # type: ignore[no-any-return]


def load_tokenizer(path: Path) -> object:
    """The model's tokenizer, from local files only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
