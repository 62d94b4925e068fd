"""The worker's parent process: Celery's consumer and everything that talks to the broker.

Consumer, batcher, heartbeat, held transport, recovery and the control commands. It never imports torch, the
child side (:mod:`gpufleet.workers.child`) or :mod:`gpufleet.gpu.runtime` (an import-linter contract): CUDA and
fork do not mix, and the parent must answer the broker while the child computes. GPU detection goes through NVML
(:mod:`gpufleet.gpu.nvml`), which starts no CUDA context.
"""
