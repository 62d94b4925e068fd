"""The fleet HTTP API and dashboard (``gpufleet api``): status, Prometheus metrics and a page, from the registry.

Everything here reads :class:`gpufleet.tasks.fleet.FleetSnapshot` values: :mod:`gpufleet.tasks.api.views` and
:mod:`gpufleet.tasks.api.metrics` are pure functions of a snapshot, :mod:`gpufleet.tasks.api.app` wires them to FastAPI
and the registry. No GPU, no torch: the API runs anywhere that reaches the broker's Redis. Needs the ``api`` extra.
"""
