"""Pure planning: which GPU type a model needs, from its config.json or its name.

Catalog of GPU types, model specs (parameter counts per architecture, name rules), memory estimates and the
placement rules. Never imports torch, transformers, pynvml, Celery or :mod:`gpufleet.gpu.runtime`: the producer-side
router and ``gpufleet plan`` run it on machines without a GPU.
"""
