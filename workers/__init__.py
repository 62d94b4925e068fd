"""gpufleet's composition root: the worker entry point, runtime state, task bodies and control commands.

Binds the device (``CUDA_VISIBLE_DEVICES``) before anything imports torch; CUDA lives only in the pool child.
"""
