"""Running loaded models: sentence embeddings and text generation (torch, imported lazily).

A :class:`LoadedModel` is what every loader returns and what the model cache holds: the torch module, its
tokenizer and what the job bodies need to know about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import ModelLoadError, ModelSpecError
from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.runtime.options import GenerateOptions

if TYPE_CHECKING:
    import torch


class ModelKind(str, Enum):
    """What a model is served for."""

    EMBEDDING = "embedding"
    CAUSAL_LM = "causal-lm"


class Pooling(str, Enum):
    """How token states become one sentence embedding (sentence-transformers' 1_Pooling/config.json)."""

    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass
class LoadedModel:
    """A model resident on a device, ready to answer."""

    model_id: str
    path: Path
    kind: ModelKind
    module: Any  # torch.nn.Module; Any keeps this module importable without torch
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    device: str
    dtype: str
    bytes: int  # parameters + buffers on the device
    loader: str  # which load path produced it ("fast-safetensors", "from_pretrained", ...)
    load_s: float = 0.0
    pooling: Pooling = Pooling.MEAN
    extra: dict[str, Any] = field(default_factory=dict)


CAUSAL_LM_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def detect_kind(model_dir: Path) -> ModelKind:
    """Whether a model directory holds a causal LM or an encoder to embed with (from its config.json).

    Multimodal checkpoints (``...ForConditionalGeneration``) are causal LMs: their text generation is served.
    A GGUF model without a config.json is judged from the file's architecture.
    """
    from gpufleet.gpu.plan.specs import read_config  # cached: planning and loading parse config.json once between them

    if not (model_dir / "config.json").is_file():
        from gpufleet.gpu.runtime.gguf_loader import gguf_model_kind, is_gguf_model

        if is_gguf_model(model_dir):
            return gguf_model_kind(model_dir)
    try:
        config = read_config(model_dir / "config.json")
    except ModelSpecError as exc:
        raise ModelLoadError(f"{exc}; the model directory is incomplete or corrupt") from exc
    architectures = config.get("architectures") or []
    if any(str(arch).endswith(CAUSAL_LM_ARCH_SUFFIXES) for arch in architectures):
        return ModelKind.CAUSAL_LM
    return ModelKind.EMBEDDING


def detect_pooling(model_dir: Path) -> Pooling:
    """Pooling mode from sentence-transformers' ``1_Pooling/config.json``; mean pooling when absent."""
    pooling_config = model_dir / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        data = json.loads(pooling_config.read_text())
        if data.get("pooling_mode_cls_token"):
            return Pooling.CLS
        if data.get("pooling_mode_lasttoken"):
            return Pooling.LAST
    return Pooling.MEAN


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def embed(loaded: LoadedModel, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
    """Sentence embeddings for ``texts`` (one vector per text): one job's share of :func:`embed_batch`.

    Args:
        loaded: an embedding model.
        texts: the texts to embed.
        normalize: scale each vector to unit length.

    Returns:
        One vector per text.

    Raises:
        InferenceError: the model is not an embedding model, or tokenizing or its forward failed.
        DeviceOutOfMemoryError: the device ran out of memory during the forward.
    """
    from gpufleet.gpu.runtime.batching import EmbedJob, embed_batch

    return embed_batch(loaded, [EmbedJob(texts, normalize)])[0]


@dataclass(frozen=True)
class Generation:
    """Output of :func:`generate`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


def generate(loaded: LoadedModel, options: GenerateOptions) -> Generation:
    """Generate text from a prompt or chat messages with transformers' own ``generate``, one job alone.

    The reference the batched and continuous paths are checked against. A ``seed`` seeds torch's global generator
    for the call (its state is restored afterwards); ``stop`` strings are not applied here.

    Args:
        loaded: a causal LM.
        options: the prompt or chat messages (rendered with the model's chat template) and the sampling settings.

    Returns:
        The generated text and its token accounting.

    Raises:
        InferenceError: the model is not a causal LM, has no chat template for ``messages``, the request exceeds
            its context, or tokenizing or generation failed.
        DeviceOutOfMemoryError: the device ran out of memory during generation.
    """
    import torch

    from gpufleet.gpu.runtime.batching import GENERATE_ADVICE as advice
    from gpufleet.gpu.runtime.batching import encode_prompt
    from gpufleet.gpu.runtime.oom import translate_model_errors

    # The same tokenizing and checks (kind, chat template, context) as a batch's prompts.
    encoded = encode_prompt(loaded, options)
    max_new_tokens, temperature, top_p, seed = options.max_new_tokens, options.temperature, options.top_p, options.seed
    tokenizer = loaded.tokenizer
    input_ids = torch.tensor([encoded.input_ids], device=loaded.device)
    attention_mask = torch.ones_like(input_ids)
    prompt_tokens = len(encoded.input_ids)
    sampling = temperature > 0
    generate_kwargs: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens}
    if sampling:
        generate_kwargs.update(temperature=float(temperature), top_p=float(top_p))
    else:
        # Greedy: clear sampling knobs a checkpoint's generation_config may carry, so transformers does not warn.
        generate_kwargs.update(temperature=None, top_p=None, top_k=None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        with (
            translate_model_errors(loaded.model_id, f"generating up to {max_new_tokens} tokens", advice),
            torch.inference_mode(),
        ):
            output = loaded.module.generate(
                input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_id, **generate_kwargs
            )
            new_tokens = output[0, prompt_tokens:].cpu()
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    completion_tokens = int(new_tokens.shape[0])
    eos_ids = loaded.module.generation_config.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    stopped = completion_tokens > 0 and int(new_tokens[-1]) in eos_set
    finish: FinishReason = "stop" if stopped or completion_tokens < max_new_tokens else "length"
    with translate_model_errors(loaded.model_id, "decoding the generated tokens", advice):
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return Generation(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
    )
