"""The same jobs over the other broker Celery users run: RabbitMQ (results in Redis)."""

from __future__ import annotations

import socket

import pytest

from gpufleet.tasks.streams import StreamDelta
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.integration.conftest import WorkerFactory

pytestmark = pytest.mark.integration

RABBITMQ = ("127.0.0.1", 5672)
EMBED = "sentence-transformers/all-MiniLM-L6-v2"


def rabbitmq_up() -> bool:
    try:
        with socket.create_connection(RABBITMQ, timeout=1.0):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_embed_and_generate_over_rabbitmq(worker_factory: WorkerFactory, redis_server: LocalRedis) -> None:
    vhost_queue = "amqp://guest:guest@127.0.0.1:5672//"
    worker = worker_factory({"GPUFLEET_BROKER_URL": vhost_queue, "GPUFLEET_RESULT_BACKEND": redis_server.url(60)})
    result = worker.client.embed(EMBED, ["over amqp"]).get(timeout=120)
    assert result["dim"] == 384 and result["worker"] == worker.name
    text = worker.client.generate("gpufleet/tiny-chat", prompt="amqp", max_new_tokens=3).get(timeout=120)
    assert 1 <= text["completion_tokens"] <= 3
    # Streaming: the broker carries the job, the result backend's Redis its token stream.
    *deltas, final = worker.client.generate_stream("gpufleet/tiny-chat", prompt="amqp", max_new_tokens=12)
    assert isinstance(final, dict) and final["completion_tokens"] == 12
    assert "".join(d.text for d in deltas if isinstance(d, StreamDelta)) == final["text"]
    status = worker.client.status("gpu_status")
    assert status[worker.name]["ready"] is True
