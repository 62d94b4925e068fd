"""Name rules and quantization: what a model's name (or GGUF file name) says about its size and quantization.

Sizes (``7B``, ``0.5B``, ``135M``; ``8x7B`` for Mixtral-style MoE; ``30B-A3B`` for total and active), a table
of well-known names without a size (``gpt2``, ``bert-base-uncased``, ``phi-2``), quantization suffixes
(``-GPTQ``, ``-AWQ``, ``-FP8``, ``bnb-4bit``), llama.cpp GGUF quant types (``Q4_K_M``) and the typical shapes
a name-only model's KV cache is estimated from. Also home of the quantization records (:class:`QuantMethod`,
:class:`Quantization`), built from names here and from a config's ``quantization_config``
(:func:`quantization_from_config`).

Pure Python: never imports torch or transformers, nor :mod:`gpufleet.gpu.plan.specs` (which imports this module).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gpufleet.gpu.errors import ModelSpecError

__all__ = [
    "DEFAULT_GGUF_TYPE",
    "ENGINE_QUANTIZATION_NAMES",
    "GGUF_BITS_PER_WEIGHT",
    "NAME_VOCAB",
    "NameSize",
    "QuantMethod",
    "Quantization",
    "Shape",
    "family_from_name",
    "gguf_type_from_name",
    "quantization_from_config",
    "quantization_from_name",
    "reference_shape",
    "size_from_name",
]

# ------------------------------------------------------------------------------------ quantization records


class QuantMethod(str, Enum):
    """How a checkpoint's weights are quantized."""

    GPTQ = "gptq"
    AWQ = "awq"
    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    FP8 = "fp8"
    COMPRESSED_TENSORS = "compressed-tensors"
    MXFP4 = "mxfp4"
    GGUF = "gguf"
    OTHER = "other"


# The quantization names serving engines (vLLM's ``--quantization``) use for each method.
ENGINE_QUANTIZATION_NAMES: Mapping[QuantMethod, str] = {
    QuantMethod.GPTQ: "gptq",
    QuantMethod.AWQ: "awq",
    QuantMethod.BNB_4BIT: "bitsandbytes",
    QuantMethod.BNB_8BIT: "bitsandbytes",
    QuantMethod.FP8: "fp8",
    QuantMethod.COMPRESSED_TENSORS: "compressed-tensors",
    QuantMethod.MXFP4: "mxfp4",
    QuantMethod.GGUF: "gguf",
}

# Average bits per weight of llama.cpp quant types over a whole model (mixed tensor types included), as the
# llama.cpp quantize tool reports them for Llama-class models.
GGUF_BITS_PER_WEIGHT: Mapping[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.89,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.55,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "IQ3_M": 3.66,
    "IQ3_S": 3.44,
    "IQ3_XS": 3.3,
    "IQ3_XXS": 3.06,
    "Q2_K": 2.96,
    "IQ2_M": 2.7,
    "IQ2_S": 2.5,
    "IQ2_XS": 2.31,
    "IQ2_XXS": 2.06,
    "IQ1_M": 1.75,
    "IQ1_S": 1.56,
}
# A GGUF repository name without a quant type holds several; plan for the largest common one.
DEFAULT_GGUF_TYPE = "Q8_0"


