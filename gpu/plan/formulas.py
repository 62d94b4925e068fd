"""The registry of parameter formulas (which ``model_type`` is counted by which function, and how to name it),
and :func:`parameter_counts`, which picks a config's source of parameters: headers, a formula, the general path.

A family is recognised by its ``model_type`` only, never by the presence of keys it happens to share with
another family (a DBRX config has ``d_model`` and ``n_layers`` like many others; a llama-shaped guess on it is
eight times too small). A ``model_type`` not listed here takes the general path (:mod:`gpufleet.gpu.plan.general`).

Pure Python: never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.architectures import CLASSIC_FAMILIES
from gpufleet.gpu.plan.counting import Cfg, Counts
from gpufleet.gpu.plan.families import dbrx_counts, deepseek_counts, mamba2_counts, mamba_counts
from gpufleet.gpu.plan.general import general_counts, geometry_from_keys
from gpufleet.gpu.plan.model_names import Quantization
from gpufleet.gpu.plan.multimodal import llama4_counts, qwen2_5_vl_counts
from gpufleet.gpu.plan.safetensors_header import CheckpointWeights

__all__ = ["FORMULAS", "SUPPORTED_ARCHITECTURES", "Formula", "parameter_counts"]


@dataclass(frozen=True)
class Formula:
    """A parameter formula and the words a placement's reasons use for it.

    Attributes:
        count: the function from a config to its counts.
        description: what the formula covers (``MLA + MoE``), shown as ``formula deepseek_v3 (MLA + MoE)``.
    """

    count: Callable[[Cfg], Counts]
    description: str


_CLASSIC_DESCRIPTIONS: Mapping[str, str] = {
    "gpt2": "GPT-2 decoder",
    "gpt_neox": "GPT-NeoX decoder",
    "falcon": "Falcon decoder",
    "distilbert": "encoder",
    "bert": "encoder",
    "roberta": "encoder",
    "xlm-roberta": "encoder",
    "camembert": "encoder",
    "mixtral": "llama-style decoder + MoE",
    "qwen2_moe": "llama-style decoder + MoE",
    "qwen3_moe": "llama-style decoder + MoE",
}

FORMULAS: Mapping[str, Formula] = {
    **{
        model_type: Formula(count, _CLASSIC_DESCRIPTIONS.get(model_type, "llama-style decoder"))
        for model_type, count in CLASSIC_FAMILIES.items()
    },
    "dbrx": Formula(dbrx_counts, "fused-QKV GQA + MoE"),
    "deepseek_v2": Formula(deepseek_counts, "MLA + MoE"),
    "deepseek_v3": Formula(deepseek_counts, "MLA + MoE"),
    "mamba": Formula(mamba_counts, "state space, no KV cache"),
    "mamba2": Formula(mamba2_counts, "state space, no KV cache"),
    "llama4": Formula(llama4_counts, "MoE text model + vision tower"),
    "qwen2_5_vl": Formula(qwen2_5_vl_counts, "Qwen2 text model + vision tower"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(FORMULAS))
"""``model_type`` values with a formula; any other takes the general path."""


def parameter_counts(
    config: Mapping[str, Any],
    text: Mapping[str, Any],
    model_type: str,
    *,
    label: str,
    weights: CheckpointWeights | None,
    checkpoint_bytes: int | None,
    dtype: str,
    quantization: Quantization | None,
) -> tuple[Counts, str]:
    """The counts of a config and the why-string naming their source: headers over a formula over the general path.

    Args:
        config: the whole config (formulas read it whole; the meta-device count builds the whole model).
        text: the language model's part of it (the general path's geometry).
        model_type: the config's ``model_type``, which picks the formula.
        label: the model's name, for messages.
        weights: what the safetensors headers say, when the files were read: their parameters win.
        checkpoint_bytes: the checkpoint's size on disk, for the general path without transformers.
        dtype: the checkpoint's dtype.
        quantization: the checkpoint's quantization.

    Raises:
        ModelSpecError: a formula's size is missing and no headers stand in, or the general path has no source.
    """
    formula = FORMULAS.get(model_type)
    text_cfg = Cfg(text, str(text.get("model_type") or model_type))
    if formula is None:
        return general_counts(
            text_cfg,
            config,
            label=label,
            weights=weights,
            checkpoint_bytes=checkpoint_bytes,
            dtype=dtype,
            quantization=quantization,
            formulas=SUPPORTED_ARCHITECTURES,
        )
    described = f"formula {model_type} ({formula.description})"
    try:
        counts = formula.count(Cfg(config, model_type))
    except ModelSpecError:
        if weights is None:
            raise
        # The headers hold the truth; the config only lacks what the formula's geometry needed.
        return geometry_from_keys(text_cfg, weights.params), f"parameters: safetensors headers ({weights.files_text})"
    if weights is None:
        return counts, f"parameters: {described}"
    # Exact parameters from the headers; the formula keeps the geometry, and its per-token share for an MoE.
    inactive = counts.total - counts.active
    exact = replace(counts, total=weights.params, active=max(weights.params - inactive, 0))
    return exact, (
        f"parameters: safetensors headers ({weights.files_text}; {described} gives {counts.total:,}, "
        f"the headers {weights.params:,})"
    )
