"""The FastAPI application behind ``gpufleet api``, and the uvicorn server that runs it.

Every endpoint reads one snapshot of the fleet registry (through the registry's short-lived cache, so a page
that refreshes every two seconds and a Prometheus scrape cost Redis one read per ``GPUFLEET_FLEET__REGISTRY_CACHE_S``)
and answers from :mod:`gpufleet.tasks.api.views` or :mod:`gpufleet.tasks.api.metrics`. When the registry cannot be read,
every endpoint answers 503 with the registry's own message (what failed and what to do), ``/healthz`` included: it
reports the API's ability to show the fleet, which is nothing without Redis.

With ``GPUFLEET_API__TOKEN`` set, every endpoint but ``/healthz``, the page itself and the API's description
(``/openapi.json``, ``/docs``: the contract, which holds no fleet data) requires ``Authorization: Bearer <token>``;
the page holds no data and asks for the token in the browser (see
``static/dashboard.html``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpufleet.tasks.api import metrics, views
from gpufleet.tasks.errors import FleetError
from gpufleet.tasks.fleet import FleetRegistry, FleetSnapshot
from gpufleet.tasks.settings import Settings, redact_url

if TYPE_CHECKING:
    from gpufleet.tasks.api.openai.routes import OpenAIFrontDoor

SnapshotSource = Callable[[], FleetSnapshot]
"""Reads the live fleet; raises a :class:`FleetError` (e.g. ``BrokerUnavailableError``) when it cannot."""

_bearer = HTTPBearer(auto_error=False, description="the value of GPUFLEET_API__TOKEN")


def dashboard_html() -> str:
    """The dashboard page, shipped as package data."""
    return resources.files("gpufleet.tasks.api").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def _token_check(token: str) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    expected = token.encode()

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "this endpoint needs a bearer token: send the header `Authorization: Bearer <token>` with the "
                "token the API runs with (GPUFLEET_API__TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Constant time, so the token cannot be guessed byte by byte from response times.
        if not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the bearer token does not match the one the API runs with (GPUFLEET_API__TOKEN); check the "
                "token you were given",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    return check


def create_app(
    snapshots: SnapshotSource,
    *,
    registry: str,
    token: str | None = None,
    front_door: OpenAIFrontDoor | None = None,
) -> FastAPI:
    """The API over a source of fleet snapshots.

    Args:
        snapshots: returns the live fleet; raises a :class:`FleetError` when the registry cannot be read.
        registry: where the snapshots come from, for ``/healthz`` (a URL without its password).
        token: the bearer token every data endpoint requires; None for no authentication.
        front_door: the OpenAI-compatible ``/v1`` endpoints (their own keys: see
            :mod:`gpufleet.tasks.api.openai`); None to serve none.

    Returns:
        The FastAPI application (serve it with uvicorn, or test it with ``fastapi.testclient.TestClient``).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if front_door is not None:
            await front_door.aclose()

    app = FastAPI(
        title="gpufleet",
        summary="The live fleet: workers, GPUs, models, caches and Prometheus metrics, from the fleet registry; "
        "OpenAI-compatible /v1 endpoints served by fleet jobs.",
        version="1",
        lifespan=lifespan,
    )
    protected = [Depends(_token_check(token))] if token else []
    router = APIRouter(dependencies=protected, responses={503: {"description": "the fleet registry is unreachable"}})
    if token:
        router.responses[401] = {"description": "missing or wrong bearer token"}

    rendered: dict[str, tuple[FleetSnapshot, bytes]] = {}

    def read() -> FleetSnapshot:
        try:
            return snapshots()
        except FleetError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc

    # Plain `def` endpoints: FastAPI runs them in its thread pool, so a slow Redis never blocks the event loop.
    @router.get("/gpu/status", tags=["fleet"])
    def gpu_status() -> views.GpuStatus:
        """Devices, memory and readiness of every live worker, fleet-wide and per GPU type."""
        return views.gpu_status(read())

    @router.get("/models/status", tags=["fleet"])
    def models_status() -> views.ModelsStatus:
        """Which models are resident or parked where, fleet-wide and per worker."""
        return views.models_status(read())

    @router.get("/cache/status", tags=["fleet"])
    def cache_status() -> views.CacheStatus:
        """Model-cache hits, misses, evictions and held bytes, fleet-wide and per worker."""
        return views.cache_status(read())

    @router.get("/workers", tags=["fleet"])
    def workers() -> views.WorkersList:
        """Every live worker's heartbeat record, with its cache hit rate (what the dashboard draws)."""
        return views.workers_list(read())

    @router.get(
        "/metrics",
        tags=["monitoring"],
        response_class=Response,
        responses={200: {"content": {metrics.CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    )
    def prometheus_metrics() -> Response:
        """The live fleet in Prometheus' text exposition format (scrape it; docs/prometheus.yml)."""
        snapshot = read()
        cached = rendered.get("last")
        # Rendering costs ~50 us a sample (~70 ms for 50 workers): scrapers that arrive within one registry-cache
        # period get the same snapshot object, so they share one rendering. A race only renders twice.
        if cached is None or cached[0] is not snapshot:
            cached = rendered["last"] = (snapshot, metrics.render_metrics(snapshot))
        usage = front_door.usage.render() if front_door is not None else b""
        return Response(cached[1] + usage, media_type=metrics.CONTENT_TYPE_LATEST)

    app.include_router(router)
    if front_door is not None:
        app.include_router(front_door.router())

    @app.get(
        "/healthz",
        tags=["monitoring"],
        response_model=views.Health,
        responses={503: {"model": views.Health, "description": "the fleet registry is unreachable"}},
    )
    def healthz() -> views.Health | JSONResponse:
        """Whether the API can read the fleet registry: 200 with the number of live workers, else 503. No auth."""
        try:
            snapshot = snapshots()
        except FleetError as exc:
            down = views.Health(status="unavailable", registry=registry, detail=str(exc))
            return JSONResponse(down.model_dump(mode="json"), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        return views.health(snapshot, registry)

    page = dashboard_html()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        # The page carries no fleet data (it fetches /workers with the token), so it is served without one.
        return HTMLResponse(page)

    return app


def _unconfigured() -> FleetSnapshot:
    raise FleetError(
        "the fleet registry lives in Redis, but neither GPUFLEET_BROKER_URL nor GPUFLEET_RESULT_BACKEND is a "
        "redis:// URL; point one of them at the fleet's Redis"
    )


def app_from_settings(settings: Settings) -> FastAPI:
    """The API over the registry of ``settings`` (the broker's Redis, or the result backend's).

    Returns:
        The application; with no Redis configured it still starts, and every endpoint answers 503 saying so.
    """
    registry = FleetRegistry.from_settings(settings)
    token = settings.api.token.get_secret_value() if settings.api.token is not None else None
    snapshots: SnapshotSource = registry.snapshot if registry is not None else _unconfigured
    front_door = front_door_from_settings(settings, snapshots)
    where = redact_url(registry.url) if registry is not None else "(none)"
    return create_app(snapshots, registry=where, token=token, front_door=front_door)


def front_door_from_settings(settings: Settings, snapshots: SnapshotSource) -> OpenAIFrontDoor:
    """The ``/v1`` endpoints over the fleet of ``settings``: its producer, router, keys and limits.

    Raises:
        SettingsError: the keys (``GPUFLEET_API__KEYS``, ``GPUFLEET_API__KEYS_FILE``) are invalid.
    """
    from gpufleet.tasks.api.openai.coalescing import EmbedCoalescer
    from gpufleet.tasks.api.openai.gateway import JobGateway
    from gpufleet.tasks.api.openai.keys import KeyRing
    from gpufleet.tasks.api.openai.routes import OpenAIFrontDoor
    from gpufleet.tasks.client import FleetClient
    from gpufleet.tasks.routing import LiveRouter

    keys = KeyRing.from_settings(settings)
    gateway: JobGateway | None = None
    coalescer: EmbedCoalescer | None = None
    unavailable = ""
    if settings.result_backend.startswith(("redis://", "rediss://", "unix://")):
        client = FleetClient(settings=settings)
        gateway = JobGateway(
            client,
            request_timeout_s=settings.api.request_timeout_s,
            max_pending_per_model=settings.api.max_pending_per_model,
        )
        if settings.api.coalesce_embeddings:
            router = client.router
            coalescer = EmbedCoalescer(gateway, fleet=router.fleet if isinstance(router, LiveRouter) else None)
    else:
        unavailable = (
            f"the /v1 endpoints read results and token streams from a Redis result backend, and "
            f"GPUFLEET_RESULT_BACKEND is {redact_url(settings.result_backend)}; point it at the fleet's Redis"
        )
    return OpenAIFrontDoor(
        gateway,
        keys,
        snapshots=snapshots,
        settings=settings,
        max_body_bytes=settings.api.max_body_bytes,
        default_max_tokens=settings.api.default_max_tokens,
        unavailable=unavailable,
        coalescer=coalescer,
    )


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn until interrupted (``gpufleet api``).

    Args:
        settings: gpufleet settings (the registry, the token, the default host and port).
        host: address to listen on; default ``GPUFLEET_API__HOST``.
        port: port to listen on; default ``GPUFLEET_API__PORT``.
    """
    import uvicorn

    uvicorn.run(
        app_from_settings(settings),
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level=settings.worker.loglevel.lower(),
        # Behind a proxy the client address is the proxy's; nothing here depends on it, so do not trust headers.
        proxy_headers=False,
    )
