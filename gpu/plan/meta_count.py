"""The general path's exact count: let transformers build the model on the meta device and count its parameters.

Used only for a ``model_type`` without a formula and without safetensors files to read, and only when
transformers is installed: it is imported inside :func:`count_on_meta_device`, never at module import, so the
router keeps planning the known families on machines without it (the import-linter contract ``plan-pure``
allows this one edge and says why). The meta device allocates no memory and reads no weights; no CUDA is
touched and ``trust_remote_code`` is never passed, so only architectures transformers ships are built.

The one module of :mod:`gpufleet.gpu.plan` that may import torch and transformers. Code that must never import
them though they are installed (a worker's parent routing the jobs of the fleet's entry queue) plans inside
:func:`without_meta_count`, as a producer without them would.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.counting import Counts, KvKind, KvLayout, gqa_layout, kv_layout_from_layer_types

__all__ = ["MetaCount", "count_on_meta_device", "transformers_available", "without_meta_count"]

# Auto classes tried, in order, when the config names no architecture transformers has: the generating head
# (what a fleet serves), then the multimodal and encoder-decoder ones, then the bare model. Each with the mapping
# that says whether it knows the model type. The auto class, not the mapped class, builds the model: as
# ``from_pretrained`` does, it hands a multimodal config's text part to a text-only causal LM (Llama 4, Qwen 3.5).
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)
# Parameters quantizers leave in 16-bit besides the embeddings: routers and vision/audio towers.
_NOT_QUANTIZED = re.compile(r"(router|\.gate)\.weight$|vision|visual|audio")


@dataclass(frozen=True)
class MetaCount:
    """What transformers built: the counts and how they were obtained.

    Attributes:
        counts: parameters and geometry.
        version: the transformers version that built the model.
        model_class: the class instantiated (``JambaForCausalLM``).
    """

    counts: Counts
    version: str
    model_class: str


_allowed: ContextVar[bool] = ContextVar("gpufleet_meta_count_allowed", default=True)


@contextmanager
def without_meta_count() -> Iterator[None]:
    """Plan as if transformers were not installed, within this block (this thread or task only).

    For code that must not import torch in its process (a worker's parent, whose forked pool child owns the
    device): planning then falls back to a checkpoint's size on disk, as on a producer without transformers.
    """
    token = _allowed.set(False)
    try:
        yield
    finally:
        _allowed.reset(token)


def transformers_available() -> bool:
    """Whether transformers and torch can be imported here (without importing them), and may be."""
    if not _allowed.get():
        return False
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("transformers", "torch"))
    except (ImportError, ValueError):  # a module blocked in sys.modules (set to None) reads as absent
        return False


def count_on_meta_device(config: Mapping[str, Any]) -> MetaCount:
    """Build the model ``config`` describes on the meta device and count its parameters.

    Args:
        config: a parsed config.json (``model_type`` required). A ``quantization_config`` is ignored: the count
            is of the unquantized architecture, the shape the quantized one is sized from.

    Returns:
        The counts, with the geometry read from the config transformers built.

    Raises:
        ModelSpecError: transformers is not installed, does not know the ``model_type``, or cannot build it.
    """
    if not transformers_available():
        raise ModelSpecError("transformers is not installed here: the meta-device count needs it")
    import torch
    import transformers
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map", "_name_or_path")}
    model_type = str(fields.pop("model_type", ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter about old config keys is not the user's problem
            hf_config = AutoConfig.for_model(model_type, **fields)
            with torch.device("meta"):
                model = _build(transformers, model_type, fields.get("architectures"), hf_config)
    except Exception as exc:  # foreign library: any failure to build means "no meta count", said once, here
        raise ModelSpecError(
            f"transformers {transformers.__version__} cannot build model_type {model_type!r} on the meta device "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    params = quantizable = 0
    embeddings = {
        id(p)
        for module in _embedding_modules(model)
        for p in (module.parameters() if hasattr(module, "parameters") else [module])  # some return a Parameter
    }
    for name, param in model.named_parameters():  # tied parameters are yielded once
        params += param.numel()
        if param.dim() >= 2 and id(param) not in embeddings and not _NOT_QUANTIZED.search(name):
            quantizable += param.numel()
    model_class = type(model).__name__
    encoder = model_class.endswith("Model") and not _get(hf_config, "is_encoder_decoder")
    encoder = encoder and model_type not in getattr(transformers.models.auto.modeling_auto, _AUTO_CLASSES[0][1])
    try:
        text = hf_config.get_text_config()
    except Exception:  # foreign library: configs without a separable text part describe themselves
        text = hf_config
    counts = _geometry(text, params=params, quantizable=quantizable, encoder=encoder)
    return MetaCount(counts, transformers.__version__, model_class)


def _embedding_modules(model: Any) -> list[Any]:
    """The input and output embeddings, which quantizers leave alone; models without them (vision-only
    encoders) raise in transformers' accessors, which means none."""
    modules = []
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, accessor)()
        except (NotImplementedError, AttributeError):
            continue
        if module is not None:
            modules.append(module)
    return modules


