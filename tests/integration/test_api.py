"""`gpufleet api` started as the README says, read with a real HTTP client (httpx) and a real headless browser
(Debian's chromium), over two real CPU workers whose heartbeats fill the fleet registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.workers.tools.launch import gpufleet_command, spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import free_port
from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

TOKEN = "api-integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@dataclass
class Api:
    base: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, *, auth: bool = True) -> httpx.Response:
        return httpx.get(self.base + path, headers=AUTH if auth else {}, timeout=10.0)


def start_api(env: dict[str, str], log_path: Path) -> Api:
    """`gpufleet api --host 127.0.0.1 --port N`, exactly as the README runs it; waits until it answers."""
    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [*gpufleet_command(), "api", "--host", "127.0.0.1", "--port", str(port)],
            env={**base_env, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = Api(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gpufleet api exited with {process.returncode}:\n{tail(log_path)}")
        try:
            api.get("/healthz", auth=False)
            return api
        except httpx.TransportError:
            time.sleep(0.2)
    stop_process(process)
    pytest.fail(f"gpufleet api did not answer within 60 s:\n{tail(log_path)}")


def wait_for(what: str, check: Callable[[], Any], api: Api, timeout_s: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (heartbeats arrive every couple of seconds)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout_s:g} s; last seen: {last!r}\napi log:\n{tail(api.log_path)}")


@dataclass
class Fleet:
    api: Api
    first: RunningWorker
    second: str  # the second worker's name (same broker and registry as the first)
    second_process: subprocess.Popen[bytes]

    @property
    def names(self) -> set[str]:
        return {self.first.name, self.second}


@pytest.fixture(scope="module")
def fleet(module_worker_factory: WorkerFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two CPU workers on one registry, each holding a model it loaded for a real job, and the API over them."""
    logs = tmp_path_factory.mktemp("api")
    first = module_worker_factory(
        env={"GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S": "0.5", "GPUFLEET_FLEET__HEARTBEAT_TTL_S": "5"}
    )
    second_name = first.name.replace("@", "-b@")
    second_log = logs / "second-worker.log"
    second_process = spawn_worker(first.env, second_log, name=second_name)
    api = start_api({**first.env, "GPUFLEET_API__TOKEN": TOKEN}, logs / "api.log")
    try:
        wait_until_ready(first.client, second_name, second_process, second_log)
        # Each worker's direct queue, so each job lands on the worker named (the router may pick either).
        first.client.embed(EMBED, ["warm the cache"], queue=f"cpu.{first.name}").get(timeout=180)
        first.client.embed(EMBED, ["a cache hit"], queue=f"cpu.{first.name}").get(timeout=60)
        first.client.load_model(CHAT, queue=f"cpu.{second_name}").get(timeout=180)
        yield Fleet(api, first, second_name, second_process)
    finally:
        stop_process(api.process)
        stop_process(second_process)


def resident(fleet: Fleet) -> dict[str, set[str]]:
    """Worker name -> the models it reports resident, from GET /models/status."""
    workers = fleet.api.get("/models/status").json()["workers"]
    return {name: {m["model"] for m in data["resident"]} for name, data in workers.items()}


def test_workers_lists_each_live_worker(fleet: Fleet) -> None:
    def both_ready() -> list[dict[str, Any]] | None:
        listed = fleet.api.get("/workers").json()["workers"]
        return listed if {w["name"] for w in listed if w["ready"]} == fleet.names else None

    for worker in wait_for("both workers listed and ready", both_ready, fleet.api):
        assert worker["gpu_type"] == "cpu"
        assert worker["direct_queue"] == f"cpu.{worker['name']}"
        assert 0 < worker["memory_budget_bytes"] <= worker["memory_total_bytes"]


def test_models_and_cache_follow_the_jobs(fleet: Fleet) -> None:
    expected = {fleet.first.name: {EMBED}, fleet.second: {CHAT}}
    wait_for("each worker's model in /models/status", lambda: resident(fleet) == expected, fleet.api)
    models = {m["model"]: m for m in fleet.api.get("/models/status").json()["models"]}
    assert models[EMBED]["resident_on"] == [fleet.first.name]
    assert models[EMBED]["resident_bytes"] > 0
    cache = fleet.api.get("/cache/status").json()
    first = cache["workers"][fleet.first.name]
    assert (first["hits"], first["misses"]) >= (1, 1)  # the first embed loaded, the second found it resident
    assert cache["fleet"]["resident_models"] == 2
    gpu = fleet.api.get("/gpu/status").json()
    assert gpu["fleet"]["workers"] == 2
    assert gpu["fleet"]["by_gpu_type"]["cpu"]["ready"] == 2
    assert gpu["workers"][fleet.first.name]["memory"]["used_bytes"] > 0


