"""Writing GGUF files locally: a random-weight Llama checkpoint, converted the way llama.cpp converts one.

The tests and the docs need a GGUF model without a hub: :func:`make_gguf_model` builds a tiny Llama with
:func:`gpufleet.workers.tools.checkpoints.make_checkpoint`, then writes it with the ``gguf`` package (a worker
dependency) under llama.cpp's tensor names, with the query and key projections permuted as llama.cpp's
converter permutes them (transformers undoes it when it reads the file), 2-D weights in ``Q8_0`` (or ``F16``
/ ``F32``; rows that are no whole number of blocks stay ``F32``), and the tokenizer as GGUF metadata
(``tokenizer.ggml.model = "gpt2"``: byte-level BPE, the local tokenizer's vocabulary and merges), so the file
alone is a complete model, as a hub GGUF file is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ConfigError
from gpufleet.workers.tools.checkpoints import make_checkpoint, publish_atomically
from gpufleet.workers.tools.guards import needs_worker_libraries, writing
from gpufleet.workers.tools.shapes import Shape

__all__ = ["GGUF_TENSOR_TYPES", "make_gguf_model", "write_gguf"]

GGUF_TENSOR_TYPES = ("Q8_0", "F16", "F32")


def make_gguf_model(
    directory: Path,
    *,
    size: str | Shape = "tiny",
    tensor_type: str = "Q8_0",
    seed: int = 0,
    file_name: str | None = None,
) -> Path:
    """Create ``directory`` holding one GGUF file of a random-weight Llama (and nothing else).

    Args:
        directory: the model directory to create; it must not exist yet (or be empty).
        size: a name in :data:`gpufleet.workers.tools.checkpoints.SHAPES` or a :class:`Shape` (the default is 1 MB).
        tensor_type: the type of the 2-D weights, one of :data:`GGUF_TENSOR_TYPES` (norms stay F32, as in
            llama.cpp's files).
        seed: seed for the random weights (the same as :func:`make_checkpoint`'s for the same shape).
        file_name: the file's name; default ``model.<tensor_type>.gguf``.

    Returns:
        The path of the GGUF file.

    Raises:
        ConfigError: an unknown ``tensor_type``, ``directory`` already holds files, the worker libraries
            (torch, transformers, gguf) are missing, or ``directory`` cannot be written.
    """
    if tensor_type not in GGUF_TENSOR_TYPES:
        raise ConfigError(f"GGUF tensor type {tensor_type!r} is not written here; use one of {GGUF_TENSOR_TYPES}")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} already exists and is not empty; pass a new directory for the GGUF model")
    name = file_name or f"model.{tensor_type}.gguf"

    def build(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="gguf-source-", dir=target.parent) as scratch:
            source = make_checkpoint(Path(scratch) / "llama", "llama", size=size, dtype="float32", seed=seed)
            write_gguf(source, target / name, tensor_type=tensor_type)

    with writing(directory, "GGUF model"):
        publish_atomically(directory, build)
    return directory / name


def write_gguf(checkpoint: Path, file: Path, *, tensor_type: str = "Q8_0") -> Path:
    """Convert the Llama checkpoint in ``checkpoint`` (config.json, safetensors, tokenizer.json) to ``file``.

    Raises:
        ConfigError: the checkpoint is not a Llama, or the worker libraries are missing.
    """
    with needs_worker_libraries("writing GGUF files"):
        import gguf
        import numpy as np
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        config = json.loads((checkpoint / "config.json").read_text())
        if config.get("model_type") != "llama":
            raise ConfigError(f"{checkpoint} is a {config.get('model_type')!r} model; only llama is written as GGUF")
        writer: Any = gguf.GGUFWriter(str(file), "llama")
        _write_config(writer, gguf, config, tensor_type)
        _write_tokenizer(writer, gguf, AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
        quant = getattr(gguf.GGMLQuantizationType, tensor_type)
        for key, tensor in load_file(str(checkpoint / "model.safetensors")).items():
            array = tensor.astype(np.float32)
            if key.endswith("q_proj.weight"):
                array = _permute(array, config["num_attention_heads"])
            elif key.endswith("k_proj.weight"):
                array = _permute(array, config.get("num_key_value_heads") or config["num_attention_heads"])
            base, suffix = key.rsplit(".", 1)
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise ConfigError(f"no GGUF name for the tensor {key!r}; the checkpoint is not a plain Llama")
            block = gguf.GGML_QUANT_SIZES[quant][0]
            if array.ndim == 2 and tensor_type != "F32" and array.shape[-1] % block == 0:
                writer.add_tensor(f"{gguf_name}.{suffix}", gguf.quantize(array, quant), raw_dtype=quant)
            else:
                # Norms, and rows that are no whole number of blocks, stay F32, as llama.cpp's converter keeps them.
                writer.add_tensor(f"{gguf_name}.{suffix}", array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return file


def _write_config(writer: Any, gguf: Any, config: dict[str, Any], tensor_type: str) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    file_types = {"Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "F32": "ALL_F32"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[tensor_type]))


def _write_tokenizer(writer: Any, gguf: Any, tokenizer: Any) -> None:
    """The tokenizer as llama.cpp writes a byte-level BPE one, which transformers' GGUF converter reads back."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    special = set(tokenizer.all_special_tokens)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _permute(weights: Any, heads: int) -> Any:
    """llama.cpp's interleaving of the rotary halves of each head (its converter's ``permute``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
