"""What sets the model families the checkpoint builder makes apart: their tokenizer, config layout and class.

:mod:`gpufleet.workers.tools.checkpoints` builds every family the same way; this module holds the differences:

* decoder LMs (llama, mistral, qwen2, gpt2, gpt_neox, phi3) use the byte-level BPE demo tokenizer and
  ``AutoModelForCausalLM``;
* encoders (bert, xlm-roberta) are saved as bare encoders (``AutoModel``: what an embedding model is);
  XLM-RoBERTa gets the Unigram tokenizer and its position layout (``pad_token_id`` 1, two extra positions);
* multimodal (qwen2_vl) nests the language model's sizes in ``text_config`` beside a tiny ``vision_config``
  and is saved with ``AutoModelForImageTextToText``; its text generation is what the fleet serves.

transformers and tokenizers are imported lazily.
"""

from __future__ import annotations

from typing import Any

from gpufleet.workers.tools.shapes import Shape
from gpufleet.workers.tools.tokenizer import demo_tokenizer, unigram_tokenizer

ENCODERS = frozenset({"bert", "xlm-roberta"})
MULTIMODAL = frozenset({"qwen2_vl"})
# Qwen2-VL's vision tokens (image, video, vision start and end) sit after the text vocabulary.
_VISION_TOKENS = 4


def tokenizer_for(arch: str) -> Any:
    """A fresh tokenizer for a model of ``arch``: Unigram for XLM-RoBERTa, the byte-level BPE one otherwise."""
    return unigram_tokenizer() if arch == "xlm-roberta" else demo_tokenizer()


def config_options(arch: str, shape: Shape, tokenizer: Any, *, tie: bool | None) -> dict[str, Any]:
    """Keyword arguments for ``AutoConfig.for_model(arch, ...)`` giving ``shape`` and the tokenizer's ids."""
    vocab = shape.vocab_size or len(tokenizer)
    ids: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if tie is not None:
        ids["tie_word_embeddings"] = tie
    if arch == "gpt2":
        dims: dict[str, Any] = {
            "n_embd": shape.hidden,
            "n_layer": shape.layers,
            "n_head": shape.heads,
            "n_inner": shape.intermediate,
            "n_positions": shape.max_positions,
        }
        return {**dims, "vocab_size": vocab, **ids}
    dims = {
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": min(shape.max_positions, 512) if arch in ENCODERS else shape.max_positions,
    }
    if arch not in ("gpt_neox", *ENCODERS):
        dims["num_key_value_heads"] = shape.kv_heads
    if arch == "phi3":
        dims["original_max_position_embeddings"] = shape.max_positions
    if arch == "xlm-roberta":
        # Positions start after the padding index (1), as in every XLM-R checkpoint: 512 tokens need 514 rows.
        dims["max_position_embeddings"] += tokenizer.pad_token_id + 1
        dims["type_vocab_size"] = 1
    if arch in MULTIMODAL:
        return _qwen2_vl_options(dims, shape, vocab, ids)
    return {**dims, "vocab_size": vocab, **ids}


def auto_class(arch: str) -> Any:
    """The transformers auto class a model of ``arch`` is built and saved with (its ``from_config`` is untyped)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if arch in ENCODERS:
        return AutoModel
    if arch in MULTIMODAL:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _qwen2_vl_options(dims: dict[str, Any], shape: Shape, vocab: int, ids: dict[str, Any]) -> dict[str, Any]:
    half = shape.hidden // shape.heads // 2
    # Multimodal rotary positions: each head's rotary half split over (time, height, width) as Qwen2-VL splits
    # its 64 (16, 24, 24).
    spatial = half * 3 // 8
    sections = [half - 2 * spatial, spatial, spatial]
    text = {
        **dims,
        **ids,
        "vocab_size": vocab + _VISION_TOKENS,
        "rope_scaling": {"type": "mrope", "mrope_section": sections},
    }
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": shape.hidden,  # the merger's output: the language model's width
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    image, video, start, end = range(vocab, vocab + _VISION_TOKENS)
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        **ids,
    }
