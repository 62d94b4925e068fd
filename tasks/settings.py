"""Typed settings, bound to ``GPUFLEET_*`` environment variables and validated at start-up.

Nested sections use ``__``: ``GPUFLEET_GPU__MEMORY_FRACTION=0.8``, ``GPUFLEET_GPU__WARMUP__SIZE=large``.
Lists take JSON (``["a/b","c/d"]``) or a comma-separated string (``a/b,c/d``). Every variable is listed, with its
default, in the README's configuration table (a test keeps the two in step).
"""

from __future__ import annotations

import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as SourceError

from gpufleet.gpu.config import GpuConfig
from gpufleet.gpu.repository import default_hf_cache
from gpufleet.tasks.errors import SettingsError

ENV_PREFIX = "GPUFLEET_"
ENV_DELIMITER = "__"


_FIELD_REF = re.compile(r"<([a-z0-9_.]+)>")


class SettingRuleError(ValueError):
    """A rule between settings is broken (a soft limit not below its hard one, ...).

    Such a rule fails a whole section, so pydantic locates the error at the section (``GPUFLEET_FLEET``), which is
    not what anyone sets: the message names each field as ``<field>`` (dotted from the section the validator runs
    on: ``<jobs.time_limit_s>`` at the top level), and :func:`load_settings` writes each as the variable to change.

    Args:
        message: what is wrong and what to do, with ``<field>`` for each setting it involves.
    """

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(_FIELD_REF.sub(lambda match: match.group(1), message))

    def naming_variables(self, location: tuple[int | str, ...]) -> str:
        """The message with each field written as its environment variable, for a section at ``location``."""
        return _FIELD_REF.sub(lambda match: env_name((*location, *match.group(1).split("."))), self.template)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobLimits(_Section):
    """``GPUFLEET_JOBS__*``: time limits and result lifetime. Every job has a soft and a hard limit."""

    soft_time_limit_s: float = Field(default=300.0, gt=0)
    time_limit_s: float = Field(default=330.0, gt=0)
    # Loading a large checkpoint from cold storage can take longer than answering.
    load_soft_time_limit_s: float = Field(default=900.0, gt=0)
    load_time_limit_s: float = Field(default=960.0, gt=0)
    result_expires_s: int = Field(default=3600, gt=0)
    # A job whose worker process died is redelivered; after this many deliveries it is failed, not retried,
    # so one poison job cannot kill workers forever.
    max_deliveries: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _soft_below_hard(self) -> JobLimits:
        for soft, hard in (("soft_time_limit_s", "time_limit_s"), ("load_soft_time_limit_s", "load_time_limit_s")):
            soft_s, hard_s = getattr(self, soft), getattr(self, hard)
            if soft_s >= hard_s:
                raise SettingRuleError(
                    f"<{soft}> ({soft_s:g} s) must be below <{hard}> ({hard_s:g} s): the soft limit lets a job fail "
                    f"cleanly before the hard one kills its process; lower <{soft}> or raise <{hard}>"
                )
        return self

    @property
    def longest_hard_limit_s(self) -> float:
        return max(self.time_limit_s, self.load_time_limit_s)


class BrokerOptions(_Section):
    """``GPUFLEET_BROKER__*``: how producers and workers talk to the broker."""

    # Redis redelivers an unacknowledged job after this long; it must exceed every hard time limit, or a
    # long job runs twice. Applied to broker and result-backend transport options alike (celery#7651).
    visibility_timeout_s: int = Field(default=3600, gt=0)
    # Producer side: give up enqueuing after this many connection retries instead of hanging.
    publish_max_retries: int = Field(default=3, ge=0)
    publish_retry_interval_s: float = Field(default=0.2, ge=0)
    connect_timeout_s: float = Field(default=4.0, gt=0)


class WorkerOptions(_Section):
    """``GPUFLEET_WORKER__*``: the worker process."""

    # The pool child warms the GPU up (and preloads priority models) before it reports alive; the parent
    # waits this long for it (Celery's default of 4 s would kill a warming child).
    proc_alive_timeout_s: float = Field(default=600.0, gt=0)
    # Where a worker's child publishes its state for the control commands its parent answers.
    state_dir: Path | None = None
    loglevel: str = "INFO"


