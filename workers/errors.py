"""Errors of the ``workers`` package.

Hierarchy::

    WorkerError
    └── WorkerStartError   the worker cannot start (no such GPU, bad flags, settings)
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error in ``workers``."""


class WorkerStartError(WorkerError):
    """The worker cannot start; the message says which flag or setting to change."""
