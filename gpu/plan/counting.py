"""The records every parameter formula shares: typed config reads, the counts, and the KV cache layout.

A formula (:mod:`gpufleet.gpu.plan.architectures`, :mod:`gpufleet.gpu.plan.families`,
:mod:`gpufleet.gpu.plan.multimodal`) reads a config through :class:`Cfg` and returns :class:`Counts`, which carry the
parameters and the geometry planning needs, including how the model caches keys and values (:class:`KvLayout`): plain or
grouped-query attention, layers limited to a sliding window, the compressed latent of multi-head latent attention, or no
cache at all for state-space layers.

Pure Python: never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gpufleet.gpu.errors import ModelSpecError

__all__ = ["Cfg", "Counts", "KvKind", "KvLayout", "gqa_layout", "kv_layout_from_layer_types", "positive_int"]


def positive_int(value: object) -> int | None:
    """``value`` as a positive int, or ``None`` when it is not a positive number (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value > 0 else None


class Cfg:
    """Typed reads from a config dict, with the attribute aliases transformers uses (``n_embd`` …)."""

    def __init__(self, raw: Mapping[str, Any], model_type: str) -> None:
        self.raw = raw
        self.model_type = model_type

    def req(self, *keys: str, default: int | None = None) -> int:
        """The first of ``keys`` holding a positive number, else ``default``.

        Raises:
            ModelSpecError: none of the keys holds one and there is no default.
        """
        for key in keys:
            value = positive_int(self.raw.get(key))
            if value is not None:
                return value
        if default is None:
            raise ModelSpecError(
                f"config.json ({self.model_type}) has no {' / '.join(keys)}: the parameter count needs it; "
                "check that the file is the model's config"
            )
        return default

    def opt(self, *keys: str) -> int | None:
        """The first of ``keys`` holding a positive number, or ``None``."""
        for key in keys:
            value = positive_int(self.raw.get(key))
            if value is not None:
                return value
        return None

    def flag(self, key: str, default: bool) -> bool:
        """A boolean setting; ``default`` when absent or null."""
        value = self.raw.get(key)
        return bool(value) if value is not None else default

    def sub(self, key: str, model_type: str | None = None) -> Cfg:
        """A nested config (``attn_config``, ``vision_config``); an empty one when absent."""
        value = self.raw.get(key)
        return Cfg(value if isinstance(value, Mapping) else {}, model_type or f"{self.model_type}.{key}")

    def int_list(self, key: str) -> list[int] | None:
        """A list of ints (``moe_layers``), or ``None`` when absent or not a list of ints."""
        value = self.raw.get(key)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None
        return list(value)


class KvKind(str, Enum):
    """What one attention layer caches per token."""

    GQA = "gqa"  # keys and values of the key/value heads (MHA and MQA are the two ends of GQA)
    MLA = "mla"  # one compressed latent plus the rotary key part (DeepSeek V2/V3 multi-head latent attention)
    NONE = "none"  # no attention layer caches anything (state-space models, encoders)


@dataclass(frozen=True)
class KvLayout:
    """How a model's KV cache grows with the context.

    Attributes:
        kind: what a caching layer stores per token.
        token_elements: elements one caching layer stores per token (``2 * kv_heads * head_dim`` for GQA,
            ``kv_lora_rank + qk_rope_head_dim`` for MLA).
        full_layers: layers that cache every token of the context.
        window_layers: layers that cache at most ``window`` tokens (sliding-window or chunked attention).
        window: tokens a window layer keeps.
        stateless_layers: layers with no KV cache (state-space, linear-attention or convolution layers).
    """

    kind: KvKind
    token_elements: int
    full_layers: int
    window_layers: int = 0
    window: int = 0
    stateless_layers: int = 0

    def elements(self, context_length: int) -> int:
        """Elements cached for one sequence of ``context_length`` tokens."""
        tokens = self.full_layers * context_length + self.window_layers * min(context_length, self.window)
        return self.token_elements * tokens

    def describe(self) -> str:
        """A short why-string: ``GQA, 2 x 8 x 128 per token, 24 full + 24 window(4096) layers``."""
        if self.kind is KvKind.NONE or not (self.full_layers or self.window_layers):
            return "no KV cache" + (f" ({self.stateless_layers} state-space layers)" if self.stateless_layers else "")
        parts = [f"{self.full_layers} full"] if self.full_layers else []
        if self.window_layers:
            parts.append(f"{self.window_layers} window({self.window})")
        if self.stateless_layers:
            parts.append(f"{self.stateless_layers} without cache")
        what = "MLA latent" if self.kind is KvKind.MLA else "GQA keys+values"
        return f"{what}, {self.token_elements} elements per token per layer; layers: {' + '.join(parts)}"


def gqa_layout(layers: int, kv_heads: int, head_dim: int) -> KvLayout:
    """Every layer full attention with ``kv_heads`` key/value heads of ``head_dim``."""
    return KvLayout(KvKind.GQA, 2 * kv_heads * head_dim, full_layers=layers)


# Entries of transformers' ``layer_types`` lists, by what they cache.
_WINDOW_TYPES = frozenset({"sliding_attention", "chunked_attention", "local_attention", "sliding_window_attention"})
_FULL_TYPES = frozenset({"full_attention", "attention", "global_attention", "full"})


def kv_layout_from_layer_types(
    layer_types: Sequence[object], *, token_elements: int, window: int | None, kind: KvKind = KvKind.GQA
) -> KvLayout:
    """A layout from a per-layer type list (transformers' ``layer_types``, Jamba's ``layers_block_type``).

    Full-attention entries cache every token; sliding and chunked entries cache ``window`` tokens (every token when
    the window is unknown: an overestimate, never an underestimate); anything else (``linear_attention``,
    ``mamba``, ``conv``) caches nothing.
    """
    full = windowed = stateless = 0
    for entry in layer_types:
        name = str(entry).lower()
        if name in _WINDOW_TYPES:
            if window:
                windowed += 1
            else:
                full += 1
        elif name in _FULL_TYPES:
            full += 1
        else:
            stateless += 1
    if not (full or windowed):
        return KvLayout(KvKind.NONE, 0, 0, stateless_layers=stateless)
    return KvLayout(kind, token_elements, full, windowed, (window or 0) if windowed else 0, stateless)


@dataclass(frozen=True)
class Counts:
    """What a formula counted: parameters (total, per token, quantizable) and the geometry of the model.

    ``kv`` is ``None`` for the plain layout (every one of ``layers`` caches ``2 * kv_heads * head_dim``
    elements per token, none for encoders).
    """

    total: int
    active: int
    quantizable: int
    layers: int
    hidden: int
    mlp_width: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    num_experts: int = 0
    experts_per_token: int = 0
    encoder: bool = False
    note: str = ""
    kv: KvLayout | None = None

    def kv_layout(self) -> KvLayout:
        """The KV layout, the plain one when the formula gave none."""
        if self.kv is not None:
            return self.kv
        if self.encoder:
            return KvLayout(KvKind.NONE, 0, 0)
        return gqa_layout(self.layers, self.kv_heads, self.head_dim)
