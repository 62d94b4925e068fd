"""The generation engine's figures per model, kept by the pool child and published in its snapshot.

Counters (tokens, latency histograms) only grow while the child lives, as Prometheus expects of ``_total`` and
``_bucket`` series; the gauges (running, waiting, KV bytes) are what the decode loop holds at its last step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from gpufleet.tasks.fleet import TOKEN_LATENCY_S_BUCKETS, GenerationMetrics


class _Histogram:
    def __init__(self) -> None:
        self.buckets: dict[str, int] = {str(bound): 0 for bound in (*TOKEN_LATENCY_S_BUCKETS, "+Inf")}
        self.sum_s = 0.0

    def observe(self, value_s: float) -> None:
        # Cumulative: a value counts in every bucket whose bound it does not exceed.
        for bound in TOKEN_LATENCY_S_BUCKETS:
            if value_s <= bound:
                self.buckets[str(bound)] += 1
        self.buckets["+Inf"] += 1
        self.sum_s += value_s


class _ModelStats:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.generated_tokens = 0
        self.running = 0
        self.waiting = 0
        self.kv_used_bytes = 0
        self.kv_reserved_bytes = 0
        self.ttft = _Histogram()
        self.itl = _Histogram()


class GenerationStats:
    """Per-model figures of the decode loop (thread-safe: the snapshot is written from other threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _ModelStats] = {}

    def _model(self, model: str) -> _ModelStats:
        return self._models.setdefault(model, _ModelStats())

    def finished(
        self,
        model: str,
        *,
        prompt_tokens: int,
        prefill_tokens: int,
        generated_tokens: int,
        first_token_s: float,
        inter_token_s: Iterable[float],
    ) -> None:
        """One sequence done: its tokens and latencies."""
        with self._lock:
            stats = self._model(model)
            stats.prompt_tokens += prompt_tokens
            stats.prefill_tokens += prefill_tokens
            stats.generated_tokens += generated_tokens
            if generated_tokens:
                stats.ttft.observe(first_token_s)
            for gap_s in inter_token_s:
                stats.itl.observe(gap_s)

    def gauges(self, model: str, *, running: int, waiting: int, kv_used_bytes: int, kv_reserved_bytes: int) -> None:
        """What the loop holds now (after a step, and zeros when its session ends)."""
        with self._lock:
            stats = self._model(model)
            stats.running, stats.waiting = running, waiting
            stats.kv_used_bytes, stats.kv_reserved_bytes = kv_used_bytes, kv_reserved_bytes

    def report(self) -> dict[str, GenerationMetrics]:
        with self._lock:
            return {
                model: GenerationMetrics(
                    prompt_tokens=s.prompt_tokens,
                    prefill_tokens=s.prefill_tokens,
                    generated_tokens=s.generated_tokens,
                    sequences_running=s.running,
                    sequences_waiting=s.waiting,
                    kv_used_bytes=s.kv_used_bytes,
                    kv_reserved_bytes=s.kv_reserved_bytes,
                    ttft_s_buckets=dict(s.ttft.buckets),
                    ttft_s_sum=s.ttft.sum_s,
                    itl_s_buckets=dict(s.itl.buckets),
                    itl_s_sum=s.itl.sum_s,
                )
                for model, s in self._models.items()
            }