class FleetOptions(_Section):
    """``GPUFLEET_FLEET__*``: what the fleet has, for the producer-side router."""

    # GPU types (catalog names, e.g. H100,L4 or cpu) that have workers; the router plans only onto these.
    # Empty means every GPU type in the catalog (not cpu).
    gpu_types: tuple[str, ...] = ()
    # The live fleet: each worker's parent writes a heartbeat to the registry (in the broker's Redis, or the
    # result backend's when the broker is not Redis) every heartbeat_interval_s; it drops out heartbeat_ttl_s
    # after the last one. Readers cache what they read for registry_cache_s, so routing costs no round trip.
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)
    registry_cache_s: float = Field(default=1.0, ge=0)
    # Route to live workers (prefer the one holding the model); false: plan by GPU type alone, as without a registry.
    live_routing: bool = True
    # A worker holding the model is preferred until this many jobs wait on it; then the type's queue is used.
    max_backlog: int = Field(default=8, ge=0)
    # Redis broker: each worker records which deliveries it holds, and a live worker puts a dead one's back on their
    # queues as soon as its heartbeat expires (about heartbeat_ttl_s), instead of after broker.visibility_timeout_s.
    recover_held_jobs: bool = True

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> FleetOptions:
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise SettingRuleError(
                f"<heartbeat_ttl_s> ({self.heartbeat_ttl_s:g} s) must be at least twice <heartbeat_interval_s> "
                f"({self.heartbeat_interval_s:g} s), or a live worker flickers out of the fleet between two "
                "heartbeats; raise <heartbeat_ttl_s> or lower <heartbeat_interval_s>"
            )
        return self


class BatchingOptions(_Section):
    """``GPUFLEET_BATCHING__*``: jobs queued for the same model on a worker run as one batch (embed, generate)."""

    enabled: bool = True
    # Jobs per batch. The worker reserves this many messages (Celery's prefetch), so it is also what one worker
    # may hold unstarted while a batch runs: keep it near what one forward serves well.
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    # How long a job that arrives at an idle worker during a burst waits for company before it runs; a job after a
    # quiet spell this long runs at once. While the device is busy, jobs gather anyway and run together after.
    max_wait_s: float = Field(default=0.002, ge=0, le=1.0)
    # Padded tokens per embedding forward: a batch of long texts is split into forwards below this.
    max_batch_tokens: int = Field(default=16384, ge=64)


class GenerationOptions(_Section):
    """``GPUFLEET_GENERATION__*``: how a worker runs ``fleet.generate`` jobs."""

    # "continuous": each model's jobs share one decode loop that they join and leave between steps (answered
    # each at its own end, streamable, cancellable); "static": jobs batched as for embeddings, each batch run as
    # one left-padded generate() (every job of a batch waits for its longest). Models the loop cannot run
    # (sliding-window or state-space layers, multimodal checkpoints) use the static path either way.
    engine: Literal["continuous", "static"] = "continuous"
    # Sequences one decode loop runs at once; further jobs wait for a place (the worker reserves up to twice
    # GPUFLEET_BATCHING__MAX_BATCH_SIZE messages, so that also bounds what waits on one worker).
    max_running: int = Field(default=64, ge=1, le=1024)
    # Share of the memory budget left free by the models that a loop's KV cache may reserve (shown as
    # "kv:<model>" among the pool's reservations); admission keeps every running sequence's longest cache in it.
    kv_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # Padded prompt tokens one prefill forward takes at most (more waiting prompts join at the next step).
    max_prefill_tokens: int = Field(default=4096, ge=64)
    # Entries one job's token stream keeps (a reader that falls further behind loses the oldest deltas).
    stream_max_entries: int = Field(default=10_000, ge=16)