@dataclass(frozen=True)
class Quantization:
    """How the quantized layers (the linear layers inside the blocks) store their weights.

    Attributes:
        method: the quantization scheme.
        bits: bits per quantized weight (for GGUF: the average over the whole model).
        group_size: weights sharing one scale (and zero point); ``None`` for per-channel or per-tensor scales.
        scale_bytes: bytes per stored scale (fp16 for GPTQ/AWQ, fp32 for bitsandbytes and FP8).
        has_zero_point: a zero point is stored per group next to the scale (packed at ``bits``).
        fp8_weights: the weights are FP8, which needs FP8 tensor cores (compute capability 8.9 or later).
        gguf_type: the llama.cpp quant type (``Q4_K_M``) for GGUF files.
    """

    method: QuantMethod
    bits: float
    group_size: int | None = None
    scale_bytes: int = 2
    has_zero_point: bool = False
    fp8_weights: bool = False
    gguf_type: str | None = None

    @property
    def label(self) -> str:
        """Short human and JSON label: ``gptq-4bit``, ``awq-4bit``, ``bnb-4bit``, ``fp8``, ``gguf-Q4_K_M``."""
        if self.method is QuantMethod.GGUF:
            return f"gguf-{self.gguf_type or DEFAULT_GGUF_TYPE}"
        if self.method in (QuantMethod.GPTQ, QuantMethod.AWQ, QuantMethod.OTHER):
            return f"{self.method.value}-{self.bits:g}bit"
        if self.method is QuantMethod.COMPRESSED_TENSORS:
            kind = "fp" if self.fp8_weights else "w"
            return f"compressed-tensors-{kind}{self.bits:g}"
        return str(self.method.value)

    @property
    def engine_name(self) -> str | None:
        """The engine's name for this method (vLLM ``--quantization``), ``None`` when it has none."""
        return ENGINE_QUANTIZATION_NAMES.get(self.method)

    def bytes_per_weight(self, row_length: int) -> float:
        """Bytes one quantized weight costs, scales and zero points included.

        Args:
            row_length: input features of a typical layer (the hidden size), over which per-channel scales are
                spread when there are no groups.
        """
        group = self.group_size if self.group_size else max(row_length, 1)
        zero_bytes = self.bits / 8 if self.has_zero_point else 0.0
        return self.bits / 8 + (self.scale_bytes + zero_bytes) / group


# ---------------------------------------------------------------------------------------- GGUF quant types


def gguf_type_from_name(name: str) -> str | None:
    upper = name.upper()
    # Longest names first so Q4_K_M wins over Q4_K and IQ4_XS over Q4.
    for gguf_type in sorted(GGUF_BITS_PER_WEIGHT, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(gguf_type)}(?![A-Z0-9])", upper):
            return gguf_type
    return None


# ------------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class NameSize:
    params: int
    active: int
    is_moe: bool
    num_experts: int
    experts_per_token: int
    per_expert: int | None  # the dense base of an NxM name, which sets the KV shape
    text: str
    architecture: str = ""
    encoder: bool = False

    @property
    def per_expert_params(self) -> int:
        return self.per_expert or self.params


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int


# Typical shapes by size (billions of parameters), from the Llama 3 / Qwen 2.5 / SmolLM families: the KV cache of
# a name-only model is estimated from the nearest.
_REFERENCE_SHAPES: tuple[tuple[float, Shape], ...] = (
    (0.135, Shape(30, 576, 3, 64)),
    (0.5, Shape(24, 896, 2, 64)),
    (1.0, Shape(16, 2048, 8, 64)),
    (1.5, Shape(28, 1536, 2, 128)),
    (3.0, Shape(28, 3072, 8, 128)),
    (8.0, Shape(32, 4096, 8, 128)),
    (14.0, Shape(48, 5120, 8, 128)),
    (32.0, Shape(64, 5120, 8, 128)),
    (70.0, Shape(80, 8192, 8, 128)),
    (405.0, Shape(126, 16384, 8, 128)),
)
_ENCODER_SHAPES: tuple[tuple[float, Shape], ...] = (
    (0.03, Shape(6, 384, 12, 32)),
    (0.11, Shape(12, 768, 12, 64)),
    (0.34, Shape(24, 1024, 16, 64)),
)
NAME_VOCAB = 152_064  # a large modern vocabulary (Qwen 2.5): keeps the unquantized embedding estimate honest


def reference_shape(params_b: float, *, encoder: bool = False) -> Shape:
    table = _ENCODER_SHAPES if encoder else _REFERENCE_SHAPES
    return min(table, key=lambda entry: abs(math.log(max(params_b, 1e-3) / entry[0])))[1]


