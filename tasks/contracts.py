"""JSON request and result models shared by producers and workers.

Requests are strict: wrong types, unknown fields and out-of-range values are refused with a message naming the
field. Results are plain JSON (``model_dump(mode="json")``) so callers without gpufleet read them as dicts.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gpufleet.gpu.errors import UnsafeModelIdError
from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.repository import validate_model_id
from gpufleet.tasks.errors import InvalidRequestError

MAX_TEXTS = 1024
MAX_TEXT_CHARS = 100_000
MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
RequestT = TypeVar("RequestT", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StrictStr = Field(min_length=1, max_length=256, description="model id, e.g. 'org/name'")

    @field_validator("model")
    @classmethod
    def _safe_model_id(cls, value: str) -> str:
        # The same rule for every task and every producer (a plain Celery client included): an id that could
        # escape the model root is refused before a worker acts on it, even for an unload that would find nothing.
        try:
            return validate_model_id(value)
        except UnsafeModelIdError as exc:
            raise ValueError(str(exc)) from None


class EmbedRequest(_Request):
    """``fleet.embed``: sentence embeddings for a batch of texts."""

    texts: list[StrictStr] = Field(min_length=1, max_length=MAX_TEXTS)
    normalize: StrictBool = True
    # "base64": the result's vectors as float32 little-endian, base64 (``embeddings_base64``, as OpenAI's
    # encoding_format=base64), a quarter the size of JSON floats and no float parsing; "float": lists of floats.
    encoding: Literal["float", "base64"] = "float"

    @model_validator(mode="after")
    def _texts_not_blank(self) -> EmbedRequest:
        for index, text in enumerate(self.texts):
            if not text.strip():
                raise ValueError(f"texts[{index}] is empty: every text must contain something to embed")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"texts[{index}] has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        return self


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class GenerateRequest(_Request):
    """``fleet.generate``: text generation from a prompt or a chat (exactly one of the two)."""

    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_new_tokens: StrictInt = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    # 0 means greedy decoding (deterministic); above 0 samples with this temperature.
    temperature: StrictFloat | StrictInt = Field(default=0.0, ge=0.0, le=5.0)
    top_p: StrictFloat | StrictInt = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    # Generation ends before the first of these strings (not included in the text), as OpenAI's ``stop``.
    stop: list[StrictStr] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    # Publish the text as it grows to the job's token stream (gpufleet.tasks.streams); the result is unchanged.
    stream: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("pass exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        for index, stop in enumerate(self.stop):
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{index}] must have 1 to {MAX_STOP_CHARS} characters; got {len(stop)}")
        return self


class LoadModelRequest(_Request):
    """``fleet.load_model``: load a model into the worker's cache (optionally pinned)."""

    priority: StrictBool = False


class UnloadModelRequest(_Request):
    """``fleet.unload_model``: drop a model from the worker's cache."""


class SleepRequest(BaseModel):
    """``fleet.diag.sleep``: hold the worker's process (liveness and limit checks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: StrictFloat | StrictInt = Field(ge=0, le=3600)
    # Keep sleeping through the soft time limit, like a stuck CUDA kernel: only the hard limit ends it.
    uninterruptible: StrictBool = False


class NoopRequest(BaseModel):
    """``fleet.diag.noop``: Celery's own round trip (``benchmarks/overhead_bench.py``).

    ``floats`` asks for that many numbers back, so the round trip of an answer as large as an embedding's can be
    told apart from what the fleet's job bookkeeping adds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    floats: StrictInt = Field(default=0, ge=0, le=65536)


class Timings(BaseModel):
    """Where a job's time went, in seconds. ``queue_wait_s`` is None when the producer sent no timestamp."""

    queue_wait_s: float | None = None
    load_s: float = 0.0
    compute_s: float = 0.0
    total_s: float = 0.0
    # Jobs that shared this job's forward (the worker batches queued jobs for one model); 1 when it ran alone.
    # compute_s is that shared forward's time.
    batch_size: int = 1


class _Result(BaseModel):
    model: str
    worker: str
    device: str  # "cuda:0 (H100)" or "cpu"
    gpu_type: str
    timings: Timings


class EmbedResult(_Result):
    embeddings: list[list[float]]  # empty when the request asked for encoding="base64"
    embeddings_base64: list[str] = Field(default_factory=list)  # float32 little-endian, base64, one per text
    dim: int
    normalized: bool
    # Tokens the model read for all the texts, special tokens included, and for each text (so a caller that
    # merged several requests' texts into one job can split the count); 0 and [] from a worker older than them.
    prompt_tokens: int = 0
    text_tokens: list[int] = Field(default_factory=list)


class GenerateResult(_Result):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


LoadAction = Literal["loaded", "already-loaded", "restored"]
"""What a load did: read the model from disk, found it resident, or copied it back from the parked tier."""


class LoadModelResult(_Result):
    action: LoadAction
    bytes: int
    seconds: float
    pinned: bool
    loader: str  # which load path ran, e.g. "fast-safetensors" or "from_pretrained"
    evicted: list[str] = Field(default_factory=list)


class UnloadModelResult(_Result):
    action: Literal["unloaded", "not-loaded"]
    bytes: int
    seconds: float


class SleepResult(BaseModel):
    worker: str
    slept_s: float


class NoopResult(BaseModel):
    worker: str
    floats: list[float] = Field(default_factory=list)


REROUTED = "REROUTED"
"""The state of a job a worker re-sent to another queue under the same id, until it runs there.

Not a ready state: ``AsyncResult.get`` keeps waiting, and the re-sent job's own states (``STARTED``, its result)
overwrite it. Its meta is a :class:`Rerouted`."""


class Rerouted(BaseModel):
    """Where a re-routed job went and why: the meta of state :data:`REROUTED` (replacing any stale progress)."""

    rerouted_to: str  # the queue it was re-sent to
    reason: str
    worker: str  # who re-sent it
    at: float  # seconds since the epoch

    @classmethod
    def from_meta(cls, meta: Any) -> Rerouted | None:
        """The re-route a result backend's task meta records, or None when the job is in another state."""
        if not isinstance(meta, dict) or meta.get("status") != REROUTED:
            return None
        try:
            return cls.model_validate(meta.get("result"))
        except ValidationError:
            return None

    def describe(self, job_id: str) -> str:
        """``job 1f2e… was re-sent by cpu-d@x to queue 'cpu.cpu-e@x': out of memory …`` for a person."""
        return f"job {job_id} was re-sent by {self.worker} to queue {self.rerouted_to!r}: {self.reason}"


def validate_request(model: type[RequestT], kwargs: dict[str, Any]) -> RequestT:
    """Validate a job's keyword arguments against its contract.

    Raises:
        InvalidRequestError: naming every wrong field and why (``texts: List should have at least 1 item``).
    """
    try:
        return model.model_validate(kwargs)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid {model.__name__}: {problems}") from None


def dump(result: BaseModel) -> dict[str, Any]:
    """A result as the JSON-ready dict a task returns."""
    return result.model_dump(mode="json")
