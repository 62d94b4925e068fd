"""What both processes of a worker share: who the worker is, its context, and the formats that cross between them.

Nothing here imports the parent side (:mod:`gpufleet.workers.parent`) or the child side
(:mod:`gpufleet.workers.child`); both import this.
"""
