"""Tiny random checkpoints for loader and parking tests (transformers, built in seconds, never downloaded)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model is loaded onto the device from safetensors",
    "hello world, this is a tiny tokenizer for tests",
]
VOCAB_SIZE = 128


@cache
def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
    )


def save_tokenizer(directory: Path) -> None:
    """Write the shared tiny word-level tokenizer into ``directory``."""
    _tokenizer().save_pretrained(str(directory))


def make_checkpoint(
    directory: Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    tie: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny random model of ``arch`` (llama, qwen2, mistral, gpt2, bert) with a tokenizer.

    Args:
        directory: where to write (created).
        arch: which architecture.
        dtype: the dtype the weights are saved in.
        tie: tie the input embeddings to the LM head.
        max_shard_size: e.g. "100KB" to save a sharded checkpoint with an index.
        seed: torch seed for the random weights.

    Returns:
        ``directory``.
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}
    if arch == "llama":
        config: Any = tf.LlamaConfig(
            vocab_size=VOCAB_SIZE, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128, **small
        )
        model = tf.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = tf.Qwen2Config(
            vocab_size=VOCAB_SIZE, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128, **small
        )
        model = tf.Qwen2ForCausalLM(config)
    elif arch == "mistral":
        config = tf.MistralConfig(
            vocab_size=VOCAB_SIZE, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128, **small
        )
        model = tf.MistralForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = tf.BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=128, **small)
        model = tf.BertModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model = model.to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    model.save_pretrained(str(directory), **options)
    save_tokenizer(directory)
    return directory


def sample_inputs() -> dict[str, Any]:
    """A fixed batch of token ids (with padding) every test feeds to both loaders."""
    import torch

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def outputs(module: Any, inputs: dict[str, Any]) -> Any:
    """Logits of a causal LM or last hidden states of an encoder, on the module's device."""
    import torch

    device = next(module.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = module(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
