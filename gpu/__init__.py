"""gpufleet's device and model-memory library.

Never imports Celery, ``tasks`` or ``workers``. The planning core (catalog, specs, estimates, selection,
model resolution) is pure Python and importable without torch; the runtime modules (warm-up, memory pool,
loader, inference) import torch and NVML inside functions.
"""