def test_metrics_expose_the_fleet(fleet: Fleet) -> None:
    def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        answer = fleet.api.get("/metrics")
        assert answer.status_code == 200
        found = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }
        jobs = ("gpufleet_jobs_total", _labels(fleet.first.name, task="fleet.embed", outcome="ok"))
        return found if found.get(jobs, 0) >= 2 else None

    found = wait_for("two embed jobs counted in /metrics", scraped, fleet.api)
    first = fleet.first.name
    assert found["gpufleet_resident_model_bytes", _labels(first, model=EMBED)] > 0
    assert found["gpufleet_resident_model_bytes", _labels(fleet.second, model=CHAT)] > 0
    assert found["gpufleet_device_memory_budget_bytes", _labels(first)] > 0
    assert found["gpufleet_cache_hits_total", _labels(first)] >= 1
    assert found["gpufleet_model_load_seconds_count", _labels(first)] >= 1
    assert found["gpufleet_queue_backlog", _labels(first, queue=f"cpu.{first}")] == 0
    assert found["gpufleet_worker_ready", _labels(fleet.second)] == 1


def _labels(worker: str, **extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"worker": worker, "gpu_type": "cpu", **extra}.items())


def test_the_token_is_required_but_healthz_stays_open(fleet: Fleet) -> None:
    for path in ("/workers", "/gpu/status", "/metrics"):
        refused = fleet.api.get(path, auth=False)
        assert refused.status_code == 401, path
        assert "GPUFLEET_API__TOKEN" in refused.json()["detail"]
    health = fleet.api.get("/healthz", auth=False)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["workers"] >= 2


def test_registry_down_answers_503(tmp_path: Path) -> None:
    dead = f"redis://:pw@127.0.0.1:{free_port()}"
    env = {"GPUFLEET_BROKER_URL": dead + "/0", "GPUFLEET_RESULT_BACKEND": dead + "/1"}
    api = start_api({**env, "GPUFLEET_BROKER__CONNECT_TIMEOUT_S": "0.5"}, tmp_path / "api.log")
    try:
        health = api.get("/healthz", auth=False)
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert "did not answer" in health.json()["detail"]
        workers = api.get("/workers")
        assert workers.status_code == 503
        assert "start Redis" in workers.json()["detail"]
    finally:
        stop_process(api.process)


# --- the page, in a real browser ----------------------------------------------------------------------------


class _Cards(HTMLParser):
    """Worker cards (``section[data-worker]``) and model rows (``li[data-model][data-worker]``) of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: set[str] = set()
        self.models: set[tuple[str, str]] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        worker = found.get("data-worker")
        if tag == "section" and worker:
            self.workers.add(worker)
        model = found.get("data-model")
        if tag == "li" and worker and model:
            self.models.add((worker, model))


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip(
            "Debian's chromium is not installed, so the page is not checked in a browser: `apt-get install "
            "chromium` (scripts/bootstrap.sh installs it where apt can)"
        )
    return binary


def dump_dom(binary: str, url: str, profile: Path) -> str:
    # The page draws from /workers by JS: the virtual-time budget lets its first fetches finish before the dump.
    result = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_page_shows_each_live_worker_and_its_models(fleet: Fleet, tmp_path: Path) -> None:
    binary = chromium()
    expected_models = {(fleet.first.name, EMBED), (fleet.second, CHAT)}
    wait_for("both models resident", lambda: resident(fleet) == {w: {m} for w, m in expected_models}, fleet.api)
    live = {w["name"]: {m["model"] for m in w["resident"]} for w in fleet.api.get("/workers").json()["workers"]}

    def page() -> _Cards | None:
        # The token travels in the fragment, as the README says to open the page; it never reaches the server.
        cards = _Cards()
        cards.feed(dump_dom(binary, f"{fleet.api.base}/#token={TOKEN}", tmp_path / "profile"))
        return cards if cards.workers == set(live) else None

    cards = wait_for("a card per live worker in the page", page, fleet.api, timeout_s=120)
    assert cards.models >= {(worker, model) for worker, models in live.items() for model in models}
    assert cards.models >= expected_models


def test_the_page_asks_for_the_token_without_one(fleet: Fleet, tmp_path: Path) -> None:
    dom = dump_dom(chromium(), fleet.api.base + "/", tmp_path / "profile")
    cards = _Cards()
    cards.feed(dom)
    assert cards.workers == set()
    assert "This API needs its token." in dom


def test_a_stopped_worker_leaves_the_fleet(fleet: Fleet) -> None:
    stop_process(fleet.second_process)  # graceful: the worker removes its own record
    wait_for(
        "the stopped worker gone from /workers",
        lambda: {w["name"] for w in fleet.api.get("/workers").json()["workers"]} == {fleet.first.name},
        fleet.api,
        timeout_s=30,
    )
    assert fleet.second not in fleet.api.get("/gpu/status").json()["workers"]
