"""Running one job on a loaded model: sentence embeddings and text generation (torch, imported lazily).

The records (:class:`~gpufleet.gpu.runtime.model.LoadedModel`, :class:`~gpufleet.gpu.runtime.model.Generation`)
are :mod:`gpufleet.gpu.runtime.model`'s; the batched forms are :mod:`gpufleet.gpu.runtime.batching`'s.
"""

from __future__ import annotations

from typing import Any

from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.runtime.model import Generation, LoadedModel
from gpufleet.gpu.runtime.options import GenerateOptions


def embed(loaded: LoadedModel, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
    """Sentence embeddings for ``texts`` (one vector per text): one job's share of :func:`embed_batch`.

    Args:
        loaded: an embedding model.
        texts: the texts to embed.
        normalize: scale each vector to unit length.

    Returns:
        One vector per text.

    Raises:
        ForwardError: the model is not an embedding model, or tokenizing or its forward failed.
        DeviceOutOfMemoryError: the device ran out of memory during the forward.
    """
    from gpufleet.gpu.runtime.batching import EmbedJob, embed_batch

    return embed_batch(loaded, [EmbedJob(texts, normalize)])[0].vectors


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
        ForwardError: the model is not a causal LM, has no chat template for ``messages``, the request exceeds
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
