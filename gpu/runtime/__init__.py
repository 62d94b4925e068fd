"""The torch runtime: warm-up, memory budget, model cache, parked tier, loader and inference.

torch, transformers and NVML are imported inside functions, so importing these modules costs nothing until a model
runs. Foreign errors (a CUDA out-of-memory, a failing forward) are translated into :mod:`gpufleet.gpu.errors` here,
where they happen; what to do about them (evict, retry, re-route) is the worker's policy.
"""
