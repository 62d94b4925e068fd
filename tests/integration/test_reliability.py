"""What GPU serving needs from Celery, checked on real processes: answers while busy, hard limits, a killed
child's job requeued, readiness before consuming, the OOM path, the broker going down and coming back."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import redis as redis_client

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.errors import BrokerUnavailableError
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.launch import gpufleet_command
from gpufleet.workers.tools.local_redis import LocalRedis, free_port
from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"


def pool_child_pid(worker: RunningWorker) -> int:
    return int(worker.client.status("gpu_status")[worker.name]["pid"])


def test_control_answers_while_a_job_runs(worker: RunningWorker) -> None:
    busy = worker.send("fleet.diag.sleep", kwargs={"seconds": 4}, queue=worker.direct_queue)
    deadline = time.monotonic() + 10
    while busy.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy.state == "STARTED"
    started = time.monotonic()
    pong = worker.client.app.control.ping(destination=[worker.name], timeout=2.0)
    status = worker.client.status("gpu_status", timeout_s=2.0)
    assert time.monotonic() - started < 3.0
    assert pong and worker.name in pong[0]
    assert status[worker.name]["ready"] is True
    assert busy.get(timeout=30)["slept_s"] >= 4


def test_hard_time_limit_kills_the_job_and_the_worker_recovers(worker_factory: WorkerFactory) -> None:
    worker = worker_factory()
    before = pool_child_pid(worker)
    # Celery arms the hard timer from the soft one, so both are given, soft first; the job ignores the soft one.
    stuck = worker.send(
        "fleet.diag.sleep", kwargs={"seconds": 60, "uninterruptible": True}, soft_time_limit=1, time_limit=2
    )
    with pytest.raises(Exception, match=r"TimeLimitExceeded|time limit") as raised:
        stuck.get(timeout=30)
    assert "TimeLimitExceeded" in type(raised.value).__name__ or "limit" in str(raised.value)
    ok = worker.client.embed(EMBED, ["after the kill"]).get(timeout=120)
    assert ok["dim"] == 384
    assert pool_child_pid(worker) != before, "the hard limit replaces the pool child"


def test_soft_time_limit_gives_a_clear_error(worker: RunningWorker) -> None:
    slow = worker.send("fleet.diag.sleep", kwargs={"seconds": 30}, soft_time_limit=1, time_limit=20)
    with pytest.raises(Exception, match="soft time limit"):
        slow.get(timeout=30)


def test_job_of_a_killed_child_is_requeued_and_completes(worker_factory: WorkerFactory) -> None:
    worker = worker_factory()
    job = worker.send("fleet.diag.sleep", kwargs={"seconds": 3})
    deadline = time.monotonic() + 10
    while job.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pool_child_pid(worker), signal.SIGKILL)
    assert job.get(timeout=120)["slept_s"] >= 3


def test_no_job_is_consumed_before_warm_up_ends(worker_factory: WorkerFactory) -> None:
    worker = worker_factory({"GPUFLEET_FAULTS": "slow:warmup:20"}, wait=False)
    enqueued_at = time.time()
    # Straight to the type queue: the router would (rightly) wait for a heartbeat, and this checks the worker.
    job = worker.client.embed(EMBED, ["sent before the worker was warm"], queue="cpu")
    # Ask until the worker's parent answers (it may take seconds to start on a loaded machine); the warm-up is
    # held 20 s longer than usual, so an answer within 15 s comes from a worker that is still warming.
    names: set[str] = set()
    deadline = time.monotonic() + 15
    while not names and time.monotonic() < deadline:
        queues = worker.client.app.control.inspect(destination=[worker.name], timeout=1.0).active_queues() or {}
        names = {queue["name"] for queue in queues.get(worker.name, [])}
    assert names and "cpu" not in names, f"consuming {names} while warming"
    assert not job.ready()
    result = job.get(timeout=180)
    ready_at = worker.client.status("gpu_status")[worker.name]["ready_at"]
    job_started_at = enqueued_at + result["timings"]["queue_wait_s"]
    assert ready_at is not None
    assert job_started_at >= ready_at - 0.05, "the job started before warm-up had ended"


def test_oom_evicts_and_retries_once(worker_factory: WorkerFactory) -> None:
    worker = worker_factory({"GPUFLEET_FAULTS": f"oom:infer:{CHAT}:1"})
    worker.client.embed(EMBED, ["resident before the OOM"]).get(timeout=120)
    result = worker.client.generate(CHAT, prompt="after an OOM", max_new_tokens=4).get(timeout=120)
    assert result["completion_tokens"] >= 1
    cache = worker.client.status("cache_status")[worker.name]["stats"]
    assert cache["evictions"] >= 1, "the OOM path evicts unpinned models before retrying"


def test_repeated_oom_never_strands_the_job_on_a_gpu_type_queue_nobody_consumes(worker_factory: WorkerFactory) -> None:
    # The plan's next type is T4, but no T4 worker is live: the job fails clearly instead of waiting on gpu.t4.
    worker = worker_factory({"GPUFLEET_FAULTS": f"oom:load:{CHAT}:9", "GPUFLEET_FLEET__GPU_TYPES": "cpu,T4"})
    job = worker.send("fleet.generate", kwargs={"model": CHAT, "prompt": "x", "max_new_tokens": 2})
    with pytest.raises(Exception, match=f"no live worker other than {worker.name} with more memory") as raised:
        job.get(timeout=120)
    assert type(raised.value).__name__ == "CapacityError"
    broker = redis_client.Redis.from_url(worker.env["GPUFLEET_BROKER_URL"])
    assert broker.llen("gpu.t4") == 0, "nothing was sent to a queue no live worker consumes"


def test_oom_with_no_fallback_fails_clearly(worker_factory: WorkerFactory) -> None:
    worker = worker_factory({"GPUFLEET_FAULTS": f"oom:load:{CHAT}:9"})
    job = worker.send("fleet.generate", kwargs={"model": CHAT, "prompt": "x", "max_new_tokens": 2})
    with pytest.raises(Exception, match="quantized variant") as raised:
        job.get(timeout=120)
    assert type(raised.value).__name__ == "CapacityError"
    assert worker.client.embed(EMBED, ["still serving"]).get(timeout=120)["dim"] == 384


def test_enqueue_with_the_broker_down_fails_fast() -> None:
    port = free_port()
    settings = load_settings(
        broker_url=f"redis://127.0.0.1:{port}/0",
        result_backend=f"redis://127.0.0.1:{port}/1",
        fleet={"gpu_types": ("cpu",)},
        broker={"publish_max_retries": 1, "publish_retry_interval_s": 0.1, "connect_timeout_s": 0.5},
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="GPUFLEET_BROKER_URL"):  # names both settings
        FleetClient(settings=settings).embed(EMBED, ["nobody listens"])
    assert time.monotonic() - started < 15


def test_queued_jobs_survive_a_redis_restart(
    tmp_path_factory: pytest.TempPathFactory, worker_factory: WorkerFactory, model_root: object
) -> None:
    """Append-only Redis: jobs enqueued before a restart are served after it (nothing lost)."""
    del model_root
    server = LocalRedis(tmp_path_factory.mktemp("redis-restart")).start()
    try:
        settings = load_settings(broker_url=server.url(0), result_backend=server.url(1), fleet={"gpu_types": ("cpu",)})
        client = FleetClient(settings=settings)
        # No worker is live yet, so the router would refuse them: straight to the CPU type queue.
        jobs = [client.embed(EMBED, [f"before restart {i}"], queue="cpu") for i in range(3)]
        time.sleep(1.2)  # appendfsync everysec
        server.restart()
        worker = _worker_on(worker_factory, server)
        answers = [job.get(timeout=180) for job in jobs]
        assert [answer["dim"] for answer in answers] == [384, 384, 384]
        assert {answer["worker"] for answer in answers} == {worker.name}, "answered by the worker started after"
    finally:
        server.stop()


def _worker_on(worker_factory: WorkerFactory, server: LocalRedis) -> RunningWorker:
    return worker_factory({"GPUFLEET_BROKER_URL": server.url(0), "GPUFLEET_RESULT_BACKEND": server.url(1)})


def test_a_poison_job_is_failed_after_max_deliveries(worker_factory: WorkerFactory) -> None:
    """A job that kills its process every time is requeued (acks_late + reject_on_worker_lost), counted, and
    failed once it exceeds GPUFLEET_JOBS__MAX_DELIVERIES, instead of killing workers forever."""
    worker = worker_factory({"GPUFLEET_FAULTS": f"crash:infer:{CHAT}:99", "GPUFLEET_JOBS__MAX_DELIVERIES": "2"})
    job = worker.send("fleet.generate", kwargs={"model": CHAT, "prompt": "poison", "max_new_tokens": 2})
    with pytest.raises(Exception, match="delivered 3 times") as raised:
        job.get(timeout=180)
    assert type(raised.value).__name__ == "JobError"
    assert worker.client.embed(EMBED, ["the worker survived the poison job"]).get(timeout=120)["dim"] == 384


def test_production_worker_serves_no_test_hooks_and_expires_idle_models(worker_factory: WorkerFactory) -> None:
    """Diagnostics off (the default): fleet.diag.* is refused clearly; an idle model leaves after its TTL."""
    worker = worker_factory({"GPUFLEET_DIAGNOSTICS": "false", "GPUFLEET_GPU__MEMORY_POOL__IDLE_TTL_S": "1"})
    sleep = worker.send("fleet.diag.sleep", kwargs={"seconds": 1}, queue=worker.direct_queue)
    with pytest.raises(Exception, match="GPUFLEET_DIAGNOSTICS=true") as raised:
        sleep.get(timeout=60)
    assert type(raised.value).__name__ == "InvalidRequestError"
    worker.client.embed(EMBED, ["loaded, then left idle"]).get(timeout=120)
    deadline = time.monotonic() + 10
    loaded: list[object] = [EMBED]
    while loaded and time.monotonic() < deadline:
        time.sleep(0.25)
        loaded = worker.client.status("models_status")[worker.name]["loaded"]
    assert loaded == [], "the idle model was evicted within a few seconds of its 1 s TTL"
    assert worker.client.status("cache_status")[worker.name]["stats"]["expirations"] >= 1


def test_a_worker_refuses_fault_injection_without_diagnostics() -> None:
    env = {**os.environ, "GPUFLEET_FAULTS": f"crash:infer:{CHAT}:1", "GPUFLEET_DIAGNOSTICS": "false"}
    result = subprocess.run(
        [*gpufleet_command(), "worker", "--cpu"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "GPUFLEET_DIAGNOSTICS=true" in result.stderr + result.stdout
