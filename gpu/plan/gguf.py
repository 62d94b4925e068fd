"""GGUF files, planned as they are served: parameters counted from the header, sized at the serving dtype.

Workers serve a GGUF file through transformers' GGUF loading, which dequantizes every tensor to the dtype the
model is served in (:mod:`gpufleet.gpu.runtime.gguf_loader`). So the memory a GGUF model needs is its parameter count
times the serving dtype's bytes, not the file's size: a 7B ``Q4_K_M`` file of 4.1 GB takes about 14 GB in bf16. This
module reads the file's header (metadata and tensor infos, never the tensor data) in pure Python, so the router
can plan a GGUF model without torch, transformers or the ``gguf`` package, and the worker reserves what it will
really hold.

The layout read here is GGUF version 2 and 3, little-endian (what llama.cpp and the ``gguf`` package write)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count  x (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)

where a string is a u64 byte length and UTF-8 bytes, and an array value is an element type (u32), a count (u64)
and the elements.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.model_spec import ModelSpec, SpecSource
from gpufleet.gpu.units import fmt_bytes

__all__ = [
    "GGUF_ENCODER_ARCHITECTURES",
    "GGUF_MAGIC",
    "GgufHeader",
    "GgufTensor",
    "gguf_files",
    "is_gguf",
    "read_gguf_header",
    "spec_from_gguf_files",
]

GGUF_MAGIC = b"GGUF"
# llama.cpp's names for encoder-only architectures: served as embedding models, with no KV cache.
GGUF_ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}
)
# Split models: llama.cpp's gguf-split names the parts model-00001-of-00003.gguf.
_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Multimodal projectors shipped beside a language model's GGUF (llava, Qwen2-VL): not the model itself.
_PROJECTOR_PREFIX = "mmproj"

# GGUF metadata value types: struct format of the scalars; 8 is a string and 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types by number (ggml.h), for notes; the parameter count does not depend on them.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in the header: its name, element counts (innermost first, as GGUF stores them), type."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int

    @property
    def numel(self) -> int:
        """Number of elements (parameters)."""
        count = 1
        for dim in self.dims:
            count *= dim
        return count

    @property
    def type_name(self) -> str:
        """``Q8_0``, ``F16`` …; ``type N`` for a type this module does not name."""
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file's header says: version, metadata (arrays as their lengths) and tensor infos."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GgufTensor, ...]

    @property
    def architecture(self) -> str:
        """``general.architecture`` (``llama``, ``qwen2``, ``bert`` …), ``unknown`` when absent."""
        return str(self.metadata.get("general.architecture") or "unknown")

    def arch_value(self, key: str) -> Any:
        """The architecture's own key, e.g. ``block_count`` → ``llama.block_count``; ``None`` when absent."""
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def params(self) -> int:
        """Parameters over all tensors."""
        return sum(t.numel for t in self.tensors)

    def type_counts(self) -> Counter[str]:
        """How many tensors of each ggml type the file holds."""
        return Counter(t.type_name for t in self.tensors)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """The GGUF file(s) that make up the model in ``model_dir``, and notes on what was chosen.

    A directory may hold one file, the parts of one split model, or several quantizations side by side (the
    first by name is taken, and a note says so); multimodal projector files (``mmproj-*.gguf``) are never the
    model. The loader and the plan both choose through this function, so they agree on the file.

    Returns:
        The chosen files (several only for a split model) and notes; no files when there is no model GGUF.
    """
    found = sorted(p for p in model_dir.glob("*.gguf") if p.is_file())
    models = [p for p in found if not p.name.lower().startswith(_PROJECTOR_PREFIX)]
    if not models:
        return [], []
    parts = [p for p in models if _SPLIT_PART.search(p.name)]
    if parts and len(parts) == len(models):
        return parts, [f"split GGUF model in {len(parts)} parts"]
    if len(models) > 1:
        return [models[0]], [f"{len(models)} GGUF files found: {models[0].name} is the one served and planned"]
    return models, []


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the header of the GGUF file at ``path`` (metadata and tensor infos; the tensor data is not read).

    Arrays in the metadata (the vocabulary, merges, scores) are kept as their lengths only.

    Raises:
        ModelSpecError: the file cannot be read, is not GGUF, is a version this parser does not read (1, or
            big-endian), or its header is truncated.
    """
    try:
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ModelSpecError(f"{path} is not a GGUF file (no GGUF magic): re-download or re-convert it")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data)
    except OSError as exc:
        raise ModelSpecError(f"cannot read {path}: {exc.strerror or exc}; check the path and permissions") from None
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise ModelSpecError(
            f"{path} has a truncated or corrupt GGUF header ({exc}): re-download or re-convert the file"
        ) from None


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.at = 4  # after the magic

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.at + length > len(self.data):
            raise struct.error(f"string of {length} bytes runs past the end of the file")
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8")
        self.at += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type = self.unpack("<I")
            count = self.unpack("<Q")
            self.skip_array(element_type, count)
            return count  # planning needs an array's length (the vocabulary size), never its elements
        raise struct.error(f"unknown metadata value type {value_type}")

    def skip_array(self, element_type: int, count: int) -> None:
        if element_type in _SCALARS:
            self.at += struct.calcsize(_SCALARS[element_type]) * count
        elif element_type == _STRING:
            for _ in range(count):
                self.at += 8 + struct.unpack_from("<Q", self.data, self.at)[0]
        else:
            for _ in range(count):  # nested arrays: rare (per-layer lists of lists); walk them
                self.value(element_type)
        if self.at > len(self.data):
            raise struct.error("an array runs past the end of the file")


def _parse(path: Path, data: mmap.mmap) -> GgufHeader:
    cursor = _Cursor(data)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        detail = "a big-endian file" if version > 0xFFFF else f"version {version}"
        raise ModelSpecError(
            f"{path} is GGUF {detail}, which is not read here (versions 2 and 3, little-endian): re-convert it "
            "with a current llama.cpp"
        )
    tensor_count = cursor.unpack("<Q")
    kv_count = cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        dims = tuple(cursor.unpack("<Q") for _ in range(n_dims))
        ggml_type = cursor.unpack("<I")
        cursor.unpack("<Q")  # the data offset: the data is never read here
        tensors.append(GgufTensor(name, dims, ggml_type))
    return GgufHeader(path=path, version=version, metadata=metadata, tensors=tuple(tensors))


# ------------------------------------------------------------------------------------------------ the spec


def spec_from_gguf_files(files: list[Path], *, notes: tuple[str, ...] = ()) -> ModelSpec:
    """A spec for the GGUF model made of ``files`` (one file, or the parts of a split model), as it is served.

    Parameters are counted from the tensor infos (exact); the spec has no quantization, because the worker
    dequantizes the weights to its serving dtype: the estimate is parameters x serving dtype bytes. The file's
    quant types and size are in the notes and ``checkpoint_bytes``.

    Args:
        files: the GGUF files (:func:`gguf_files` chooses them).
        notes: notes to carry (which file was chosen).

    Raises:
        ModelSpecError: a file is not a readable GGUF file.
    """

    headers = [read_gguf_header(f) for f in files]
    first = headers[0]
    tensors = [t for h in headers for t in h.tensors]
    by_name = {t.name: t for t in tensors}
    params = sum(t.numel for t in tensors)
    # Quantizers convert the linear layers inside the blocks; embeddings, norms, biases and routers stay as they are.
    quantizable = sum(
        t.numel for t in tensors if t.name.startswith("blk.") and len(t.dims) >= 2 and "ffn_gate_inp" not in t.name
    )
    hidden = _int(first.arch_value("embedding_length")) or _dim(by_name.get("token_embd.weight"), 0)
    heads = _int(first.arch_value("attention.head_count"))
    kv_heads = _int(first.arch_value("attention.head_count_kv")) or heads
    head_dim = _int(first.arch_value("attention.key_length")) or (hidden // heads if heads else 0)
    experts = _int(first.arch_value("expert_count"))
    experts_used = _int(first.arch_value("expert_used_count"))
    ffn = _int(first.arch_value("feed_forward_length")) or _dim(by_name.get("blk.0.ffn_up.weight"), 1)
    expert_ffn = _int(first.arch_value("expert_feed_forward_length")) or ffn
    vocab = _int(first.metadata.get("tokenizer.ggml.tokens")) or _dim(by_name.get("token_embd.weight"), 1)
    counts = Counter(t.type_name for t in tensors)
    file_bytes = sum(f.stat().st_size for f in files)
    types = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
    all_notes = [
        f"parameters counted from the GGUF header ({len(tensors)} tensors: {types})",
        f"GGUF weights are dequantized on load: sized at the serving dtype, not the {fmt_bytes(file_bytes)} file",
        *notes,
    ]
    active = params
    if experts and experts_used:
        # Each token goes through experts_used of the experts: the rest of the expert weights are idle for it.
        expert_params = sum(t.numel for t in tensors if "_exps." in t.name)
        active = params - expert_params + expert_params * experts_used // experts
    return ModelSpec(
        name=files[0].name,
        architecture=first.architecture,
        params=params,
        active_params=active,
        quantizable_params=quantizable,
        dtype=_float_dtype(counts),
        quantization=None,
        is_moe=experts > 0,
        num_experts=experts,
        num_experts_per_token=experts_used,
        num_layers=_int(first.arch_value("block_count")),
        hidden_size=hidden,
        mlp_width=expert_ffn * experts_used if experts and experts_used else ffn,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=_int(first.arch_value("context_length")) or None,
        tie_word_embeddings="output.weight" not in by_name,
        is_encoder=first.architecture in GGUF_ENCODER_ARCHITECTURES,
        num_shards=len(files),
        checkpoint_bytes=file_bytes,
        source=SpecSource.GGUF,
        exact=True,
        notes=tuple(all_notes),
    )


def _int(value: object) -> int:
    """A metadata value as a positive int; 0 for absent, non-numeric or per-layer (array) values."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return 0
    return value


def _dim(tensor: GgufTensor | None, index: int) -> int:
    return tensor.dims[index] if tensor is not None and len(tensor.dims) > index else 0


def _float_dtype(counts: Counter[str]) -> str:
    """The dtype the file's float tensors are in: what ``serving_dtype`` keeps fp16 for; bf16 for quantized files."""
    floats = {name: n for name, n in counts.items() if name in ("F32", "F16", "BF16")}
    if floats and sum(floats.values()) == sum(counts.values()):
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[max(floats, key=lambda k: floats[k])]
    return "bfloat16"  # quantized blocks have no float type of their own: dequantized to what the GPU serves best
