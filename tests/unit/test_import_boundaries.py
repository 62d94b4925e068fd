"""The layers point one way: tasks and gpu planning import without torch, transformers or pynvml;
gpu never imports Celery; the worker's parent process never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(blocked: set[str], body: str) -> subprocess.CompletedProcess[str]:
    code = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_tasks_and_planning_import_without_torch_transformers_pynvml() -> None:
    result = run_blocked(
        {"torch", "transformers", "pynvml", "safetensors", "tokenizers"},
        """
        import tasks.app, tasks.client, tasks.contracts, tasks.routing, tasks.settings, tasks.names
        import gpu.plan.catalog, gpu.plan.specs, gpu.plan.estimate, gpu.plan.selection, gpu.repository, gpu.config
        from tasks.routing import queue_for_model
        from tasks.settings import load_settings
        print(queue_for_model("meta-llama/Llama-3.1-8B-Instruct", load_settings()))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("gpu.")


def test_gpu_package_never_imports_celery() -> None:
    result = run_blocked(
        {"celery", "kombu", "tasks", "workers"},
        """
        import pkgutil, importlib, gpu
        for module in pkgutil.iter_modules(gpu.__path__):
            importlib.import_module("gpu." + module.name)
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr


def test_worker_parent_imports_no_torch() -> None:
    """Everything the worker's parent imports before forking the pool child is free of torch."""
    result = run_blocked(
        {"torch", "transformers"},
        """
        from tasks.app import create_app
        from tasks.settings import load_settings
        import workers.main, workers.control, workers.process
        from workers.jobs import register_tasks
        settings = load_settings()
        register_tasks(create_app(settings), settings)
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