# Well-known names without a size (or with a misleading one: gemma-7b has 8.5 B parameters), matched with
# re.search on the lower-cased last path segment. (pattern, params, active, experts, experts/token, family, encoder)
_KNOWN_NAMES: tuple[tuple[str, int, int, int, int, str, bool], ...] = (
    (r"^distilgpt2$", 81_912_576, 0, 0, 0, "gpt2", False),
    (r"^gpt2$", 124_439_808, 0, 0, 0, "gpt2", False),
    (r"^gpt2-medium$", 354_823_168, 0, 0, 0, "gpt2", False),
    (r"^gpt2-large$", 774_030_080, 0, 0, 0, "gpt2", False),
    (r"^gpt2-xl$", 1_557_611_200, 0, 0, 0, "gpt2", False),
    (r"^distilbert-base", 66_362_880, 0, 0, 0, "distilbert", True),
    (r"^bert-base", 109_482_240, 0, 0, 0, "bert", True),
    (r"^bert-large", 335_141_888, 0, 0, 0, "bert", True),
    (r"^roberta-base", 124_645_632, 0, 0, 0, "roberta", True),
    (r"^roberta-large", 355_359_744, 0, 0, 0, "roberta", True),
    (r"^xlm-roberta-base", 278_043_648, 0, 0, 0, "xlm-roberta", True),
    (r"^xlm-roberta-large", 559_890_432, 0, 0, 0, "xlm-roberta", True),
    (r"minilm-l6", 22_713_216, 0, 0, 0, "bert", True),
    (r"minilm-l12", 33_360_000, 0, 0, 0, "bert", True),
    (r"mpnet-base", 109_486_464, 0, 0, 0, "mpnet", True),
    (r"^(bge|gte|e5)-small", 33_360_000, 0, 0, 0, "bert", True),
    (r"^(bge|gte|e5)-base", 109_482_240, 0, 0, 0, "bert", True),
    (r"^(bge|gte|e5)-large", 335_141_888, 0, 0, 0, "bert", True),
    (r"^bge-m3$", 567_754_752, 0, 0, 0, "xlm-roberta", True),
    (r"^phi-1_5$", 1_418_270_720, 0, 0, 0, "phi", False),
    (r"^phi-2$", 2_779_683_840, 0, 0, 0, "phi", False),
    (r"^phi-3(\.5)?-mini", 3_821_079_552, 0, 0, 0, "phi3", False),
    (r"^phi-3-small", 7_392_272_384, 0, 0, 0, "phi3small", False),
    (r"^phi-3-medium", 13_960_238_080, 0, 0, 0, "phi3", False),
    (r"^phi-4$", 14_659_507_200, 0, 0, 0, "phi3", False),
    (r"^gemma-2b", 2_506_172_416, 0, 0, 0, "gemma", False),
    (r"^gemma-7b", 8_537_680_896, 0, 0, 0, "gemma", False),
    (r"^mixtral-8x7b", 46_702_792_704, 12_879_925_248, 8, 2, "mixtral", False),
    (r"^mixtral-8x22b", 140_630_071_296, 39_158_976_512, 8, 2, "mixtral", False),
    (r"^qwen1\.5-moe-a2\.7b", 14_315_784_192, 2_689_060_864, 60, 4, "qwen2_moe", False),
    (r"^llama-4-scout-17b-16e", 108_641_793_536, 17_170_000_000, 16, 1, "llama4", False),
    (r"^llama-4-maverick-17b-128e", 401_583_781_376, 17_170_000_000, 128, 1, "llama4", False),
    (r"^gpt-oss-20b", 20_914_757_184, 3_610_000_000, 32, 4, "gpt_oss", False),
    (r"^gpt-oss-120b", 116_829_156_672, 5_130_000_000, 128, 4, "gpt_oss", False),
    (r"^deepseek-(v3|r1)(-\d+)?$", 671_026_419_200, 37_000_000_000, 256, 8, "deepseek_v3", False),
)

