"""Words the runtime and the job contract share, each defined once (the contract's results use these types)."""

from __future__ import annotations

from typing import Literal

FinishReason = Literal["stop", "length"]
"""Why a generation ended: ``"stop"`` (an end-of-sequence token or a stop string), ``"length"`` (its token limit)."""

FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length")
