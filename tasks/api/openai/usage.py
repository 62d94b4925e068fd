"""Per-key usage of the ``/v1`` endpoints, counted in this API process and appended to ``/metrics``.

Counters restart with the process (Prometheus' ``rate()`` and ``increase()`` handle that); with several API
replicas, sum over their ``instance`` label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class Usage(Collector):
    """Requests by key, endpoint and status; prompt and completion tokens by key and model."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.prompt_tokens: Counter[tuple[str, str]] = Counter()
        self.completion_tokens: Counter[tuple[str, str]] = Counter()

    def request(self, key: str, endpoint: str, status: int) -> None:
        self.requests[(key, endpoint, str(status))] += 1

    def tokens(self, key: str, model: str, *, prompt: int, completion: int = 0) -> None:
        self.prompt_tokens[(key, model)] += prompt
        self.completion_tokens[(key, model)] += completion

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gpufleet_api_requests",
            "Requests to the /v1 endpoints, by key, endpoint and status code",
            labels=["key", "endpoint", "code"],
        )
        for request_labels, count in sorted(self.requests.items()):
            requests.add_metric(list(request_labels), count)
        yield requests
        for name, counts, what in (
            ("gpufleet_api_prompt_tokens", self.prompt_tokens, "Prompt (input) tokens"),
            ("gpufleet_api_completion_tokens", self.completion_tokens, "Completion (output) tokens"),
        ):
            family = CounterMetricFamily(name, f"{what} of /v1 requests, by key and model", labels=["key", "model"])
            for labels, count in sorted(counts.items()):
                family.add_metric(list(labels), count)
            yield family

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)
