"""gpufleet: serve many Hugging Face models on a fleet of mixed GPUs through a Celery task queue.

The producer API, for other services (no torch needed)::

    from gpufleet import FleetClient

    client = FleetClient()  # reads GPUFLEET_BROKER_URL etc.
    vectors = client.embed("sentence-transformers/all-MiniLM-L6-v2", ["hello"]).get(timeout=60)["embeddings"]

The contract's errors (:class:`FleetError` and its subclasses) and request/result models are reachable from here
too. Everything else lives in the three layers, each a sub-package kept in its own top-level folder of the
repository: :mod:`gpufleet.gpu` (``gpu/``: planning and the torch runtime), :mod:`gpufleet.tasks` (``tasks/``: the
contract and the producer side) and :mod:`gpufleet.workers` (``workers/``: the worker processes and the CLI).

Names are imported on first use, so ``import gpufleet.gpu.plan`` does not load Celery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpufleet.tasks.client import FleetClient, route_of
    from gpufleet.tasks.contracts import (
        ChatMessage,
        EmbedRequest,
        EmbedResult,
        GenerateRequest,
        GenerateResult,
        LoadModelRequest,
        LoadModelResult,
        Timings,
        UnloadModelRequest,
        UnloadModelResult,
    )
    from gpufleet.tasks.errors import (
        BrokerAuthenticationError,
        BrokerUnavailableError,
        CapacityError,
        FleetError,
        InferenceError,
        InvalidRequestError,
        JobError,
        ModelLoadError,
        ModelNotFoundError,
        RoutingError,
        SettingsError,
    )
    from gpufleet.tasks.names import TaskName

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "FleetClient": "gpufleet.tasks.client",
    "route_of": "gpufleet.tasks.client",
    "TaskName": "gpufleet.tasks.names",
    **dict.fromkeys(
        (
            "ChatMessage",
            "EmbedRequest",
            "EmbedResult",
            "GenerateRequest",
            "GenerateResult",
            "LoadModelRequest",
            "LoadModelResult",
            "Timings",
            "UnloadModelRequest",
            "UnloadModelResult",
        ),
        "gpufleet.tasks.contracts",
    ),
    **dict.fromkeys(
        (
            "BrokerAuthenticationError",
            "BrokerUnavailableError",
            "CapacityError",
            "FleetError",
            "InferenceError",
            "InvalidRequestError",
            "JobError",
            "ModelLoadError",
            "ModelNotFoundError",
            "RoutingError",
            "SettingsError",
        ),
        "gpufleet.tasks.errors",
    ),
}

__all__ = [
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "CapacityError",
    "ChatMessage",
    "EmbedRequest",
    "EmbedResult",
    "FleetClient",
    "FleetError",
    "GenerateRequest",
    "GenerateResult",
    "InferenceError",
    "InvalidRequestError",
    "JobError",
    "LoadModelRequest",
    "LoadModelResult",
    "ModelLoadError",
    "ModelNotFoundError",
    "RoutingError",
    "SettingsError",
    "TaskName",
    "Timings",
    "UnloadModelRequest",
    "UnloadModelResult",
    "route_of",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpufleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
