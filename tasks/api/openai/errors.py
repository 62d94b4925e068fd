"""OpenAI's error object, and the status each fleet error maps to.

OpenAI's clients turn the status into their exception class (400 ``BadRequestError``, 401
``AuthenticationError``, 403 ``PermissionDeniedError``, 404 ``NotFoundError``, 413/other 4xx ``APIStatusError``,
429 ``RateLimitError``, 5xx ``InternalServerError``) and show ``error.message``: so the message says what happened
and what to do, as every gpufleet message does.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from gpufleet.tasks import errors as fleet_errors

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
UNAVAILABLE = "service_unavailable"
TIMEOUT = "timeout"
SERVER = "server_error"

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An answer in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}`` with a status.

    Args:
        status: the HTTP status.
        message: what happened and what to do.
        type: OpenAI's error type (``invalid_request_error`` ...).
        param: the request field at fault, if one is.
        code: a short machine-readable code (``model_not_found``, ``rate_limit_exceeded`` ...).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_fleet_error(exc: BaseException, *, model: str | None = None, retry_after_s: int = 5) -> OpenAIError:
    """The answer for an error the fleet raised while a request's job was sent or run.

    Args:
        model: the request's model; given, a model that is not installed is answered with its id only, since the
            fleet's own message names directories on its machines (those go to this API's log).
    """
    message = str(exc) or type(exc).__name__
    if isinstance(exc, fleet_errors.InvalidRequestError):
        return OpenAIError(400, message, code="invalid_request")
    if isinstance(exc, fleet_errors.ModelNotFoundError):
        if model is not None:
            log.info("a /v1 request named a model that is not installed: %s", message)
            message = f"model {model!r} is not installed on this fleet; GET /v1/models lists the models it can serve"
        return OpenAIError(404, message, type=NOT_FOUND, param="model", code="model_not_found")
    if isinstance(exc, (fleet_errors.RoutingError, fleet_errors.CapacityError)):
        # Nothing live can run the model (now): a client may retry later, when a bigger worker has joined.
        return OpenAIError(503, message, type=UNAVAILABLE, code="no_capable_worker")
    if isinstance(exc, fleet_errors.BrokerUnavailableError):
        return OpenAIError(
            503, message, type=UNAVAILABLE, code="broker_unavailable", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, TimeoutError):
        return OpenAIError(504, message, type=TIMEOUT, code="timeout")
    if isinstance(exc, fleet_errors.JobError):
        return OpenAIError(500, message, type=SERVER, code=type(exc).__name__)
    return OpenAIError(500, f"the API failed: {message}", type=SERVER, code="internal_error")
