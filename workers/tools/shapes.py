"""A test checkpoint's dimensions, mapped onto each architecture's config by the families module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """Model dimensions, mapped onto each architecture's own config names.

    Attributes:
        hidden: model width.
        layers: transformer blocks.
        heads: attention heads.
        kv_heads: key/value heads (grouped-query attention where the architecture has it).
        intermediate: MLP width.
        max_positions: longest context (encoders cap it at 512).
        vocab_size: ``None`` takes the tokenizer's size; larger ones pad the vocabulary, as many hub models do.
        shard_size: :func:`write_checkpoint`'s default shard size (``"64MiB"``).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 2048
    vocab_size: int | None = None
    shard_size: str = "2GiB"
