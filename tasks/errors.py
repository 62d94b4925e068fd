"""Errors of the job contract, raised by producers and carried back from workers.

Workers translate ``gpu`` errors into these at the task boundary; Celery ships them back as JSON
(``exc_type``, ``exc_message``) so a caller without gpufleet installed still reads a clear message.
Each class takes a single message argument so Celery can rebuild it on the caller's side.

Hierarchy::

    FleetError
    ├── SettingsError            a GPUFLEET_* variable is invalid (raised at start-up)
    ├── BrokerUnavailableError   the broker or result backend cannot be reached; nothing was sent
    │   └── BrokerAuthenticationError   it answered but refused the password in its URL
    ├── RoutingError             no queue can take the job's model
    └── JobError                 a job was refused or failed on a worker (the worker keeps serving)
        ├── InvalidRequestError  arguments do not match the contract
        ├── ModelNotFoundError   the model id does not resolve on the worker (or, seen by the producer, is not
        │                        installed under the model root)
        ├── ModelLoadError       the model could not be loaded
        ├── CapacityError        the model does not fit the worker's memory budget, after eviction and retry
        └── InferenceError       the model failed while answering
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error in ``tasks``."""


class SettingsError(FleetError):
    """A GPUFLEET_* setting is invalid."""


class BrokerUnavailableError(FleetError):
    """The broker could not be reached; the job was not enqueued."""


class BrokerAuthenticationError(BrokerUnavailableError):
    """The broker or result backend refused the password in its URL; nothing was sent."""


class RoutingError(FleetError):
    """No queue can take the job's model."""


class JobError(FleetError):
    """A job was refused or failed on a worker."""


class InvalidRequestError(JobError):
    """The job's arguments do not match the contract."""


class ModelNotFoundError(JobError):
    """The job's model id does not resolve on the worker, or is not installed under the producer's model root."""


class ModelLoadError(JobError):
    """The model could not be loaded."""


class CapacityError(JobError):
    """The model does not fit the worker's memory budget."""


class InferenceError(JobError):
    """The model failed while answering."""