def _build(transformers: Any, model_type: str, architectures: object, hf_config: Any) -> Any:
    """The model of the config's own architecture when transformers has it, else of the first auto class that
    knows the type (transformers' classes are untyped)."""
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        named: Any = getattr(transformers, architectures[0], None)
        if isinstance(named, type):
            return named._from_config(hf_config)  # type: ignore[attr-defined]
    auto = transformers.models.auto.modeling_auto
    for auto_class, mapping_name in _AUTO_CLASSES:
        if model_type in getattr(auto, mapping_name, {}):
            return getattr(transformers, auto_class).from_config(hf_config)
    raise ModelSpecError(f"transformers has no model class for model_type {model_type!r}")


def _get(config: Any, name: str) -> Any:
    """An attribute of a transformers config, ``None`` when absent or when the config refuses to give one global
    value (heterogeneous per-layer configs raise on some attributes)."""
    try:
        return getattr(config, name, None)
    except Exception:  # foreign library: any refusal means "not known globally"
        return None


def _attr(config: Any, *names: str) -> int | None:
    for name in names:
        value = _get(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _geometry(text: Any, *, params: int, quantizable: int, encoder: bool) -> Counts:
    """Counts around an exact parameter total, with the geometry the built config reports."""
    hidden = _attr(text, "hidden_size", "d_model", "n_embd") or 0
    layers = _attr(text, "num_hidden_layers", "num_layers", "n_layer") or 0
    heads = _attr(text, "num_attention_heads", "num_heads", "n_head") or 1
    kv_heads = _attr(text, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _attr(text, "head_dim") or (hidden // heads if hidden else 0)
    experts = _attr(text, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts") or 0
    per_token = _attr(text, "num_experts_per_tok", "moe_top_k") or 0
    return Counts(
        total=params,
        active=params,  # which experts a token uses is not known here: counted as all, never fewer
        quantizable=quantizable,
        layers=layers,
        hidden=hidden,
        mlp_width=_attr(text, "intermediate_size", "ffn_dim", "d_ff") or 4 * hidden,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_attr(text, "vocab_size") or 0,
        tied=bool(_get(text, "tie_word_embeddings")),
        num_experts=experts,
        experts_per_token=per_token if experts else 0,
        encoder=encoder,
        kv=None if encoder else _kv(text, layers, kv_heads, head_dim),
    )


def _kv(text: Any, layers: int, kv_heads: int, head_dim: int) -> KvLayout:
    window = _attr(text, "sliding_window", "attention_chunk_size")
    kv_rank, rope_dim = _attr(text, "kv_lora_rank"), _attr(text, "qk_rope_head_dim")
    kind, elements = (KvKind.MLA, kv_rank + (rope_dim or 0)) if kv_rank else (KvKind.GQA, 2 * kv_heads * head_dim)
    for name in ("layer_types", "layers_block_type"):
        types = _get(text, name)
        if isinstance(types, (list, tuple)) and len(types) == layers:
            return kv_layout_from_layer_types(types, token_elements=elements, window=window, kind=kind)
    if kind is KvKind.MLA:
        return KvLayout(kind, elements, full_layers=layers)
    return gqa_layout(layers, kv_heads, head_dim)