_SIZE = r"(\d+(?:\.\d+)?)"
_MOE_NAME = re.compile(rf"(?<![a-z0-9.])(\d+)x{_SIZE}b(?![a-z0-9])")
_ACTIVE_NAME = re.compile(rf"(?<![a-z0-9.])a{_SIZE}b(?![a-z0-9])")
_SIZE_NAME = re.compile(rf"(?<![a-z0-9.]){_SIZE}([bm])(?![a-z0-9])")
# A Mixtral-style NxM name shares attention and embeddings across experts: about 20 % of a dense model of the
# expert's size is shared, 80 % (the MLP) is replicated per expert (8x7B → 46.7 B, 8x22B → 141 B).
_MOE_MLP_FRACTION = 0.8
_MOE_NAME_EXPERTS_PER_TOKEN = 2


def size_from_name(name: str) -> NameSize | None:
    base = name.rsplit("/", 1)[-1].lower()
    for pattern, params, active, experts, per_token, family, encoder in _KNOWN_NAMES:
        known = re.search(pattern, base)
        if known:
            text = f"{known.group(0)}: {_human_params(params)}"
            return NameSize(params, active or params, experts > 0, experts, per_token, None, text, family, encoder)
    moe = _MOE_NAME.search(base)
    if moe:
        experts = int(moe.group(1))
        expert = float(moe.group(2)) * 1e9
        moe_total = expert * (1 - _MOE_MLP_FRACTION) + experts * expert * _MOE_MLP_FRACTION
        per_token = min(_MOE_NAME_EXPERTS_PER_TOKEN, experts)
        moe_active = expert * (1 - _MOE_MLP_FRACTION) + per_token * expert * _MOE_MLP_FRACTION
        return NameSize(int(moe_total), int(moe_active), True, experts, per_token, int(expert), moe.group(0))
    # The lookbehind keeps "a3b" (active size) and "2.5" (a version) out of the sizes.
    sizes = [float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6) for m in _SIZE_NAME.finditer(base)]
    if not sizes:
        return None
    total = max(sizes)
    active_match = _ACTIVE_NAME.search(base)
    if active_match:
        active_params = float(active_match.group(1)) * 1e9
        text = f"{total / 1e9:g}B-{active_match.group(0)}"
        return NameSize(int(total), int(active_params), True, 0, 0, None, text)
    return NameSize(int(total), int(total), False, 0, 0, None, f"{_human_params(total)}")


