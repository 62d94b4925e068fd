from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded

import gpufleet.gpu.errors as gpu_errors
from gpufleet.tasks import errors
from gpufleet.tasks.contracts import EmbedRequest
from gpufleet.workers.child.task_base import job_errors, parse


def test_parse_refuses_positional_and_names_fields() -> None:
    with pytest.raises(errors.InvalidRequestError, match="keyword arguments only"):
        parse(EmbedRequest, ("a/b",), {})
    with pytest.raises(errors.InvalidRequestError, match=r"texts.*at least 1"):
        parse(EmbedRequest, (), {"model": "a/b", "texts": []})


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (gpu_errors.UnsafeModelIdError("x"), errors.InvalidRequestError),
        (gpu_errors.ModelNotInstalledError("x"), errors.ModelNotFoundError),
        (gpu_errors.LoadFailedError("x"), errors.ModelLoadError),
        (gpu_errors.AllPinnedError("x"), errors.CapacityError),
        (gpu_errors.ForwardError("x"), errors.InferenceError),
        (gpu_errors.PlanningError("x"), errors.JobError),
    ],
)
def test_gpu_errors_map_to_contract_errors(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected), job_errors("fleet.embed", 10.0):
        raise raised


def test_soft_time_limit_message() -> None:
    with pytest.raises(errors.JobError, match="GPUFLEET_JOBS__SOFT_TIME_LIMIT_S"), job_errors("fleet.embed", 5.0):
        raise SoftTimeLimitExceeded()


def test_an_unknown_exception_becomes_a_contract_error() -> None:
    import pickle

    unexpected = r"fleet.load_model failed unexpectedly: UnpicklingError: nope"
    with pytest.raises(errors.JobError, match=unexpected), job_errors("fleet.load_model", 10.0):
        raise pickle.UnpicklingError("nope")


def test_celery_control_flow_passes_through() -> None:
    from celery.exceptions import Ignore

    with pytest.raises(Ignore), job_errors("fleet.embed", 10.0):
        raise Ignore()  # what Task.replace raises when the OOM policy re-routes a job
