"""The one record of a generation's options, from the job contract down to the decode loop (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and how: exactly one of ``prompt`` or ``messages``, and the sampling settings.

    ``temperature`` 0 decodes greedily; above 0 samples with that temperature, within the ``top_p`` nucleus, from a
    generator seeded with ``seed`` (so a seed gives the same text whatever the job runs with). Generation stops at
    an end-of-sequence token, at one of the ``stop`` strings (not included in the text) or after
    ``max_new_tokens`` tokens.
    """

    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sampled(self) -> bool:
        return self.temperature > 0
