"""gpufleet's job contract and producer side.

The Celery app and its settings, task names, JSON request/result models, queue names, the router and the
client other services use. Importable without torch, transformers or pynvml (a test proves it).
"""
