"""The fleet entry queue's forwarder in the worker's parent: which jobs it takes, and that routing them there never
imports torch (the end-to-end path, a plain Celery client through real workers: tests/integration/test_rerouting.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from gpufleet.workers.parent.entry import came_from_entry


class Request:
    """What the forwarder reads of a Celery request."""

    def __init__(self, routing_key: str | None) -> None:
        self.delivery_info: dict[str, Any] = {} if routing_key is None else {"routing_key": routing_key}


def test_only_jobs_taken_from_the_entry_queue_are_forwarded() -> None:
    assert came_from_entry(Request("fleet"))
    assert not came_from_entry(Request("cpu")) and not came_from_entry(Request("cpu.cpu-0@box"))
    assert not came_from_entry(Request(None)), "a request without delivery info is this worker's to run"


PROBE = textwrap.dedent(
    """
    import json, sys
    from gpufleet.tasks.app import create_app
    from gpufleet.tasks.settings import load_settings
    from gpufleet.workers.parent.entry import EntryForwarder

    class Backend:
        def mark_as_failure(self, task_id, exc, **_):
            self.refused = f"{type(exc).__name__}: {exc}"

    class Task:
        backend = Backend()

    class Request:
        id, name, args = "job-1", "fleet.embed", ()
        kwargs = {"model": "org/odd", "texts": ["x"]}
        delivery_info = {"routing_key": "fleet"}
        task, _context = Task(), None
        def send_event(self, *_, **__): pass
        def acknowledge(self): self.acked = True

    settings = load_settings(model_root=sys.argv[1], fleet={"live_routing": False})
    request = Request()
    handled = EntryForwarder(create_app(settings), settings).handle(request)
    print(json.dumps({"handled": handled, "acked": getattr(request, "acked", False),
                      "refused": getattr(Task.backend, "refused", None), "torch": "torch" in sys.modules}))
    """
)


def test_routing_an_entry_job_never_imports_torch_in_the_parent(tmp_path: Path) -> None:
    """A model_type without a formula and no weight files would be counted on the meta device (torch and
    transformers imported) by a producer that has them; the worker's parent plans as one without them."""
    odd = tmp_path / "org" / "odd"
    odd.mkdir(parents=True)
    config = {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 128}
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["GPTBigCodeForCausalLM"]}))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] is False, "the worker's parent imported torch to route a job"
    assert seen["handled"] and seen["acked"], "refused at once, as a producer without transformers would"
    assert seen["refused"].startswith("RoutingError") and "gpt_bigcode" in seen["refused"], seen["refused"]
