"""The OpenAI-compatible front door of ``gpufleet api``: ``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``
and ``/v1/completions``.

Every request becomes a fleet job, sent through the same router as every producer's (:mod:`gpufleet.tasks.client`),
so it is planned, queued, recovered and counted like any other. The modules: ``schema`` (the request bodies and
their translation into job requests), ``keys`` (API keys, their limits),
``coalescing`` (concurrent embedding requests merged into shared jobs), ``gateway`` (sending jobs and waiting for
their results and token streams on the event loop), ``usage`` (per-key counters for ``/metrics``), ``errors``
(OpenAI's error object) and ``routes`` (the endpoints).
"""
