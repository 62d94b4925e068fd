"""What the static layer contracts cannot see: the worker's parent process imports no torch at run time.

The layer rules themselves (gpu never imports Celery, tasks or workers; gpu.plan and tasks never import torch,
transformers, NVML, safetensors or tokenizers; workers over tasks over gpu) are import-linter contracts in
pyproject.toml, checked by ``lint-imports`` in scripts/test.sh. Those contracts see every import, lazy ones
included; workers legitimately imports torch inside functions that run only in the pool child. Whether the
parent stays free of torch therefore depends on which functions run, and only running them shows it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "pynvml", "safetensors", "tokenizers")

PARENT = textwrap.dedent(
    """
    import json, sys
    from gpufleet.tasks.app import create_app
    from gpufleet.tasks.settings import load_settings
    import gpufleet.workers.main, gpufleet.workers.parent.control, gpufleet.workers.child.process, gpufleet.workers.cli
    import gpufleet.workers.tools.demo_models
    from gpufleet.workers.child.jobs import register_tasks
    settings = load_settings()
    register_tasks(create_app(settings), settings)
    # The CLI's planning path runs in the parent too (gpufleet plan, the router's checks).
    assert gpufleet.workers.cli.main(["plan", "meta-llama/Llama-3.1-8B-Instruct", "--json"]) == 0
    print(json.dumps(sorted({".".join(name.split(".")[:2]) for name in sys.modules})))
    """
)


def test_worker_parent_imports_no_heavy_libraries() -> None:
    """Registering the tasks, the control commands, the CLI and planning leave torch and friends unimported."""
    result = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert {
        "celery",
        "gpufleet.tasks",
        "gpufleet.workers",
        "gpufleet.gpu",
    } <= imported  # the probe really ran the parent's code
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