class ApiKey(_Section):
    """One key of the OpenAI-compatible endpoints (``/v1/*``): who it is, what it may use, how fast.

    Give the key as its SHA-256 hex digest (``key_sha256``: nothing secret in the settings) or, for local use, in
    the clear (``key``); exactly one of the two.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    key: SecretStr | None = None
    # Model ids the key may use; empty means every model.
    models: tuple[str, ...] = ()
    # Requests in any 60 s; None: no limit.
    requests_per_minute: int | None = Field(default=None, ge=1)
    # Requests of this key in flight at once (each is one job); None: no limit.
    max_concurrent: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key_sha256 is None) == (self.key is None):
            raise ValueError(
                f"API key {self.name!r}: give exactly one of key_sha256 (the key's SHA-256 hex digest: "
                "printf %s KEY | sha256sum) or key (the key itself)"
            )
        if self.key is not None and len(self.key.get_secret_value()) < 16:
            raise ValueError(f"API key {self.name!r}: the key is shorter than 16 characters; use a random one")
        return self

    def digest(self) -> bytes:
        """The key's SHA-256 digest (32 bytes): what requests are compared against."""
        import hashlib

        if self.key is not None:
            return hashlib.sha256(self.key.get_secret_value().encode()).digest()
        return bytes.fromhex(self.key_sha256 or "")


class ApiOptions(_Section):
    """``GPUFLEET_API__*``: the fleet HTTP API, the dashboard and the OpenAI-compatible ``/v1`` endpoints."""

    # Bearer token every endpoint but /healthz requires; unset means no authentication (loopback use only).
    # On /v1 it is one more key, with no limits.
    token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Keys of the /v1 endpoints (a JSON list of ApiKey objects), and a JSON file of more (read at start-up).
    keys: tuple[ApiKey, ...] = ()
    keys_file: Path | None = None
    # A /v1 request body above this is refused with 413 before it is parsed.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # A /v1 request whose job has not finished by then is answered 504 (and its job revoked).
    request_timeout_s: float = Field(default=600.0, gt=0)
    # /v1 jobs this API may have waiting or running per model; past it, requests are answered 429.
    max_pending_per_model: int = Field(default=1024, ge=1)
    # max_tokens of a chat request that sets none (a completion's default is 16, as OpenAI's).
    default_max_tokens: int = Field(default=256, ge=1, le=4096)
    # Merge concurrent /v1/embeddings requests for one model into shared fleet.embed jobs (tasks/api/openai/
    # coalescing.py); false sends one job a request.
    coalesce_embeddings: bool = True

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would accept "Bearer " from anyone: refuse it rather than guess what was meant.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("the API token is empty: unset it to turn authentication off, or set a token")
        return value


_SEQUENCE_ORIGINS = (tuple, list, set, frozenset)