def _human_params(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def quantization_from_name(name: str) -> Quantization | None:
    low = name.lower()
    base = low.rsplit("/", 1)[-1]
    if base.endswith(".gguf") or "gguf" in low:
        gguf_type = gguf_type_from_name(base) or DEFAULT_GGUF_TYPE
        return Quantization(QuantMethod.GGUF, GGUF_BITS_PER_WEIGHT[gguf_type], gguf_type=gguf_type)
    bits8 = bool(re.search(r"int8|8bit|8-bit|w8a16", low))
    if "gptq" in low:
        return Quantization(QuantMethod.GPTQ, 8.0 if bits8 else 4.0, 128, 2, has_zero_point=True)
    if "awq" in low:
        return Quantization(QuantMethod.AWQ, 4.0, 128, 2, has_zero_point=True)
    if re.search(r"fp8|float8", low):
        return Quantization(QuantMethod.FP8, 8.0, None, 4, fp8_weights=True)
    if "w4a16" in low or "int4" in low:
        return Quantization(QuantMethod.COMPRESSED_TENSORS, 4.0, 128, 2)
    if "w8a8" in low:
        return Quantization(QuantMethod.COMPRESSED_TENSORS, 8.0, None, 2)
    if re.search(r"bnb[-_]?4bit|(?<![a-z0-9])4bit(?![a-z0-9])|nf4", low):
        return Quantization(QuantMethod.BNB_4BIT, 4.0, 64, 4)
    if re.search(r"bnb[-_]?8bit|(?<![a-z0-9])(8bit|int8)(?![a-z0-9])", low):
        return Quantization(QuantMethod.BNB_8BIT, 8.0, None, 4)
    return None


def quantization_from_config(qc: object, label: str) -> Quantization | None:
    """The quantization a config's ``quantization_config`` describes; ``None`` for a method it does not know.

    Args:
        qc: the ``quantization_config`` value (GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, MXFP4, or any
            method that states its ``bits``).
        label: the model's name, for messages.

    Raises:
        ModelSpecError: ``qc`` is not a JSON object, or a bitsandbytes config loads neither 4 nor 8 bits.
    """
    if not isinstance(qc, Mapping):
        raise ModelSpecError(f"{label}: quantization_config must be a JSON object; fix the config")
    method = str(qc.get("quant_method") or "").lower().replace("_", "-")
    group = _group(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "gptq":
        return Quantization(QuantMethod.GPTQ, float(qc.get("bits", 4)), group, 2, has_zero_point=True)
    if method == "awq":
        bits = float(qc.get("bits", qc.get("w_bit", 4)))
        return Quantization(QuantMethod.AWQ, bits, group, 2, has_zero_point=bool(qc.get("zero_point", True)))
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            # Absmax per block of 64 weights: fp32, or 8-bit with double quantization.
            scale_bytes = 1 if qc.get("bnb_4bit_use_double_quant") else 4
            return Quantization(QuantMethod.BNB_4BIT, 4.0, 64, scale_bytes)
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return Quantization(QuantMethod.BNB_8BIT, 8.0, None, 4)
        raise ModelSpecError(f"{label}: bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit")
    if method in ("fp8", "fbgemm-fp8", "finegrained-fp8"):
        return Quantization(QuantMethod.FP8, 8.0, None, 4, fp8_weights=True)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "mxfp4":
        return Quantization(QuantMethod.MXFP4, 4.0, 32, 1)
    other_bits = qc.get("bits") or qc.get("weight_bits")
    if isinstance(other_bits, (int, float)) and other_bits > 0:
        return Quantization(QuantMethod.OTHER, float(other_bits), group, 2, has_zero_point=True)
    return None


def _group(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _compressed_tensors(qc: Mapping[str, Any]) -> Quantization:
    groups = qc.get("config_groups")
    weights: Mapping[str, Any] = {}
    if isinstance(groups, Mapping):
        for group in groups.values():
            if isinstance(group, Mapping) and isinstance(group.get("weights"), Mapping):
                weights = group["weights"]
                break
    bits = float(weights.get("num_bits", 8))
    is_float = str(weights.get("type", "int")).lower() == "float"
    strategy = str(weights.get("strategy", "channel")).lower()
    group = _group(weights.get("group_size")) if strategy == "group" else None
    return Quantization(
        QuantMethod.COMPRESSED_TENSORS,
        bits,
        group,
        scale_bytes=2,
        has_zero_point=not bool(weights.get("symmetric", True)),
        fp8_weights=is_float and bits == 8,
    )


def family_from_name(name: str) -> str:
    low = name.lower()
    for needle, family in (
        ("mixtral", "mixtral"),
        ("mistral", "mistral"),
        ("qwen3", "qwen3"),
        ("qwen2", "qwen2"),
        ("qwen", "qwen2"),
        ("gemma-2", "gemma2"),
        ("gemma", "gemma"),
        ("phi-3", "phi3"),
        ("llama", "llama"),
        ("falcon", "falcon"),
        ("pythia", "gpt_neox"),
        ("gpt-neox", "gpt_neox"),
        ("deepseek", "deepseek"),
    ):
        if needle in low:
            return family
    return "unknown"
