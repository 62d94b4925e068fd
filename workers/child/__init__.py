"""The worker's pool child: the process that owns the device.

The per-process runtime (memory budget, model cache, loader), the one job pipeline every job goes through
(:mod:`~gpufleet.workers.child.pipeline`), the task bodies, the OOM policy and storing results. It never imports
the parent's broker plumbing (:mod:`gpufleet.workers.parent`; an import-linter contract).
"""