def _is_sequence(annotation: Any) -> bool:
    """Whether a field's type is a list-like setting (``tuple[str, ...]``, ``list[int] | None`` …)."""
    if typing.get_origin(annotation) in _SEQUENCE_ORIGINS:
        return True
    return any(_is_sequence(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def split_list(value: str) -> list[Any]:
    """A list setting's text as a list: a JSON list (``["a","b"]``) or comma-separated (``a, b``; empty: ``[]``).

    Raises:
        ValueError: the text starts like JSON (``[``) but is not a JSON list.
    """
    text = value.strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{value!r} is not a JSON list ({exc}); write it as JSON or as a,b,c") from None
    if not isinstance(parsed, list):
        raise ValueError(f"{value!r} is not a list; write it as JSON or as a,b,c")
    return parsed


def _split_sequences(model: type[BaseModel], data: dict[str, Any], location: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` with the text of every list field, at any depth of ``model``, split by :func:`split_list`.

    Raises:
        SettingsError: a list value starts like JSON but is not a JSON list (naming its variable).
    """
    fields = model.model_fields
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        annotation = field.annotation
        if isinstance(value, str) and _is_sequence(annotation):
            try:
                data[key] = split_list(value)
            except ValueError as exc:
                raise SettingsError(f"invalid gpufleet settings: {env_name((*location, key))}: {exc}") from None
        elif isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            data[key] = _split_sequences(annotation, value, (*location, key))
    return data


class _EnvSource(EnvSettingsSource):
    """The environment source, with one rule for list settings at every depth: JSON or comma-separated.

    pydantic-settings JSON-decodes list values and, for nested sections, does so while it assembles the section,
    where a field validator cannot intervene; so list values are left as text here and split in one pass after.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if field is not None and isinstance(value, str) and _is_sequence(field.annotation):
            return value  # split by _split_sequences, with the rest of the list fields
        return super().decode_complex_value(field_name, field, value)

    def __call__(self) -> dict[str, Any]:
        return _split_sequences(self.settings_cls, super().__call__())


class Settings(BaseSettings):
    """All of gpufleet's settings. Build with :func:`get_settings` (cached) or :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="ignore",
        frozen=True,
    )

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    model_root: Path | None = None
    # Offline Hugging Face cache to fall back on; unset means the default hub cache location.
    hf_cache: Path | None = None
    priority_models: tuple[str, ...] = ()
    trust_remote_code: bool = False
    # Test hooks: fault injection (GPUFLEET_FAULTS) and the fleet.diag.* tasks. Off in production: a fault can
    # kill a worker and a diag task holds one for as long as it is told.
    diagnostics: bool = False
    # Fault injection for tests of failure paths (GPUFLEET_FAULTS; the forms are in workers/child/faults.py).
    # Refused unless diagnostics are on, so a stray variable never kills a production worker.
    faults: str = ""
    gpu: GpuConfig = GpuConfig()
    jobs: JobLimits = JobLimits()
    broker: BrokerOptions = BrokerOptions()
    worker: WorkerOptions = WorkerOptions()
    fleet: FleetOptions = FleetOptions()
    batching: BatchingOptions = BatchingOptions()
    generation: GenerationOptions = GenerationOptions()
    api: ApiOptions = ApiOptions()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings

    @property
    def hf_cache_dir(self) -> Path:
        """The offline Hugging Face cache models also resolve in: ``GPUFLEET_HF_CACHE``, else the hub's default."""
        return self.hf_cache or default_hf_cache()

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"{value!r} is not a URL: use e.g. redis://:password@127.0.0.1:6379/0")
        return value

    @model_validator(mode="after")
    def _faults_need_diagnostics(self) -> Settings:
        if self.faults.strip() and not self.diagnostics:
            raise SettingRuleError(
                "<faults> is set but diagnostics are off: fault injection is for tests only. Unset <faults>, or set "
                "<diagnostics>=true on a test worker"
            )
        return self

    @model_validator(mode="after")
    def _visibility_covers_limits(self) -> Settings:
        if self.broker.visibility_timeout_s <= self.jobs.longest_hard_limit_s:
            longest = "load_time_limit_s" if self.jobs.load_time_limit_s >= self.jobs.time_limit_s else "time_limit_s"
            raise SettingRuleError(
                f"<broker.visibility_timeout_s> ({self.broker.visibility_timeout_s} s) must exceed the longest hard "
                f"time limit, <jobs.{longest}> ({self.jobs.longest_hard_limit_s:g} s), or Redis redelivers long "
                f"jobs while they run; raise <broker.visibility_timeout_s> or lower <jobs.{longest}>"
            )
        return self


def env_name(location: tuple[int | str, ...]) -> str:
    """The environment variable behind a pydantic error location: ``('gpu','warmup','size')`` -> name."""
    parts = [str(part) for part in location if not isinstance(part, int)]
    return ENV_PREFIX + ENV_DELIMITER.join(parts).upper() if parts else ENV_PREFIX + "*"


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings from the environment (plus keyword overrides).

    Raises:
        SettingsError: naming each invalid variable and why.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(err["loc"], err["msg"], err.get("ctx", {}).get("error")) for err in exc.errors())
        raise SettingsError(f"invalid gpufleet settings: {problems}") from None
    except SourceError as exc:
        # Raised while reading the environment, before validation: the cause says which value and why.
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise SettingsError(f"invalid gpufleet settings: {exc}{cause}") from None


def _problem(location: tuple[int | str, ...], message: str, error: object) -> str:
    """One validation error for a person: the variable, then what is wrong (a rule names its own variables)."""
    if isinstance(error, SettingRuleError):
        return error.naming_variables(location)
    return f"{env_name(location)}: {message}"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call ``get_settings.cache_clear()`` after changing env."""
    return load_settings()


def redact_url(url: str) -> str:
    """A broker or backend URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in credentials else user}@{host}"
